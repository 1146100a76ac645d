"""Sans-I/O RTCP (RFC 3550 §6): compound packets, reports, and receiver statistics.

:func:`parse` splits a compound packet (after SRTCP decryption) into typed SR, RR, SDES and BYE
packets; other types (RTPFB, PSFB, XR, APP, ...) are kept as :class:`RawRtcpPacket` so they
can be forwarded or re-serialized unchanged. :func:`serialize` is the inverse.

:class:`ReceiverStatistics` keeps the per-source counters of RFC 3550 Appendix A.3 and A.8
and produces the :class:`ReportBlock` for our next receiver report. Time is passed in as
seconds on any monotonic clock; nothing here reads a clock.

Every malformed input raises :class:`~sessions.webrtc.errors.RtpError`.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Iterable
from typing import Final, TypeAlias, final

import attrs

from sessions.webrtc.errors import RtpError
from sessions.webrtc.rtp import SequenceTracker

__all__ = [
    "NTP_UNIX_OFFSET",
    "Bye",
    "RawRtcpPacket",
    "ReceiverReport",
    "ReceiverStatistics",
    "ReportBlock",
    "RtcpPacket",
    "RtcpType",
    "SdesChunk",
    "SdesItem",
    "SenderReport",
    "SourceDescription",
    "ntp_from_seconds",
    "ntp_middle32",
    "ntp_to_seconds",
    "parse",
    "rtt_seconds",
    "serialize",
    "serialize_packet",
]

#: Seconds from the NTP epoch (1900-01-01) to the Unix epoch (1970-01-01).
NTP_UNIX_OFFSET: Final = 2_208_988_800

_HEADER = struct.Struct("!BBH")
_BLOCK = struct.Struct("!IIIIII")
_SR_INFO = struct.Struct("!IQIII")
_U32 = struct.Struct("!I")
_MAX_COUNT: Final = 31  # the 5-bit RC/SC/FMT field


class RtcpType(enum.IntEnum):
    """RTCP packet types (RFC 3550 §12.1, RFC 4585 §6.1, RFC 3611 §3)."""

    SR = 200
    RR = 201
    SDES = 202
    BYE = 203
    APP = 204
    RTPFB = 205
    PSFB = 206
    XR = 207


class SdesItem(enum.IntEnum):
    """SDES item types (RFC 3550 §6.5)."""

    END = 0
    CNAME = 1
    NAME = 2
    EMAIL = 3
    PHONE = 4
    LOC = 5
    TOOL = 6
    NOTE = 7
    PRIV = 8


@final
@attrs.frozen
class ReportBlock:
    """Reception report about one source (RFC 3550 §6.4.1).

    ``fraction_lost`` is an 8-bit fixed-point fraction (lost/expected * 256) since the previous
    report; ``cumulative_lost`` is signed 24-bit (duplicates can make it negative);
    ``highest_sequence`` is the extended (32-bit) highest sequence number; ``jitter`` is in
    RTP timestamp units; ``lsr`` is the middle 32 bits of the last SR's NTP timestamp (0 if
    none) and ``dlsr`` the delay since receiving it, in units of 1/65536 s.
    """

    ssrc: int
    fraction_lost: int = 0
    cumulative_lost: int = 0
    highest_sequence: int = 0
    jitter: int = 0
    lsr: int = 0
    dlsr: int = 0


@final
@attrs.frozen
class SenderReport:
    """SR (RFC 3550 §6.4.1): sender info plus reception reports.

    ``ntp_timestamp`` is the full 64-bit NTP timestamp (32.32 fixed point);
    ``extension`` holds any profile-specific extension (RFC 3550 §6.4.1).
    """

    ssrc: int
    ntp_timestamp: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: tuple[ReportBlock, ...] = ()
    extension: bytes = b""


@final
@attrs.frozen
class ReceiverReport:
    """RR (RFC 3550 §6.4.2): reception reports from a participant that is not sending."""

    ssrc: int
    reports: tuple[ReportBlock, ...] = ()
    extension: bytes = b""


@final
@attrs.frozen
class SdesChunk:
    """One SDES chunk (RFC 3550 §6.5): a source and its ``(item type, value)`` items."""

    ssrc: int
    items: tuple[tuple[int, bytes], ...] = ()

    @property
    def cname(self) -> str | None:
        """The CNAME item (RFC 3550 §6.5.1) as text; raises :class:`RtpError` if not UTF-8."""
        for item_type, value in self.items:
            if item_type == SdesItem.CNAME:
                try:
                    return value.decode("utf-8")
                except UnicodeDecodeError:
                    raise RtpError("SDES CNAME is not UTF-8") from None
        return None


@final
@attrs.frozen
class SourceDescription:
    """SDES packet (RFC 3550 §6.5)."""

    chunks: tuple[SdesChunk, ...] = ()


@final
@attrs.frozen
class Bye:
    """BYE packet (RFC 3550 §6.6); ``reason`` is ``None`` when the packet carries none."""

    ssrcs: tuple[int, ...] = ()
    reason: bytes | None = None


@final
@attrs.frozen
class RawRtcpPacket:
    """An RTCP packet we do not interpret, kept whole for forwarding.

    ``count`` is the 5-bit field after the padding bit (FMT for RTPFB/PSFB, RFC 4585 §6.1);
    ``body`` is everything after the 4-byte header, with any padding removed.
    """

    packet_type: int
    count: int
    body: bytes


RtcpPacket: TypeAlias = SenderReport | ReceiverReport | SourceDescription | Bye | RawRtcpPacket


# --- parse ------------------------------------------------------------------------------------


def _report_blocks(body: bytes, pos: int, count: int) -> tuple[tuple[ReportBlock, ...], int]:
    if pos + count * _BLOCK.size > len(body):
        raise RtpError("report blocks overrun the packet")
    blocks = []
    for _ in range(count):
        ssrc, lost_word, highest, jitter, lsr, dlsr = _BLOCK.unpack_from(body, pos)
        cumulative = lost_word & 0xFFFFFF
        if cumulative & 0x800000:  # RFC 3550 §6.4.1: signed 24-bit
            cumulative -= 1 << 24
        blocks.append(ReportBlock(ssrc, lost_word >> 24, cumulative, highest, jitter, lsr, dlsr))
        pos += _BLOCK.size
    return tuple(blocks), pos


def _parse_sdes(body: bytes, count: int) -> SourceDescription:
    # RFC 3550 §6.5: each chunk is an SSRC, items (type, length, text), then one or more null
    # octets ending the list and padding to the next 32-bit boundary.
    chunks = []
    pos = 0
    end = len(body)
    for _ in range(count):
        if pos + 4 > end:
            raise RtpError("SDES chunk is truncated")
        ssrc = _U32.unpack_from(body, pos)[0]
        pos += 4
        items = []
        while True:
            if pos >= end:
                raise RtpError("SDES item list is not terminated")
            item_type = body[pos]
            if item_type == SdesItem.END:
                pos += 1
                break
            if pos + 2 > end or pos + 2 + body[pos + 1] > end:
                raise RtpError("SDES item overruns the packet")
            length = body[pos + 1]
            items.append((item_type, body[pos + 2 : pos + 2 + length]))
            pos += 2 + length
        pos = min((pos + 3) & ~3, end)
        chunks.append(SdesChunk(ssrc, tuple(items)))
    return SourceDescription(tuple(chunks))


def _parse_bye(body: bytes, count: int) -> Bye:
    # RFC 3550 §6.6: SSRC/CSRC list, then optionally a length-prefixed reason.
    pos = 4 * count
    if pos > len(body):
        raise RtpError("BYE source list overruns the packet")
    ssrcs = struct.unpack_from(f"!{count}I", body)
    reason = None
    if pos < len(body):
        length = body[pos]
        if pos + 1 + length > len(body):
            raise RtpError("BYE reason overruns the packet")
        reason = body[pos + 1 : pos + 1 + length]
    return Bye(ssrcs, reason)


def _parse_one(packet_type: int, count: int, body: bytes) -> RtcpPacket:
    if packet_type == RtcpType.SR:
        if len(body) < _SR_INFO.size:
            raise RtpError("SR is shorter than its sender info")
        ssrc, ntp, rtp_ts, packets, octets = _SR_INFO.unpack_from(body)
        reports, pos = _report_blocks(body, _SR_INFO.size, count)
        return SenderReport(ssrc, ntp, rtp_ts, packets, octets, reports, body[pos:])
    if packet_type == RtcpType.RR:
        if len(body) < 4:
            raise RtpError("RR is missing its SSRC")
        reports, pos = _report_blocks(body, 4, count)
        return ReceiverReport(_U32.unpack_from(body)[0], reports, body[pos:])
    if packet_type == RtcpType.SDES:
        return _parse_sdes(body, count)
    if packet_type == RtcpType.BYE:
        return _parse_bye(body, count)
    return RawRtcpPacket(packet_type, count, body)


def parse(data: bytes) -> tuple[RtcpPacket, ...]:
    """Parse a compound RTCP packet (RFC 3550 §6.1) into its packets, in order.

    Each packet's length field must fit within ``data`` and the packets must tile it exactly
    (RFC 3550 §A.2). A single non-compound packet (RFC 5506 reduced-size RTCP) is accepted.
    Padding (P bit) is validated and removed.
    """
    if not data:
        raise RtpError("empty RTCP packet")
    packets: list[RtcpPacket] = []
    pos = 0
    size = len(data)
    while pos < size:
        if size - pos < 4:
            raise RtpError("truncated RTCP header")
        first, packet_type, words = _HEADER.unpack_from(data, pos)
        if first >> 6 != 2:
            raise RtpError("RTCP version is not 2")
        end = pos + 4 * (words + 1)
        if end > size:
            raise RtpError("RTCP packet overruns the datagram")
        body_end = end
        if first & 0x20:
            # RFC 3550 §6.4.1: the last octet counts the padding octets, itself included.
            padding = data[end - 1]
            if padding == 0 or padding > end - pos - 4:
                raise RtpError("bad RTCP padding count")
            body_end -= padding
        packets.append(_parse_one(packet_type, first & 0x1F, data[pos + 4 : body_end]))
        pos = end
    return tuple(packets)


# --- serialize --------------------------------------------------------------------------------


def _block_bytes(block: ReportBlock) -> bytes:
    if not 0 <= block.fraction_lost <= 255:
        raise ValueError("fraction lost is 8 bits")
    if not -(1 << 23) <= block.cumulative_lost < 1 << 23:
        raise ValueError("cumulative lost is signed 24 bits")
    lost_word = block.fraction_lost << 24 | (block.cumulative_lost & 0xFFFFFF)
    return _BLOCK.pack(
        block.ssrc, lost_word, block.highest_sequence, block.jitter, block.lsr, block.dlsr
    )


def _count_and_body(packet: RtcpPacket) -> tuple[int, int, bytes]:
    if isinstance(packet, SenderReport):
        info = _SR_INFO.pack(
            packet.ssrc,
            packet.ntp_timestamp,
            packet.rtp_timestamp,
            packet.packet_count,
            packet.octet_count,
        )
        blocks = b"".join(_block_bytes(b) for b in packet.reports)
        return RtcpType.SR, len(packet.reports), info + blocks + packet.extension
    if isinstance(packet, ReceiverReport):
        blocks = b"".join(_block_bytes(b) for b in packet.reports)
        body = _U32.pack(packet.ssrc) + blocks + packet.extension
        return RtcpType.RR, len(packet.reports), body
    if isinstance(packet, SourceDescription):
        out = bytearray()
        for chunk in packet.chunks:
            out += _U32.pack(chunk.ssrc)
            for item_type, value in chunk.items:
                if not 1 <= item_type <= 255 or len(value) > 255:
                    raise ValueError("SDES items: type 1..255, at most 255 bytes")
                out += bytes((item_type, len(value))) + value
            out += bytes(4 - len(out) % 4)  # RFC 3550 §6.5: at least one null octet
        return RtcpType.SDES, len(packet.chunks), bytes(out)
    if isinstance(packet, Bye):
        out = bytearray(struct.pack(f"!{len(packet.ssrcs)}I", *packet.ssrcs))
        if packet.reason is not None:
            if len(packet.reason) > 255:
                raise ValueError("BYE reason is at most 255 bytes")
            out += bytes((len(packet.reason),)) + packet.reason
            out += bytes(-len(out) & 3)  # RFC 3550 §6.6: pad with null octets
        return RtcpType.BYE, len(packet.ssrcs), bytes(out)
    return packet.packet_type, packet.count, packet.body


def serialize_packet(packet: RtcpPacket) -> bytes:
    """Serialize one RTCP packet; raise :class:`ValueError` if a field is out of range.

    A body that is not a multiple of 4 bytes (an unaligned SR/RR extension or raw body, as
    :func:`parse` leaves them after removing padding) is padded, with the P bit set.
    """
    try:
        packet_type, count, body = _count_and_body(packet)
    except struct.error as exc:
        raise ValueError(f"RTCP field out of range: {exc}") from None
    if not 0 <= count <= _MAX_COUNT:
        raise ValueError("at most 31 report blocks, chunks or sources per packet")
    if not 0 <= packet_type <= 255:
        raise ValueError("RTCP packet type is 8 bits")
    first = 0x80 | count
    if len(body) % 4:
        # RFC 3550 §6.4.1: pad to 32 bits, the last octet counting the padding (P bit set).
        pad = 4 - len(body) % 4
        body += bytes(pad - 1) + bytes((pad,))
        first |= 0x20
    if len(body) // 4 > 0xFFFF:
        raise ValueError("RTCP packet too long")
    return _HEADER.pack(first, packet_type, len(body) // 4) + body


def serialize(packets: Iterable[RtcpPacket]) -> bytes:
    """Serialize packets back to back as one compound RTCP packet (RFC 3550 §6.1)."""
    return b"".join(serialize_packet(p) for p in packets)


# --- NTP timestamps and round-trip time -------------------------------------------------------


def ntp_from_seconds(seconds: float) -> int:
    """64-bit NTP timestamp (32.32 fixed point, RFC 3550 §4) for seconds since 1900.

    For a Unix time add :data:`NTP_UNIX_OFFSET` first. Wraps modulo 2**64 (NTP eras).
    """
    whole = math.floor(seconds)
    fraction = round((seconds - whole) * (1 << 32))
    return ((whole << 32) + fraction) & 0xFFFF_FFFF_FFFF_FFFF


def ntp_to_seconds(ntp: int) -> float:
    """Seconds since 1900 for a 64-bit NTP timestamp (inverse of :func:`ntp_from_seconds`)."""
    return ntp / (1 << 32)


def ntp_middle32(ntp: int) -> int:
    """Middle 32 bits of an NTP timestamp (16.16 seconds): the LSR of RFC 3550 §6.4.1."""
    return (ntp >> 16) & 0xFFFF_FFFF


def rtt_seconds(block: ReportBlock, arrival_mid32: int) -> float | None:
    """Round-trip time from a report block about our stream (RFC 3550 §6.4.1).

    ``arrival_mid32`` is :func:`ntp_middle32` of the NTP time the report arrived, on the
    clock our SRs are stamped with. RTT = arrival - LSR - DLSR, in 16.16 seconds. Returns
    ``None`` if the peer has not received an SR yet (LSR 0); a slightly negative result
    (DLSR rounding) is reported as 0.
    """
    if block.lsr == 0:
        return None
    delta = (arrival_mid32 - block.lsr - block.dlsr) & 0xFFFF_FFFF
    if delta & 0x8000_0000:
        return 0.0
    return delta / 65536


# --- receiver statistics ----------------------------------------------------------------------


@final
class ReceiverStatistics:
    """Reception statistics for one remote source, producing our report blocks about it.

    Loss follows RFC 3550 Appendix A.3 and jitter Appendix A.8. Sequence numbers are extended
    with :class:`~sessions.webrtc.rtp.SequenceTracker` (the SRTP index estimate) rather than
    the A.1 probation machine: SRTP authentication already vouches for every packet.
    """

    __slots__ = (
        "_base",
        "_clock_rate",
        "_expected_prior",
        "_jitter",
        "_last_sr_arrival",
        "_last_sr_mid32",
        "_previous",
        "_received",
        "_received_prior",
        "_sequence",
        "ssrc",
    )

    def __init__(self, ssrc: int, clock_rate: int, *, after: int | None = None) -> None:
        """``after``: the highest packet index of this source that someone else (the
        session's previous owner, before a planned move) already received: reception counts
        from the next one, so that packets of the source's that arrive here late, but after
        that one, are neither before the base (negative loss, RFC 3550 §A.3) nor a wrap."""
        if clock_rate <= 0:
            raise ValueError("clock rate must be positive")
        #: the source these statistics are about
        self.ssrc = ssrc
        self._clock_rate = clock_rate
        self._sequence = SequenceTracker(after)
        self._base: int | None = None if after is None else after + 1
        self._received = 0
        self._expected_prior = 0
        self._received_prior = 0
        self._jitter = 0.0
        self._previous: tuple[int, float] | None = None  # (RTP timestamp, arrival seconds)
        self._last_sr_mid32 = 0
        self._last_sr_arrival: float | None = None

    def record_packet(self, sequence_number: int, rtp_timestamp: int, arrival: float) -> None:
        """Count one RTP packet (duplicates and late ones included, as A.3 says)."""
        index = self._sequence.update(sequence_number)
        if self._base is None:
            self._base = index
        self._received += 1
        # RFC 3550 §A.8: D(i-1, i) = (R_i - R_{i-1}) - (S_i - S_{i-1}) in timestamp units;
        # J += (|D| - J) / 16. Differences keep this exact across the 32-bit timestamp wrap.
        previous = self._previous
        if previous is not None:
            prev_ts, prev_arrival = previous
            ts_delta = ((rtp_timestamp - prev_ts + (1 << 31)) & 0xFFFF_FFFF) - (1 << 31)
            d = (arrival - prev_arrival) * self._clock_rate - ts_delta
            self._jitter += (abs(d) - self._jitter) / 16
        self._previous = (rtp_timestamp, arrival)

    def record_sender_report(self, ntp_timestamp: int, arrival: float) -> None:
        """Remember an SR from this source, for the LSR and DLSR of our next report."""
        self._last_sr_mid32 = ntp_middle32(ntp_timestamp)
        self._last_sr_arrival = arrival

    @property
    def received(self) -> int:
        """Packets received so far, duplicates included."""
        return self._received

    @property
    def expected(self) -> int:
        """Packets expected: extended highest minus extended base, plus one (RFC 3550 §A.3)."""
        highest = self._sequence.highest_index
        if self._base is None or highest is None:
            return 0
        return highest - self._base + 1

    @property
    def lost(self) -> int:
        """Cumulative packets lost; negative if duplicates outnumber losses (RFC 3550 §A.3)."""
        return self.expected - self._received

    @property
    def jitter(self) -> float:
        """Interarrival jitter estimate in RTP timestamp units (RFC 3550 §A.8)."""
        return self._jitter

    def report_block(self, now: float) -> ReportBlock | None:
        """The report block for a report sent at ``now``; ``None`` before any packet.

        Starts a new interval for the fraction lost, so call it once per report sent.
        """
        highest = self._sequence.highest_index
        if highest is None:
            return None
        expected = self.expected
        # RFC 3550 §A.3: fraction lost over the interval since the previous report.
        expected_interval = expected - self._expected_prior
        received_interval = self._received - self._received_prior
        self._expected_prior = expected
        self._received_prior = self._received
        lost_interval = expected_interval - received_interval
        if expected_interval == 0 or lost_interval <= 0:
            fraction = 0
        else:
            fraction = min((lost_interval << 8) // expected_interval, 255)
        # RFC 3550 §A.3: clamp the cumulative loss to the signed 24-bit field.
        cumulative = max(-(1 << 23), min(self.lost, (1 << 23) - 1))
        dlsr = 0
        if self._last_sr_arrival is not None:
            dlsr = max(0, round((now - self._last_sr_arrival) * 65536)) & 0xFFFF_FFFF
        return ReportBlock(
            ssrc=self.ssrc,
            fraction_lost=fraction,
            cumulative_lost=cumulative,
            highest_sequence=highest & 0xFFFF_FFFF,
            jitter=int(self._jitter) & 0xFFFF_FFFF,
            lsr=self._last_sr_mid32,
            dlsr=dlsr,
        )
