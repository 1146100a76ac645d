"""RTCP (RFC 3550 §6): reports, SDES, BYE, compound packets, NTP/RTT and receiver statistics."""

from __future__ import annotations

import contextlib
import struct

import pytest
from aiortc import rtp as aiortc_rtp
from hypothesis import given, settings
from hypothesis import strategies as st

from sessions.webrtc import rtcp
from sessions.webrtc.errors import RtpError
from sessions.webrtc.rtcp import (
    Bye,
    RawRtcpPacket,
    ReceiverReport,
    ReceiverStatistics,
    ReportBlock,
    RtcpType,
    SdesChunk,
    SdesItem,
    SenderReport,
    SourceDescription,
)

BLOCK = ReportBlock(
    ssrc=0x11223344,
    fraction_lost=64,
    cumulative_lost=1000,
    highest_sequence=0x0001_0005,
    jitter=123,
    lsr=0xAABBCCDD,
    dlsr=0x00018000,
)

# --- vectors ----------------------------------------------------------------------------------


def test_sender_report_layout() -> None:
    sr = SenderReport(
        ssrc=0xCAFEBABE,
        ntp_timestamp=0x83AA7E80_80000000,
        rtp_timestamp=48000,
        packet_count=50,
        octet_count=4000,
        reports=(BLOCK,),
    )
    data = rtcp.serialize([sr])
    expected = (
        bytes.fromhex("81c8000c cafebabe 83aa7e80 80000000".replace(" ", ""))
        + struct.pack("!III", 48000, 50, 4000)
        + bytes.fromhex("11223344 400003e8 00010005 0000007b aabbccdd 00018000".replace(" ", ""))
    )
    assert data == expected
    assert rtcp.parse(data) == (sr,)


def test_cumulative_lost_is_signed_24_bit() -> None:
    for lost, wire in [(-1, "ffffff"), (-(1 << 23), "800000"), ((1 << 23) - 1, "7fffff")]:
        rr = ReceiverReport(1, (ReportBlock(2, fraction_lost=0, cumulative_lost=lost),))
        data = rtcp.serialize([rr])
        assert data[13:16] == bytes.fromhex(wire)
        assert rtcp.parse(data) == (rr,)
    with pytest.raises(ValueError):
        rtcp.serialize([ReceiverReport(1, (ReportBlock(2, cumulative_lost=1 << 23),))])


def test_sdes_cname_and_chunk_padding() -> None:
    sdes = SourceDescription(
        (
            SdesChunk(0x01020304, ((SdesItem.CNAME, b"abcd"),)),  # 4+2+4 = 10, +2 nulls
            SdesChunk(5, ((SdesItem.CNAME, b"ab"), (SdesItem.TOOL, b"parley"))),  # 16: +4 nulls
            SdesChunk(6),
        )
    )
    data = rtcp.serialize([sdes])
    assert data[:4] == bytes.fromhex("83ca000a")
    assert data[4:16] == bytes.fromhex("01020304 0104 61626364 0000".replace(" ", ""))
    assert data[16:36] == bytes.fromhex(
        "00000005 0102 6162 0606 706172 6c6579 00000000".replace(" ", "")
    )
    assert data[36:] == bytes.fromhex("00000006 00000000".replace(" ", ""))
    (parsed,) = rtcp.parse(data)
    assert parsed == sdes
    assert isinstance(parsed, SourceDescription)
    assert parsed.chunks[0].cname == "abcd"
    assert parsed.chunks[2].cname is None


def test_bye_with_and_without_reason() -> None:
    for bye in (Bye((1, 2)), Bye((1,), b"going away"), Bye((), b""), Bye()):
        assert rtcp.parse(rtcp.serialize([bye])) == (bye,)
    assert rtcp.serialize([Bye((7,), b"bye")]) == bytes.fromhex("81cb0002 00000007 03627965")


def test_unknown_types_are_kept_raw() -> None:
    pli = bytes.fromhex("81ce0002 00000001 00000002".replace(" ", ""))  # PSFB FMT 1 (PLI)
    nack = bytes.fromhex("81cd0003 00000001 00000002 00640003".replace(" ", ""))  # RTPFB NACK
    xr = bytes.fromhex("80cf0002 00000001 05000000".replace(" ", ""))
    packets = rtcp.parse(pli + nack + xr)
    assert packets == (
        RawRtcpPacket(RtcpType.PSFB, 1, bytes.fromhex("0000000100000002")),
        RawRtcpPacket(RtcpType.RTPFB, 1, bytes.fromhex("000000010000000200640003")),
        RawRtcpPacket(RtcpType.XR, 0, bytes.fromhex("0000000105000000")),
    )
    assert rtcp.serialize(packets) == pli + nack + xr


def test_compound_with_padding_on_the_last_packet() -> None:
    rr = rtcp.serialize([ReceiverReport(9)])
    bye = bytes.fromhex("a1cb0002 00000009 00000004".replace(" ", ""))  # P bit, 4 padding
    assert rtcp.parse(rr + bye) == (ReceiverReport(9), Bye((9,)))


def test_unaligned_raw_bodies_are_padded_on_output() -> None:
    app = RawRtcpPacket(RtcpType.APP, 3, b"12345")
    data = rtcp.serialize([app])
    assert data[0] & 0x20 and len(data) % 4 == 0 and data[-1] == 3
    assert rtcp.parse(data) == (app,)


def test_sr_profile_extension_is_kept() -> None:
    sr = SenderReport(1, 2, 3, 4, 5, (BLOCK,), extension=b"extn")
    assert rtcp.parse(rtcp.serialize([sr])) == (sr,)


# --- interop with aiortc ----------------------------------------------------------------------


def test_aiortc_reports_parse() -> None:
    theirs_block = aiortc_rtp.RtcpReceiverInfo(
        ssrc=7, fraction_lost=12, packets_lost=-5, highest_sequence=70000, jitter=9, lsr=1, dlsr=2
    )
    sr = aiortc_rtp.RtcpSrPacket(
        ssrc=1,
        sender_info=aiortc_rtp.RtcpSenderInfo(
            ntp_timestamp=1 << 40, rtp_timestamp=3, packet_count=4, octet_count=5
        ),
        reports=[theirs_block],
    )
    rr = aiortc_rtp.RtcpRrPacket(ssrc=2, reports=[theirs_block])
    sdes = aiortc_rtp.RtcpSdesPacket(
        chunks=[aiortc_rtp.RtcpSourceInfo(ssrc=1, items=[(1, b"cname-x")])]
    )
    bye = aiortc_rtp.RtcpByePacket(sources=[1])
    data = bytes(sr) + bytes(rr) + bytes(sdes) + bytes(bye)
    block = ReportBlock(7, 12, -5, 70000, 9, 1, 2)
    assert rtcp.parse(data) == (
        SenderReport(1, 1 << 40, 3, 4, 5, (block,)),
        ReceiverReport(2, (block,)),
        SourceDescription((SdesChunk(1, ((1, b"cname-x"),)),)),
        Bye((1,)),
    )


def test_aiortc_parses_our_compound() -> None:
    data = rtcp.serialize(
        [
            SenderReport(1, 1 << 40, 3, 4, 5, (BLOCK,)),
            SourceDescription((SdesChunk(1, ((SdesItem.CNAME, b"parley"),)),)),
            Bye((1,)),
        ]
    )
    sr, sdes, bye = aiortc_rtp.RtcpPacket.parse(data)
    assert isinstance(sr, aiortc_rtp.RtcpSrPacket)
    assert sr.sender_info.ntp_timestamp == 1 << 40
    assert sr.reports[0].packets_lost == 1000
    assert sr.reports[0].lsr == BLOCK.lsr
    assert isinstance(sdes, aiortc_rtp.RtcpSdesPacket)
    assert sdes.chunks[0].items == [(1, b"parley")]
    assert isinstance(bye, aiortc_rtp.RtcpByePacket)
    assert bye.sources == [1]


# --- malformed input --------------------------------------------------------------------------

MALFORMED = [
    b"",
    b"\x80\xc9\x00",  # truncated header
    b"\x40\xc9\x00\x01\x00\x00\x00\x01",  # version 1
    b"\x80\xc9\x00\x02\x00\x00\x00\x01",  # length overruns
    b"\x80\xc9\x00\x00",  # RR without SSRC
    b"\x81\xc9\x00\x01\x00\x00\x00\x01",  # report block missing
    b"\x80\xc8\x00\x01\x00\x00\x00\x01",  # SR without sender info
    b"\xa0\xc9\x00\x01\x00\x00\x00\x00",  # padding count 0
    b"\xa0\xc9\x00\x01\x00\x00\x00\x05",  # padding eats the header
    b"\x81\xca\x00\x01\x00\x00\x00\x01",  # SDES chunk without terminator
    b"\x81\xca\x00\x02\x00\x00\x00\x01\x01\x09ab",  # SDES item overrun
    b"\x82\xca\x00\x02\x00\x00\x00\x01\x00\x00\x00\x00",  # second SDES chunk missing
    b"\x81\xca\x00\x02\x00\x00\x00\x01\x01\x02ab",  # SDES item list not terminated
    b"\x82\xcb\x00\x01\x00\x00\x00\x01",  # BYE source missing
    b"\x81\xcb\x00\x02\x00\x00\x00\x01\x09abc",  # BYE reason overrun
    rtcp.serialize([ReceiverReport(1)]) + b"\x80",  # trailing junk
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_raise_rtp_error(data: bytes) -> None:
    with pytest.raises(RtpError):
        rtcp.parse(data)


def test_bad_cname_fails_with_rtp_error() -> None:
    (sdes,) = rtcp.parse(rtcp.serialize([SourceDescription((SdesChunk(1, ((1, b"\xff"),)),))]))
    assert isinstance(sdes, SourceDescription)
    with pytest.raises(RtpError):
        _ = sdes.chunks[0].cname


def test_serialize_rejects_out_of_range() -> None:
    for packet in (
        ReceiverReport(1, (BLOCK,) * 32),
        ReceiverReport(1, (ReportBlock(1, fraction_lost=256),)),
        ReceiverReport(2**32),
        Bye((1,), b"x" * 256),
        SourceDescription((SdesChunk(1, ((0, b"x"),)),)),
        RawRtcpPacket(300, 0, b""),
        RawRtcpPacket(205, 32, b""),
    ):
        with pytest.raises(ValueError):
            rtcp.serialize_packet(packet)


# --- NTP and RTT ------------------------------------------------------------------------------


def test_ntp_conversions() -> None:
    assert rtcp.ntp_from_seconds(1.5) == (1 << 32) | (1 << 31)
    assert rtcp.ntp_to_seconds((1 << 32) | (1 << 30)) == 1.25
    now = 1_700_000_000.123456 + rtcp.NTP_UNIX_OFFSET
    assert abs(rtcp.ntp_to_seconds(rtcp.ntp_from_seconds(now)) - now) < 1e-6
    assert rtcp.ntp_middle32(0x1122334455667788) == 0x33445566
    assert rtcp.ntp_from_seconds(2.0**32 + 3) == 3 << 32  # next NTP era wraps


def test_rtt_from_report_block() -> None:
    sent = 3_900_000_000.0  # our SR went out at this NTP time
    lsr = rtcp.ntp_middle32(rtcp.ntp_from_seconds(sent))
    block = ReportBlock(1, lsr=lsr, dlsr=round(0.25 * 65536))  # peer held it 250 ms
    arrival = rtcp.ntp_middle32(rtcp.ntp_from_seconds(sent + 0.25 + 0.080))
    rtt = rtcp.rtt_seconds(block, arrival)
    assert rtt is not None
    assert abs(rtt - 0.080) < 2 / 65536
    assert rtcp.rtt_seconds(ReportBlock(1, lsr=0, dlsr=5), arrival) is None
    # DLSR rounding can make it a hair negative: clamp, don't wrap to 18 hours
    assert rtcp.rtt_seconds(ReportBlock(1, lsr=lsr, dlsr=round(0.331 * 65536)), arrival) == 0.0


def test_rtt_across_the_mid32_wrap() -> None:
    block = ReportBlock(1, lsr=0xFFFF_FF00, dlsr=0x10)
    assert rtcp.rtt_seconds(block, 0x0000_0100) == (0x200 - 0x10) / 65536


# --- receiver statistics ----------------------------------------------------------------------

CLOCK = 48_000
PTIME = 0.02


def test_loss_and_fraction_over_the_wrap() -> None:
    stats = ReceiverStatistics(ssrc=77, clock_rate=CLOCK)
    assert stats.report_block(0.0) is None
    for i in range(1000):
        if i % 10 == 5:
            continue  # 10% loss
        stats.record_packet((65000 + i) & 0xFFFF, (i * 960) & 0xFFFF_FFFF, i * PTIME)
    assert (stats.expected, stats.received, stats.lost) == (1000, 900, 100)
    block = stats.report_block(20.0)
    assert block is not None
    assert block.ssrc == 77
    assert block.fraction_lost == (100 << 8) // 1000 == 25
    assert block.cumulative_lost == 100
    assert block.highest_sequence == 65000 + 999  # ROC 1 in the upper 16 bits
    assert block.highest_sequence >> 16 == 1
    assert block.jitter == 0  # perfectly paced
    assert (block.lsr, block.dlsr) == (0, 0)

    # next interval: 500 packets, none lost; the fraction restarts, the total does not
    for i in range(1000, 1500):
        stats.record_packet((65000 + i) & 0xFFFF, i * 960, i * PTIME)
    block = stats.report_block(30.0)
    assert block is not None
    assert (block.fraction_lost, block.cumulative_lost) == (0, 100)

    # an interval with nothing received at all
    block = stats.report_block(31.0)
    assert block is not None
    assert block.fraction_lost == 0


def test_duplicates_make_loss_negative_but_fraction_zero() -> None:
    stats = ReceiverStatistics(ssrc=1, clock_rate=CLOCK)
    for i in range(10):
        stats.record_packet(i, i * 960, i * PTIME)
        stats.record_packet(i, i * 960, i * PTIME + 0.001)
    block = stats.report_block(1.0)
    assert block is not None
    assert (block.cumulative_lost, block.fraction_lost) == (-10, 0)


def test_reordering_is_not_loss() -> None:
    stats = ReceiverStatistics(ssrc=1, clock_rate=CLOCK)
    for seq in [10, 12, 11, 14, 13, 15]:
        stats.record_packet(seq, seq * 960, seq * PTIME)
    block = stats.report_block(1.0)
    assert block is not None
    assert (block.cumulative_lost, block.fraction_lost, block.highest_sequence) == (0, 0, 15)


def test_reception_after_a_move_counts_from_where_the_old_owner_stopped() -> None:
    """The new owner of a moved session: the old one received up to index 99. Packets it
    kept and handed on (100, 101) arrive here after newer direct ones (102, 103): no
    negative loss, and the highest stays the highest."""
    stats = ReceiverStatistics(ssrc=1, clock_rate=CLOCK, after=99)
    for seq in [102, 103, 100, 101, 104]:
        stats.record_packet(seq, seq * 960, seq * PTIME)
    block = stats.report_block(5.0)
    assert block is not None
    assert (block.cumulative_lost, block.highest_sequence) == (0, 104)
    fresh = ReceiverStatistics(ssrc=1, clock_rate=CLOCK)  # what it did before: base 102
    for seq in [102, 103, 100, 101, 104]:
        fresh.record_packet(seq, seq * 960, seq * PTIME)
    assert fresh.lost == -2


def test_jitter_converges_to_the_transit_swing() -> None:
    # Transit alternates between 0 and 5 ms: |D| is 5 ms = 240 timestamp units every packet,
    # and J += (|D| - J) / 16 converges to 240 (RFC 3550 §A.8).
    stats = ReceiverStatistics(ssrc=1, clock_rate=CLOCK)
    base_ts = 2**32 - 960 * 100  # and the RTP timestamp wraps halfway through
    for i in range(400):
        delay = 0.005 if i % 2 else 0.0
        stats.record_packet(i, (base_ts + i * 960) & 0xFFFF_FFFF, 100.0 + i * PTIME + delay)
    assert abs(stats.jitter - 240) < 0.01
    block = stats.report_block(200.0)
    assert block is not None
    assert block.jitter in (239, 240)


def test_jitter_of_a_single_step() -> None:
    stats = ReceiverStatistics(ssrc=1, clock_rate=8000)
    stats.record_packet(0, 0, 0.0)
    stats.record_packet(1, 160, 0.02 + 0.002)  # 2 ms late = 16 units
    assert stats.jitter == pytest.approx(16 / 16)


def test_lsr_and_dlsr_from_the_last_sender_report() -> None:
    stats = ReceiverStatistics(ssrc=1, clock_rate=CLOCK)
    stats.record_packet(1, 0, 10.0)
    ntp = 0x83AA7E80_12345678
    stats.record_sender_report(ntp, arrival=10.0)
    block = stats.report_block(10.5)
    assert block is not None
    assert block.lsr == rtcp.ntp_middle32(ntp) == 0x7E801234
    assert block.dlsr == 32768


def test_statistics_reject_bad_clock_rate() -> None:
    with pytest.raises(ValueError):
        ReceiverStatistics(ssrc=1, clock_rate=0)


# --- property tests ---------------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
blocks = st.builds(
    ReportBlock,
    ssrc=u32,
    fraction_lost=st.integers(0, 255),
    cumulative_lost=st.integers(-(1 << 23), (1 << 23) - 1),
    highest_sequence=u32,
    jitter=u32,
    lsr=u32,
    dlsr=u32,
)
block_lists = st.lists(blocks, max_size=4).map(tuple)
extensions = st.binary(max_size=12)
packets = st.one_of(
    st.builds(
        SenderReport,
        ssrc=u32,
        ntp_timestamp=st.integers(0, 2**64 - 1),
        rtp_timestamp=u32,
        packet_count=u32,
        octet_count=u32,
        reports=block_lists,
        extension=extensions,
    ),
    st.builds(ReceiverReport, ssrc=u32, reports=block_lists, extension=extensions),
    st.builds(
        SourceDescription,
        st.lists(
            st.builds(
                SdesChunk,
                ssrc=u32,
                items=st.lists(
                    st.tuples(st.integers(1, 255), st.binary(max_size=20)), max_size=3
                ).map(tuple),
            ),
            max_size=3,
        ).map(tuple),
    ),
    st.builds(
        Bye,
        ssrcs=st.lists(u32, max_size=4).map(tuple),
        reason=st.none() | st.binary(max_size=30),
    ),
    st.builds(
        RawRtcpPacket,
        packet_type=st.integers(204, 255),
        count=st.integers(0, 31),
        body=st.binary(max_size=30),
    ),
)


@given(st.lists(packets, min_size=1, max_size=4))
def test_parse_inverts_serialize(compound: list[rtcp.RtcpPacket]) -> None:
    data = rtcp.serialize(compound)
    assert len(data) % 4 == 0
    assert rtcp.parse(data) == tuple(compound)


@settings(max_examples=300)
@given(st.binary(max_size=100))
def test_arbitrary_bytes_raise_only_rtp_error(data: bytes) -> None:
    with contextlib.suppress(RtpError):
        rtcp.parse(data)


@settings(max_examples=300)
@given(st.lists(packets, min_size=1, max_size=3), st.data())
def test_mutated_compounds_raise_only_rtp_error(
    compound: list[rtcp.RtcpPacket], data: st.DataObject
) -> None:
    wire = bytearray(rtcp.serialize(compound))
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    for candidate in (bytes(wire), bytes(wire[: data.draw(st.integers(0, len(wire)))])):
        with contextlib.suppress(RtpError):
            for packet in rtcp.parse(candidate):
                if isinstance(packet, SourceDescription):
                    for chunk in packet.chunks:
                        with contextlib.suppress(RtpError):
                            _ = chunk.cname
