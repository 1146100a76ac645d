"""What signaling speaks and promises: client messages, error objects, the backend seam, limits.

The bottom layer of the signaling package: no sockets, no HTTP. Every other module builds on it.
"""

from __future__ import annotations

import json
import re
from typing import Literal, Protocol, final

import attrs
import trio

__all__ = [
    "ATTACHED_ELSEWHERE",
    "CLIENT_CODES",
    "MAX_CONTROL_CHARS",
    "MIN_SECRET_CHARS",
    "REATTACH",
    "REATTACH_GOING_AWAY",
    "SESSION_PATH",
    "ClientMessageError",
    "Gone",
    "Redirect",
    "Refusal",
    "SessionBackend",
    "SessionHandle",
    "SignalingLimits",
    "SignalingRefused",
    "error_body",
    "error_object",
    "is_control_token",
    "parse_client_message",
]

#: the WebSocket endpoint and the WHIP endpoint (``POST``); sessions live under it
SESSION_PATH = "/v1/session"

#: offer refusals that are the client's fault (HTTP 400); any other refusal code is a 503
CLIENT_CODES = frozenset({"bad_sdp", "no_audio", "no_common_codec", "unsupported"})

#: WebSocket close codes of our own (RFC 6455 §7.4.2: 4000-4999 are for applications). The first
#: two mean "your session lives on: re-attach"; the last "another socket attached: do not".
#: ``REATTACH_GOING_AWAY``: this node is going away (re-attach to any node, to your own origin).
REATTACH_GOING_AWAY = 4000
#: ``REATTACH``: the session moved (the ``session_moved`` event before it says where).
REATTACH = 4001
#: another socket attached to this session with its secret; this one is no longer its line.
ATTACHED_ELSEWHERE = 4003

#: session ids and secrets: URL-safe base64 characters (RFC 4648 §5), so that both fit a URL path
#: segment as they are; at most this long
MAX_CONTROL_CHARS = 128
#: a secret shorter than this is a backend bug (32 random bytes make 43 characters)
MIN_SECRET_CHARS = 32
_CONTROL_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def is_control_token(value: object) -> bool:
    """Whether ``value`` can be a session id or a secret: a non-empty string of URL-safe base64
    characters, at most :data:`MAX_CONTROL_CHARS` long."""
    return (
        isinstance(value, str)
        and len(value) <= MAX_CONTROL_CHARS
        and _CONTROL_TOKEN.fullmatch(value) is not None
    )


class SignalingRefused(Exception):
    """The node will not do what a client asked: open a session (``node_draining``, ...), attach
    to one or end one (``forbidden``, ``unknown_session``); ``code`` is machine-readable."""

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


def _check_secret(handle: SessionHandle, attribute: attrs.Attribute[str], secret: str) -> None:
    if not is_control_token(secret) or len(secret) < MIN_SECRET_CHARS:
        raise ValueError(
            f"a session secret is {MIN_SECRET_CHARS} to {MAX_CONTROL_CHARS} URL-safe characters"
        )
    # issue #15: the secret never travels in clear, and the SDP and the id do (in the answer,
    # and in the ufrag of every STUN check)
    if secret in handle.answer_sdp or secret in handle.session_id:
        raise ValueError("the session secret must not appear in the answer or the id")


def _check_session_id(handle: SessionHandle, attribute: attrs.Attribute[str], value: str) -> None:
    if not is_control_token(value):
        raise ValueError(f"a session id is 1 to {MAX_CONTROL_CHARS} URL-safe characters")


@final
@attrs.frozen
class SessionHandle:
    """What the backend returns for an accepted offer or an attached socket."""

    #: a URL path segment as it is (it ends up in the WHIP ``Location``): :func:`is_control_token`
    session_id: str = attrs.field(validator=_check_session_id)
    #: the SDP answer to an offer (a handle for an attach may carry anything: it is not sent)
    answer_sdp: str
    #: server events for the client (WebSocket sessions: forwarded; HTTP sessions: drained and
    #: dropped). The backend closes its send side when the session ends. The server closes this
    #: receive side once nobody listens (socket gone), so the backend's sends then raise
    #: ``trio.BrokenResourceError``, which the backend should read as "client gone".
    #:
    #: A ``session_ended`` event should carry ``code`` and ``reason``; it may carry an integer
    #: ``close_code`` (e.g. 1001 for a node going away) that closes a WebSocket instead of 1000
    #: and is not forwarded to the client.
    #:
    #: Two events say the session lives on but no longer through this socket: the server
    #: forwards them (without ``close_code``), closes the socket at once and does NOT call
    #: ``close_session``. The backend sends one and closes the channel at once (no await between):
    #:
    #: - ``{"event": "session_moved", "node": B, "url": "ws://.../v1/session"}``, optionally with
    #:   a ``close_code`` (default :data:`REATTACH`, 4001; :data:`REATTACH_GOING_AWAY`, 4000, for a
    #:   node going away): the client re-attaches, at ``url``;
    #: - ``{"event": "session_attached_elsewhere"}``: another socket attached with the secret; the
    #:   close code is always :data:`ATTACHED_ELSEWHERE` (4003).
    #:
    #: Whenever the backend has closed this channel, the socket no longer calls
    #: ``close_session`` when it closes: the session ended, or it is another socket's now.
    events: trio.MemoryReceiveChannel[dict[str, object]]
    #: the session's control secret: :data:`MIN_SECRET_CHARS` or more URL-safe characters (32
    #: random bytes, ``secrets.token_urlsafe(32)``), made by the backend when it opens the session
    #: and kept for its life (moves included). The client gets it only in the answer on its own
    #: signaling socket, or in the WHIP ``Location``; the server never logs it.
    secret: str = attrs.field(validator=_check_secret)


@final
@attrs.frozen
class Redirect:
    """Another node owns the session: the client attaches there. Or (``reason`` "region")
    another node should answer the offer, one of the client's region: it offers there."""

    #: the node's name (shown to people)
    node: str
    #: its WebSocket signaling URL (``ws://HOST:PORT/v1/session``); its WHIP URL is the same
    #: with http(s)
    url: str
    reason: Literal["owner", "region"] = "owner"


class SessionBackend(Protocol):
    """What the signaling server needs from the node."""

    async def open_session(
        self,
        offer_sdp: str,
        *,
        transport: Literal["websocket", "http"],
        region: str | None = None,
    ) -> SessionHandle:
        """Answer an offer from a client of ``region`` (None: not known) and start its
        session. Raises :class:`SdpError` (its ``code`` is the error code: ``bad_sdp``,
        ``no_audio``, ``no_common_codec``, ``unsupported``) or :class:`SignalingRefused`
        (``node_draining``, ``node_over_capacity``, ...)."""
        ...

    async def close_session(self, session_id: str, reason: str) -> bool:
        """End a session; False if the backend does not know it."""
        ...

    async def attach_session(self, session_id: str, secret: str) -> SessionHandle | Redirect:
        """The session's event stream for a new socket; any node can be asked.

        A handle when this node owns the session (its ``secret`` is the one given); a
        :class:`Redirect` when another node does. Raises :class:`SignalingRefused`:
        ``forbidden`` for a wrong secret (compared in constant time, ``hmac.compare_digest``),
        ``unknown_session`` when no such session is live. A session has at most one attached
        socket: before returning a new handle, the backend sends ``session_attached_elsewhere``
        on the previous handle's channel and closes it.
        """
        ...

    async def end_session_by_secret(self, session_id: str, secret: str) -> bool:
        """End the session wherever it lives now (WHIP ``DELETE`` on any node); True once ended,
        False if it ended meanwhile. Raises :class:`SignalingRefused` ``forbidden`` (wrong
        secret) or ``unknown_session``."""
        ...


@final
@attrs.frozen
class Refusal:
    """An offer the node did not take: the error for the client, and its HTTP status."""

    status: int
    code: str
    message: str
    #: whole seconds after which asking again may succeed (HTTP ``Retry-After``, RFC 9110
    #: §10.2.3; ``retry_after`` in a WebSocket error); None when waiting would not help
    retry_after: int | None = None


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
    #: connections one source (an IPv4 address, an IPv6 /64) may hold at once; more are
    #: answered 429 ``source_limit`` and closed
    source_connections: int = attrs.field(default=32, validator=_positive_int)
    #: offers (WHIP POSTs, WebSocket offers) per second that one source, and one token subject,
    #: may make in the long run; more are refused 429 ``rate_limited``
    offer_rate: float = attrs.field(default=5.0, validator=_positive_float)
    #: offers one source, or subject, may make at once after a quiet spell (the bucket's depth)
    offer_burst: int = attrs.field(default=10, validator=_positive_int)
    #: sessions of one source, and of one subject, answered (or being answered) whose ICE has
    #: not connected yet; more offers are refused 429 ``half_open_limit``
    half_open: int = attrs.field(default=8, validator=_positive_int)
    #: seconds an answered session has to connect (ICE) before it is ended (``setup_timeout``)
    setup_within: float = attrs.field(default=10.0, validator=_positive_float)
    #: sources, and subjects, whose offer rate is remembered; the least recently seen is
    #: forgotten first, so a flood of spoofed sources cannot grow the table
    rate_entries: int = attrs.field(default=10_000, validator=_positive_int)


def parse_client_message(message: str | bytes, *, max_chars: int = 64 * 1024) -> dict[str, object]:
    """Check one WebSocket message from a client and return it as a JSON object.

    Raises :class:`ClientMessageError`: ``bad_json`` for anything that is not a JSON object with a
    string ``type`` (binary frames included), ``bad_message`` for an unknown type, an offer
    without a non-empty ``sdp`` string, an attach without a ``session`` and a ``secret`` that are
    control tokens (:func:`is_control_token`), or a message longer than ``max_chars``.
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
    elif kind == "attach":
        if not (is_control_token(value.get("session")) and is_control_token(value.get("secret"))):
            raise ClientMessageError(
                "bad_message", 'an attach needs "session" and "secret" strings (URL-safe)'
            )
    elif kind not in ("ping", "bye"):
        raise ClientMessageError("bad_message", "unknown message type")
    return value


def error_object(code: str, message: str, retry_after: int | None = None) -> dict[str, object]:
    """The error both transports send: a WebSocket message, or an HTTP error's JSON body; with
    ``retry_after`` (seconds) when asking again later may succeed."""
    error: dict[str, object] = {"type": "error", "code": code, "message": message}
    if retry_after is not None:
        error["retry_after"] = retry_after
    return error


def error_body(code: str, message: str) -> bytes:
    """:func:`error_object` as an HTTP body."""
    return json.dumps(error_object(code, message)).encode()
