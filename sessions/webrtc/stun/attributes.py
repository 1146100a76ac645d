"""STUN attributes: their types, and the values ICE connectivity checks carry.

The attribute TLV layout and padding are RFC 8489 §14; the values are RFC 8489 §14.2-§14.9
and, for ICE, RFC 8445 §16.1. Decoders raise :class:`~sessions.webrtc.errors.StunError` for a
malformed value; builders return ``(type, value)`` pairs for
:class:`~sessions.webrtc.stun.StunMessage`.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Iterable
from typing import Final, final

import attrs

from sessions.webrtc.errors import StunError

__all__ = [
    "COOKIE_BYTES",
    "HMAC_SHA1_LENGTH",
    "MAGIC_COOKIE",
    "UNDERSTOOD_REQUIRED",
    "AttrType",
    "ErrorCode",
    "decode_error_code",
    "decode_unknown_attributes",
    "decode_xor_address",
    "error_code_attribute",
    "ice_controlled_attribute",
    "ice_controlling_attribute",
    "priority_attribute",
    "uint",
    "unknown_attributes_attribute",
    "use_candidate_attribute",
    "username_attribute",
    "utf8",
    "validate",
    "xor_mapped_address_attribute",
]

#: RFC 8489 §5: fixed value in bytes 4..8 of every message.
MAGIC_COOKIE: Final = 0x2112A442
COOKIE_BYTES: Final = MAGIC_COOKIE.to_bytes(4, "big")
#: RFC 8489 §14.5: MESSAGE-INTEGRITY holds an HMAC-SHA1, 20 bytes.
HMAC_SHA1_LENGTH: Final = 20
_IPV4: Final = 0x01  # RFC 8489 §14.1 address families
_IPV6: Final = 0x02
_U16 = struct.Struct("!H")


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
UNDERSTOOD_REQUIRED: Final = frozenset(
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


# --- attribute values -------------------------------------------------------------------------


def utf8(value: bytes, name: str) -> str:
    """``value`` as text; raise :class:`StunError` naming ``name`` if it is not UTF-8."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise StunError(f"{name} is not UTF-8") from None


def uint(value: bytes, size: int, name: str) -> int:
    """``value`` as a big-endian unsigned integer of exactly ``size`` bytes."""
    if len(value) != size:
        raise StunError(f"{name} must be {size} bytes long")
    return int.from_bytes(value, "big")


def _xor_pad(transaction_id: bytes) -> bytes:
    return COOKIE_BYTES + transaction_id


def decode_xor_address(value: bytes, transaction_id: bytes) -> tuple[str, int]:
    """An XOR-MAPPED-ADDRESS value as ``(host, port)``."""
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


def decode_error_code(value: bytes) -> ErrorCode:
    """An ERROR-CODE value."""
    # RFC 8489 §14.8: 21 reserved bits, class (3 bits, 3..6), number (8 bits, 0..99), reason.
    if len(value) < 4:
        raise StunError("ERROR-CODE is too short")
    error_class = value[2] & 0x07
    number = value[3]
    if not 3 <= error_class <= 6 or number > 99:
        raise StunError("ERROR-CODE is out of range")
    return ErrorCode(error_class * 100 + number, utf8(value[4:], "ERROR-CODE reason"))


_FIXED_LENGTHS: Final[dict[int, int]] = {
    AttrType.MESSAGE_INTEGRITY: HMAC_SHA1_LENGTH,  # RFC 8489 §14.5
    AttrType.FINGERPRINT: 4,  # RFC 8489 §14.7
    AttrType.PRIORITY: 4,  # RFC 8445 §16.1
    AttrType.USE_CANDIDATE: 0,
    AttrType.ICE_CONTROLLED: 8,
    AttrType.ICE_CONTROLLING: 8,
}


def validate(attr_type: int, value: bytes, transaction_id: bytes) -> None:
    """Reject malformed values of the attributes we read, so the accessors cannot fail."""
    size = _FIXED_LENGTHS.get(attr_type)
    if size is not None:
        if len(value) != size:
            raise StunError(f"attribute 0x{attr_type:04x} must be {size} bytes long")
    elif attr_type == AttrType.USERNAME:
        utf8(value, "USERNAME")
    elif attr_type == AttrType.XOR_MAPPED_ADDRESS:
        decode_xor_address(value, transaction_id)
    elif attr_type == AttrType.ERROR_CODE:
        decode_error_code(value)
    elif attr_type == AttrType.UNKNOWN_ATTRIBUTES and len(value) % 2:
        raise StunError("UNKNOWN-ATTRIBUTES has an odd length")


def decode_unknown_attributes(value: bytes) -> tuple[int, ...]:
    """The types listed in an UNKNOWN-ATTRIBUTES value (RFC 8489 §14.9)."""
    if len(value) % 2:
        raise StunError("UNKNOWN-ATTRIBUTES has an odd length")
    return tuple(_U16.unpack_from(value, i)[0] for i in range(0, len(value), 2))


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
