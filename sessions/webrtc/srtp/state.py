"""The whole state of an :class:`~sessions.webrtc.srtp.SrtpSession` as an immutable value.

:class:`SrtpState` is what a snapshot holds and a restore takes; :meth:`SrtpState.to_bytes`
gives a compact, versioned encoding of it (which contains the keys: store it as a secret).
"""

from __future__ import annotations

import struct
from typing import Final, final

import attrs

from sessions.webrtc.srtp.index import MAX_RTP_INDEX, MAX_SRTCP_INDEX, WINDOW_MASK
from sessions.webrtc.srtp.profile import SrtpProfile

__all__ = ["MAX_RTCP_SOURCES", "SrtpState"]

#: SSRCs of the peer's RTCP whose SRTCP replay window we keep.
MAX_RTCP_SOURCES: Final = 16
_U32: Final = struct.Struct("!I")


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
    if not 0 <= window <= WINDOW_MASK or not window & 1:
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
            ("rtp_index", self.rtp_index, MAX_RTP_INDEX),
            ("rtp_reserved", self.rtp_reserved, MAX_RTP_INDEX),
            ("rtp_received", self.rtp_received, MAX_RTP_INDEX),
            ("srtcp_index", self.srtcp_index, MAX_SRTCP_INDEX),
            ("srtcp_reserved", self.srtcp_reserved, MAX_SRTCP_INDEX),
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
        if len(self.srtcp_received) > MAX_RTCP_SOURCES:
            raise ValueError(f"at most {MAX_RTCP_SOURCES} SRTCP sources")
        previous = -1
        for entry in self.srtcp_received:
            if len(entry) != 3:
                raise ValueError("srtcp_received holds (SSRC, highest index, window) triples")
            ssrc, highest, window = entry
            _check_u32("SRTCP source", ssrc)
            if ssrc <= previous:
                raise ValueError("srtcp_received must be sorted by SSRC, each SSRC once")
            previous = ssrc
            _check_index("srtcp highest", highest, MAX_SRTCP_INDEX)
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
