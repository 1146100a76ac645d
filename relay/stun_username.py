"""The only thing the relay reads in a client's STUN message: a Binding request's USERNAME.

A relay routes a new client address by the server ufrag in the USERNAME of its first
connectivity check (RFC 8445 §7.2.2: ``"<receiver ufrag>:<sender ufrag>"``). Everything else in
the message is the session's business (its ICE core parses and authenticates it), so this reader
reads nothing else: the RFC 5389 §6 header, then attribute headers until USERNAME. It computes no
MAC — the routing hint inside the ufrag carries its own (relay/tunnel/hint.py).

Every byte here is remote input: :func:`read_username` returns a string or None, or raises
:class:`MalformedStun`, and nothing else, whatever it is given.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_ATTRIBUTES", "MalformedStun", "read_username"]

# RFC 5389 §6: type (2 bytes), length (2), magic cookie (4), transaction ID (12).
_HEADER_LENGTH: Final = 20
_MAGIC_COOKIE: Final = b"\x21\x12\xa4\x42"
# RFC 5389 §6 and §18.1: method Binding (0x001), class request (C1 C0 = 00).
_BINDING_REQUEST: Final = 0x0001
# RFC 5389 §18.2 attribute types.
_USERNAME: Final = 0x0006
_MESSAGE_INTEGRITY: Final = 0x0008

#: attributes walked before USERNAME at most. Browsers send USERNAME first and a check carries
#: about seven attributes (RFC 8445 §7.1.1); a request with more before it is not one we route.
MAX_ATTRIBUTES: Final = 32


class MalformedStun(ValueError):
    """A datagram that looked like STUN is not a well-framed STUN message (remote input: the
    relay counts it and drops it)."""


def read_username(data: bytes) -> str | None:
    """The USERNAME of the STUN Binding request ``data``, or None if it carries none.

    None also for a well-framed STUN message that is not a Binding request, for a USERNAME
    after MESSAGE-INTEGRITY (RFC 5389 §15.4: nothing after it is covered, so a check is not
    routed by it), and past :data:`MAX_ATTRIBUTES` attributes. Raises :class:`MalformedStun` if
    the header is not RFC 5389 §6 framing of exactly ``data``, an attribute before USERNAME
    overruns the message, or USERNAME is not UTF-8 (RFC 5389 §15.3).
    """
    size = len(data)
    if size < _HEADER_LENGTH:
        raise MalformedStun("shorter than a STUN header")
    if data[0] & 0xC0:
        raise MalformedStun("the two leading bits of a STUN message must be zero")
    if data[4:8] != _MAGIC_COOKIE:
        raise MalformedStun("no magic cookie")
    length = int.from_bytes(data[2:4], "big")
    if length & 3:
        raise MalformedStun("STUN message length is not a multiple of 4")
    if length != size - _HEADER_LENGTH:
        raise MalformedStun("STUN message length does not match the datagram")
    if int.from_bytes(data[0:2], "big") != _BINDING_REQUEST:
        return None
    pos = _HEADER_LENGTH
    # Bounded twice over: by the count, and by the message (each step advances 4 bytes or more).
    for _ in range(MAX_ATTRIBUTES):
        if pos >= size:
            return None
        if size - pos < 4:
            raise MalformedStun("truncated STUN attribute header")
        kind = int.from_bytes(data[pos : pos + 2], "big")
        value_length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        start = pos + 4
        end = start + value_length
        if end > size:
            raise MalformedStun("STUN attribute overruns the message")
        if kind == _USERNAME:
            try:
                return data[start:end].decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedStun("USERNAME is not UTF-8") from None
        if kind == _MESSAGE_INTEGRITY:
            return None
        pos = start + ((value_length + 3) & ~3)  # RFC 5389 §15: values padded to 4 bytes
    return None
