"""Sans-I/O STUN (RFC 8489) with the ICE connectivity-check attributes (RFC 8445 §16.1).

Only what an ICE agent on a WebRTC media port needs: the message header, the attribute TLV
walk, short-term-credential MESSAGE-INTEGRITY (HMAC-SHA1, the key is the ICE password),
FINGERPRINT, and typed access to the handful of attributes a connectivity check carries.
Attributes we do not know are kept as raw bytes, in wire order.

Every malformed input raises :class:`~sessions.webrtc.errors.StunError`.

The package, bottom up: :mod:`~sessions.webrtc.stun.attributes` (attribute types, values and
builders), :mod:`~sessions.webrtc.stun.framing` (header, message type, attribute walk, and
the relay's USERNAME read), :mod:`~sessions.webrtc.stun.integrity` (MESSAGE-INTEGRITY and
FINGERPRINT) and :mod:`~sessions.webrtc.stun.message` (the message value, parse, encode and
the Binding messages). Use it through this package: ``from sessions.webrtc import stun``.
"""

from __future__ import annotations

from sessions.webrtc.stun.attributes import (
    MAGIC_COOKIE,
    AttrType,
    ErrorCode,
    error_code_attribute,
    ice_controlled_attribute,
    ice_controlling_attribute,
    priority_attribute,
    unknown_attributes_attribute,
    use_candidate_attribute,
    username_attribute,
    xor_mapped_address_attribute,
)
from sessions.webrtc.stun.framing import BINDING, HEADER_LENGTH, StunClass, is_stun, username_of
from sessions.webrtc.stun.integrity import verify_fingerprint, verify_integrity
from sessions.webrtc.stun.message import (
    StunMessage,
    binding_request,
    binding_success,
    encode,
    error_response,
    parse,
)

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
