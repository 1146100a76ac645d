"""MESSAGE-INTEGRITY (RFC 8489 §14.5) and FINGERPRINT (RFC 8489 §14.7): computed and checked.

ICE uses short-term credentials: the HMAC-SHA1 key is the ICE password (RFC 8489 §9.1.1,
RFC 8445 §7.2.2). Both checks work on the raw bytes of a message, since what they cover is
the message as it was on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from typing import Final

from sessions.webrtc.errors import StunError
from sessions.webrtc.stun.attributes import HMAC_SHA1_LENGTH, AttrType
from sessions.webrtc.stun.framing import HEADER_LENGTH, check_framing, find

__all__ = ["fingerprint_value", "integrity_tag", "verify_fingerprint", "verify_integrity"]

_FINGERPRINT_XOR: Final = 0x5354554E  # RFC 8489 §14.7: "STUN" in ASCII
_U16 = struct.Struct("!H")


def integrity_tag(key: bytes, covered: bytes) -> bytes:
    """The MESSAGE-INTEGRITY value over ``covered``: the message up to the attribute, its
    header length already counting the attribute (RFC 8489 §14.5)."""
    return hmac.new(key, covered, hashlib.sha1).digest()


def fingerprint_value(covered: bytes) -> int:
    """The FINGERPRINT value over ``covered``: the message up to the attribute, its header
    length already counting the attribute (RFC 8489 §14.7)."""
    return zlib.crc32(covered) ^ _FINGERPRINT_XOR


def _with_length(data: bytes, end: int, length: int) -> bytes:
    """``data[:end]`` with the header's length field replaced."""
    return data[:2] + _U16.pack(length) + data[4:end]


def verify_integrity(data: bytes, key: bytes) -> bool:
    """Check MESSAGE-INTEGRITY of the raw message ``data`` with ``key`` (RFC 8489 §14.5).

    For ICE's short-term credentials the key is the password (RFC 8489 §9.1.1). The HMAC
    covers the message up to the attribute, with the header length field set as if
    MESSAGE-INTEGRITY were the last attribute; the comparison is constant-time. Returns
    ``False`` when the attribute is absent, wrong, or ``data`` is malformed.
    """
    try:
        check_framing(data)
        found = find(data, AttrType.MESSAGE_INTEGRITY)
    except StunError:
        return False
    if found is None or found[1] - found[0] != HMAC_SHA1_LENGTH:
        return False
    start, end = found
    covered = _with_length(data, start - 4, start + HMAC_SHA1_LENGTH - HEADER_LENGTH)
    return hmac.compare_digest(integrity_tag(key, covered), data[start:end])


def verify_fingerprint(data: bytes) -> bool:
    """Check the FINGERPRINT of the raw message ``data`` (RFC 8489 §14.7).

    FINGERPRINT must be the last attribute; its value is the CRC-32 of everything before it,
    XOR 0x5354554E. Returns ``False`` when absent, misplaced, wrong, or ``data`` is malformed.
    """
    try:
        check_framing(data)
        found = find(data, AttrType.FINGERPRINT)
    except StunError:
        return False
    if found is None or found[0] != len(data) - 4 or found[1] != len(data):
        return False
    expected = fingerprint_value(data[: found[0] - 4])
    return int.from_bytes(data[found[0] :], "big") == expected
