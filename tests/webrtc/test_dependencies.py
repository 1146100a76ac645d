"""What we reach into past pylibsrtp's public API still exists, so a pin bump is safe.

:mod:`sessions.webrtc.srtp.binding` uses private parts of pylibsrtp: its ``_binding`` module
(the cffi ``ffi``, and the shared object's path to reopen with ``ctypes``), the ``srtp_t``
each ``Session`` keeps in ``_srtp``, and two functions of the bundled libsrtp that pylibsrtp
never wraps. Each check below names the symbol it misses. Nothing from ``sessions.webrtc.srtp``
is imported at module level: that import itself fails without these symbols, and the tests
here should say which one rather than fail to collect.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import struct
from pathlib import Path
from typing import Any

import pylibsrtp
import pytest

VERSION = getattr(pylibsrtp, "__version__", "?")
ROC_FUNCTIONS = ("srtp_get_stream_roc", "srtp_set_stream_roc")
SSRC = 0x01020304
MASTER = bytes(range(30))  # AES128_CM_HMAC_SHA1_80: 16-byte key, 14-byte salt


def binding_module() -> Any:
    try:
        return importlib.import_module("pylibsrtp._binding")
    except ImportError as exc:
        pytest.fail(f"pylibsrtp {VERSION} has no private module pylibsrtp._binding: {exc}")


def private(owner: Any, name: str, where: str) -> Any:
    if not hasattr(owner, name):
        pytest.fail(f"pylibsrtp {VERSION} no longer has the private symbol {where}.{name}")
    return getattr(owner, name)


def libsrtp() -> ctypes.CDLL:
    path = private(binding_module(), "__file__", "pylibsrtp._binding")
    if not isinstance(path, str) or not Path(path).is_file():
        pytest.fail(f"pylibsrtp._binding.__file__ is not a shared object's path: {path!r}")
    try:
        # RTLD_NOLOAD, as the binding opens it: the copy already loaded, never a second one.
        return ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
    except OSError as exc:
        pytest.fail(f"pylibsrtp._binding's shared object cannot be reopened with ctypes: {exc}")


def test_the_binding_module_has_a_cffi_ffi() -> None:
    ffi = private(binding_module(), "ffi", "pylibsrtp._binding")
    for method in ("cast", "typeof"):
        if not callable(getattr(ffi, method, None)):
            pytest.fail(f"pylibsrtp._binding.ffi has no usable {method}(): not a cffi FFI")
    # srtp_t is the type the ROC functions take; uintptr_t is what we cast it to.
    for ctype in ("srtp_t", "srtp_t *", "uintptr_t"):
        try:
            ffi.typeof(ctype)
        except Exception as exc:
            pytest.fail(f"pylibsrtp._binding.ffi does not declare {ctype}: {exc}")


@pytest.mark.parametrize("name", ROC_FUNCTIONS)
def test_the_bundled_libsrtp_exports_the_roc_functions(name: str) -> None:
    library = libsrtp()
    try:
        function = getattr(library, name)
    except AttributeError:
        pytest.fail(f"the libsrtp in pylibsrtp {VERSION} does not export {name}")
    assert callable(function), f"{name} is not a function"


def test_a_session_keeps_its_srtp_t_in_srtp() -> None:
    ffi = private(binding_module(), "ffi", "pylibsrtp._binding")
    session = pylibsrtp.Session()
    handle = private(session, "_srtp", "pylibsrtp.Session")
    assert ffi.typeof(handle) is ffi.typeof("srtp_t *"), (
        f"pylibsrtp.Session._srtp is {ffi.typeof(handle)}, no longer an srtp_t *"
    )
    assert int(ffi.cast("uintptr_t", handle[0])) != 0, "pylibsrtp.Session._srtp[0] is NULL"


def test_the_roc_functions_act_on_a_pylibsrtp_session() -> None:
    from sessions.webrtc.srtp import SrtpProfile, binding

    profile = SrtpProfile.AES128_CM_HMAC_SHA1_80
    session = pylibsrtp.Session()
    session.add_stream(binding.policy(profile, MASTER, SSRC))
    assert binding.stream_roc(session, SSRC) == 0
    # libsrtp keeps a set ROC pending until the stream's next packet, then takes it
    binding.set_roc(session, SSRC, 5)
    packet = session.protect(struct.pack("!BBHII", 0x80, 0, 7, 0, SSRC) + b"payload")
    assert binding.stream_roc(session, SSRC) == 5
    # and protected with it: a receiver set alike accepts the packet
    receiver = pylibsrtp.Session()
    receiver.add_stream(binding.policy(profile, MASTER, SSRC))
    binding.set_roc(receiver, SSRC, 5)
    assert receiver.unprotect(packet).endswith(b"payload")
    # no such stream: libsrtp reports it, and we do not crash
    assert binding.stream_roc(session, SSRC + 1) is None
    with pytest.raises(RuntimeError):
        binding.set_roc(session, SSRC + 1, 1)


def test_the_public_api_we_use_is_there() -> None:
    from sessions.webrtc.srtp import SrtpProfile

    # our profile ids are passed as pylibsrtp's profile constants (RFC 5764 §4.1.2)
    policy = pylibsrtp.Policy
    assert (
        SrtpProfile.AES128_CM_HMAC_SHA1_80.protection_profile_id
    ) == policy.SRTP_PROFILE_AES128_CM_SHA1_80
    assert (
        SrtpProfile.AEAD_AES_128_GCM.protection_profile_id
    ) == policy.SRTP_PROFILE_AEAD_AES_128_GCM
    assert isinstance(policy.SSRC_ANY_INBOUND, int)
    assert isinstance(policy.SSRC_SPECIFIC, int)
    for method in ("add_stream", "protect", "unprotect", "unprotect_rtcp"):
        assert callable(getattr(pylibsrtp.Session, method, None)), f"Session.{method} is gone"
    assert issubclass(pylibsrtp.Error, Exception)


def test_a_repeated_index_is_reported_as_a_replay() -> None:
    # SrtpSession.protect_rtp tells a reused index (SrtpIndexError) from a malformed packet
    # (ValueError) by the word "replay" in pylibsrtp's message.
    from sessions.webrtc.srtp import SrtpProfile, binding

    session = pylibsrtp.Session()
    session.add_stream(binding.policy(SrtpProfile.AES128_CM_HMAC_SHA1_80, MASTER, SSRC))
    packet = struct.pack("!BBHII", 0x80, 0, 7, 0, SSRC) + b"payload"
    session.protect(packet)
    with pytest.raises(pylibsrtp.Error, match="replay"):
        session.protect(packet)
