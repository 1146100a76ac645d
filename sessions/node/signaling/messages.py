"""What signaling speaks and promises: client messages, error objects, the backend seam, limits.

The bottom layer of the signaling package: no sockets, no HTTP. Every other module builds on it.
"""

from __future__ import annotations

import json
from typing import Literal, Protocol, final

import attrs
import trio

__all__ = [
    "CLIENT_CODES",
    "SESSION_PATH",
    "ClientMessageError",
    "Gone",
    "Refusal",
    "SessionBackend",
    "SessionHandle",
    "SignalingLimits",
    "SignalingRefused",
    "error_body",
    "error_object",
    "parse_client_message",
]

#: the WebSocket endpoint and the WHIP endpoint (``POST``); sessions live under it
SESSION_PATH = "/v1/session"

#: offer refusals that are the client's fault (HTTP 400); any other refusal code is a 503
CLIENT_CODES = frozenset({"bad_sdp", "no_audio", "no_common_codec", "unsupported"})


class SignalingRefused(Exception):
    """The node will not open a session; ``code`` is machine-readable (``node_draining``, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ClientMessageError(ValueError):
    """A WebSocket message from a client is not one we accept; ``code`` goes back to the client."""

    def __init__(self, code: Literal["bad_json", "bad_message"], message: str) -> None:
        super().__init__(message)
        self.code: str = code
        self.message = message


class Gone(Exception):
    """The peer cannot be written to any more (closed, broken, or not reading)."""


@final
@attrs.frozen
class SessionHandle:
    """What the backend returns for an accepted offer."""

    session_id: str
    answer_sdp: str
    #: server events for the client (WebSocket sessions: forwarded; HTTP sessions: drained and
    #: dropped). The backend closes its send side when the session ends. The server closes this
    #: receive side once nobody listens (socket gone), so the backend's sends then raise
    #: ``trio.BrokenResourceError``, which the backend should read as "client gone".
    #:
    #: A ``session_ended`` event should carry ``code`` and ``reason``; it may carry an integer
    #: ``close_code`` (e.g. 1001 for a node going away) that closes a WebSocket instead of 1000
    #: and is not forwarded to the client.
    events: trio.MemoryReceiveChannel[dict[str, object]]


class SessionBackend(Protocol):
    """What the signaling server needs from the node."""

    async def open_session(
        self, offer_sdp: str, *, transport: Literal["websocket", "http"]
    ) -> SessionHandle:
        """Answer an offer and start its session. Raises :class:`SdpError` (its ``code`` is the
        error code: ``bad_sdp``, ``no_audio``, ``no_common_codec``, ``unsupported``) or
        :class:`SignalingRefused` (``node_draining``, ``node_over_capacity``, ...)."""
        ...

    async def close_session(self, session_id: str, reason: str) -> bool:
        """End a session; False if the backend does not know it."""
        ...


@final
@attrs.frozen
class Refusal:
    """An offer the backend did not take: the error for the client, and its HTTP status."""

    status: int
    code: str
    message: str


_positive_int = attrs.validators.gt(0)
_positive_float = attrs.validators.gt(0.0)


@final
@attrs.frozen
class SignalingLimits:
    """Bounds on what one client can make the server hold, and for how long."""

    #: request line plus headers (larger → 431)
    max_head_bytes: int = attrs.field(default=16 * 1024, validator=_positive_int)
    #: HTTP request body; SDP offers are a few KiB (larger → 413)
    max_body_bytes: int = attrs.field(default=64 * 1024, validator=_positive_int)
    #: a WebSocket message larger than this gets a ``bad_message`` error, the connection lives on
    max_message_chars: int = attrs.field(default=64 * 1024, validator=_positive_int)
    #: a WebSocket message larger than this closes the connection (1009) while it is read
    max_frame_chars: int = attrs.field(default=256 * 1024, validator=_positive_int)
    #: from the start of a request cycle (or connection) until its head and body are in
    request_timeout: float = attrs.field(default=10.0, validator=_positive_float)
    #: a WebSocket that opens no session within this long is closed
    offer_timeout: float = attrs.field(default=30.0, validator=_positive_float)
    #: one response or message write; a client that stops reading loses its connection
    send_timeout: float = attrs.field(default=10.0, validator=_positive_float)
    #: closing handshakes and lingering closes
    close_timeout: float = attrs.field(default=2.0, validator=_positive_float)
    #: the backend's ``close_session`` (runs shielded from cancellation, bounded by this)
    close_session_timeout: float = attrs.field(default=10.0, validator=_positive_float)
    #: connections served at once; more are answered 503 and closed
    max_connections: int = attrs.field(default=1024, validator=_positive_int)


def parse_client_message(message: str | bytes, *, max_chars: int = 64 * 1024) -> dict[str, object]:
    """Check one WebSocket message from a client and return it as a JSON object.

    Raises :class:`ClientMessageError`: ``bad_json`` for anything that is not a JSON object with a
    string ``type`` (binary frames included), ``bad_message`` for an unknown type, an offer
    without a non-empty ``sdp`` string, or a message longer than ``max_chars``.
    """
    if len(message) > max_chars:
        raise ClientMessageError("bad_message", f"message too large (limit {max_chars})")
    if isinstance(message, bytes):
        raise ClientMessageError("bad_json", "messages are JSON text, not binary frames")
    try:
        value = json.loads(message)
    except (ValueError, RecursionError):
        raise ClientMessageError("bad_json", "message is not valid JSON") from None
    if not isinstance(value, dict):
        raise ClientMessageError("bad_json", "message is not a JSON object")
    kind = value.get("type")
    if not isinstance(kind, str):
        raise ClientMessageError("bad_json", 'message has no "type" string')
    if kind == "offer":
        sdp = value.get("sdp")
        if not isinstance(sdp, str) or not sdp.strip():
            raise ClientMessageError("bad_message", 'an offer needs a non-empty "sdp" string')
    elif kind not in ("ping", "bye"):
        raise ClientMessageError("bad_message", "unknown message type")
    return value


def error_object(code: str, message: str) -> dict[str, object]:
    """The error both transports send: a WebSocket message, or an HTTP error's JSON body."""
    return {"type": "error", "code": code, "message": message}


def error_body(code: str, message: str) -> bytes:
    """:func:`error_object` as an HTTP body."""
    return json.dumps(error_object(code, message)).encode()
