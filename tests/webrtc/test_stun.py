"""STUN core: header layout, attributes, authentication, aioice interop and fuzzing."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import struct
import zlib

import pytest
from aioice import stun as aioice_stun
from hypothesis import given, settings
from hypothesis import strategies as st

from sessions.webrtc import stun
from sessions.webrtc.errors import StunError
from sessions.webrtc.stun import AttrType, StunClass, StunMessage

TXID = bytes(range(1, 13))
PASSWORD = b"the-remote-ice-password"

# RFC 5769 §2.1 sample request (short-term credentials) and §2.2 sample IPv4 response.
RFC5769_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
RFC5769_REQUEST = bytes.fromhex(
    "00010058 2112a442 b7e7a701 bc34d686 fa87dfae"
    "80220010 5354554e 20746573 7420636c 69656e74"
    "00240004 6e0001ff"
    "80290008 932ff9b1 51263b36"
    "00060009 6576746a 3a683676 59202020"
    "00080014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2"
    "80280004 e57a3bcf".replace(" ", "")
)
RFC5769_IPV4_RESPONSE = bytes.fromhex(
    "0101003c 2112a442 b7e7a701 bc34d686 fa87dfae"
    "8022000b 74657374 20766563 746f7220"
    "00200008 0001a147 e112a643"
    "00080014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7"
    "80280004 c07d4c96".replace(" ", "")
)


def _request(**overrides: object) -> StunMessage:
    fields: dict[str, object] = {
        "username": "local:remote",
        "priority": 0x6E0001FF,
        "controlling": True,
        "tie_breaker": 0x0123456789ABCDEF,
        "use_candidate": True,
    }
    fields.update(overrides)
    return stun.binding_request(TXID, **fields)  # type: ignore[arg-type]


# --- message type -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "wire"),
    [
        (StunClass.REQUEST, 0x0001),
        (StunClass.INDICATION, 0x0011),
        (StunClass.SUCCESS, 0x0101),
        (StunClass.ERROR, 0x0111),
    ],
)
def test_binding_type_values(cls: StunClass, wire: int) -> None:
    data = stun.encode(StunMessage(stun.BINDING, cls, TXID))
    assert data[:2] == wire.to_bytes(2, "big")
    assert stun.parse(data).cls is cls


def test_method_bits_interleave_around_class_bits() -> None:
    # RFC 8489 §5: M11..M7 C1 M6..M4 C0 M3..M0 under two zero bits.
    data = stun.encode(StunMessage(0xFFF, StunClass.REQUEST, TXID))
    assert int.from_bytes(data[:2], "big") == 0b0011_1110_1110_1111
    data = stun.encode(StunMessage(0x000, StunClass.ERROR, TXID))
    assert int.from_bytes(data[:2], "big") == 0b0000_0001_0001_0000


def test_every_method_and_class_round_trips() -> None:
    for method in range(0x1000):
        for cls in StunClass:
            parsed = stun.parse(stun.encode(StunMessage(method, cls, TXID)))
            assert (parsed.method, parsed.cls) == (method, cls)


# --- RFC 5769 vectors -------------------------------------------------------------------------


def test_rfc5769_sample_request() -> None:
    msg = stun.parse(RFC5769_REQUEST)
    assert (msg.method, msg.cls) == (stun.BINDING, StunClass.REQUEST)
    assert msg.transaction_id == bytes.fromhex("b7e7a701bc34d686fa87dfae")
    assert msg.username == "evtj:h6vY"  # padded with spaces on the wire; padding is ignored
    assert msg.priority == 0x6E0001FF
    assert msg.ice_controlled == 0x932FF9B151263B36
    assert msg.ice_controlling is None
    assert not msg.use_candidate
    assert msg.get(AttrType.SOFTWARE) == b"STUN test client"
    assert msg.has_integrity and msg.has_fingerprint
    assert msg.unknown_comprehension_required() == ()
    assert stun.verify_integrity(RFC5769_REQUEST, RFC5769_PASSWORD)
    assert not stun.verify_integrity(RFC5769_REQUEST, b"VOkJxbRl1RmTxUk/WvJxBT")
    assert stun.verify_fingerprint(RFC5769_REQUEST)
    assert stun.is_stun(RFC5769_REQUEST)
    assert stun.username_of(RFC5769_REQUEST) == "evtj:h6vY"


def test_rfc5769_sample_ipv4_response() -> None:
    msg = stun.parse(RFC5769_IPV4_RESPONSE)
    assert msg.cls is StunClass.SUCCESS
    assert msg.xor_mapped_address == ("192.0.2.1", 32853)
    assert stun.verify_integrity(RFC5769_IPV4_RESPONSE, RFC5769_PASSWORD)
    assert stun.verify_fingerprint(RFC5769_IPV4_RESPONSE)
    assert stun.username_of(RFC5769_IPV4_RESPONSE) is None  # not a request


def test_reencoding_the_rfc5769_request_reproduces_it_but_for_padding() -> None:
    msg = stun.parse(RFC5769_REQUEST)
    again = stun.encode(msg, integrity_key=RFC5769_PASSWORD, fingerprint=True)
    assert len(again) == len(RFC5769_REQUEST)
    assert stun.verify_integrity(again, RFC5769_PASSWORD)
    assert stun.verify_fingerprint(again)
    assert stun.parse(again).attributes[:-2] == msg.attributes[:-2]


# --- interop with aioice (aiortc's ICE) -------------------------------------------------------


def test_we_accept_an_aioice_connectivity_check() -> None:
    request = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING,
        message_class=aioice_stun.Class.REQUEST,
        transaction_id=TXID,
        attributes={
            "USERNAME": "ours:theirs",
            "PRIORITY": 1853824767,
            "ICE-CONTROLLING": 0xDEADBEEFCAFEF00D,
            "USE-CANDIDATE": None,
        },
    )
    request.add_message_integrity(PASSWORD)  # also adds FINGERPRINT
    data = bytes(request)
    assert stun.is_stun(data)
    assert stun.username_of(data) == "ours:theirs"
    msg = stun.parse(data)
    assert msg.username == "ours:theirs"
    assert msg.priority == 1853824767
    assert msg.ice_controlling == 0xDEADBEEFCAFEF00D
    assert msg.use_candidate
    assert stun.verify_integrity(data, PASSWORD)
    assert not stun.verify_integrity(data, PASSWORD + b"x")
    assert stun.verify_fingerprint(data)


@pytest.mark.parametrize(("host", "port"), [("203.0.113.7", 50000), ("2001:db8::1:2", 9)])
def test_aioice_accepts_our_binding_success(host: str, port: int) -> None:
    request = stun.parse(stun.encode(_request(), integrity_key=PASSWORD, fingerprint=True))
    data = stun.encode(
        stun.binding_success(request, host, port), integrity_key=PASSWORD, fingerprint=True
    )
    theirs = aioice_stun.parse_message(data)  # checks FINGERPRINT itself
    assert theirs.message_class == aioice_stun.Class.RESPONSE
    assert theirs.transaction_id == TXID
    assert theirs.attributes["XOR-MAPPED-ADDRESS"] == (host, port)
    assert theirs.check_message_integrity(PASSWORD)
    assert not theirs.check_message_integrity(b"wrong")
    assert stun.parse(data).xor_mapped_address == (host, port)


def test_aioice_accepts_our_request_and_error() -> None:
    data = stun.encode(_request(), integrity_key=PASSWORD, fingerprint=True)
    theirs = aioice_stun.parse_message(data)
    assert theirs.attributes["USERNAME"] == "local:remote"
    assert theirs.attributes["PRIORITY"] == 0x6E0001FF
    assert theirs.attributes["ICE-CONTROLLING"] == 0x0123456789ABCDEF
    assert "USE-CANDIDATE" in theirs.attributes
    assert theirs.check_message_integrity(PASSWORD)

    error = stun.error_response(stun.parse(data), 487, "Role Conflict")
    theirs = aioice_stun.parse_message(stun.encode(error, fingerprint=True))
    assert theirs.message_class == aioice_stun.Class.ERROR
    assert theirs.attributes["ERROR-CODE"] == (487, "Role Conflict")


# --- authentication ---------------------------------------------------------------------------


def test_integrity_is_hmac_sha1_over_the_length_adjusted_prefix() -> None:
    data = stun.encode(_request(), integrity_key=PASSWORD)
    prefix = data[:-24]
    covered = prefix[:2] + struct.pack("!H", len(data) - 20) + prefix[4:]
    assert data[-24:-20] == b"\x00\x08\x00\x14"
    assert data[-20:] == hmac.new(PASSWORD, covered, hashlib.sha1).digest()


def test_fingerprint_is_crc32_xor_stun() -> None:
    data = stun.encode(_request(), fingerprint=True)
    assert data[-8:-4] == b"\x80\x28\x00\x04"
    assert int.from_bytes(data[-4:], "big") == zlib.crc32(data[:-8]) ^ 0x5354554E


def test_any_tampered_byte_fails_integrity() -> None:
    data = stun.encode(_request(), integrity_key=PASSWORD, fingerprint=True)
    covered_end = len(data) - 8  # everything up to the end of MESSAGE-INTEGRITY
    for i in range(covered_end):
        for flip in (0x01, 0x80):
            tampered = bytearray(data)
            tampered[i] ^= flip
            assert not stun.verify_integrity(bytes(tampered), PASSWORD), (i, flip)
            assert not stun.verify_fingerprint(bytes(tampered)), (i, flip)


def test_fingerprint_tamper_and_placement() -> None:
    data = stun.encode(_request(), integrity_key=PASSWORD, fingerprint=True)
    tampered = data[:-1] + bytes((data[-1] ^ 1,))
    assert not stun.verify_fingerprint(tampered)
    assert stun.verify_integrity(tampered, PASSWORD)  # FINGERPRINT is outside the HMAC
    assert not stun.verify_fingerprint(stun.encode(_request()))
    assert not stun.verify_integrity(stun.encode(_request()), PASSWORD)


def test_verify_functions_reject_garbage_quietly() -> None:
    for junk in (b"", b"\x00" * 19, b"\xff" * 40, RFC5769_REQUEST[:-4]):
        assert not stun.verify_integrity(junk, PASSWORD)
        assert not stun.verify_fingerprint(junk)


def test_encode_replaces_stale_integrity_and_fingerprint() -> None:
    signed = stun.parse(stun.encode(_request(), integrity_key=b"old", fingerprint=True))
    data = stun.encode(signed, integrity_key=PASSWORD, fingerprint=True)
    assert stun.verify_integrity(data, PASSWORD)
    assert not stun.verify_integrity(data, b"old")
    assert stun.parse(data).attributes[:-2] == _request().attributes
    assert stun.parse(stun.encode(signed)).attributes == _request().attributes


# --- attributes -------------------------------------------------------------------------------


def test_padding_and_order_are_preserved() -> None:
    attributes = (
        (0x8055, b"abc"),  # comprehension-optional, unknown to us
        (AttrType.USERNAME, b"x"),
        (0xC057, b"\x00\x01\x00\x0a"),  # GOOG-NETWORK-INFO as Chrome sends it
        (0x8099, b""),
    )
    msg = StunMessage(stun.BINDING, StunClass.REQUEST, TXID, attributes)
    data = stun.encode(msg)
    assert len(data) == 20 + (4 + 4) + (4 + 4) + (4 + 4) + 4
    assert data[24:28] == b"abc\x00"
    assert stun.parse(data) == msg
    assert msg.unknown_comprehension_required() == ()


def test_comprehension_required_unknowns_get_a_420() -> None:
    msg = StunMessage(
        stun.BINDING,
        StunClass.REQUEST,
        TXID,
        ((0x7777, b"1"), (AttrType.USERNAME, b"a:b"), (0x001C, b"\x00" * 32), (0x7777, b"2")),
    )
    request = stun.parse(stun.encode(msg))
    unknown = request.unknown_comprehension_required()
    assert unknown == (0x7777, 0x001C)
    reply = stun.parse(
        stun.encode(
            stun.error_response(request, 420, "Unknown Attribute", unknown_attributes=unknown)
        )
    )
    assert reply.cls is StunClass.ERROR
    assert reply.transaction_id == TXID
    assert reply.error_code == stun.ErrorCode(420, "Unknown Attribute")
    assert reply.unknown_attributes == (0x7777, 0x001C)


def test_attributes_after_integrity_are_dropped() -> None:
    data = bytearray(stun.encode(_request(), integrity_key=PASSWORD))
    extra = struct.pack("!HH", AttrType.PRIORITY, 4) + b"\x00\x00\x00\x01"
    data += extra
    data[2:4] = struct.pack("!H", len(data) - 20)
    msg = stun.parse(bytes(data))
    assert msg.priority == 0x6E0001FF
    assert msg.attributes[-1][0] == AttrType.MESSAGE_INTEGRITY
    # ... and username_of stops looking at MESSAGE-INTEGRITY too
    late = StunMessage(stun.BINDING, StunClass.REQUEST, TXID, ())
    signed = bytearray(stun.encode(late, integrity_key=PASSWORD))
    signed += struct.pack("!HH", AttrType.USERNAME, 3) + b"a:b\x00"
    signed[2:4] = struct.pack("!H", len(signed) - 20)
    assert stun.username_of(bytes(signed)) is None


def test_nothing_may_follow_fingerprint() -> None:
    data = bytearray(stun.encode(_request(), fingerprint=True))
    data += struct.pack("!HH", 0x8055, 0)
    data[2:4] = struct.pack("!H", len(data) - 20)
    with pytest.raises(StunError):
        stun.parse(bytes(data))
    assert not stun.verify_fingerprint(bytes(data))


def test_error_codes_round_trip() -> None:
    for code in (300, 400, 401, 420, 487, 500, 699):
        msg = stun.error_response(_request(), code, "réason")
        assert stun.parse(stun.encode(msg)).error_code == stun.ErrorCode(code, "réason")
    with pytest.raises(ValueError):
        stun.error_code_attribute(200, "OK")


def test_binding_request_builder_roles() -> None:
    controlled = _request(controlling=False, use_candidate=False, tie_breaker=7)
    assert controlled.ice_controlled == 7
    assert controlled.ice_controlling is None
    assert not controlled.use_candidate
    assert controlled.username == "local:remote"


def test_username_of_cases() -> None:
    assert stun.username_of(stun.encode(_request())) == "local:remote"
    no_user = StunMessage(stun.BINDING, StunClass.REQUEST, TXID, (stun.priority_attribute(1),))
    assert stun.username_of(stun.encode(no_user)) is None
    indication = StunMessage(stun.BINDING, StunClass.INDICATION, TXID, _request().attributes)
    assert stun.username_of(stun.encode(indication)) is None
    other_method = StunMessage(0x003, StunClass.REQUEST, TXID, _request().attributes)
    assert stun.username_of(stun.encode(other_method)) is None
    bad_utf8 = StunMessage(stun.BINDING, StunClass.REQUEST, TXID, ((AttrType.USERNAME, b"\xff"),))
    with pytest.raises(StunError):
        stun.username_of(stun.encode(bad_utf8))
    for junk in (b"", b"\x00\x01", b"\x00\x01\x00\x00" + b"\x00" * 16, b"\x80" * 20):
        with pytest.raises(StunError):
            stun.username_of(junk)


def test_is_stun() -> None:
    good = stun.encode(_request())
    assert stun.is_stun(good)
    assert not stun.is_stun(b"")
    assert not stun.is_stun(good[:19])
    assert not stun.is_stun(good + b"\x00\x00\x00\x00")  # length field disagrees
    assert not stun.is_stun(bytes((good[0] | 0x40,)) + good[1:])
    assert not stun.is_stun(good[:4] + b"\x21\x12\xa4\x43" + good[8:])


MALFORMED = [
    b"",
    b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"\x00" * 11,  # short header
    b"\xc0\x01\x00\x00\x21\x12\xa4\x42" + b"\x00" * 12,  # leading bits
    b"\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x00" * 12,  # no cookie (RFC 3489)
    b"\x00\x01\x00\x04\x21\x12\xa4\x42" + b"\x00" * 12,  # length > datagram
    b"\x00\x01\x00\x02\x21\x12\xa4\x42" + b"\x00" * 14,  # length not a multiple of 4
    b"\x00\x01\x00\x04\x21\x12\xa4\x42" + b"\x00" * 12 + b"\x80\x55\x00\x05",  # overrun
    b"\x00\x01\x00\x08\x21\x12\xa4\x42" + b"\x00" * 12 + b"\x00\x24\x00\x03abc\x00",  # PRIORITY
    b"\x00\x01\x00\x04\x21\x12\xa4\x42" + b"\x00" * 12 + b"\x00\x25\x00\x00",  # fine (control)
    b"\x01\x01\x00\x0c\x21\x12\xa4\x42" + b"\x00" * 12 + b"\x00\x20\x00\x08\x00\x03" + b"\x00" * 6,
    b"\x01\x11\x00\x08\x21\x12\xa4\x42" + b"\x00" * 12 + b"\x00\x09\x00\x04\x00\x00\x02\x00",
    b"\x01\x11\x00\x08\x21\x12\xa4\x42" + b"\x00" * 12 + b"\x00\x09\x00\x04\x00\x00\x04\x64",
    b"\x00\x01\x00\x08\x21\x12\xa4\x42" + b"\x00" * 12 + b"\x00\x06\x00\x02\xc3\x28\x00\x00",
    b"\x00\x01\x00\x08\x21\x12\xa4\x42" + b"\x00" * 12 + b"\x00\x0a\x00\x03abc\x00",
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_messages_raise_stun_error(data: bytes) -> None:
    if data[2:4] == b"\x00\x04" and data.endswith(b"\x00\x25\x00\x00"):
        assert stun.parse(data).use_candidate  # the well-formed control case
        return
    with pytest.raises(StunError):
        stun.parse(data)


def test_hand_built_bad_values_fail_in_accessors_with_stun_error() -> None:
    msg = StunMessage(
        stun.BINDING,
        StunClass.REQUEST,
        TXID,
        ((AttrType.PRIORITY, b"\x01"), (AttrType.XOR_MAPPED_ADDRESS, b"\x00"), (0x000A, b"z")),
    )
    for accessor in ("priority", "xor_mapped_address", "unknown_attributes"):
        with pytest.raises(StunError):
            getattr(msg, accessor)


def test_transaction_id_must_be_96_bits() -> None:
    with pytest.raises(ValueError):
        StunMessage(stun.BINDING, StunClass.REQUEST, b"short")


# --- property tests ---------------------------------------------------------------------------

_KNOWN = {int(t) for t in AttrType}


@st.composite
def messages(draw: st.DrawFn) -> StunMessage:
    txid = draw(st.binary(min_size=12, max_size=12))
    typed = st.one_of(
        st.text(max_size=40).map(stun.username_attribute),
        st.integers(0, 2**32 - 1).map(stun.priority_attribute),
        st.just(stun.use_candidate_attribute()),
        st.integers(0, 2**64 - 1).map(stun.ice_controlling_attribute),
        st.integers(0, 2**64 - 1).map(stun.ice_controlled_attribute),
        st.builds(stun.error_code_attribute, st.integers(300, 699), st.text(max_size=30)),
        st.lists(st.integers(0, 0xFFFF), max_size=5).map(stun.unknown_attributes_attribute),
        st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).flatmap(
            lambda ip: st.integers(0, 0xFFFF).map(
                lambda port: stun.xor_mapped_address_attribute(str(ip), port, txid)
            )
        ),
    )
    raw = st.tuples(
        st.integers(0, 0xFFFF).filter(lambda t: t not in _KNOWN), st.binary(max_size=40)
    )
    attributes = draw(st.lists(st.one_of(typed, raw), max_size=8))
    return StunMessage(
        draw(st.integers(0, 0xFFF)), draw(st.sampled_from(StunClass)), txid, tuple(attributes)
    )


@given(messages())
def test_parse_inverts_encode(msg: StunMessage) -> None:
    assert stun.parse(stun.encode(msg)) == msg


@given(messages(), st.binary(max_size=32))
def test_signed_messages_verify(msg: StunMessage, key: bytes) -> None:
    data = stun.encode(msg, integrity_key=key, fingerprint=True)
    assert stun.is_stun(data)
    assert stun.verify_integrity(data, key)
    assert stun.verify_fingerprint(data)
    parsed = stun.parse(data)
    assert parsed.attributes[:-2] == msg.attributes
    assert [t for t, _ in parsed.attributes[-2:]] == [
        AttrType.MESSAGE_INTEGRITY,
        AttrType.FINGERPRINT,
    ]


def _exercise(data: bytes) -> None:
    stun.is_stun(data)
    stun.verify_integrity(data, PASSWORD)
    stun.verify_fingerprint(data)
    with contextlib.suppress(StunError):
        stun.username_of(data)
    try:
        msg = stun.parse(data)
    except StunError:
        return
    for accessor in (
        "username",
        "priority",
        "use_candidate",
        "ice_controlling",
        "ice_controlled",
        "xor_mapped_address",
        "error_code",
        "unknown_attributes",
    ):
        getattr(msg, accessor)  # validated by parse: must not raise
    msg.unknown_comprehension_required()


@settings(max_examples=300)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_raise_only_stun_error(data: bytes) -> None:
    _exercise(data)


@settings(max_examples=300)
@given(st.integers(0, 0x3FFF), st.binary(max_size=25).map(lambda b: b + bytes(-len(b) & 3)))
def test_arbitrary_bodies_in_a_valid_header_raise_only_stun_error(
    message_type: int, body: bytes
) -> None:
    header = struct.pack("!HH", message_type, len(body)) + b"\x21\x12\xa4\x42" + TXID
    _exercise(header + body)


@settings(max_examples=300)
@given(messages(), st.data())
def test_mutated_messages_raise_only_stun_error(msg: StunMessage, data: st.DataObject) -> None:
    wire = bytearray(stun.encode(msg, integrity_key=PASSWORD, fingerprint=True))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    _exercise(bytes(wire[:cut]))
    _exercise(bytes(wire))
