"""RTP header (RFC 3550 §5.1), header extensions (RFC 8285) and sequence-number arithmetic."""

from __future__ import annotations

import contextlib
import struct

import pytest
from aiortc import rtp as aiortc_rtp
from hypothesis import given, settings
from hypothesis import strategies as st

from sessions.webrtc import rtp
from sessions.webrtc.errors import RtpError
from sessions.webrtc.rtp import ONE_BYTE_PROFILE, RtpPacket, SequenceTracker, seq_distance

# --- vectors ----------------------------------------------------------------------------------


def test_minimal_opus_packet() -> None:
    data = bytes.fromhex("806f1234deadbeef01020304") + b"opus"
    packet = rtp.parse(data)
    assert packet == RtpPacket(
        payload_type=111,
        sequence_number=0x1234,
        timestamp=0xDEADBEEF,
        ssrc=0x01020304,
        payload=b"opus",
    )
    assert rtp.serialize(packet) == data


def test_marker_csrcs_and_padding() -> None:
    data = (
        bytes.fromhex("a2 e0 0001 00000002 00000003".replace(" ", ""))
        + bytes.fromhex("0000000a 0000000b".replace(" ", ""))
        + b"pay"
        + b"\x00\x00\x03"
    )
    packet = rtp.parse(data)
    assert packet.marker
    assert packet.payload_type == 0x60
    assert packet.csrcs == (10, 11)
    assert packet.payload == b"pay"
    assert packet.padding == 3
    assert rtp.serialize(packet) == data


def test_one_byte_extensions() -> None:
    # audio level (id 1, 1 byte), abs-send-time (id 3, 3 bytes), a padding byte between, then
    # padding to the 32-bit boundary (RFC 8285 §4.2).
    ext = bytes.fromhex("10 aa 00 32 010203 00".replace(" ", ""))
    data = bytes.fromhex("906f000100000000000000ff") + struct.pack("!HH", 0xBEDE, 2) + ext + b"x"
    packet = rtp.parse(data)
    assert packet.extension_profile == ONE_BYTE_PROFILE
    assert packet.extensions == ((1, b"\xaa"), (3, b"\x01\x02\x03"))
    assert packet.extension(3) == b"\x01\x02\x03"
    assert packet.extension(2) is None
    assert packet.extension_data == b""
    assert packet.payload == b"x"
    assert rtp.parse(rtp.serialize(packet)) == packet


def test_one_byte_id_15_stops_processing() -> None:
    ext = bytes.fromhex("10aa f5 ff".replace(" ", ""))  # id 15: ignore it and the rest
    data = bytes.fromhex("906f000100000000000000ff") + struct.pack("!HH", 0xBEDE, 1) + ext
    assert rtp.parse(data).extensions == ((1, b"\xaa"),)


def test_two_byte_extensions_keep_appbits() -> None:
    ext = bytes.fromhex("05 00 c8 03 616263 00".replace(" ", ""))  # id 5 empty, id 200
    data = bytes.fromhex("906f000100000000000000ff") + struct.pack("!HH", 0x100A, 2) + ext
    packet = rtp.parse(data)
    assert packet.extension_profile == 0x100A
    assert rtp.is_two_byte_profile(0x100A)
    assert packet.extensions == ((5, b""), (200, b"abc"))
    assert rtp.parse(rtp.serialize(packet)) == packet


def test_generic_profile_extension_is_opaque() -> None:
    data = bytes.fromhex("906f000100000000000000ff") + struct.pack("!HH", 0xABCD, 2) + b"12345678"
    packet = rtp.parse(data)
    assert packet.extension_profile == 0xABCD
    assert packet.extensions == ()
    assert packet.extension_data == b"12345678"
    assert rtp.serialize(packet) == data


def test_empty_extension_and_empty_payload() -> None:
    data = bytes.fromhex("906f000100000000000000ff") + struct.pack("!HH", 0xBEDE, 0)
    packet = rtp.parse(data)
    assert packet.extension_profile == ONE_BYTE_PROFILE
    assert packet.extensions == ()
    assert packet.payload == b""
    assert rtp.serialize(packet) == data


HEADER = bytes.fromhex("806f000100000000000000ff")
MALFORMED = [
    b"",
    HEADER[:11],
    bytes((0x40,)) + HEADER[1:],  # version 1
    bytes((0x00,)) + HEADER[1:],  # version 0
    bytes((0x81,)) + HEADER[1:],  # one CSRC missing
    bytes((0x8F,)) + HEADER[1:] + bytes(56),  # 15 CSRCs, 14 present
    bytes((0xA0,)) + HEADER[1:] + b"\x00",  # padding count 0
    bytes((0xA0,)) + HEADER[1:] + b"\x02",  # padding longer than the payload
    bytes((0x90,)) + HEADER[1:] + b"\xbe\xde",  # extension header truncated
    bytes((0x90,)) + HEADER[1:] + b"\xbe\xde\x00\x01",  # extension body missing
    bytes((0x90,)) + HEADER[1:] + b"\xbe\xde\x00\x01\x13\xaa\x00\x00",  # element overrun
    bytes((0x90,)) + HEADER[1:] + b"\x10\x00\x00\x01\x00\x00\x00\x07",  # two-byte truncated
    bytes((0x90,)) + HEADER[1:] + b"\x10\x00\x00\x01\x07\x09\x00\x00",  # two-byte overrun
    bytes((0xB0,)) + HEADER[1:] + b"\xbe\xde\x00\x01\x10\xaa\x00\x04",  # padding eats ext
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_packets_raise_rtp_error(data: bytes) -> None:
    with pytest.raises(RtpError):
        rtp.parse(data)


def test_serialize_rejects_out_of_range_fields() -> None:
    base = RtpPacket(payload_type=111, sequence_number=1, timestamp=2, ssrc=3)
    bad = [
        RtpPacket(payload_type=128, sequence_number=1, timestamp=2, ssrc=3),
        RtpPacket(payload_type=111, sequence_number=65536, timestamp=2, ssrc=3),
        RtpPacket(payload_type=111, sequence_number=1, timestamp=2**32, ssrc=3),
        RtpPacket(payload_type=111, sequence_number=1, timestamp=2, ssrc=-1),
        RtpPacket(payload_type=111, sequence_number=1, timestamp=2, ssrc=3, csrcs=(0,) * 16),
        RtpPacket(payload_type=111, sequence_number=1, timestamp=2, ssrc=3, padding=256),
        RtpPacket(
            payload_type=111,
            sequence_number=1,
            timestamp=2,
            ssrc=3,
            extension_profile=ONE_BYTE_PROFILE,
            extensions=((15, b"x"),),
        ),
        RtpPacket(
            payload_type=111,
            sequence_number=1,
            timestamp=2,
            ssrc=3,
            extension_profile=ONE_BYTE_PROFILE,
            extensions=((1, b""),),
        ),
        RtpPacket(
            payload_type=111,
            sequence_number=1,
            timestamp=2,
            ssrc=3,
            extension_profile=0xABCD,
            extension_data=b"123",
        ),
        RtpPacket(
            payload_type=111,
            sequence_number=1,
            timestamp=2,
            ssrc=3,
            extension_profile=0xABCD,
            extensions=((1, b"x"),),
        ),
    ]
    assert rtp.serialize(base)
    for packet in bad:
        with pytest.raises(ValueError):
            rtp.serialize(packet)


# --- interop with aiortc ----------------------------------------------------------------------


def test_aiortc_packets_parse() -> None:
    theirs = aiortc_rtp.RtpPacket(
        payload_type=111, marker=1, sequence_number=65535, timestamp=4_000_000_000, ssrc=42
    )
    theirs.csrc = [7, 8]
    theirs.payload = b"\x01" * 50
    theirs.padding_size = 6
    ours = rtp.parse(theirs.serialize())
    assert (ours.payload_type, ours.marker, ours.sequence_number) == (111, True, 65535)
    assert (ours.timestamp, ours.ssrc, ours.csrcs) == (4_000_000_000, 42, (7, 8))
    assert (ours.payload, ours.padding) == (b"\x01" * 50, 6)

    back = aiortc_rtp.RtpPacket.parse(rtp.serialize(ours))
    assert (back.payload_type, back.marker, back.sequence_number) == (111, 1, 65535)
    assert (back.csrc, back.payload, back.padding_size) == ([7, 8], b"\x01" * 50, 6)


@pytest.mark.parametrize(
    "elements",
    [
        [(1, b"\x90")],
        [(1, b"\x90"), (3, b"\x00\x10\x20"), (14, b"x" * 16)],
        [(1, b"\x90"), (20, b"mid")],  # id > 14: two-byte form
        [(2, b""), (4, b"y" * 40)],  # empty / long value: two-byte form
    ],
)
def test_extension_elements_agree_with_aiortc(elements: list[tuple[int, bytes]]) -> None:
    profile, body = aiortc_rtp.pack_header_extensions(elements)
    data = bytes((0x90,)) + HEADER[1:] + struct.pack("!HH", profile, len(body) // 4) + body
    ours = rtp.parse(data)
    assert ours.extension_profile == profile
    assert list(ours.extensions) == elements
    ours_body = rtp.serialize(ours)[16:]
    assert aiortc_rtp.unpack_header_extensions(profile, ours_body) == elements


# --- property tests ---------------------------------------------------------------------------


@st.composite
def packets(draw: st.DrawFn) -> RtpPacket:
    form = draw(st.sampled_from(["none", "one", "two", "generic"]))
    profile: int | None = None
    elements: tuple[tuple[int, bytes], ...] = ()
    data = b""
    if form == "one":
        profile = ONE_BYTE_PROFILE
        element = st.tuples(st.integers(1, 14), st.binary(min_size=1, max_size=16))
        elements = tuple(draw(st.lists(element, max_size=5)))
    elif form == "two":
        profile = 0x1000 | draw(st.integers(0, 15))
        element = st.tuples(st.integers(1, 255), st.binary(max_size=20))
        elements = tuple(draw(st.lists(element, max_size=5)))
    elif form == "generic":
        profile = draw(
            st.integers(0, 0xFFFF).filter(lambda p: p != ONE_BYTE_PROFILE and p >> 4 != 0x100)
        )
        data = draw(st.binary(max_size=24).map(lambda b: b + bytes(-len(b) & 3)))
    return RtpPacket(
        payload_type=draw(st.integers(0, 127)),
        sequence_number=draw(st.integers(0, 0xFFFF)),
        timestamp=draw(st.integers(0, 2**32 - 1)),
        ssrc=draw(st.integers(0, 2**32 - 1)),
        payload=draw(st.binary(max_size=60)),
        marker=draw(st.booleans()),
        csrcs=tuple(draw(st.lists(st.integers(0, 2**32 - 1), max_size=15))),
        extension_profile=profile,
        extensions=elements,
        extension_data=data,
        padding=draw(st.sampled_from([0, 1, 2, 3, 4, 255])),
    )


@given(packets())
def test_parse_inverts_serialize(packet: RtpPacket) -> None:
    data = rtp.serialize(packet)
    assert rtp.parse(data) == packet
    assert rtp.serialize(rtp.parse(data)) == data


@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_arbitrary_bytes_raise_only_rtp_error(data: bytes) -> None:
    with contextlib.suppress(RtpError):
        rtp.parse(data)


@settings(max_examples=300)
@given(packets(), st.data())
def test_mutated_packets_raise_only_rtp_error(packet: RtpPacket, data: st.DataObject) -> None:
    wire = bytearray(rtp.serialize(packet))
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    for candidate in (bytes(wire), bytes(wire[: data.draw(st.integers(0, len(wire)))])):
        with contextlib.suppress(RtpError):
            rtp.parse(candidate)


# --- sequence numbers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        (0, 0, 0),
        (0, 1, 1),
        (1, 0, -1),
        (65535, 0, 1),
        (0, 65535, -1),
        (65530, 5, 11),
        (5, 65530, -11),
        (0, 32767, 32767),
        (0, 32768, -32768),
        (100, 100 + 32767, 32767),
    ],
)
def test_seq_distance(a: int, b: int, distance: int) -> None:
    assert seq_distance(a, b) == distance


@pytest.mark.parametrize(
    ("roc", "s_l", "seq", "index"),
    [
        (0, 10, 11, 11),
        (0, 65535, 0, 65536),  # wrapped forward
        (3, 65000, 100, 4 * 65536 + 100),
        (3, 100, 65000, 2 * 65536 + 65000),  # late packet from the previous cycle
        (3, 100, 32868, 3 * 65536 + 32868),  # exactly half: same cycle (RFC 3711 §3.3.1)
        (3, 40000, 7232, 3 * 65536 + 7232),  # exactly half the other way: same cycle
        (0, 5, 65535, -1),  # before the stream's first packet, across the wrap
    ],
)
def test_estimate_index(roc: int, s_l: int, seq: int, index: int) -> None:
    assert rtp.estimate_index(roc, s_l, seq) == index


def test_tracker_across_the_wrap() -> None:
    tracker = SequenceTracker()
    assert (tracker.highest_index, tracker.roc, tracker.highest_seq) == (None, 0, None)
    indices = [tracker.update(s) for s in [65533, 65534, 65535, 0, 1, 2]]
    assert indices == [65533, 65534, 65535, 65536, 65537, 65538]
    assert (tracker.roc, tracker.highest_seq, tracker.highest_index) == (1, 2, 65538)


def test_tracker_with_reordering_around_the_wrap() -> None:
    tracker = SequenceTracker()
    seqs = [65532, 65534, 0, 65533, 65535, 2, 1, 65531]
    assert [tracker.update(s) for s in seqs] == [
        65532,
        65534,
        65536,
        65533,
        65535,
        65538,
        65537,
        65531,
    ]
    assert tracker.highest_index == 65538
    assert tracker.roc == 1


def test_estimate_does_not_commit() -> None:
    tracker = SequenceTracker()
    tracker.update(65535)
    assert tracker.estimate(0) == 65536
    assert tracker.roc == 0  # e.g. SRTP authentication failed: nothing learned
    tracker.commit(tracker.estimate(0))
    assert tracker.roc == 1
    tracker.commit(5)  # older: ignored
    assert tracker.highest_index == 65536


def test_tracker_migrates_as_one_integer() -> None:
    tracker = SequenceTracker(7 * 65536 + 65000)
    assert tracker.roc == 7
    assert tracker.update(10) == 8 * 65536 + 10
    with pytest.raises(ValueError):
        SequenceTracker(-1)


@st.composite
def true_indices(draw: st.DrawFn) -> list[int]:
    """A stream of true packet indices with loss, jumps and bounded reordering."""
    index = draw(st.integers(0, 5 * 65536))
    out = [index]
    highest = index
    for step in draw(st.lists(st.integers(-2000, 3000), max_size=80)):
        index = max(highest - 30000, min(index + step, highest + 30000))
        out.append(index)
        highest = max(highest, index)
    return out


@given(true_indices())
def test_tracker_recovers_true_indices(indices: list[int]) -> None:
    tracker = SequenceTracker(indices[0])
    for index in indices:
        assert tracker.update(index & 0xFFFF) == index
    assert tracker.highest_index == max(indices)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 100))
def test_estimate_matches_seq_distance_off_the_tie(s_l: int, seq: int, roc: int) -> None:
    distance = seq_distance(s_l, seq)
    if abs(distance) != 32768:
        assert rtp.estimate_index(roc, s_l, seq) == roc * 65536 + s_l + distance
