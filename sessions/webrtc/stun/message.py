"""The STUN message (RFC 8489 §5, §6): a value, parsed from and encoded to bytes, and the
Binding messages ICE connectivity checks are made of (RFC 8445 §7)."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import final

import attrs

from sessions.webrtc.errors import StunError
from sessions.webrtc.stun.attributes import (
    COOKIE_BYTES,
    HMAC_SHA1_LENGTH,
    UNDERSTOOD_REQUIRED,
    AttrType,
    ErrorCode,
    decode_error_code,
    decode_unknown_attributes,
    decode_xor_address,
    error_code_attribute,
    ice_controlled_attribute,
    ice_controlling_attribute,
    priority_attribute,
    uint,
    unknown_attributes_attribute,
    use_candidate_attribute,
    username_attribute,
    utf8,
    validate,
    xor_mapped_address_attribute,
)
from sessions.webrtc.stun.framing import (
    BINDING,
    HEADER,
    StunClass,
    append,
    check_framing,
    decode_type,
    encode_type,
    walk,
)
from sessions.webrtc.stun.integrity import fingerprint_value, integrity_tag

__all__ = ["StunMessage", "binding_request", "binding_success", "encode", "error_response", "parse"]

_U16 = struct.Struct("!H")


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
        return None if value is None else utf8(value, "USERNAME")

    @property
    def priority(self) -> int | None:
        """PRIORITY of the candidate the sender would learn from this check (RFC 8445 §7.1.1)."""
        value = self.get(AttrType.PRIORITY)
        return None if value is None else uint(value, 4, "PRIORITY")

    @property
    def use_candidate(self) -> bool:
        """Whether USE-CANDIDATE is present (RFC 8445 §7.1.2): the pair is nominated."""
        return self.has(AttrType.USE_CANDIDATE)

    @property
    def ice_controlling(self) -> int | None:
        """Tie-breaker of ICE-CONTROLLING (RFC 8445 §7.1.3), if the sender is controlling."""
        value = self.get(AttrType.ICE_CONTROLLING)
        return None if value is None else uint(value, 8, "ICE-CONTROLLING")

    @property
    def ice_controlled(self) -> int | None:
        """Tie-breaker of ICE-CONTROLLED (RFC 8445 §7.1.3), if the sender is controlled."""
        value = self.get(AttrType.ICE_CONTROLLED)
        return None if value is None else uint(value, 8, "ICE-CONTROLLED")

    @property
    def xor_mapped_address(self) -> tuple[str, int] | None:
        """XOR-MAPPED-ADDRESS as ``(host, port)`` (RFC 8489 §14.2)."""
        value = self.get(AttrType.XOR_MAPPED_ADDRESS)
        return None if value is None else decode_xor_address(value, self.transaction_id)

    @property
    def error_code(self) -> ErrorCode | None:
        """ERROR-CODE (RFC 8489 §14.8)."""
        value = self.get(AttrType.ERROR_CODE)
        return None if value is None else decode_error_code(value)

    @property
    def unknown_attributes(self) -> tuple[int, ...]:
        """Types listed in an UNKNOWN-ATTRIBUTES attribute (RFC 8489 §14.9) of a 420 reply."""
        value = self.get(AttrType.UNKNOWN_ATTRIBUTES)
        return () if value is None else decode_unknown_attributes(value)

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
            if t < 0x8000 and t not in UNDERSTOOD_REQUIRED and t not in unknown:
                unknown.append(t)
        return tuple(unknown)


# --- parse ------------------------------------------------------------------------------------


def parse(data: bytes) -> StunMessage:
    """Parse one STUN message; raise :class:`StunError` if it is malformed.

    Authentication is separate: call :func:`verify_integrity` and :func:`verify_fingerprint`
    on the same bytes. As RFC 8489 §14.5 requires, attributes after MESSAGE-INTEGRITY other
    than FINGERPRINT (and MESSAGE-INTEGRITY-SHA256) are dropped, since nothing vouches for them.
    """
    check_framing(data)
    message_type, _, _, transaction_id = HEADER.unpack_from(data)
    method, cls = decode_type(message_type)
    attributes: list[tuple[int, bytes]] = []
    after_integrity = False
    after_fingerprint = False
    for attr_type, start, end in walk(data):
        if after_fingerprint:
            raise StunError("attribute after FINGERPRINT")  # RFC 8489 §14.7: it is last
        if attr_type == AttrType.FINGERPRINT:
            after_fingerprint = True
        elif after_integrity and attr_type != AttrType.MESSAGE_INTEGRITY_SHA256:
            continue  # RFC 8489 §14.5: ignore unauthenticated trailing attributes
        elif attr_type == AttrType.MESSAGE_INTEGRITY:
            after_integrity = True
        value = bytes(data[start:end])
        validate(attr_type, value, transaction_id)
        attributes.append((attr_type, value))
    return StunMessage(method, cls, transaction_id, tuple(attributes))


# --- encode -----------------------------------------------------------------------------------


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
            append(body, attr_type, value)
    type_bytes = _U16.pack(encode_type(msg.method, msg.cls))
    prefix = COOKIE_BYTES + msg.transaction_id

    def header(length: int) -> bytes:
        if length > 0xFFFF:
            raise ValueError("STUN message longer than 65535 bytes")
        return type_bytes + _U16.pack(length) + prefix

    if integrity_key is not None:
        # RFC 8489 §14.5: the length counts the MESSAGE-INTEGRITY attribute itself.
        covered = header(len(body) + 4 + HMAC_SHA1_LENGTH) + body
        append(
            body,
            AttrType.MESSAGE_INTEGRITY,
            integrity_tag(integrity_key, covered),
        )
    if fingerprint:
        crc = fingerprint_value(header(len(body) + 8) + body)  # RFC 8489 §14.7
        append(body, AttrType.FINGERPRINT, crc.to_bytes(4, "big"))
    return header(len(body)) + bytes(body)


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
