"""Sans-I/O STUN (RFC 8489) with the ICE connectivity-check attributes (RFC 8445 §16.1).

Only what an ICE agent on a WebRTC media port needs: the message header, the attribute TLV
walk, short-term-credential MESSAGE-INTEGRITY (HMAC-SHA1, the key is the ICE password),
FINGERPRINT, and typed access to the handful of attributes a connectivity check carries.
Attributes we do not know are kept as raw bytes, in wire order.

Every malformed input raises :class:`~sessions.webrtc.errors.StunError`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import struct
import zlib
from collections.abc import Iterable, Iterator
from typing import Final, final

import attrs

from sessions.webrtc.errors import StunError

__all__ = [
    "BINDING",
    "HEADER_LENGTH",
    "MAGIC_COOKIE",
    "AttrType",
    "ErrorCode",
    "StunClass",
    "StunMessage",
    "binding_request",
    "binding_success",
    "encode",
    "error_code_attribute",
    "error_response",
    "ice_controlled_attribute",
    "ice_controlling_attribute",
    "is_stun",
    "parse",
    "priority_attribute",
    "unknown_attributes_attribute",
    "use_candidate_attribute",
    "username_attribute",
    "username_of",
    "verify_fingerprint",
    "verify_integrity",
    "xor_mapped_address_attribute",
]

#: RFC 8489 §5: fixed value in bytes 4..8 of every message.
MAGIC_COOKIE: Final = 0x2112A442
#: RFC 8489 §5: type, length, cookie, 96-bit transaction id.
HEADER_LENGTH: Final = 20
#: RFC 8489 §18.2: the only method ICE uses.
BINDING: Final = 0x001

_COOKIE_BYTES: Final = MAGIC_COOKIE.to_bytes(4, "big")
_FINGERPRINT_XOR: Final = 0x5354554E  # RFC 8489 §14.7: "STUN" in ASCII
_HMAC_SHA1_LENGTH: Final = 20
_IPV4: Final = 0x01  # RFC 8489 §14.1 address families
_IPV6: Final = 0x02
_U16 = struct.Struct("!H")
_TLV = struct.Struct("!HH")
_HEADER = struct.Struct("!HH4s12s")


class StunClass(enum.IntEnum):
    """The two class bits of the message type (RFC 8489 §5)."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class AttrType(enum.IntEnum):
    """Attribute types this module knows by name (RFC 8489 §18.3, RFC 8445 §16.1)."""

    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    #: known by name only: we do not implement it, so a request carrying it earns a 420
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    XOR_MAPPED_ADDRESS = 0x0020
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    SOFTWARE = 0x8022
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A


#: Comprehension-required types (0x0000-0x7FFF, RFC 8489 §14) that we process or may ignore.
_UNDERSTOOD_REQUIRED: Final = frozenset(
    {
        AttrType.MAPPED_ADDRESS,
        AttrType.USERNAME,
        AttrType.MESSAGE_INTEGRITY,
        AttrType.ERROR_CODE,
        AttrType.UNKNOWN_ATTRIBUTES,
        AttrType.XOR_MAPPED_ADDRESS,
        AttrType.PRIORITY,
        AttrType.USE_CANDIDATE,
    }
)


@final
@attrs.frozen
class ErrorCode:
    """Value of an ERROR-CODE attribute (RFC 8489 §14.8)."""

    code: int
    reason: str


def _check_transaction_id(_: object, __: attrs.Attribute[bytes], value: bytes) -> None:
    if len(value) != 12:
        raise ValueError("a STUN transaction id is 96 bits")


@final
@attrs.frozen
class StunMessage:
    """One STUN message: header fields and its attributes in wire order.

    ``attributes`` holds ``(type, value)`` pairs with the padding removed. :func:`parse`
    includes MESSAGE-INTEGRITY and FINGERPRINT as they were on the wire (so their presence is
    visible); :func:`encode` recomputes them from its arguments and ignores any stale copies.
    """

    method: int
    cls: StunClass
    transaction_id: bytes = attrs.field(validator=_check_transaction_id)
    attributes: tuple[tuple[int, bytes], ...] = ()

    def get(self, attr_type: int) -> bytes | None:
        """Value of the first attribute of ``attr_type``, or ``None`` if absent."""
        for t, value in self.attributes:
            if t == attr_type:
                return value
        return None

    def has(self, attr_type: int) -> bool:
        """Whether an attribute of ``attr_type`` is present."""
        return any(t == attr_type for t, _ in self.attributes)

    @property
    def username(self) -> str | None:
        """USERNAME (RFC 8489 §14.3); for ICE, ``"<recipient ufrag>:<sender ufrag>"``."""
        value = self.get(AttrType.USERNAME)
        return None if value is None else _utf8(value, "USERNAME")

    @property
    def priority(self) -> int | None:
        """PRIORITY of the candidate the sender would learn from this check (RFC 8445 §7.1.1)."""
        value = self.get(AttrType.PRIORITY)
        return None if value is None else _uint(value, 4, "PRIORITY")

    @property
    def use_candidate(self) -> bool:
        """Whether USE-CANDIDATE is present (RFC 8445 §7.1.2): the pair is nominated."""
        return self.has(AttrType.USE_CANDIDATE)

    @property
    def ice_controlling(self) -> int | None:
        """Tie-breaker of ICE-CONTROLLING (RFC 8445 §7.1.3), if the sender is controlling."""
        value = self.get(AttrType.ICE_CONTROLLING)
        return None if value is None else _uint(value, 8, "ICE-CONTROLLING")

    @property
    def ice_controlled(self) -> int | None:
        """Tie-breaker of ICE-CONTROLLED (RFC 8445 §7.1.3), if the sender is controlled."""
        value = self.get(AttrType.ICE_CONTROLLED)
        return None if value is None else _uint(value, 8, "ICE-CONTROLLED")

    @property
    def xor_mapped_address(self) -> tuple[str, int] | None:
        """XOR-MAPPED-ADDRESS as ``(host, port)`` (RFC 8489 §14.2)."""
        value = self.get(AttrType.XOR_MAPPED_ADDRESS)
        return None if value is None else _decode_xor_address(value, self.transaction_id)

    @property
    def error_code(self) -> ErrorCode | None:
        """ERROR-CODE (RFC 8489 §14.8)."""
        value = self.get(AttrType.ERROR_CODE)
        return None if value is None else _decode_error_code(value)

    @property
    def unknown_attributes(self) -> tuple[int, ...]:
        """Types listed in an UNKNOWN-ATTRIBUTES attribute (RFC 8489 §14.9) of a 420 reply."""
        value = self.get(AttrType.UNKNOWN_ATTRIBUTES)
        if value is None:
            return ()
        if len(value) % 2:
            raise StunError("UNKNOWN-ATTRIBUTES has an odd length")
        return tuple(_U16.unpack_from(value, i)[0] for i in range(0, len(value), 2))

    @property
    def has_integrity(self) -> bool:
        """Whether MESSAGE-INTEGRITY is present; check it with :func:`verify_integrity`."""
        return self.has(AttrType.MESSAGE_INTEGRITY)

    @property
    def has_fingerprint(self) -> bool:
        """Whether FINGERPRINT is present; check it with :func:`verify_fingerprint`."""
        return self.has(AttrType.FINGERPRINT)

    def unknown_comprehension_required(self) -> tuple[int, ...]:
        """Comprehension-required types (< 0x8000) we do not understand, in wire order.

        RFC 8489 §6.3.1.1: a request carrying any of these is answered with a 420 error listing
        them (see :func:`error_response`); a response carrying any fails its transaction.
        """
        unknown: list[int] = []
        for t, _ in self.attributes:
            if t < 0x8000 and t not in _UNDERSTOOD_REQUIRED and t not in unknown:
                unknown.append(t)
        return tuple(unknown)


# --- message type (RFC 8489 §5) ---------------------------------------------------------------
# The 14-bit type interleaves the class bits C1 C0 with the 12 method bits M11..M0:
#   bit 13..9: M11..M7   bit 8: C1   bit 7..5: M6..M4   bit 4: C0   bit 3..0: M3..M0


def _encode_type(method: int, cls: int) -> int:
    return (
        ((method & 0xF80) << 2)
        | ((method & 0x070) << 1)
        | (method & 0x00F)
        | ((cls & 0b10) << 7)
        | ((cls & 0b01) << 4)
    )


def _decode_type(message_type: int) -> tuple[int, StunClass]:
    method = ((message_type >> 2) & 0xF80) | ((message_type >> 1) & 0x070) | (message_type & 0x00F)
    cls = ((message_type >> 7) & 0b10) | ((message_type >> 4) & 0b01)
    return method, StunClass(cls)


# --- framing ----------------------------------------------------------------------------------


def is_stun(data: bytes) -> bool:
    """Cheap test that ``data`` is framed as an RFC 8489 STUN message.

    Checks what RFC 8489 §6.3 and §7 let a receiver check before parsing: the two leading zero
    bits, the magic cookie, and a length field that is a multiple of 4 and matches the datagram.
    """
    return (
        len(data) >= HEADER_LENGTH
        and data[0] < 0x40
        and data[4:8] == _COOKIE_BYTES
        and (len(data) - HEADER_LENGTH) & 3 == 0
        and _U16.unpack_from(data, 2)[0] == len(data) - HEADER_LENGTH
    )


def _check_framing(data: bytes) -> None:
    if len(data) < HEADER_LENGTH:
        raise StunError("shorter than a STUN header")
    if data[0] >= 0x40:
        raise StunError("the two leading bits of a STUN message must be zero")  # RFC 8489 §5
    if data[4:8] != _COOKIE_BYTES:
        raise StunError("no magic cookie (not an RFC 5389/8489 STUN message)")
    length = _U16.unpack_from(data, 2)[0]
    if length & 3:
        raise StunError("STUN message length is not a multiple of 4")
    if length != len(data) - HEADER_LENGTH:
        raise StunError("STUN message length does not match the datagram")


def _walk(data: bytes) -> Iterator[tuple[int, int, int]]:
    """Yield ``(type, value_start, value_end)`` for each attribute; framing already checked."""
    pos = HEADER_LENGTH
    end = len(data)
    while pos < end:
        if end - pos < 4:
            raise StunError("truncated STUN attribute header")
        attr_type, length = _TLV.unpack_from(data, pos)
        start = pos + 4
        if start + length > end:
            raise StunError("STUN attribute overruns the message")
        yield attr_type, start, start + length
        pos = start + ((length + 3) & ~3)  # RFC 8489 §14: values are padded to 4 bytes


# --- attribute values -------------------------------------------------------------------------


def _utf8(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise StunError(f"{name} is not UTF-8") from None


def _uint(value: bytes, size: int, name: str) -> int:
    if len(value) != size:
        raise StunError(f"{name} must be {size} bytes long")
    return int.from_bytes(value, "big")


def _xor_pad(transaction_id: bytes) -> bytes:
    return _COOKIE_BYTES + transaction_id


def _decode_xor_address(value: bytes, transaction_id: bytes) -> tuple[str, int]:
    # RFC 8489 §14.2: reserved byte, family, X-Port, X-Address; port XOR the cookie's top 16
    # bits, address XOR the cookie (IPv4) or the cookie followed by the transaction id (IPv6).
    if len(value) < 4:
        raise StunError("XOR-MAPPED-ADDRESS is too short")
    family = value[1]
    if family == _IPV4 and len(value) == 8:
        size = 4
    elif family == _IPV6 and len(value) == 20:
        size = 16
    else:
        raise StunError("XOR-MAPPED-ADDRESS has a bad family or length")
    pad = _xor_pad(transaction_id)
    port = _U16.unpack_from(value, 2)[0] ^ (MAGIC_COOKIE >> 16)
    raw = bytes(a ^ b for a, b in zip(value[4 : 4 + size], pad, strict=False))
    host = ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw)
    return str(host), port


def _decode_error_code(value: bytes) -> ErrorCode:
    # RFC 8489 §14.8: 21 reserved bits, class (3 bits, 3..6), number (8 bits, 0..99), reason.
    if len(value) < 4:
        raise StunError("ERROR-CODE is too short")
    error_class = value[2] & 0x07
    number = value[3]
    if not 3 <= error_class <= 6 or number > 99:
        raise StunError("ERROR-CODE is out of range")
    return ErrorCode(error_class * 100 + number, _utf8(value[4:], "ERROR-CODE reason"))


_FIXED_LENGTHS: Final[dict[int, int]] = {
    AttrType.MESSAGE_INTEGRITY: _HMAC_SHA1_LENGTH,  # RFC 8489 §14.5
    AttrType.FINGERPRINT: 4,  # RFC 8489 §14.7
    AttrType.PRIORITY: 4,  # RFC 8445 §16.1
    AttrType.USE_CANDIDATE: 0,
    AttrType.ICE_CONTROLLED: 8,
    AttrType.ICE_CONTROLLING: 8,
}


def _validate(attr_type: int, value: bytes, transaction_id: bytes) -> None:
    """Reject malformed values of the attributes we read, so the accessors cannot fail."""
    size = _FIXED_LENGTHS.get(attr_type)
    if size is not None:
        if len(value) != size:
            raise StunError(f"attribute 0x{attr_type:04x} must be {size} bytes long")
    elif attr_type == AttrType.USERNAME:
        _utf8(value, "USERNAME")
    elif attr_type == AttrType.XOR_MAPPED_ADDRESS:
        _decode_xor_address(value, transaction_id)
    elif attr_type == AttrType.ERROR_CODE:
        _decode_error_code(value)
    elif attr_type == AttrType.UNKNOWN_ATTRIBUTES and len(value) % 2:
        raise StunError("UNKNOWN-ATTRIBUTES has an odd length")


# --- parse ------------------------------------------------------------------------------------


def parse(data: bytes) -> StunMessage:
    """Parse one STUN message; raise :class:`StunError` if it is malformed.

    Authentication is separate: call :func:`verify_integrity` and :func:`verify_fingerprint`
    on the same bytes. As RFC 8489 §14.5 requires, attributes after MESSAGE-INTEGRITY other
    than FINGERPRINT (and MESSAGE-INTEGRITY-SHA256) are dropped, since nothing vouches for them.
    """
    _check_framing(data)
    message_type, _, _, transaction_id = _HEADER.unpack_from(data)
    method, cls = _decode_type(message_type)
    attributes: list[tuple[int, bytes]] = []
    after_integrity = False
    after_fingerprint = False
    for attr_type, start, end in _walk(data):
        if after_fingerprint:
            raise StunError("attribute after FINGERPRINT")  # RFC 8489 §14.7: it is last
        if attr_type == AttrType.FINGERPRINT:
            after_fingerprint = True
        elif after_integrity and attr_type != AttrType.MESSAGE_INTEGRITY_SHA256:
            continue  # RFC 8489 §14.5: ignore unauthenticated trailing attributes
        elif attr_type == AttrType.MESSAGE_INTEGRITY:
            after_integrity = True
        value = bytes(data[start:end])
        _validate(attr_type, value, transaction_id)
        attributes.append((attr_type, value))
    return StunMessage(method, cls, transaction_id, tuple(attributes))


def username_of(data: bytes) -> str | None:
    """USERNAME of a Binding request, reading as little of ``data`` as possible.

    For the relay, which routes connectivity checks by ufrag and reads nothing else. Returns
    ``None`` for a well-framed message that is not a Binding request or carries no USERNAME;
    raises :class:`StunError` if ``data`` is not a well-framed STUN message, the attributes
    before USERNAME are truncated, or USERNAME is not UTF-8. Nothing is authenticated here.
    """
    _check_framing(data)
    if data[0] != 0 or data[1] != BINDING:  # type 0x0001: Binding request
        return None
    for attr_type, start, end in _walk(data):
        if attr_type == AttrType.USERNAME:
            return _utf8(data[start:end], "USERNAME")
        if attr_type == AttrType.MESSAGE_INTEGRITY:
            return None  # RFC 8489 §14.5: anything later is not covered by the integrity check
    return None


# --- authentication ---------------------------------------------------------------------------


def _with_length(data: bytes, end: int, length: int) -> bytes:
    """``data[:end]`` with the header's length field replaced."""
    return data[:2] + _U16.pack(length) + data[4:end]


def _find(data: bytes, wanted: int) -> tuple[int, int] | None:
    for attr_type, start, end in _walk(data):
        if attr_type == wanted:
            return start, end
    return None


def verify_integrity(data: bytes, key: bytes) -> bool:
    """Check MESSAGE-INTEGRITY of the raw message ``data`` with ``key`` (RFC 8489 §14.5).

    For ICE's short-term credentials the key is the password (RFC 8489 §9.1.1). The HMAC
    covers the message up to the attribute, with the header length field set as if
    MESSAGE-INTEGRITY were the last attribute; the comparison is constant-time. Returns
    ``False`` when the attribute is absent, wrong, or ``data`` is malformed.
    """
    try:
        _check_framing(data)
        found = _find(data, AttrType.MESSAGE_INTEGRITY)
    except StunError:
        return False
    if found is None or found[1] - found[0] != _HMAC_SHA1_LENGTH:
        return False
    start, end = found
    covered = _with_length(data, start - 4, start + _HMAC_SHA1_LENGTH - HEADER_LENGTH)
    expected = hmac.new(key, covered, hashlib.sha1).digest()
    return hmac.compare_digest(expected, data[start:end])


def verify_fingerprint(data: bytes) -> bool:
    """Check the FINGERPRINT of the raw message ``data`` (RFC 8489 §14.7).

    FINGERPRINT must be the last attribute; its value is the CRC-32 of everything before it,
    XOR 0x5354554E. Returns ``False`` when absent, misplaced, wrong, or ``data`` is malformed.
    """
    try:
        _check_framing(data)
        found = _find(data, AttrType.FINGERPRINT)
    except StunError:
        return False
    if found is None or found[0] != len(data) - 4 or found[1] != len(data):
        return False
    expected = zlib.crc32(data[: found[0] - 4]) ^ _FINGERPRINT_XOR
    return int.from_bytes(data[found[0] :], "big") == expected


# --- encode -----------------------------------------------------------------------------------


def _append(out: bytearray, attr_type: int, value: bytes) -> None:
    if len(value) > 0xFFFF:
        raise ValueError("STUN attribute value longer than 65535 bytes")
    out += _TLV.pack(attr_type, len(value))
    out += value
    out += bytes(-len(value) & 3)  # RFC 8489 §14: pad with zeros to a multiple of 4


def encode(
    msg: StunMessage, *, integrity_key: bytes | None = None, fingerprint: bool = False
) -> bytes:
    """Serialize ``msg``, appending MESSAGE-INTEGRITY and/or FINGERPRINT when asked.

    MESSAGE-INTEGRITY (HMAC-SHA1 under ``integrity_key``, RFC 8489 §14.5) and FINGERPRINT
    (§14.7) always go last, in that order; copies of either in ``msg.attributes`` are skipped.
    """
    if not 0 <= msg.method <= 0xFFF:
        raise ValueError("STUN method is a 12-bit value")
    body = bytearray()
    for attr_type, value in msg.attributes:
        if attr_type not in (AttrType.MESSAGE_INTEGRITY, AttrType.FINGERPRINT):
            _append(body, attr_type, value)
    type_bytes = _U16.pack(_encode_type(msg.method, msg.cls))
    prefix = _COOKIE_BYTES + msg.transaction_id

    def header(length: int) -> bytes:
        if length > 0xFFFF:
            raise ValueError("STUN message longer than 65535 bytes")
        return type_bytes + _U16.pack(length) + prefix

    if integrity_key is not None:
        # RFC 8489 §14.5: the length counts the MESSAGE-INTEGRITY attribute itself.
        covered = header(len(body) + 4 + _HMAC_SHA1_LENGTH) + body
        _append(
            body,
            AttrType.MESSAGE_INTEGRITY,
            hmac.new(integrity_key, covered, hashlib.sha1).digest(),
        )
    if fingerprint:
        crc = zlib.crc32(header(len(body) + 8) + body) ^ _FINGERPRINT_XOR  # RFC 8489 §14.7
        _append(body, AttrType.FINGERPRINT, crc.to_bytes(4, "big"))
    return header(len(body)) + bytes(body)


# --- attribute builders -----------------------------------------------------------------------


def username_attribute(username: str) -> tuple[int, bytes]:
    """USERNAME (RFC 8489 §14.3)."""
    return AttrType.USERNAME, username.encode("utf-8")


def priority_attribute(priority: int) -> tuple[int, bytes]:
    """PRIORITY (RFC 8445 §16.1), a 32-bit candidate priority."""
    return AttrType.PRIORITY, priority.to_bytes(4, "big")


def use_candidate_attribute() -> tuple[int, bytes]:
    """USE-CANDIDATE (RFC 8445 §16.1), which has no value."""
    return AttrType.USE_CANDIDATE, b""


def ice_controlling_attribute(tie_breaker: int) -> tuple[int, bytes]:
    """ICE-CONTROLLING (RFC 8445 §16.1) with a 64-bit tie-breaker."""
    return AttrType.ICE_CONTROLLING, tie_breaker.to_bytes(8, "big")


def ice_controlled_attribute(tie_breaker: int) -> tuple[int, bytes]:
    """ICE-CONTROLLED (RFC 8445 §16.1) with a 64-bit tie-breaker."""
    return AttrType.ICE_CONTROLLED, tie_breaker.to_bytes(8, "big")


def xor_mapped_address_attribute(host: str, port: int, transaction_id: bytes) -> tuple[int, bytes]:
    """XOR-MAPPED-ADDRESS (RFC 8489 §14.2) for an IPv4 or IPv6 ``host`` and ``port``."""
    address = ipaddress.ip_address(host)
    family = _IPV4 if address.version == 4 else _IPV6
    pad = _xor_pad(transaction_id)
    x_address = bytes(a ^ b for a, b in zip(address.packed, pad, strict=False))
    value = bytes((0, family)) + _U16.pack(port ^ (MAGIC_COOKIE >> 16)) + x_address
    return AttrType.XOR_MAPPED_ADDRESS, value


def error_code_attribute(code: int, reason: str) -> tuple[int, bytes]:
    """ERROR-CODE (RFC 8489 §14.8); ``code`` is 300..699."""
    if not 300 <= code <= 699:
        raise ValueError("STUN error codes are 300..699")
    return AttrType.ERROR_CODE, bytes((0, 0, code // 100, code % 100)) + reason.encode("utf-8")


def unknown_attributes_attribute(types: Iterable[int]) -> tuple[int, bytes]:
    """UNKNOWN-ATTRIBUTES (RFC 8489 §14.9) listing ``types``."""
    return AttrType.UNKNOWN_ATTRIBUTES, b"".join(_U16.pack(t) for t in types)


# --- message builders -------------------------------------------------------------------------


def binding_request(
    transaction_id: bytes,
    *,
    username: str,
    priority: int,
    controlling: bool,
    tie_breaker: int,
    use_candidate: bool = False,
) -> StunMessage:
    """An ICE connectivity check (RFC 8445 §7.1); encode it with the remote password as key."""
    role = ice_controlling_attribute if controlling else ice_controlled_attribute
    attributes = [username_attribute(username), priority_attribute(priority), role(tie_breaker)]
    if use_candidate:
        attributes.append(use_candidate_attribute())
    return StunMessage(BINDING, StunClass.REQUEST, transaction_id, tuple(attributes))


def binding_success(request: StunMessage, host: str, port: int) -> StunMessage:
    """Success response to ``request`` telling the peer its reflexive ``host:port``.

    RFC 8445 §7.3.1.1 / RFC 8489 §6.3.1.1: same method and transaction id, with
    XOR-MAPPED-ADDRESS; encode it with our own password as key and a fingerprint.
    """
    address = xor_mapped_address_attribute(host, port, request.transaction_id)
    return StunMessage(request.method, StunClass.SUCCESS, request.transaction_id, (address,))


def error_response(
    request: StunMessage, code: int, reason: str, *, unknown_attributes: Iterable[int] = ()
) -> StunMessage:
    """Error response to ``request`` (RFC 8489 §6.3.1.1).

    For 420 (Unknown Attribute) pass ``request.unknown_comprehension_required()`` as
    ``unknown_attributes``; for 487 (Role Conflict, RFC 8445 §7.3.1.1) and 400/401 just the code.
    """
    attributes = [error_code_attribute(code, reason)]
    unknown = tuple(unknown_attributes)
    if unknown:
        attributes.append(unknown_attributes_attribute(unknown))
    return StunMessage(request.method, StunClass.ERROR, request.transaction_id, tuple(attributes))
