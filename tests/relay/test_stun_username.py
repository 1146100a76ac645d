"""The relay's own STUN USERNAME reader: it reads only that, never raises anything but its own
error, and agrees with the session library's STUN code (sessions/webrtc/stun) on real checks."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.stun_username import MAX_ATTRIBUTES, MalformedStun, read_username
from sessions.webrtc import stun
from sessions.webrtc.errors import StunError

COOKIE = b"\x21\x12\xa4\x42"


def header(message_type: int, length: int) -> bytes:
    return struct.pack("!HH", message_type, length) + COOKIE + os.urandom(12)


def attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + bytes(-len(value) % 4)


def message(message_type: int, *attributes: bytes) -> bytes:
    body = b"".join(attributes)
    return header(message_type, len(body)) + body


def check(username: str, *, use_candidate: bool = False) -> bytes:
    """A connectivity check as sessions/webrtc/stun writes one (RFC 8445 §7.1.1)."""
    request = stun.binding_request(
        os.urandom(12),
        username=username,
        priority=0x6E0001FF,
        controlling=True,
        tie_breaker=0x1234,
        use_candidate=use_candidate,
    )
    return stun.encode(request, integrity_key=b"password" * 3, fingerprint=True)


# Real ufrags are ICE characters (RFC 8445 §5.3), but USERNAME is any UTF-8 (RFC 5389 §15.3).
usernames = st.text(min_size=0, max_size=120).filter(lambda s: len(s.encode()) <= 500)


@given(username=usernames, use_candidate=st.booleans())
def test_agrees_with_the_session_library_on_real_checks(username: str, use_candidate: bool) -> None:
    data = check(username, use_candidate=use_candidate)
    assert read_username(data) == stun.username_of(data) == username


@given(
    username=usernames,
    before=st.lists(
        st.tuples(st.integers(0x8000, 0xFFFF), st.binary(max_size=40)), max_size=MAX_ATTRIBUTES - 1
    ),
)
def test_agrees_on_requests_with_other_attributes_first(
    username: str, before: list[tuple[int, bytes]]
) -> None:
    # Comprehension-optional attributes (0x8000 and up, RFC 5389 §15) before USERNAME.
    data = message(
        0x0001, *(attribute(k, v) for k, v in before), attribute(0x0006, username.encode())
    )
    assert read_username(data) == stun.username_of(data) == username


@settings(max_examples=500)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_malformed_stun(data: bytes) -> None:
    with contextlib.suppress(MalformedStun):
        read_username(data)


@settings(max_examples=500)
@given(
    message_type=st.sampled_from([0x0001, 0x0101, 0x0111, 0x0011, 0x0002, 0x4001]),
    body=st.binary(max_size=120),
    length_delta=st.sampled_from([0, 0, 0, 4, -4, 1, 2]),
)
def test_stun_shaped_input_raises_only_malformed_stun_and_agrees_when_it_reads(
    message_type: int, body: bytes, length_delta: int
) -> None:
    # Well-framed headers over arbitrary bodies reach the attribute walk, where bugs would hide.
    body += bytes(-len(body) % 4)
    data = header(message_type, max(0, len(body) + length_delta)) + body
    try:
        ours: str | None = read_username(data)
    except MalformedStun:
        with pytest.raises(StunError):
            stun.username_of(data)
        return
    if ours is not None:
        assert stun.username_of(data) == ours


def test_what_is_not_a_binding_request_has_no_username() -> None:
    user = attribute(0x0006, b"server:client")
    assert read_username(message(0x0001, user)) == "server:client"
    assert read_username(message(0x0101, user)) is None  # Binding success response
    assert read_username(message(0x0011, user)) is None  # Binding indication
    assert read_username(message(0x0003, user)) is None  # TURN Allocate request
    assert read_username(message(0x0001)) is None  # no attributes at all
    assert read_username(message(0x0001, attribute(0x8022, b"software"))) is None


def test_a_username_after_message_integrity_is_not_read() -> None:
    # RFC 5389 §15.4: attributes after MESSAGE-INTEGRITY (but FINGERPRINT) are ignored.
    data = message(0x0001, attribute(0x0008, bytes(20)), attribute(0x0006, b"late:user"))
    assert read_username(data) is None and stun.username_of(data) is None


def test_the_attribute_walk_is_bounded() -> None:
    padding = [attribute(0x8022, b"x")] * MAX_ATTRIBUTES
    assert read_username(message(0x0001, *padding, attribute(0x0006, b"a:b"))) is None
    assert read_username(message(0x0001, *padding[1:], attribute(0x0006, b"a:b"))) == "a:b"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "shorter than a STUN header"),
        (b"\x00\x01" + bytes(17), "shorter than a STUN header"),
        (b"\x40\x01\x00\x00" + COOKIE + bytes(12), "two leading bits"),
        (b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x43" + bytes(12), "magic cookie"),
        (b"\x00\x01\x00\x02" + COOKIE + bytes(12) + b"\x00\x00", "multiple of 4"),
        (b"\x00\x01\x00\x08" + COOKIE + bytes(12) + bytes(4), "does not match"),
        (header(0x0001, 4) + b"\x00\x06\x00\x08", "overruns"),
        (header(0x0001, 12) + attribute(0x8022, b"") + b"\x00\x06\x00\x08abcd", "overruns"),
        (header(0x0001, 8) + attribute(0x0006, b"\xff\xfe\xfd\xfc"), "not UTF-8"),
    ],
)
def test_malformed_messages_say_why(data: bytes, why: str) -> None:
    with pytest.raises(MalformedStun, match=why):
        read_username(data)
