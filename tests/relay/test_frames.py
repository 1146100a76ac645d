"""Tunnel framing: round trips, sizes, and malformed frames refused with FrameError only."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.tunnel import frames
from relay.tunnel.frames import FrameError, FromClient, ToClient

SESSION = "abcdefghijklmnopqrst"


@pytest.mark.parametrize("client", [("203.0.113.7", 50000), ("2001:db8::1", 3478), ("::", 0)])
def test_round_trips(client: tuple[str, int]) -> None:
    payload = bytes(range(160))
    up = frames.decode(frames.encode_from_client(SESSION, client, payload))
    assert up == FromClient(SESSION, client, payload)
    down = frames.decode(frames.encode_to_client(SESSION, 2**40 + 3, client, payload))
    assert down == ToClient(SESSION, 2**40 + 3, client, payload)
    on = frames.decode(frames.encode_hand_on(SESSION, 77, "node-b", client, payload))
    assert on == frames.HandOn(SESSION, 77, "node-b", client, payload)


def test_header_is_compact() -> None:
    frame = frames.encode_from_client(SESSION, ("192.0.2.1", 1), b"")
    assert len(frame) == 2 + 6 + 1 + 20  # type, flags, address, id length, id
    frame = frames.encode_to_client(SESSION, 1, ("2001:db8::1", 1), b"")
    assert len(frame) == 2 + 8 + 18 + 1 + 20


def test_local_misuse_raises_value_error() -> None:
    with pytest.raises(ValueError):
        frames.encode_from_client("", ("192.0.2.1", 1), b"")
    with pytest.raises(ValueError):
        frames.encode_from_client("x" * 256, ("192.0.2.1", 1), b"")
    with pytest.raises(ValueError):
        frames.encode_from_client(SESSION, ("not an ip", 1), b"")
    with pytest.raises(ValueError):
        frames.encode_from_client(SESSION, ("192.0.2.1", 70000), b"")


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x01",
        b"\x03\x00" + bytes(30),  # unknown type
        b"\x01\x02" + bytes(30),  # unknown flag
        b"\x01\x00\x7f\x00\x00\x01",  # truncated port
        b"\x01\x00\x7f\x00\x00\x01\x00\x01",  # no id length
        b"\x01\x00\x7f\x00\x00\x01\x00\x01\x00",  # empty id
        b"\x01\x00\x7f\x00\x00\x01\x00\x01\x05abc",  # id shorter than its length
        b"\x01\x00\x7f\x00\x00\x01\x00\x01\x02\xff\xfe",  # id not ASCII
        b"\x02\x00\x00\x00\x00",  # truncated epoch
        b"\x01\x01" + bytes(10),  # truncated IPv6 address
    ],
)
def test_malformed_frames_are_refused(frame: bytes) -> None:
    with pytest.raises(FrameError):
        frames.decode(frame)


@given(st.binary(max_size=80))
def test_decode_never_raises_anything_else(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        frames.decode(data)


@given(st.binary(min_size=1, max_size=60), st.integers(0, 255))
def test_mutated_frames_decode_or_fail_cleanly(data: bytes, position: int) -> None:
    frame = bytearray(frames.encode_to_client(SESSION, 7, ("198.51.100.2", 9), data))
    frame[position % len(frame)] ^= 0xFF
    with contextlib.suppress(FrameError):
        frames.decode(bytes(frame))


def _as_decode_reads(frame: bytes) -> tuple[str, int, tuple[str, int], bytes] | str:
    """What decode makes of a frame, in ToClientReader.read's terms ("error"/"other")."""
    try:
        decoded = frames.decode(frame)
    except FrameError:
        return "error"
    if not isinstance(decoded, ToClient):
        return "other"
    return decoded.session, decoded.epoch, decoded.client, decoded.payload


def _as_reader_reads(
    reader: frames.ToClientReader, frame: bytes
) -> tuple[str, int, tuple[str, int], bytes] | str:
    """The reader, and decode for what it leaves to decode (as the relay reads frames)."""
    try:
        fields = reader.read(frame)
    except FrameError:
        return "error"
    if fields is None:
        left = _as_decode_reads(frame)
        assert isinstance(left, str), "the reader left a TO_CLIENT frame to decode"
        return left
    return fields


@pytest.mark.parametrize("client", [("203.0.113.7", 50000), ("2001:db8::1", 3478)])
def test_a_client_header_is_the_frame_without_its_payload(client: tuple[str, int]) -> None:
    header = frames.client_header(SESSION, client)
    assert header + b"media" == frames.encode_from_client(SESSION, client, b"media")


@given(
    st.lists(
        st.tuples(
            st.sampled_from([("198.51.100.2", 9), ("198.51.100.3", 9), ("2001:db8::7", 9)]),
            st.sampled_from(["s1", "s2", SESSION]),
            st.integers(0, 2**64 - 1),
            st.binary(max_size=20),
            st.integers(-1, 80),
            st.integers(0, 255),
        ),
        max_size=30,
    )
)
def test_the_to_client_reader_reads_what_decode_reads(
    items: list[tuple[tuple[str, int], str, int, bytes, int, int]],
) -> None:
    # Frames for a few clients, many the same header (the reader remembers it), some mutated
    # (-1: not) or cut short after it remembered their header: same fields or same refusal.
    reader = frames.ToClientReader(limit=2)
    for client, session, epoch, payload, position, cut in items:
        frame = bytearray(frames.encode_to_client(session, epoch, client, payload))
        if position >= 0:
            frame[position % len(frame)] ^= 0xFF
        for variant in (bytes(frame), bytes(frame[: cut % (len(frame) + 1)])):
            assert _as_reader_reads(reader, variant) == _as_decode_reads(variant)


def test_the_to_client_reader_remembers_headers_up_to_its_limit() -> None:
    reader = frames.ToClientReader(limit=2)
    one, two, three = (("198.51.100.2", port) for port in (1, 2, 3))
    for client in (one, two, one):
        assert reader.read(frames.encode_to_client(SESSION, 5, client, b"m")) == (
            SESSION,
            5,
            client,
            b"m",
        )
    assert sum(len(known) for known in reader._known) == 2
    reader.read(frames.encode_to_client(SESSION, 5, three, b"m"))
    assert sum(len(known) for known in reader._known) == 1  # full: it started over
    # Other kinds are left to decode.
    assert reader.read(frames.encode_from_client(SESSION, one, b"m")) is None
    assert reader.read(frames.encode_hand_on(SESSION, 5, "node-b", one, b"m")) is None


def _from_client_decode_reads(frame: bytes) -> tuple[str, tuple[str, int], bytes] | str:
    """What decode makes of a frame, in FromClientReader.read's terms ("error"/"other")."""
    try:
        decoded = frames.decode(frame)
    except FrameError:
        return "error"
    if not isinstance(decoded, frames.FromClient):
        return "other"
    return decoded.session, decoded.client, decoded.payload


@given(
    st.lists(
        st.tuples(
            st.sampled_from([("198.51.100.2", 9), ("198.51.100.3", 9), ("2001:db8::7", 9)]),
            st.sampled_from(["s1", "s2", SESSION]),
            st.binary(max_size=20),
            st.integers(-1, 80),
            st.integers(0, 255),
        ),
        max_size=30,
    )
)
def test_the_from_client_reader_reads_what_decode_reads(
    items: list[tuple[tuple[str, int], str, bytes, int, int]],
) -> None:
    # The node's reader, as the relay's above: remembered headers, mutations, cut frames.
    reader = frames.FromClientReader(limit=2)
    for client, session, payload, position, cut in items:
        frame = bytearray(frames.encode_from_client(session, client, payload))
        if position >= 0:
            frame[position % len(frame)] ^= 0xFF
        for variant in (bytes(frame), bytes(frame[: cut % (len(frame) + 1)])):
            try:
                fields: object = reader.read(variant)
            except FrameError:
                fields = "error"
            if fields is None:
                fields = _from_client_decode_reads(variant)
                assert isinstance(fields, str), "the reader left a FROM_CLIENT frame to decode"
            assert fields == _from_client_decode_reads(variant)
    assert all(len(known) <= 2 for known in reader._known)  # the limit holds per map
