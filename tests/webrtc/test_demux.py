"""First-byte demultiplexing (RFC 7983 §7, RFC 9443) and the RTP/RTCP split (RFC 5761 §4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sessions.webrtc import stun
from sessions.webrtc.demux import PacketKind, classify, is_rtcp

RANGES = [
    (0, 3, PacketKind.STUN),
    (4, 15, PacketKind.UNKNOWN),
    (16, 19, PacketKind.ZRTP),
    (20, 63, PacketKind.DTLS),
    (64, 79, PacketKind.TURN_CHANNEL),
    (80, 127, PacketKind.UNKNOWN),
    (128, 191, PacketKind.RTP_RTCP),
    (192, 255, PacketKind.UNKNOWN),
]


def expected_kind(first: int) -> PacketKind:
    for low, high, kind in RANGES:
        if low <= first <= high:
            return kind
    raise AssertionError(first)


def test_ranges_cover_every_byte_once() -> None:
    covered = [b for low, high, _ in RANGES for b in range(low, high + 1)]
    assert covered == list(range(256))


@pytest.mark.parametrize("first", range(256))
def test_every_first_byte(first: int) -> None:
    assert classify(bytes((first,))) is expected_kind(first)
    assert classify(bytes((first,)) + b"\x00" * 40) is expected_kind(first)


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        (3, PacketKind.STUN),
        (4, PacketKind.UNKNOWN),
        (15, PacketKind.UNKNOWN),
        (16, PacketKind.ZRTP),
        (19, PacketKind.ZRTP),
        (20, PacketKind.DTLS),
        (63, PacketKind.DTLS),
        (64, PacketKind.TURN_CHANNEL),
        (79, PacketKind.TURN_CHANNEL),
        (80, PacketKind.UNKNOWN),
        (127, PacketKind.UNKNOWN),
        (128, PacketKind.RTP_RTCP),
        (191, PacketKind.RTP_RTCP),
        (192, PacketKind.UNKNOWN),
    ],
)
def test_boundaries(first: int, kind: PacketKind) -> None:
    assert classify(bytes((first, 0))) is kind


def test_empty_input_is_unknown() -> None:
    assert classify(b"") is PacketKind.UNKNOWN
    assert not is_rtcp(b"")
    assert not is_rtcp(b"\x80")


def test_real_packets() -> None:
    request = stun.binding_request(
        bytes(12), username="a:b", priority=1, controlling=True, tie_breaker=1
    )
    assert classify(stun.encode(request)) is PacketKind.STUN
    assert classify(bytes.fromhex("16fefd0000")) is PacketKind.DTLS  # DTLS 1.2 handshake
    assert classify(bytes.fromhex("4000000c")) is PacketKind.TURN_CHANNEL  # channel 0x4000
    rtp = bytes.fromhex("80 6f 00 01 00 00 00 a0 12 34 56 78".replace(" ", ""))  # PT 111 Opus
    assert classify(rtp) is PacketKind.RTP_RTCP
    assert not is_rtcp(rtp)
    rr = bytes.fromhex("81 c9 00 07".replace(" ", "")) + bytes(28)
    assert classify(rr) is PacketKind.RTP_RTCP
    assert is_rtcp(rr)


@pytest.mark.parametrize("second", range(256))
def test_rtcp_by_second_byte(second: int) -> None:
    # RFC 5761 §4: RTCP packet types 192..223 (SR 200, RR 201, ..., XR 207) vs RTP PT+marker.
    assert is_rtcp(bytes((0x80, second))) is (192 <= second <= 223)


@given(st.binary(max_size=64))
def test_never_raises(data: bytes) -> None:
    assert isinstance(classify(data), PacketKind)
    assert isinstance(is_rtcp(data), bool)
