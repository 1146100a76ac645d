"""Sans-I/O RTP packets (RFC 3550 §5.1) and 16-bit sequence-number arithmetic.

:func:`parse` and :func:`serialize` convert between datagrams (after SRTP decryption) and
:class:`RtpPacket`. Header extensions in the RFC 8285 one-byte and two-byte forms are split into
``(id, value)`` elements; any other profile's extension is kept as opaque bytes.

:class:`SequenceTracker` extends 16-bit sequence numbers the way SRTP guesses its packet index
(RFC 3711 §3.3.1), which gives both the rollover counter SRTP needs and the extended highest
sequence number RTCP reports carry.

Every malformed input raises :class:`~sessions.webrtc.errors.RtpError`.
"""

from __future__ import annotations

import struct
from typing import Final, final

import attrs

from sessions.webrtc.errors import RtpError

__all__ = [
    "ONE_BYTE_PROFILE",
    "RtpPacket",
    "SequenceTracker",
    "estimate_index",
    "is_two_byte_profile",
    "parse",
    "parse_media",
    "seq_distance",
    "serialize",
    "serialize_media",
]

#: RFC 8285 §4.2: "defined by profile" value of the one-byte header form.
ONE_BYTE_PROFILE: Final = 0xBEDE
_TWO_BYTE_MASK: Final = 0xFFF0
_TWO_BYTE_PROFILE: Final = 0x1000  # RFC 8285 §4.3: 0x100 then 4 "appbits"
_HEADER = struct.Struct("!BBHII")
_EXT_HEADER = struct.Struct("!HH")
_SEQ_MOD: Final = 1 << 16
_HALF: Final = 1 << 15


def is_two_byte_profile(profile: int) -> bool:
    """Whether ``profile`` marks the RFC 8285 §4.3 two-byte header extension form."""
    return profile & _TWO_BYTE_MASK == _TWO_BYTE_PROFILE


@final
@attrs.frozen
class RtpPacket:
    """One RTP packet (RFC 3550 §5.1); the version is always 2.

    Header extension (X bit) is present when ``extension_profile`` is not ``None``. With
    ``ONE_BYTE_PROFILE`` or a two-byte profile (RFC 8285) the elements are in ``extensions``
    and ``extension_data`` is empty; with any other profile ``extension_data`` holds the
    extension body (a multiple of 4 bytes) and ``extensions`` is empty. ``padding`` counts the
    padding octets including the final count octet (RFC 3550 §5.1, P bit); 0 means none.
    """

    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrcs: tuple[int, ...] = ()
    extension_profile: int | None = None
    extensions: tuple[tuple[int, bytes], ...] = ()
    extension_data: bytes = b""
    padding: int = 0

    def extension(self, element_id: int) -> bytes | None:
        """Value of the first RFC 8285 header extension element with ``element_id``."""
        for i, value in self.extensions:
            if i == element_id:
                return value
        return None


# --- parse ------------------------------------------------------------------------------------


def _parse_one_byte(data: bytes) -> tuple[tuple[int, bytes], ...]:
    # RFC 8285 §4.2: each element is ID (4 bits), L (4 bits) = length - 1, then the data.
    elements: list[tuple[int, bytes]] = []
    pos = 0
    end = len(data)
    while pos < end:
        element_id = data[pos] >> 4
        if element_id == 0:
            pos += 1  # a padding byte
            continue
        if element_id == 15:
            break  # reserved: stop processing, keep what came before
        length = (data[pos] & 0x0F) + 1
        start = pos + 1
        if start + length > end:
            raise RtpError("one-byte header extension element overruns the extension")
        elements.append((element_id, data[start : start + length]))
        pos = start + length
    return tuple(elements)


def _parse_two_byte(data: bytes) -> tuple[tuple[int, bytes], ...]:
    # RFC 8285 §4.3: each element is ID (8 bits), length (8 bits), then the data.
    elements: list[tuple[int, bytes]] = []
    pos = 0
    end = len(data)
    while pos < end:
        element_id = data[pos]
        if element_id == 0:
            pos += 1  # a padding byte
            continue
        if pos + 2 > end:
            raise RtpError("two-byte header extension element is truncated")
        length = data[pos + 1]
        start = pos + 2
        if start + length > end:
            raise RtpError("two-byte header extension element overruns the extension")
        elements.append((element_id, data[start : start + length]))
        pos = start + length
    return tuple(elements)


def parse(data: bytes) -> RtpPacket:
    """Parse one RTP packet; raise :class:`RtpError` if it is malformed."""
    return RtpPacket(*_parse(data))


def parse_media(data: bytes) -> tuple[int, int, int, int, bytes]:
    """``(payload_type, sequence_number, timestamp, ssrc, payload)`` of one RTP packet, checked
    exactly as :func:`parse` checks it (raises :class:`RtpError` for the same input).

    For the per-packet receive path: it builds no :class:`RtpPacket`, whose frozen attrs
    ``__init__`` sets eleven fields one ``object.__setattr__`` at a time.
    """
    return _parse(data)[:5]


_Fields = tuple[
    int,
    int,
    int,
    int,
    bytes,
    bool,
    tuple[int, ...],
    int | None,
    tuple[tuple[int, bytes], ...],
    bytes,
    int,
]


def _parse(data: bytes) -> _Fields:
    """The fields of :class:`RtpPacket`, in its order; raise :class:`RtpError` if malformed."""
    size = len(data)
    if size < 12:
        raise RtpError("shorter than an RTP header")
    first, second, seq, timestamp, ssrc = _HEADER.unpack_from(data)
    if first >> 6 != 2:
        raise RtpError("RTP version is not 2")
    csrc_count = first & 0x0F
    pos = 12 + 4 * csrc_count
    if pos > size:
        raise RtpError("CSRC list overruns the packet")
    csrcs = struct.unpack_from(f"!{csrc_count}I", data, 12) if csrc_count else ()

    end = size
    padding = 0
    if first & 0x20:
        # RFC 3550 §5.1: the last octet counts the padding octets, itself included.
        padding = data[-1]
        if padding == 0:
            raise RtpError("RTP padding count is zero")
        end = size - padding
        if end < pos:
            raise RtpError("RTP padding overruns the header")

    profile: int | None = None
    elements: tuple[tuple[int, bytes], ...] = ()
    extension_data = b""
    if first & 0x10:
        # RFC 3550 §5.3.1: 16-bit profile value, 16-bit length in 32-bit words, then data.
        if pos + 4 > end:
            raise RtpError("header extension is truncated")
        profile, words = _EXT_HEADER.unpack_from(data, pos)
        start = pos + 4
        pos = start + 4 * words
        if pos > end:
            raise RtpError("header extension overruns the packet")
        body = data[start:pos]
        if profile == ONE_BYTE_PROFILE:
            elements = _parse_one_byte(body)
        elif is_two_byte_profile(profile):
            elements = _parse_two_byte(body)
        else:
            extension_data = bytes(body)

    return (
        second & 0x7F,  # payload_type
        seq,
        timestamp,
        ssrc,
        bytes(data[pos:end]),  # payload
        bool(second & 0x80),  # marker
        csrcs,
        profile,
        elements,
        extension_data,
        padding,
    )


# --- serialize --------------------------------------------------------------------------------


def _extension_body(packet: RtpPacket, profile: int) -> bytes:
    out = bytearray()
    if profile == ONE_BYTE_PROFILE:
        for element_id, value in packet.extensions:
            if not 1 <= element_id <= 14 or not 1 <= len(value) <= 16:
                raise ValueError("one-byte extension elements: id 1..14, 1..16 bytes")
            out.append(element_id << 4 | (len(value) - 1))
            out += value
    elif is_two_byte_profile(profile):
        for element_id, value in packet.extensions:
            if not 1 <= element_id <= 255 or len(value) > 255:
                raise ValueError("two-byte extension elements: id 1..255, 0..255 bytes")
            out += bytes((element_id, len(value)))
            out += value
    else:
        if packet.extensions:
            raise ValueError("extension elements need an RFC 8285 profile")
        if len(packet.extension_data) % 4:
            raise ValueError("header extension data must be a multiple of 4 bytes")
        return packet.extension_data
    if packet.extension_data:
        raise ValueError("RFC 8285 profiles carry elements, not raw extension data")
    out += bytes(-len(out) & 3)  # RFC 8285 §4.1: pad the elements to 32 bits with zeros
    return bytes(out)


def serialize(packet: RtpPacket) -> bytes:
    """Serialize ``packet``; raise :class:`ValueError` if a field is out of range."""
    if not 0 <= packet.payload_type <= 127:
        raise ValueError("payload type is 7 bits")
    if len(packet.csrcs) > 15:
        raise ValueError("at most 15 CSRCs")
    if not 0 <= packet.padding <= 255:
        raise ValueError("padding is 0..255 octets")
    first = 0x80 | len(packet.csrcs)
    if packet.padding:
        first |= 0x20
    if packet.extension_profile is not None:
        first |= 0x10
    second = packet.payload_type | (0x80 if packet.marker else 0)
    try:
        out = bytearray(
            _HEADER.pack(first, second, packet.sequence_number, packet.timestamp, packet.ssrc)
        )
        out += struct.pack(f"!{len(packet.csrcs)}I", *packet.csrcs)
        if packet.extension_profile is not None:
            body = _extension_body(packet, packet.extension_profile)
            out += _EXT_HEADER.pack(packet.extension_profile, len(body) // 4)
            out += body
    except struct.error as exc:
        raise ValueError(f"RTP header field out of range: {exc}") from None
    out += packet.payload
    if packet.padding:
        out += bytes(packet.padding - 1)
        out.append(packet.padding)
    return bytes(out)


def serialize_media(
    payload_type: int, sequence_number: int, timestamp: int, ssrc: int, payload: bytes, marker: bool
) -> bytes:
    """``serialize(RtpPacket(payload_type, sequence_number, timestamp, ssrc, payload, marker))``
    without building the packet: the same bytes and the same :class:`ValueError` for a field
    out of range. For the per-packet send path (no CSRCs, header extension or padding)."""
    if not 0 <= payload_type <= 127:
        raise ValueError("payload type is 7 bits")
    try:
        header = _HEADER.pack(
            0x80, payload_type | (0x80 if marker else 0), sequence_number, timestamp, ssrc
        )
    except struct.error as exc:
        raise ValueError(f"RTP header field out of range: {exc}") from None
    return header + payload


# --- sequence numbers -------------------------------------------------------------------------


def seq_distance(a: int, b: int) -> int:
    """Signed distance from sequence number ``a`` to ``b`` modulo 2**16, in -32768..32767.

    Positive when ``b`` comes after ``a`` (RFC 3550 §A.1's "serial number" comparison), so
    ``seq_distance(65535, 0) == 1`` and ``seq_distance(0, 65535) == -1``.
    """
    return ((b - a + _HALF) & 0xFFFF) - _HALF


def estimate_index(roc: int, s_l: int, seq: int) -> int:
    """Guess the packet index ``2**16 * v + seq`` of ``seq`` (RFC 3711 §3.3.1).

    ``roc`` is the rollover counter and ``s_l`` the highest sequence number received so far;
    ``v`` is ``roc - 1``, ``roc`` or ``roc + 1``, whichever puts ``seq`` nearest to ``s_l``.
    The result is negative when ``roc`` is 0 and ``seq`` seems to precede the first wrap.
    """
    # RFC 3711 §3.3.1: pick v by comparing s_l and SEQ against half the sequence space.
    if s_l < _HALF:
        v = roc - 1 if seq - s_l > _HALF else roc
    else:
        v = roc + 1 if s_l - _HALF > seq else roc
    return v * _SEQ_MOD + seq


@final
class SequenceTracker:
    """Extends the 16-bit sequence numbers of one SSRC to packet indices (RFC 3711 §3.3.1).

    The index is ``roc * 65536 + seq``; its low 32 bits are RFC 3550's extended sequence
    number. :meth:`estimate` only guesses, so an SRTP receiver can authenticate before it
    calls :meth:`commit` (RFC 3711 §3.3.1 updates ROC and s_l only for authentic packets);
    :meth:`update` does both. The whole state is :attr:`highest_index`, so it can be handed
    to another node on migration as ``SequenceTracker(highest_index)``.
    """

    __slots__ = ("_highest",)

    def __init__(self, highest_index: int | None = None) -> None:
        if highest_index is not None and highest_index < 0:
            raise ValueError("packet indices are not negative")
        self._highest = highest_index

    @property
    def highest_index(self) -> int | None:
        """Index of the newest packet committed so far, ``None`` before the first."""
        return self._highest

    @property
    def roc(self) -> int:
        """Current rollover counter: how many times the sequence number has wrapped."""
        return 0 if self._highest is None else self._highest >> 16

    @property
    def highest_seq(self) -> int | None:
        """The 16-bit sequence number of :attr:`highest_index` (RFC 3711's ``s_l``)."""
        return None if self._highest is None else self._highest & 0xFFFF

    def estimate(self, seq: int) -> int:
        """Index that ``seq`` most likely has, without changing any state."""
        if self._highest is None:
            return seq
        return estimate_index(self._highest >> 16, self._highest & 0xFFFF, seq)

    def commit(self, index: int) -> None:
        """Record that the packet with ``index`` was accepted; only moves forward."""
        if self._highest is None or index > self._highest:
            self._highest = index

    def update(self, seq: int) -> int:
        """Estimate the index of ``seq``, commit it, and return it."""
        # estimate() then commit(), inlined: RTCP reception statistics call this per packet.
        highest = self._highest
        if highest is None:
            self._highest = seq
            return seq
        index = estimate_index(highest >> 16, highest & 0xFFFF, seq)
        if index > highest:
            self._highest = index
        return index
