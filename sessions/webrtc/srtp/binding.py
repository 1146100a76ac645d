"""The one place we reach past pylibsrtp's public API into the libsrtp it bundles.

pylibsrtp has no way to read or set a stream's rollover counter (ROC), which a restored
session needs (RFC 3711 §3.3.1). Its bundled libsrtp exports ``srtp_get_stream_roc`` and
``srtp_set_stream_roc``, so we call them with ``ctypes`` on the very shared object pylibsrtp
loaded (``pylibsrtp._binding``), on the ``srtp_t`` a pylibsrtp session keeps in its private
``_srtp``, whose address ``pylibsrtp._binding.ffi`` gives us. Everything private we touch is
named here, and ``tests/webrtc/test_dependencies.py`` checks each of them, so an upgrade of
pylibsrtp that drops one fails that test by name rather than a session at run time.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Final

import pylibsrtp
import pylibsrtp._binding
from pylibsrtp._binding import ffi as _ffi

from sessions.webrtc.srtp.profile import SrtpProfile

__all__ = ["policy", "set_roc", "stream_roc"]


def _symbol(library: ctypes.CDLL, name: str) -> Any:
    try:
        return getattr(library, name)
    except AttributeError:
        raise ImportError(
            f"the libsrtp in pylibsrtp {pylibsrtp.__version__} does not export {name}, which "
            "sessions.webrtc.srtp needs to move rollover counters: pin a pylibsrtp that has it"
        ) from None


# RTLD_NOLOAD: the handle of the copy Python already loaded, or failure; never a second copy
# whose functions would act on the same srtp_t with different global state.
_LIBSRTP: Final = ctypes.CDLL(pylibsrtp._binding.__file__, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
# srtp_err_status_t srtp_set_stream_roc(srtp_t session, uint32_t ssrc, uint32_t roc)
_set_stream_roc: Final = _symbol(_LIBSRTP, "srtp_set_stream_roc")
_set_stream_roc.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32)
_set_stream_roc.restype = ctypes.c_int
# srtp_err_status_t srtp_get_stream_roc(srtp_t session, uint32_t ssrc, uint32_t *roc)
_get_stream_roc: Final = _symbol(_LIBSRTP, "srtp_get_stream_roc")
_get_stream_roc.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))
_get_stream_roc.restype = ctypes.c_int


def _srtp_t(session: Any) -> int:
    """Address of the ``srtp_t`` behind a pylibsrtp session (kept in its ``_srtp``)."""
    return int(_ffi.cast("uintptr_t", session._srtp[0]))


def set_roc(session: Any, ssrc: int, roc: int) -> None:
    """Set the rollover counter of stream ``ssrc`` of a pylibsrtp session.

    libsrtp stores it as pending: the stream's next packet is taken to have index exactly
    ``roc * 2**16 + SEQ``, without the RFC 3711 §3.3.1 estimate. Raises ``RuntimeError`` if
    the session has no such stream (streams from an ``ssrc_any_*`` template exist only from
    their first packet on).
    """
    if _set_stream_roc(_srtp_t(session), ssrc, roc) != 0:
        raise RuntimeError(f"libsrtp has no stream for SSRC {ssrc:#010x}")


def stream_roc(session: Any, ssrc: int) -> int | None:
    """libsrtp's ROC for ``ssrc`` in a pylibsrtp session, ``None`` if it has no such stream."""
    roc = ctypes.c_uint32()
    if _get_stream_roc(_srtp_t(session), ssrc, ctypes.byref(roc)) != 0:
        return None
    return roc.value


def policy(profile: SrtpProfile, master: bytes, ssrc: int | None) -> Any:
    """A pylibsrtp policy for one stream of ``ssrc``, or for any inbound SSRC if ``None``.

    ``master`` is the master key then salt; the profile's two-byte id is pylibsrtp's profile
    constant (RFC 5764 §4.1.2).
    """
    if ssrc is None:
        return pylibsrtp.Policy(
            key=master,
            ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
            srtp_profile=profile.protection_profile_id,
        )
    return pylibsrtp.Policy(
        key=master,
        ssrc_type=pylibsrtp.Policy.SSRC_SPECIFIC,
        ssrc_value=ssrc,
        srtp_profile=profile.protection_profile_id,
    )
