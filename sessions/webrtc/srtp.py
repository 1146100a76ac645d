"""SRTP and SRTCP protection (RFC 3711, RFC 7714) whose whole state is a value.

:class:`SrtpSession` protects what we send and unprotects what the peer sends for one WebRTC
peer. :meth:`SrtpSession.snapshot` returns an :class:`SrtpState`, an immutable value that
serializes with :meth:`SrtpState.to_bytes`; :meth:`SrtpSession.restore` turns it back into a
live session, possibly in another process on another node, that goes on decrypting the same
inbound stream and continuing the same outbound stream. The one property everything below
serves: **no SRTP or SRTCP index is ever protected twice under one key**, even across moves
(RFC 3711 §9.1, RFC 7714 §8.4 and §9.4: a repeated index repeats the keystream, and for GCM
also gives away the authentication key).

How each direction is built, and why:

* **Outbound RTP** goes through libsrtp (pylibsrtp), which is fast. libsrtp tracks the rollover
  counter (ROC) itself but pylibsrtp offers no way to set it, so after a restore we call
  ``srtp_set_stream_roc`` of the very libsrtp pylibsrtp loaded (``ctypes`` on its
  ``_binding`` module, opened with ``RTLD_NOLOAD`` so it cannot be a second copy) on the
  ``srtp_t`` pylibsrtp created (its private ``_srtp``). We mirror libsrtp's index estimate
  (RFC 3711 §3.3.1) in Python so we know every packet's index before libsrtp sees it.
* **Outbound SRTCP** is built here with ``cryptography``: libsrtp numbers SRTCP packets
  1, 2, 3... from its own counter and has no way to start elsewhere, so a restored libsrtp
  would reuse every index the previous owner used. We derive the SRTCP session keys (RFC 3711
  §4.3, RFC 7714 §11) and write E-flag, 31-bit index and tag ourselves (RFC 3711 §3.4 with
  AES-CM and HMAC-SHA1, RFC 7714 §9 with GCM); the tests check it byte for byte against
  libsrtp.
* **Inbound RTP and SRTCP** go through libsrtp. Setting the ROC alone is not enough after a
  restore: libsrtp then takes the first packet's index as exactly ``ROC * 2**16 + SEQ``
  without guessing, so a first packet after a wrap fails, and keeps failing. Instead we
  *prime* the fresh libsrtp receiver: we protect an empty packet at the highest index received
  so far with the peer's key (a throw-away sender, the output never leaves the process) and
  unprotect it, which leaves libsrtp exactly where the old receiver was. Replay windows
  (RFC 3711 §3.3.2) are kept in Python as well and travel in the state, so a packet received
  before the move is still refused after it.

The reservation rule (why a restored session never repeats an index):

1. A snapshot *reserves* outbound indexes: up to ``rtp_reserved`` for RTP (``RTP_RESERVE``
   beyond the highest used) and ``srtcp_reserved`` for SRTCP.
2. A session never protects beyond its *fence*: before its first snapshot it has none; then
   the fence is the reservation of the newest snapshot passed to :meth:`SrtpSession.confirm`,
   or, until one is, that of its first snapshot. :meth:`SrtpSession.protect_rtp` raises
   :class:`SrtpIndexError` rather than cross it.
3. A restored session starts above the restored state's reservation, and its fence is that
   same reservation: it sends nothing until one of its own snapshots is confirmed.

So the owner calls ``confirm(state)`` once ``state`` is durably stored as the session's newest
state, and a restore always uses the newest stored state. Then whatever the old owner sent
after that snapshot (a few packets in flight during a hand-off, or everything up to a crash)
is at or below the reservation, and the new owner starts above it. A second restore of the
same state (the first new owner died before storing its own) is safe too, because that owner
could not send before its own state was stored. An RTP reservation stays well below 2**15 so
the peer's ROC guess (RFC 3711 §3.3.1) survives the jump; the peer sees a gap in sequence
numbers, which RTP tolerates as loss. :attr:`SrtpSession.next_rtp_seq` tells the packetizer
where to continue. Choose the first sequence number of a stream below 2**15 (libwebrtc does):
a snapshot taken before anything was sent reserves that whole range.

Failures caused by what the peer sent raise :class:`SrtpError` (a
:class:`~sessions.webrtc.errors.RemoteInputError`: count and drop). Refusals to protect
raise :class:`SrtpIndexError` (a local condition); malformed outbound packets raise
``ValueError``.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import hmac
import os
import struct
from typing import Any, Final, final

import attrs
import pylibsrtp
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pylibsrtp._binding import ffi as _ffi

from sessions.webrtc.errors import RemoteInputError

__all__ = [
    "RTP_RESERVE",
    "SRTCP_RESERVE",
    "SrtpError",
    "SrtpIndexError",
    "SrtpProfile",
    "SrtpSession",
    "SrtpState",
]

#: Outbound RTP indexes a snapshot reserves beyond the highest one used (the default).
RTP_RESERVE: Final = 2048
#: Outbound SRTCP indexes a snapshot reserves beyond the highest one used (the default).
SRTCP_RESERVE: Final = 1024
# A restored sender jumps ahead by up to a reservation; the peer guesses the ROC right only
# for jumps below 2**15 (RFC 3711 §3.3.1), so leave room for losses and repeated moves.
_MAX_RTP_RESERVE: Final = 1 << 14

_SEQ_MOD: Final = 1 << 16
_HALF: Final = 1 << 15
_MAX_RTP_INDEX: Final = (1 << 48) - 1  # RFC 3711 §3.3.1: 48-bit packet index
_MAX_SRTCP_INDEX: Final = (1 << 31) - 1  # RFC 3711 §3.4: 31-bit SRTCP index
_E_FLAG: Final = 1 << 31
_WINDOW: Final = 128  # libsrtp's replay window; RFC 3711 §3.3.2 asks for at least 64
_WINDOW_MASK: Final = (1 << _WINDOW) - 1
_MAX_RTCP_SOURCES: Final = 16  # SSRCs whose SRTCP replay window we keep
_MAX_DATAGRAM: Final = 1500  # pylibsrtp's buffer; no WebRTC datagram is larger
_RTP_HEADER: Final = struct.Struct("!BBHII")
_RTCP_HEADER: Final = struct.Struct("!BBHI")
_U32: Final = struct.Struct("!I")


class SrtpError(RemoteInputError):
    """An incoming SRTP or SRTCP packet failed authentication, was replayed, or was malformed."""


class SrtpIndexError(RuntimeError):
    """We refused to protect: the index may have been used before, is outside the session's
    reservation (confirm a newer snapshot), or the index space is used up (rekey)."""


class SrtpProfile(enum.StrEnum):
    """SRTP protection profiles, by their IANA names (RFC 5764 §4.1.2, RFC 7714 §14.2)."""

    AEAD_AES_128_GCM = "SRTP_AEAD_AES_128_GCM"
    AES128_CM_HMAC_SHA1_80 = "SRTP_AES128_CM_HMAC_SHA1_80"

    @classmethod
    def from_id(cls, profile_id: int) -> SrtpProfile:
        """The profile with the two-byte SRTPProtectionProfile value ``profile_id``."""
        for profile in cls:
            if profile.protection_profile_id == profile_id:
                return profile
        raise ValueError(f"unknown SRTP protection profile 0x{profile_id:04x}")

    @property
    def protection_profile_id(self) -> int:
        """The two-byte SRTPProtectionProfile value, also pylibsrtp's profile constant."""
        return _PARAMS[self][0]

    @property
    def key_length(self) -> int:
        """Master key length in bytes."""
        return 16

    @property
    def salt_length(self) -> int:
        """Master salt length in bytes."""
        return _PARAMS[self][1]

    @property
    def master_length(self) -> int:
        """Length of key then salt, the form libsrtp and :class:`SrtpState` take."""
        return self.key_length + self.salt_length

    @property
    def is_aead(self) -> bool:
        """Whether the profile is an AEAD one (RFC 7714) rather than AES-CM with HMAC-SHA1."""
        return self is SrtpProfile.AEAD_AES_128_GCM

    @property
    def tag_length(self) -> int:
        """Authentication tag length in bytes, the same for SRTP and SRTCP."""
        return _PARAMS[self][2]


# (SRTPProtectionProfile, salt length, tag length): RFC 5764 §4.1.2 (112-bit salt, 80-bit
# HMAC tag for RTP and RTCP alike) and RFC 7714 §12 (96-bit salt, 128-bit GCM tag).
_PARAMS: Final[dict[SrtpProfile, tuple[int, int, int]]] = {
    SrtpProfile.AEAD_AES_128_GCM: (0x0007, 12, 16),
    SrtpProfile.AES128_CM_HMAC_SHA1_80: (0x0001, 14, 10),
}


# --- libsrtp's rollover counter, which pylibsrtp does not expose -------------------------------

# RTLD_NOLOAD: the handle of the copy Python already loaded, or failure; never a second copy
# whose functions would act on the same srtp_t with different global state.
_LIBSRTP: Final = ctypes.CDLL(pylibsrtp._binding.__file__, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
_set_stream_roc: Final = _LIBSRTP.srtp_set_stream_roc
_set_stream_roc.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32)
_set_stream_roc.restype = ctypes.c_int
_get_stream_roc: Final = _LIBSRTP.srtp_get_stream_roc
_get_stream_roc.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))
_get_stream_roc.restype = ctypes.c_int


def _srtp_t(session: Any) -> int:
    """Address of the ``srtp_t`` behind a pylibsrtp session (kept in its ``_srtp``)."""
    return int(_ffi.cast("uintptr_t", session._srtp[0]))


def _set_roc(session: Any, ssrc: int, roc: int) -> None:
    # libsrtp stores it as pending_roc: the next packet's index is taken as roc * 2**16 + SEQ.
    if _set_stream_roc(_srtp_t(session), ssrc, roc) != 0:
        raise RuntimeError(f"libsrtp has no stream for SSRC {ssrc:#010x}")


def _stream_roc(session: Any, ssrc: int) -> int | None:
    """libsrtp's ROC for ``ssrc`` in a pylibsrtp session, ``None`` if it has no such stream."""
    roc = ctypes.c_uint32()
    if _get_stream_roc(_srtp_t(session), ssrc, ctypes.byref(roc)) != 0:
        return None
    return roc.value


def _policy(profile: SrtpProfile, master: bytes, ssrc: int | None) -> Any:
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


# --- packet indexes and replay windows -----------------------------------------------------------


def _guess_index(highest: int | None, seq: int) -> int:
    """The index of ``seq`` next to the highest one, exactly as libsrtp guesses it.

    RFC 3711 §3.3.1 picks ROC - 1, ROC or ROC + 1, whichever is nearest; libsrtp
    (``srtp_rdbx_estimate_index``) takes ROC 0 while the highest index is at most 2**15. The
    two must agree, or the index we check and record is not the one libsrtp authenticates.
    """
    if highest is None or highest <= _HALF:
        return seq
    roc, s_l = highest >> 16, highest & 0xFFFF
    if s_l < _HALF:
        v = roc - 1 if seq - s_l > _HALF else roc
    else:
        v = roc + 1 if s_l - _HALF > seq else roc
    return (v << 16) | seq


def _replay_reason(highest: int | None, window: int, index: int) -> str | None:
    """Why ``index`` must be refused (RFC 3711 §3.3.2), or ``None``; bit k of ``window`` is
    index ``highest - k``."""
    if highest is None or index > highest:
        return None
    behind = highest - index
    if behind >= _WINDOW:
        return "too old for the replay window"
    if window >> behind & 1:
        return "replayed"
    return None


def _replay_add(highest: int | None, window: int, index: int) -> tuple[int, int]:
    if highest is None:
        return index, 1
    if index > highest:
        ahead = index - highest
        # a jump past the whole window forgets it (and never builds a 2**31-bit integer)
        return index, 1 if ahead >= _WINDOW else ((window << ahead) | 1) & _WINDOW_MASK
    return highest, window | (1 << (highest - index))


# --- SRTCP built here (RFC 3711 §3.4, §4; RFC 7714 §9, §11) ------------------------------------

# RFC 3711 §4.3.2: SRTCP encryption key, authentication key and salt labels.
_LABEL_SRTCP_KEY: Final = 0x03
_LABEL_SRTCP_AUTH: Final = 0x04
_LABEL_SRTCP_SALT: Final = 0x05
_HMAC_KEY_LENGTH: Final = 20  # RFC 3711 §4.2.1: HMAC-SHA1 session key, 160 bits


def _derive(master: bytes, key_length: int, label: int, length: int) -> bytes:
    """One session key from a master key and salt (RFC 3711 §4.3.1, AES-CM PRF of §4.3.3).

    The key derivation rate is 0 (what DTLS-SRTP uses), so ``r = 0`` and x = label * 2**48
    XOR master salt. RFC 7714 §11 (erratum 4938): a 96-bit GCM salt is first multiplied by
    2**16, i.e. padded with two zero bytes, to make the 112 bits the PRF takes.
    """
    key, salt = master[:key_length], master[key_length:]
    x = int.from_bytes(salt.ljust(14, b"\0"), "big") ^ (label << 48)
    prf = Cipher(algorithms.AES(key), modes.CTR((x << 16).to_bytes(16, "big"))).encryptor()
    return prf.update(bytes(length))


@final
class _SrtcpProtector:
    """Protects RTCP compound packets at an index we choose (libsrtp only counts its own)."""

    __slots__ = ("_aead", "_auth", "_key", "_salt")

    def __init__(self, profile: SrtpProfile, master: bytes) -> None:
        k = profile.key_length
        self._key = _derive(master, k, _LABEL_SRTCP_KEY, k)
        self._salt = int.from_bytes(
            _derive(master, k, _LABEL_SRTCP_SALT, profile.salt_length), "big"
        )
        self._aead = AESGCM(self._key) if profile.is_aead else None
        self._auth = (
            b"" if profile.is_aead else _derive(master, k, _LABEL_SRTCP_AUTH, _HMAC_KEY_LENGTH)
        )

    def protect(self, packet: bytes, index: int) -> bytes:
        """SRTCP for ``packet`` (at least the 8-byte first header) with SRTCP index ``index``;
        always encrypted (E flag set, RFC 3711 §3.4)."""
        ssrc = _U32.unpack_from(packet, 4)[0]
        trailer = _U32.pack(_E_FLAG | index)
        header, body = packet[:8], packet[8:]
        if self._aead is not None:
            # RFC 7714 §9.1: IV = (0x0000 || SSRC || 0x0000 || 0 || index) XOR salt; §9.2:
            # the AAD is the first header and the E flag with the index; the tag follows the
            # ciphertext and the index follows the tag.
            iv = ((ssrc << 48) ^ index ^ self._salt).to_bytes(12, "big")
            return header + self._aead.encrypt(iv, body, header + trailer) + trailer
        # RFC 3711 §4.1.1 with the SRTCP index as i: IV = (k_s * 2**16) XOR (SSRC * 2**64)
        # XOR (i * 2**16); everything after the first 8 bytes is encrypted (§3.4).
        iv = ((self._salt << 16) ^ (ssrc << 64) ^ (index << 16)).to_bytes(16, "big")
        cipher = Cipher(algorithms.AES(self._key), modes.CTR(iv)).encryptor()
        authenticated = header + cipher.update(body) + trailer
        # RFC 3711 §4.2.1: HMAC-SHA1 over the authenticated portion, cut to 80 bits.
        tag = hmac.new(self._auth, authenticated, hashlib.sha1).digest()[:10]
        return authenticated + tag


# --- the state ----------------------------------------------------------------------------------


def _check_u32(name: str, value: int | None) -> None:
    if value is not None and not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} must fit 32 bits")


def _check_index(name: str, value: int | None, maximum: int) -> None:
    if value is not None and not 0 <= value <= maximum:
        raise ValueError(f"{name} must be in 0..{maximum}")


def _check_window(name: str, highest: int | None, window: int) -> None:
    if highest is None:
        if window:
            raise ValueError(f"{name} window without a highest index")
        return
    if not 0 <= window <= _WINDOW_MASK or not window & 1:
        raise ValueError(f"{name} window must be 128 bits with bit 0 (the highest) set")
    if window >> (highest + 1):
        raise ValueError(f"{name} window marks indexes below 0")


@final
@attrs.frozen
class SrtpState:
    """Everything an :class:`SrtpSession` is, as a value; the repr leaves the keys out.

    Indexes are RFC 3711 §3.3.1 packet indexes, ``ROC * 2**16 + SEQ`` for RTP (see
    :attr:`out_roc`, :attr:`out_seq`, :attr:`in_roc`, :attr:`in_seq`) and 31-bit SRTCP
    indexes. ``None`` means none yet. The windows are RFC 3711 §3.3.2 replay lists: bit k
    set means index ``highest - k`` was received.
    """

    profile: SrtpProfile
    #: master key then salt for what we send
    local_key: bytes = attrs.field(repr=False)
    #: master key then salt for what the peer sends
    remote_key: bytes = attrs.field(repr=False)
    #: the SSRC of our RTP stream
    local_ssrc: int
    #: the highest outbound RTP index that we, or an owner before us, may have used
    rtp_index: int | None = None
    #: outbound RTP indexes up to this one are reserved by the snapshot; a restored session
    #: starts above it (``None``: never snapshotted, nothing reserved)
    rtp_reserved: int | None = None
    #: the highest outbound SRTCP index that we, or an owner before us, may have used
    srtcp_index: int | None = None
    #: outbound SRTCP indexes up to this one are reserved by the snapshot
    srtcp_reserved: int | None = None
    #: the peer's RTP SSRC: from the offer, or learned from its first authentic packet
    remote_ssrc: int | None = None
    #: the highest authentic inbound RTP index
    rtp_received: int | None = None
    rtp_window: int = 0
    #: per SSRC of the peer's RTCP: (SSRC, highest authentic SRTCP index, window), by SSRC
    srtcp_received: tuple[tuple[int, int, int], ...] = ()

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.profile, SrtpProfile):
            raise ValueError("profile must be an SrtpProfile")
        for name, key in (("local_key", self.local_key), ("remote_key", self.remote_key)):
            if not isinstance(key, bytes) or len(key) != self.profile.master_length:
                # lengths only: key material must never reach a message or a log
                raise ValueError(f"{name} must be {self.profile.master_length} bytes")
        _check_u32("local_ssrc", self.local_ssrc)
        _check_u32("remote_ssrc", self.remote_ssrc)
        for name, value, maximum in (
            ("rtp_index", self.rtp_index, _MAX_RTP_INDEX),
            ("rtp_reserved", self.rtp_reserved, _MAX_RTP_INDEX),
            ("rtp_received", self.rtp_received, _MAX_RTP_INDEX),
            ("srtcp_index", self.srtcp_index, _MAX_SRTCP_INDEX),
            ("srtcp_reserved", self.srtcp_reserved, _MAX_SRTCP_INDEX),
        ):
            _check_index(name, value, maximum)
        if (self.rtp_reserved is None) != (self.srtcp_reserved is None):
            raise ValueError("a snapshot reserves RTP and SRTCP indexes together")
        for index, reserved in (
            (self.rtp_index, self.rtp_reserved),
            (self.srtcp_index, self.srtcp_reserved),
        ):
            if index is not None and (reserved is None or reserved < index):
                raise ValueError("a used outbound index must lie within the reservation")
        if self.rtp_received is not None and self.remote_ssrc is None:
            raise ValueError("RTP received without a remote SSRC")
        _check_window("rtp", self.rtp_received, self.rtp_window)
        if len(self.srtcp_received) > _MAX_RTCP_SOURCES:
            raise ValueError(f"at most {_MAX_RTCP_SOURCES} SRTCP sources")
        previous = -1
        for entry in self.srtcp_received:
            if len(entry) != 3:
                raise ValueError("srtcp_received holds (SSRC, highest index, window) triples")
            ssrc, highest, window = entry
            _check_u32("SRTCP source", ssrc)
            if ssrc <= previous:
                raise ValueError("srtcp_received must be sorted by SSRC, each SSRC once")
            previous = ssrc
            _check_index("srtcp highest", highest, _MAX_SRTCP_INDEX)
            _check_window("srtcp", highest, window)

    @property
    def out_roc(self) -> int:
        """Rollover counter of :attr:`rtp_index`."""
        return 0 if self.rtp_index is None else self.rtp_index >> 16

    @property
    def out_seq(self) -> int | None:
        """Sequence number of :attr:`rtp_index`."""
        return None if self.rtp_index is None else self.rtp_index & 0xFFFF

    @property
    def in_roc(self) -> int:
        """Rollover counter of :attr:`rtp_received`."""
        return 0 if self.rtp_received is None else self.rtp_received >> 16

    @property
    def in_seq(self) -> int | None:
        """Sequence number of :attr:`rtp_received`."""
        return None if self.rtp_received is None else self.rtp_received & 0xFFFF

    def srtcp_highest(self, ssrc: int) -> int | None:
        """The highest authentic SRTCP index received from ``ssrc``."""
        for source, highest, _ in self.srtcp_received:
            if source == ssrc:
                return highest
        return None

    # Encoding, version 1, big-endian: "PS" 0x01, profile id (2), flags (1), local key,
    # remote key, local SSRC (4), then per flag bit in order: rtp_index (8), rtp_reserved (8),
    # srtcp_index (4), srtcp_reserved (4), remote_ssrc (4), rtp_received (8) with its window
    # (16); last a count (1) of (SSRC (4), highest (4), window (16)) SRTCP sources.

    def to_bytes(self) -> bytes:
        """A compact, versioned binary encoding (it contains the keys: store it as a secret)."""
        optional: tuple[tuple[int | None, str], ...] = (
            (self.rtp_index, "Q"),
            (self.rtp_reserved, "Q"),
            (self.srtcp_index, "I"),
            (self.srtcp_reserved, "I"),
            (self.remote_ssrc, "I"),
            (self.rtp_received, "Q"),
        )
        flags = 0
        parts = [b""]
        for bit, (value, fmt) in enumerate(optional):
            if value is not None:
                flags |= 1 << bit
                parts.append(struct.pack("!" + fmt, value))
        if self.rtp_received is not None:
            parts.append(self.rtp_window.to_bytes(16, "big"))
        parts[0] = (
            _MAGIC
            + struct.pack("!BHB", _VERSION, self.profile.protection_profile_id, flags)
            + self.local_key
            + self.remote_key
            + _U32.pack(self.local_ssrc)
        )
        parts.append(bytes([len(self.srtcp_received)]))
        for ssrc, highest, window in self.srtcp_received:
            parts.append(struct.pack("!II", ssrc, highest) + window.to_bytes(16, "big"))
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> SrtpState:
        """Decode :meth:`to_bytes` output; anything else raises ``ValueError``."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("SRTP state must be bytes")
        reader = _Reader(bytes(data))
        if reader.take(2) != _MAGIC:
            raise ValueError("not an SRTP state (bad magic)")
        version, profile_id, flags = reader.unpack("!BHB")
        if version != _VERSION:
            raise ValueError(f"unsupported SRTP state version {version}")
        profile = SrtpProfile.from_id(profile_id)
        if flags & ~0x3F:
            raise ValueError("unknown flags in SRTP state")
        local_key = reader.take(profile.master_length)
        remote_key = reader.take(profile.master_length)
        (local_ssrc,) = reader.unpack("!I")
        values: list[int | None] = []
        for bit, fmt in enumerate(("!Q", "!Q", "!I", "!I", "!I", "!Q")):
            values.append(reader.unpack(fmt)[0] if flags >> bit & 1 else None)
        window = int.from_bytes(reader.take(16), "big") if values[5] is not None else 0
        sources = []
        for _ in range(reader.unpack("!B")[0]):
            ssrc, highest = reader.unpack("!II")
            sources.append((ssrc, highest, int.from_bytes(reader.take(16), "big")))
        if not reader.done:
            raise ValueError("trailing bytes after SRTP state")
        return cls(
            profile=profile,
            local_key=local_key,
            remote_key=remote_key,
            local_ssrc=local_ssrc,
            rtp_index=values[0],
            rtp_reserved=values[1],
            srtcp_index=values[2],
            srtcp_reserved=values[3],
            remote_ssrc=values[4],
            rtp_received=values[5],
            rtp_window=window,
            srtcp_received=tuple(sources),
        )


_MAGIC: Final = b"PS"
_VERSION: Final = 1


@final
class _Reader:
    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise ValueError("truncated SRTP state")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def unpack(self, fmt: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    @property
    def done(self) -> bool:
        return self._pos == len(self._data)


def _newer(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


# --- the live session ---------------------------------------------------------------------------


@final
class SrtpSession:
    """SRTP and SRTCP for one peer: one outbound RTP stream (ours), one inbound RTP stream.

    Build with :meth:`create` for new keys or :meth:`restore` from a snapshot. The session is
    mutable and owns two pylibsrtp sessions; :meth:`snapshot` turns it into a value. Not
    thread-safe (one Trio task owns it).
    """

    __slots__ = (
        "_in",
        "_local_ssrc",
        "_out",
        "_out_synced",
        "_profile",
        "_remote_ssrc",
        "_rtp_fence",
        "_rtp_floor",
        "_rtp_received",
        "_rtp_reserved_max",
        "_rtp_sent",
        "_rtp_window",
        "_srtcp",
        "_srtcp_fence",
        "_srtcp_floor",
        "_srtcp_received",
        "_srtcp_reserved_max",
        "_srtcp_sent",
        "_state_keys",
    )

    def __init__(self, state: SrtpState) -> None:
        """Prefer :meth:`create` or :meth:`restore`, which say what they mean."""
        profile = state.profile
        self._profile = profile
        self._state_keys = (state.local_key, state.remote_key)
        self._local_ssrc = state.local_ssrc
        # Outbound: everything at or below the reservation may have been used by an earlier
        # owner, and the reservation is also our fence until a snapshot of ours is confirmed.
        self._rtp_floor = state.rtp_reserved
        self._rtp_fence = state.rtp_reserved
        self._rtp_reserved_max = state.rtp_reserved
        self._rtp_sent: int | None = None
        self._srtcp_floor = state.srtcp_reserved
        self._srtcp_fence = state.srtcp_reserved
        self._srtcp_reserved_max = state.srtcp_reserved
        self._srtcp_sent: int | None = None
        self._out = pylibsrtp.Session()
        self._out.add_stream(_policy(profile, state.local_key, state.local_ssrc))
        # libsrtp's outbound stream starts at ROC 0; after a restore it learns ours just
        # before the first packet (see protect_rtp).
        self._out_synced = self._rtp_floor is None
        self._srtcp = _SrtcpProtector(profile, state.local_key)

        # Inbound: a template for SSRCs not known yet (the peer's RTP SSRC before its first
        # packet, other SSRCs of its RTCP), plus the peer's RTP stream when we know it.
        self._remote_ssrc = state.remote_ssrc
        self._rtp_received = state.rtp_received
        self._rtp_window = state.rtp_window
        self._srtcp_received = {ssrc: (high, win) for ssrc, high, win in state.srtcp_received}
        self._in = pylibsrtp.Session(_policy(profile, state.remote_key, None))
        if state.remote_ssrc is not None:
            self._in.add_stream(_policy(profile, state.remote_key, state.remote_ssrc))
            if state.rtp_received is not None:
                self._prime_inbound(state.remote_key, state.remote_ssrc, state.rtp_received)

    def _prime_inbound(self, remote_key: bytes, ssrc: int, index: int) -> None:
        # A fresh libsrtp receiver given only the ROC takes the next index to be exactly
        # ROC * 2**16 + SEQ and fails for good on a packet past a wrap. Feeding it one authentic
        # packet at the highest index received puts its RFC 3711 §3.3.1 estimate where the old
        # receiver's was. We can make that packet: we hold the peer's key. It never leaves the
        # process, so no keystream reaches the network twice.
        sender = pylibsrtp.Session()
        sender.add_stream(_policy(self._profile, remote_key, ssrc))
        roc = index >> 16
        _set_roc(sender, ssrc, roc)
        primer = sender.protect(_RTP_HEADER.pack(0x80, 0, index & 0xFFFF, 0, ssrc))
        _set_roc(self._in, ssrc, roc)
        self._in.unprotect(primer)
        if _stream_roc(self._in, ssrc) != roc:
            raise RuntimeError("libsrtp did not take the restored rollover counter")

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        profile: SrtpProfile,
        *,
        local_key: bytes,
        remote_key: bytes,
        local_ssrc: int,
        remote_ssrc: int | None = None,
    ) -> SrtpSession:
        """A session for fresh keys (``key + salt`` per direction, e.g. from DTLS-SRTP).

        ``remote_ssrc`` is the peer's RTP SSRC when the offer names it; otherwise the first
        authentic RTP packet sets it.
        """
        return cls(
            SrtpState(
                profile=profile,
                local_key=local_key,
                remote_key=remote_key,
                local_ssrc=local_ssrc,
                remote_ssrc=remote_ssrc,
            )
        )

    @classmethod
    def restore(cls, state: SrtpState) -> SrtpSession:
        """A live session from a snapshot, ready to unprotect at once.

        Outbound, it continues above ``state``'s reservations: the packetizer continues at
        :attr:`next_rtp_seq`, and nothing is protected until a snapshot of the restored
        session has been stored and passed to :meth:`confirm` (see the module docstring).
        """
        return cls(state)

    # --- outbound -------------------------------------------------------------------------

    def protect_rtp(self, packet: bytes) -> bytes:
        """SRTP-protect one RTP packet of our stream (SSRC :attr:`local_ssrc`).

        Raises ``ValueError`` for a packet that is not RTP of our SSRC and
        :class:`SrtpIndexError` if its index may have been used before or lies beyond the
        reservation (see :attr:`rtp_headroom`).
        """
        if len(packet) < _RTP_HEADER.size or packet[0] >> 6 != 2:
            raise ValueError("not an RTP version 2 packet")
        seq, ssrc = _RTP_HEADER.unpack_from(packet)[2::2]
        if ssrc != self._local_ssrc:
            raise ValueError(f"SSRC {ssrc:#010x} is not our stream's {self._local_ssrc:#010x}")
        index = _guess_index(_newer(self._rtp_floor, self._rtp_sent), seq)
        if self._rtp_floor is not None and index <= self._rtp_floor:
            raise SrtpIndexError(
                f"RTP index {index} is at or below {self._rtp_floor}, which an earlier owner "
                f"may have used; continue at sequence number {self.next_rtp_seq}"
            )
        if index > _MAX_RTP_INDEX:
            raise SrtpIndexError("the 48-bit SRTP index is used up: rekey")
        if self._rtp_fence is not None and index > self._rtp_fence:
            raise SrtpIndexError(
                f"RTP index {index} is beyond the reservation {self._rtp_fence}: "
                "store a snapshot and confirm it"
            )
        if not self._out_synced:
            # libsrtp takes the first index as ROC * 2**16 + SEQ exactly; ours is a guess from
            # the floor and matches it from then on (both estimate from the same highest).
            _set_roc(self._out, ssrc, index >> 16)
        try:
            protected: bytes = self._out.protect(packet)
        except pylibsrtp.Error as exc:
            if "replay" in str(exc):
                raise SrtpIndexError(
                    f"RTP index {index} was already protected or is too old"
                ) from None
            raise ValueError(f"libsrtp refused the RTP packet: {exc}") from None
        self._out_synced = True
        self._rtp_sent = _newer(self._rtp_sent, index)
        return protected

    def protect_rtcp(self, packet: bytes) -> bytes:
        """SRTCP-protect one RTCP compound packet (always encrypted) at the next SRTCP index.

        One index counter serves every SSRC of our RTCP, so an index is never repeated even
        across SSRCs. Raises ``ValueError`` for a packet that is not RTCP and
        :class:`SrtpIndexError` beyond the reservation (see :attr:`srtcp_headroom`).
        """
        if len(packet) < _RTCP_HEADER.size or packet[0] >> 6 != 2:
            raise ValueError("not an RTCP version 2 packet")
        index = self._next_srtcp_index()
        if index > _MAX_SRTCP_INDEX:
            raise SrtpIndexError("the 31-bit SRTCP index is used up: rekey")
        if self._srtcp_fence is not None and index > self._srtcp_fence:
            raise SrtpIndexError(
                f"SRTCP index {index} is beyond the reservation {self._srtcp_fence}: "
                "store a snapshot and confirm it"
            )
        protected = self._srtcp.protect(packet, index)
        self._srtcp_sent = index
        return protected

    def _next_srtcp_index(self) -> int:
        last = _newer(self._srtcp_floor, self._srtcp_sent)
        return 0 if last is None else last + 1

    # --- inbound --------------------------------------------------------------------------

    def unprotect_rtp(self, packet: bytes) -> bytes:
        """Authenticate and decrypt one SRTP packet of the peer's stream; raise
        :class:`SrtpError` if it is malformed, forged, replayed or of another SSRC."""
        if not 12 <= len(packet) <= _MAX_DATAGRAM:
            raise SrtpError(f"SRTP packet of {len(packet)} bytes")
        first, _, seq, _, ssrc = _RTP_HEADER.unpack_from(packet)
        if first >> 6 != 2:
            raise SrtpError("SRTP packet is not RTP version 2")
        if self._remote_ssrc is not None and ssrc != self._remote_ssrc:
            raise SrtpError(f"SRTP packet from unexpected SSRC {ssrc:#010x}")
        index = _guess_index(self._rtp_received, seq)
        reason = _replay_reason(self._rtp_received, self._rtp_window, index)
        if reason is not None:
            raise SrtpError(f"SRTP packet {reason}")
        try:
            plain: bytes = self._in.unprotect(bytes(packet))
        except pylibsrtp.Error as exc:
            raise SrtpError(f"SRTP packet refused: {exc}") from None
        # RFC 3711 §3.3.1/§3.3.2: only authentic packets move the ROC, s_l and the window.
        self._remote_ssrc = ssrc
        self._rtp_received, self._rtp_window = _replay_add(
            self._rtp_received, self._rtp_window, index
        )
        return plain

    def unprotect_rtcp(self, packet: bytes) -> bytes:
        """Authenticate and decrypt one SRTCP packet; raise :class:`SrtpError` if it is
        malformed, forged or replayed."""
        tag = self._profile.tag_length
        if not _RTCP_HEADER.size + 4 + tag <= len(packet) <= _MAX_DATAGRAM:
            raise SrtpError(f"SRTCP packet of {len(packet)} bytes")
        if packet[0] >> 6 != 2:
            raise SrtpError("SRTCP packet is not RTCP version 2")
        ssrc = _U32.unpack_from(packet, 4)[0]
        # RFC 3711 §3.4: E flag and index precede the tag; RFC 7714 §9: they end the packet.
        at = len(packet) - 4 if self._profile.is_aead else len(packet) - 4 - tag
        index = _U32.unpack_from(packet, at)[0] & _MAX_SRTCP_INDEX
        known = self._srtcp_received.get(ssrc)
        if known is None and len(self._srtcp_received) >= _MAX_RTCP_SOURCES:
            raise SrtpError(f"SRTCP from too many SSRCs (new: {ssrc:#010x})")
        highest, window = known if known is not None else (None, 0)
        # libsrtp's own SRTCP replay list starts empty after a restore; ours does not.
        reason = _replay_reason(highest, window, index)
        if reason is not None:
            raise SrtpError(f"SRTCP packet {reason}")
        try:
            plain: bytes = self._in.unprotect_rtcp(bytes(packet))
        except pylibsrtp.Error as exc:
            raise SrtpError(f"SRTCP packet refused: {exc}") from None
        self._srtcp_received[ssrc] = _replay_add(highest, window, index)
        return plain

    # --- state ----------------------------------------------------------------------------

    def snapshot(
        self, *, rtp_reserve: int = RTP_RESERVE, srtcp_reserve: int = SRTCP_RESERVE
    ) -> SrtpState:
        """The session as a value, reserving outbound indexes for whoever restores it.

        The state reserves ``rtp_reserve`` RTP and ``srtcp_reserve`` SRTCP indexes beyond the
        highest used (never less than an earlier snapshot reserved). Store it, then
        :meth:`confirm` it so this session may use the reservation; until a first
        confirmation, the first snapshot's reservation is the limit.
        """
        if not 1 <= rtp_reserve <= _MAX_RTP_RESERVE:
            raise ValueError(f"rtp_reserve must be in 1..{_MAX_RTP_RESERVE}")
        if not 1 <= srtcp_reserve <= _MAX_SRTCP_INDEX:
            raise ValueError("srtcp_reserve must be positive")
        rtp_index = _newer(self._rtp_floor, self._rtp_sent)
        # Nothing sent yet: the first packet may carry any sequence number below 2**15.
        rtp_base = _HALF - 1 if rtp_index is None else rtp_index
        rtp_reserved = min(rtp_base + rtp_reserve, _MAX_RTP_INDEX)
        srtcp_index = _newer(self._srtcp_floor, self._srtcp_sent)
        srtcp_base = -1 if srtcp_index is None else srtcp_index
        srtcp_reserved = min(srtcp_base + srtcp_reserve, _MAX_SRTCP_INDEX)
        # Never reserve less than before: this session may already be allowed that far.
        if self._rtp_reserved_max is not None and self._srtcp_reserved_max is not None:
            rtp_reserved = max(rtp_reserved, self._rtp_reserved_max)
            srtcp_reserved = max(srtcp_reserved, self._srtcp_reserved_max)
        self._rtp_reserved_max, self._srtcp_reserved_max = rtp_reserved, srtcp_reserved
        if self._rtp_fence is None:
            self._rtp_fence, self._srtcp_fence = rtp_reserved, srtcp_reserved
        local_key, remote_key = self._state_keys
        return SrtpState(
            profile=self._profile,
            local_key=local_key,
            remote_key=remote_key,
            local_ssrc=self._local_ssrc,
            rtp_index=rtp_index,
            rtp_reserved=rtp_reserved,
            srtcp_index=srtcp_index,
            srtcp_reserved=srtcp_reserved,
            remote_ssrc=self._remote_ssrc,
            rtp_received=self._rtp_received,
            rtp_window=self._rtp_window,
            srtcp_received=tuple(
                (ssrc, high, win) for ssrc, (high, win) in sorted(self._srtcp_received.items())
            ),
        )

    def confirm(self, state: SrtpState) -> None:
        """Record that ``state``, a snapshot of this session, is stored durably as the newest
        state: this session may now protect up to its reservations."""
        if (
            state.profile is not self._profile
            or (state.local_key, state.remote_key) != self._state_keys
            or state.local_ssrc != self._local_ssrc
        ):
            raise ValueError("not a snapshot of this session")
        rtp, srtcp = state.rtp_reserved, state.srtcp_reserved
        if (
            rtp is None
            or srtcp is None
            or self._rtp_reserved_max is None
            or self._srtcp_reserved_max is None
            or rtp > self._rtp_reserved_max
            or srtcp > self._srtcp_reserved_max
        ):
            raise ValueError("this session never reserved what the state claims")
        self._rtp_fence = _newer(self._rtp_fence, rtp)
        self._srtcp_fence = _newer(self._srtcp_fence, srtcp)

    # --- introspection --------------------------------------------------------------------

    @property
    def profile(self) -> SrtpProfile:
        """The negotiated protection profile."""
        return self._profile

    @property
    def local_ssrc(self) -> int:
        """The SSRC of our RTP stream."""
        return self._local_ssrc

    @property
    def remote_ssrc(self) -> int | None:
        """The peer's RTP SSRC, once known."""
        return self._remote_ssrc

    @property
    def next_rtp_seq(self) -> int | None:
        """The sequence number our next RTP packet should carry; ``None`` before the first
        (then choose one below 2**15)."""
        last = _newer(self._rtp_floor, self._rtp_sent)
        return None if last is None else (last + 1) & 0xFFFF

    @property
    def rtp_headroom(self) -> int | None:
        """How many more RTP packets fit in the reservation (``None``: no limit yet)."""
        if self._rtp_fence is None:
            return None
        last = _newer(self._rtp_floor, self._rtp_sent)
        return self._rtp_fence - (-1 if last is None else last)

    @property
    def srtcp_headroom(self) -> int | None:
        """How many more SRTCP packets fit in the reservation (``None``: no limit yet)."""
        if self._srtcp_fence is None:
            return None
        return self._srtcp_fence - self._next_srtcp_index() + 1
