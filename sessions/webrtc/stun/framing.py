"""STUN message framing (RFC 8489 §5, §6.3, §14): header, message type and the attribute walk.

Also :func:`username_of`, the one read the relay makes: the USERNAME of a Binding request,
reading as little of the datagram as it can.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from typing import Final

from sessions.webrtc.errors import StunError
from sessions.webrtc.stun.attributes import COOKIE_BYTES, AttrType, utf8

__all__ = [
    "BINDING",
    "HEADER",
    "HEADER_LENGTH",
    "StunClass",
    "append",
    "check_framing",
    "decode_type",
    "encode_type",
    "find",
    "is_stun",
    "username_of",
    "walk",
]

#: RFC 8489 §5: type, length, cookie, 96-bit transaction id.
HEADER_LENGTH: Final = 20
#: RFC 8489 §18.2: the only method ICE uses.
BINDING: Final = 0x001
HEADER: Final = struct.Struct("!HH4s12s")
_U16 = struct.Struct("!H")
_TLV = struct.Struct("!HH")


class StunClass(enum.IntEnum):
    """The two class bits of the message type (RFC 8489 §5)."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


# --- message type (RFC 8489 §5) ---------------------------------------------------------------
# The 14-bit type interleaves the class bits C1 C0 with the 12 method bits M11..M0:
#   bit 13..9: M11..M7   bit 8: C1   bit 7..5: M6..M4   bit 4: C0   bit 3..0: M3..M0


def encode_type(method: int, cls: int) -> int:
    """The 14-bit message type of ``method`` and class ``cls``."""
    return (
        ((method & 0xF80) << 2)
        | ((method & 0x070) << 1)
        | (method & 0x00F)
        | ((cls & 0b10) << 7)
        | ((cls & 0b01) << 4)
    )


def decode_type(message_type: int) -> tuple[int, StunClass]:
    """``(method, class)`` of a 14-bit message type."""
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
        and data[4:8] == COOKIE_BYTES
        and (len(data) - HEADER_LENGTH) & 3 == 0
        and _U16.unpack_from(data, 2)[0] == len(data) - HEADER_LENGTH
    )


def check_framing(data: bytes) -> None:
    """Raise :class:`StunError` unless ``data`` is framed as one STUN message (RFC 8489 §6.3)."""
    if len(data) < HEADER_LENGTH:
        raise StunError("shorter than a STUN header")
    if data[0] >= 0x40:
        raise StunError("the two leading bits of a STUN message must be zero")  # RFC 8489 §5
    if data[4:8] != COOKIE_BYTES:
        raise StunError("no magic cookie (not an RFC 5389/8489 STUN message)")
    length = _U16.unpack_from(data, 2)[0]
    if length & 3:
        raise StunError("STUN message length is not a multiple of 4")
    if length != len(data) - HEADER_LENGTH:
        raise StunError("STUN message length does not match the datagram")


def walk(data: bytes) -> Iterator[tuple[int, int, int]]:
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


def find(data: bytes, wanted: int) -> tuple[int, int] | None:
    """``(value_start, value_end)`` of the first attribute of type ``wanted``, or ``None``."""
    for attr_type, start, end in walk(data):
        if attr_type == wanted:
            return start, end
    return None


def append(out: bytearray, attr_type: int, value: bytes) -> None:
    """Write one attribute TLV with its padding to ``out`` (RFC 8489 §14)."""
    if len(value) > 0xFFFF:
        raise ValueError("STUN attribute value longer than 65535 bytes")
    out += _TLV.pack(attr_type, len(value))
    out += value
    out += bytes(-len(value) & 3)  # RFC 8489 §14: pad with zeros to a multiple of 4


# --- the relay's read -------------------------------------------------------------------------


def username_of(data: bytes) -> str | None:
    """USERNAME of a Binding request, reading as little of ``data`` as possible.

    For the relay, which routes connectivity checks by ufrag and reads nothing else. Returns
    ``None`` for a well-framed message that is not a Binding request or carries no USERNAME;
    raises :class:`StunError` if ``data`` is not a well-framed STUN message, the attributes
    before USERNAME are truncated, or USERNAME is not UTF-8. Nothing is authenticated here.
    """
    check_framing(data)
    if data[0] != 0 or data[1] != BINDING:  # type 0x0001: Binding request
        return None
    for attr_type, start, end in walk(data):
        if attr_type == AttrType.USERNAME:
            return utf8(data[start:end], "USERNAME")
        if attr_type == AttrType.MESSAGE_INTEGRITY:
            return None  # RFC 8489 §14.5: anything later is not covered by the integrity check
    return None
