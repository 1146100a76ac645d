"""The node's signaling server: a WebSocket and a WHIP-style HTTP endpoint on one TCP port.

WebSocket, ``ws://HOST:PORT/v1/session``, JSON text messages::

    client → {"type": "offer", "sdp": "..."}
    node   → {"type": "answer", "sdp": "...", "session": "<id>"}
    client → {"type": "ping"}                 node → {"type": "pong"}
    client → {"type": "bye"}                  node ends the session, closes the socket (1000)
    node   → {"type": "event", "event": "<name>", "ts": <unix seconds>, ...fields}
    node   → {"type": "error", "code": "<machine-readable>", "message": "<human>"}

The socket lives as long as its session: closing it (or losing it) ends the session, and a session
the node ends closes the socket with code 1000 after a final ``session_ended`` event. One session
per connection. A bad message gets an error reply and the connection carries on.

WHIP-style HTTP (RFC 9725 shape) on the same port: ``POST /v1/session`` with an
``application/sdp`` offer answers ``201 Created`` with the SDP answer and
``Location: /v1/session/<id>``; ``DELETE /v1/session/<id>`` ends that session. Errors carry the
same JSON error object as the WebSocket. ``GET /healthz`` and static pages complete the port.

One port for both: each accepted connection's request head is read with h11. A WebSocket upgrade
on ``GET /v1/session`` is handed to trio-websocket together with the bytes already read (a stream
that replays them first); anything else is answered with h11, keep-alive included. Heads, bodies
and WebSocket messages are bounded, every read has a deadline, and closes are bounded: a slow or
malicious client costs one connection task for a bounded time and never the server.
"""

from __future__ import annotations

import contextlib
import http
import json
import logging
import math
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, final

import attrs
import h11
import trio
import trio_websocket

from sessions.webrtc.errors import SdpError

__all__ = [
    "SESSION_PATH",
    "ClientMessageError",
    "SessionBackend",
    "SessionHandle",
    "SignalingLimits",
    "SignalingRefused",
    "SignalingServer",
    "parse_client_message",
]

log = logging.getLogger("parley.signaling")

#: the WebSocket endpoint and the WHIP endpoint (``POST``); sessions live under it
SESSION_PATH = "/v1/session"
_SESSION_PREFIX = SESSION_PATH + "/"
_HEALTH_PATH = "/healthz"

#: offer refusals that are the client's fault (HTTP 400); any other refusal code is a 503
_CLIENT_CODES = frozenset({"bad_sdp", "no_audio", "no_common_codec", "unsupported"})

_RECEIVE_CHUNK = 4096
#: bytes read and discarded while closing a connection whose request we did not read in full
_MAX_DRAIN = 256 * 1024


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


# -- helpers ------------------------------------------------------------------------------------


class _Gone(Exception):
    """The peer cannot be written to any more (closed, broken, or not reading)."""


class _HttpError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.close = close


def _error_object(code: str, message: str) -> dict[str, object]:
    return {"type": "error", "code": code, "message": message}


def _error_body(code: str, message: str) -> bytes:
    return json.dumps(_error_object(code, message)).encode()


def _header(request: h11.Request, name: bytes) -> bytes | None:
    """The request's header ``name`` (lower case); repeated headers joined with commas."""
    values = [value for key, value in request.headers if key == name]
    return b", ".join(values) if values else None


def _tokens(value: bytes | None) -> set[str]:
    if value is None:
        return set()
    return {part.strip().lower() for part in value.decode("latin-1").split(",")}


def _is_websocket_upgrade(request: h11.Request) -> bool:
    return (
        request.method == b"GET"
        and "websocket" in _tokens(_header(request, b"upgrade"))
        and "upgrade" in _tokens(_header(request, b"connection"))
    )


def _peer(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@final
class _ReplayStream(trio.abc.Stream):
    """A stream whose first reads return bytes already read from the wrapped stream."""

    def __init__(self, stream: trio.abc.Stream, replay: bytes) -> None:
        self._stream = stream
        self._replay = replay

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._replay:
            size = len(self._replay) if max_bytes is None else max_bytes
            chunk, self._replay = self._replay[:size], self._replay[size:]
            await trio.lowlevel.checkpoint()
            return chunk
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        self._replay = b""
        await self._stream.aclose()


@final
class _Http:
    """One HTTP/1.1 connection: h11 over a trio stream, remembering each request head's bytes."""

    def __init__(self, stream: trio.SocketStream, limits: SignalingLimits) -> None:
        self.stream = stream
        self.limits = limits
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
        #: raw bytes of the current request head as received (replayed to a WebSocket)
        self.raw = bytearray()
        self._recording = False

    async def _next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(_RECEIVE_CHUNK)
                if self._recording:
                    self.raw += data
                self.conn.receive_data(bytes(data))
                continue
            if event is h11.PAUSED:
                raise h11.RemoteProtocolError("request while the connection is paused")
            assert isinstance(event, h11.Event)
            return event

    async def read_request(self) -> h11.Request | None:
        """The next request's head, or None if the client closed the connection between
        requests. Raises ``h11.RemoteProtocolError`` for malformed or oversized heads."""
        self.raw = bytearray(self.conn.trailing_data[0])
        self._recording = True
        try:
            event = await self._next_event()
        finally:
            self._recording = False
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")
        # h11 bounds a head while it is incomplete; bound the complete one too
        if len(self.raw) - len(self.conn.trailing_data[0]) > self.limits.max_head_bytes:
            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        return event

    async def read_body(self, request: h11.Request) -> bytes:
        limit = self.limits.max_body_bytes
        length = _header(request, b"content-length")
        if length is not None and int(length.split(b",")[0]) > limit:
            raise _HttpError(413, "bad_message", f"request body too large (limit {limit} bytes)")
        if self.conn.client_is_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise _HttpError(
                        413, "bad_message", f"request body too large (limit {limit} bytes)"
                    )
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise h11.RemoteProtocolError("connection closed inside the request body")

    @property
    def can_respond(self) -> bool:
        return self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    async def respond(
        self,
        status: int,
        *,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
        head_only: bool = False,
        close: bool = False,
    ) -> None:
        """Send a complete response. The connection is marked for closing if asked, or if the
        request is not read in full (its body is still on the wire)."""
        all_headers = [("Server", "parley"), ("X-Content-Type-Options", "nosniff"), *headers]
        if status not in (204, 304):
            all_headers.append(("Content-Length", str(len(body))))
        if close or self.conn.their_state is not h11.DONE:
            all_headers.append(("Connection", "close"))
        reason = http.HTTPStatus(status).phrase.encode()
        await self._send(h11.Response(status_code=status, headers=all_headers, reason=reason))
        if body and not head_only:
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if not data:
            return
        with trio.move_on_after(self.limits.send_timeout) as scope:
            await self.stream.send_all(data)
        if scope.cancelled_caught:
            raise _Gone("client is not reading")

    def next_cycle(self) -> bool:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False


@attrs.define
class _WsState:
    remote: str
    handle: SessionHandle | None = None
    #: the session is over (ended by the node, or closed by us); no close_session needed
    ended: bool = False
    #: the client said bye: no final session_ended event
    bye: bool = False
    ended_sent: bool = False


# -- the server ---------------------------------------------------------------------------------


@final
class SignalingServer:
    """Serves WebSocket and WHIP signaling for ``backend`` on one TCP port.

    Start ``run`` with ``nursery.start``: it binds, reports the server itself once listening, and
    serves until cancelled. ``port`` is the bound port from then on.
    """

    def __init__(
        self,
        backend: SessionBackend,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        pages: Mapping[str, tuple[str, bytes]] | None = None,
        limits: SignalingLimits | None = None,
        advertise_host: str | None = None,
    ) -> None:
        self.backend = backend
        self.host = host
        self.port = port
        #: the host put in ``urls()`` (e.g. a routable address when binding 0.0.0.0)
        self.advertise_host = advertise_host
        self.limits = limits or SignalingLimits()
        self._pages = dict(pages or {})
        for path in self._pages:
            if not path.startswith("/") or path in (SESSION_PATH, _HEALTH_PATH):
                raise ValueError(f"page path {path!r} is not a free absolute path")
            if path.startswith(_SESSION_PREFIX):
                raise ValueError(f"page path {path!r} is under {SESSION_PATH}")
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "connections",
                "connections_refused",
                "ws_connections",
                "http_requests",
                "http_errors",
                "malformed_http",
                "timeouts",
                "stalled",
                "sessions_opened",
                "sessions_closed",
                "bad_json",
                "bad_message",
                "refused",
                "internal",
                "events_forwarded",
                "events_dropped",
            ),
            0,
        )
        #: connections being served right now
        self.active_connections = 0
        #: sessions opened over HTTP that have not ended: only these can be DELETEd
        self._http_sessions: set[str] = set()
        self._nursery: trio.Nursery | None = None

    def urls(self) -> dict[str, str]:
        host = _url_host(self.advertise_host or self.host)
        return {
            "signaling": f"ws://{host}:{self.port}{SESSION_PATH}",
            "whip": f"http://{host}:{self.port}{SESSION_PATH}",
        }

    async def run(
        self, *, task_status: trio.TaskStatus[SignalingServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if self._nursery is not None:
            raise RuntimeError("this signaling server is already running")
        listener = await self._bind()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(trio.serve_listeners, self._handle_connection, [listener])
                log.info("signaling listening", extra=dict(self.urls()))
                task_status.started(self)
        finally:
            self._nursery = None

    async def _bind(self) -> trio.SocketListener:
        infos = await trio.socket.getaddrinfo(
            self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        if not infos:
            raise OSError(f"cannot resolve {self.host!r}")
        family, kind, proto, _, address = infos[0]
        sock = trio.socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind(address)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        return trio.SocketListener(sock)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    # -- connections ----------------------------------------------------------------------------

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        self._count("connections")
        remote = _peer(stream)
        if self.active_connections >= self.limits.max_connections:
            self._count("connections_refused")
            log.warning("signaling connection refused: too many", extra={"remote": remote})
            await self._refuse(stream)
            return
        self.active_connections += 1
        try:
            await self._serve(stream, remote)
        except Exception:
            self._count("internal")
            log.exception("signaling connection failed", extra={"remote": remote})
        finally:
            self.active_connections -= 1
            await trio.aclose_forcefully(stream)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        body = _error_body("node_over_capacity", "too many signaling connections")
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with trio.move_on_after(self.limits.close_timeout):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(head.encode() + body)
        await self._linger_close(stream)

    async def _serve(self, stream: trio.SocketStream, remote: str) -> None:
        """HTTP request cycles until the connection closes or turns into a WebSocket."""
        connection = _Http(stream, self.limits)
        try:
            while True:
                outcome = await self._serve_request(connection, remote)
                if outcome == "websocket":
                    return
                if outcome == "close" or not connection.next_cycle():
                    break
        except (_Gone, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        await self._linger_close(stream)

    async def _linger_close(self, stream: trio.SocketStream) -> None:
        """Close after the response without losing it: stop sending, read (and drop) what the
        client still sends until it closes, for a bounded time. Closing with unread data would
        reset the connection and could destroy the response before the client reads it."""
        with trio.move_on_after(self.limits.close_timeout):
            try:
                await stream.send_eof()
                drained = 0
                while drained < _MAX_DRAIN:
                    data = await stream.receive_some(_RECEIVE_CHUNK)
                    if not data:
                        break
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(stream)

    async def _serve_request(
        self, connection: _Http, remote: str
    ) -> Literal["next", "close", "websocket"]:
        deadline = trio.current_time() + self.limits.request_timeout
        request: h11.Request | None = None
        body = b""
        try:
            with trio.move_on_at(deadline) as scope:
                request = await connection.read_request()
                if request is None:
                    return "close"
                self._count("http_requests")
                if not _is_websocket_upgrade(request):
                    body = await connection.read_body(request)
            if scope.cancelled_caught:
                if request is None and not connection.raw:
                    return "close"  # an idle keep-alive connection: just close it
                self._count("timeouts")
                log.info("signaling request timed out", extra={"remote": remote})
                raise _HttpError(408, "timeout", "request not received in time", close=True)
            assert request is not None
            if _is_websocket_upgrade(request):
                await self._upgrade(connection, request, remote)
                return "websocket"
            await self._route(connection, request, body, remote)
            return "next"
        except h11.RemoteProtocolError as exc:
            self._count("malformed_http")
            status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
            log.info("malformed HTTP request", extra={"remote": remote, "status": status})
            # h11's message may quote request bytes (headers, tokens): debug only
            log.debug("malformed HTTP request: %s", exc, extra={"remote": remote})
            error = _HttpError(status, "bad_request", "malformed HTTP request", close=True)
            await self._send_http_error(connection, error)
            return "close"
        except _HttpError as exc:
            await self._send_http_error(connection, exc)
            return "close" if exc.close else "next"

    async def _send_http_error(self, connection: _Http, error: _HttpError) -> None:
        self._count("http_errors")
        self._count(error.code)
        if not connection.can_respond:
            return
        await connection.respond(
            error.status,
            body=_error_body(error.code, error.message),
            headers=[("Content-Type", "application/json"), *error.headers],
            close=error.close,
        )

    # -- HTTP routes ----------------------------------------------------------------------------

    async def _route(
        self, connection: _Http, request: h11.Request, body: bytes, remote: str
    ) -> None:
        method = request.method.decode("ascii", "replace")
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        head_only = method == "HEAD"
        if path == SESSION_PATH:
            allow = [("Allow", "GET, POST, OPTIONS")]
            if method == "POST":
                await self._whip_post(connection, request, body, remote)
            elif method == "OPTIONS":
                await connection.respond(204, headers=[*allow, ("Accept-Post", "application/sdp")])
            elif method in ("GET", "HEAD"):
                raise _HttpError(
                    426,
                    "upgrade_required",
                    f"GET {SESSION_PATH} is the WebSocket endpoint",
                    [("Upgrade", "websocket")],
                )
            else:
                raise _HttpError(405, "method_not_allowed", f"{method} not allowed here", allow)
        elif path.startswith(_SESSION_PREFIX):
            session_id = path[len(_SESSION_PREFIX) :]
            allow = [("Allow", "DELETE, OPTIONS")]
            if not session_id or "/" in session_id:
                raise _HttpError(404, "not_found", "no such resource")
            if method == "DELETE":
                await self._whip_delete(connection, session_id, remote)
            elif method == "OPTIONS":
                await connection.respond(204, headers=allow)
            else:
                # PATCH included: an ICE-lite node takes no trickled candidates (RFC 9725 §4.3)
                raise _HttpError(405, "method_not_allowed", f"{method} not allowed here", allow)
        elif path == _HEALTH_PATH or path in self._pages:
            if method not in ("GET", "HEAD"):
                raise _HttpError(
                    405,
                    "method_not_allowed",
                    f"{method} not allowed here",
                    [("Allow", "GET, HEAD")],
                )
            if path == _HEALTH_PATH:
                content_type, content = "application/json", b'{"ok": true}'
            else:
                content_type, content = self._pages[path]
            await connection.respond(
                200,
                body=content,
                headers=[("Content-Type", content_type), ("Cache-Control", "no-store")],
                head_only=head_only,
            )
        else:
            raise _HttpError(404, "not_found", "no such resource")

    async def _whip_post(
        self, connection: _Http, request: h11.Request, body: bytes, remote: str
    ) -> None:
        content_type = _header(request, b"content-type") or b""
        media_type = content_type.split(b";", 1)[0].strip().lower()
        if media_type != b"application/sdp":
            raise _HttpError(
                415,
                "unsupported_media_type",
                "the offer must be sent as application/sdp",
                [("Accept-Post", "application/sdp")],
            )
        try:
            offer = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _HttpError(400, "bad_sdp", "the offer is not UTF-8") from None
        if not offer.strip():
            raise _HttpError(400, "bad_sdp", "the offer is empty")
        handle = await self._open_session(offer, "http", remote)
        if isinstance(handle, _HttpError):
            raise handle
        session_id = handle.session_id
        self._http_sessions.add(session_id)
        nursery = self._nursery
        assert nursery is not None  # connections are only served while run() runs
        nursery.start_soon(self._watch_http_session, handle)
        try:
            await connection.respond(
                201,
                body=handle.answer_sdp.encode(),
                headers=[
                    ("Content-Type", "application/sdp"),
                    ("Location", f"{_SESSION_PREFIX}{session_id}"),
                    ("Cache-Control", "no-store"),
                ],
            )
        except BaseException:
            # nobody can reach a session whose answer never left: end it now
            self._http_sessions.discard(session_id)
            await self._close_session(session_id, "answer not delivered")
            raise

    async def _whip_delete(self, connection: _Http, session_id: str, remote: str) -> None:
        if session_id not in self._http_sessions:
            raise _HttpError(404, "unknown_session", "no such session")
        self._http_sessions.discard(session_id)
        if not await self._close_session(session_id, "whip delete"):
            raise _HttpError(404, "unknown_session", "no such session")
        await connection.respond(200)

    async def _watch_http_session(self, handle: SessionHandle) -> None:
        """HTTP sessions have no event channel: drop their events, forget them when they end."""
        async with handle.events:
            async for _ in handle.events:
                pass
        self._http_sessions.discard(handle.session_id)

    async def _upgrade(self, connection: _Http, request: h11.Request, remote: str) -> None:
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        if path != SESSION_PATH:
            raise _HttpError(404, "not_found", "no WebSocket endpoint here", close=True)
        if _header(request, b"sec-websocket-version") != b"13":
            raise _HttpError(
                426,
                "bad_request",
                "unsupported WebSocket version",
                [("Sec-WebSocket-Version", "13")],
                close=True,
            )
        if not _header(request, b"sec-websocket-key"):
            raise _HttpError(400, "bad_request", "missing Sec-WebSocket-Key", close=True)
        await self._serve_websocket(connection.stream, bytes(connection.raw), remote)

    # -- sessions -------------------------------------------------------------------------------

    async def _open_session(
        self, offer: str, transport: Literal["websocket", "http"], remote: str
    ) -> SessionHandle | _HttpError:
        """Ask the backend; a refusal comes back as the error to send (status for HTTP)."""
        log.debug("offer received", extra={"remote": remote, "transport": transport, "sdp": offer})
        try:
            handle = await self.backend.open_session(offer, transport=transport)
        except SdpError as exc:
            self._count("refused")
            log.info("offer refused", extra={"remote": remote, "code": exc.code})
            log.debug("offer refused: %s", exc, extra={"remote": remote, "code": exc.code})
            return _HttpError(400, exc.code, str(exc))
        except SignalingRefused as exc:
            self._count("refused")
            log.info("offer refused", extra={"remote": remote, "code": exc.code})
            status = 400 if exc.code in _CLIENT_CODES else 503
            return _HttpError(status, exc.code, exc.message)
        except Exception:
            log.exception("backend failed to open a session", extra={"remote": remote})
            return _HttpError(500, "internal", "internal error")
        self._count("sessions_opened")
        log.info(
            "session opened",
            extra={"session": handle.session_id, "transport": transport, "remote": remote},
        )
        log.debug("answer sent", extra={"session": handle.session_id, "sdp": handle.answer_sdp})
        return handle

    async def _close_session(self, session_id: str, reason: str) -> bool:
        """``backend.close_session``, shielded and bounded: it runs during teardown too."""
        closed = False
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.limits.close_session_timeout) as scope:
                try:
                    closed = await self.backend.close_session(session_id, reason)
                except Exception:
                    self._count("internal")
                    log.exception(
                        "backend failed to close a session", extra={"session": session_id}
                    )
                    return False
            if scope.cancelled_caught:
                log.warning("backend close_session timed out", extra={"session": session_id})
                return False
        if closed:
            self._count("sessions_closed")
        log.info("session closed", extra={"session": session_id, "reason": reason, "known": closed})
        return closed

    # -- WebSocket ------------------------------------------------------------------------------

    async def _serve_websocket(self, stream: trio.SocketStream, head: bytes, remote: str) -> None:
        self._count("ws_connections")
        replay = _ReplayStream(stream, head)
        async with trio.open_nursery() as nursery:
            ws: trio_websocket.WebSocketConnection | None = None
            with trio.move_on_after(self.limits.request_timeout):
                request = await trio_websocket.wrap_server_stream(
                    nursery, replay, max_message_size=self.limits.max_frame_chars
                )
                ws = await request.accept()
            if ws is None:
                self._count("timeouts")
                log.info("websocket handshake did not complete", extra={"remote": remote})
                nursery.cancel_scope.cancel()
                return
            log.info("websocket connected", extra={"remote": remote})
            try:
                await self._websocket_session(ws, remote)
            finally:
                # when the server is stopping, our reader task is cancelled too and cannot see the
                # client's close reply: send our close frame and go
                stopping = trio.current_effective_deadline() == -math.inf
                timeout = (
                    min(0.1, self.limits.close_timeout) if stopping else self.limits.close_timeout
                )
                with trio.CancelScope(shield=True), trio.move_on_after(timeout):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
                log.info("websocket closed", extra={"remote": remote})

    async def _websocket_session(self, ws: trio_websocket.WebSocketConnection, remote: str) -> None:
        state = _WsState(remote)
        try:
            async with trio.open_nursery() as tasks:
                await self._websocket_receive(ws, state, tasks)
                tasks.cancel_scope.cancel()
        finally:
            if state.handle is not None:
                state.handle.events.close()
                if not state.ended:
                    state.ended = True
                    await self._close_session(state.handle.session_id, "signaling closed")

    async def _websocket_receive(
        self, ws: trio_websocket.WebSocketConnection, state: _WsState, tasks: trio.Nursery
    ) -> None:
        offer_deadline = trio.current_time() + self.limits.offer_timeout
        try:
            while True:
                message: str | bytes | None = None
                with trio.move_on_at(offer_deadline if state.handle is None else math.inf):
                    try:
                        message = await ws.get_message()
                    except trio_websocket.ConnectionClosed:
                        return
                if message is None:
                    self._count("timeouts")
                    timeout = self.limits.offer_timeout
                    await self._ws_error(ws, "timeout", f"no session opened within {timeout:g} s")
                    return
                if not await self._websocket_message(ws, state, tasks, message):
                    return
        except _Gone:
            return

    async def _websocket_message(
        self,
        ws: trio_websocket.WebSocketConnection,
        state: _WsState,
        tasks: trio.Nursery,
        message: str | bytes,
    ) -> bool:
        """Handle one client message; False when the connection is to close."""
        try:
            parsed = parse_client_message(message, max_chars=self.limits.max_message_chars)
        except ClientMessageError as exc:
            await self._ws_error(ws, exc.code, exc.message)
            return True
        kind = parsed["type"]
        if kind == "ping":
            await self._ws_send(ws, {"type": "pong"})
            return True
        if kind == "bye":
            state.bye = True
            if state.handle is not None and not state.ended:
                state.ended = True
                await self._close_session(state.handle.session_id, "bye")
            return False
        # an offer (parse_client_message admits nothing else)
        if state.handle is not None:
            await self._ws_error(ws, "bad_message", "one session per connection")
            return True
        sdp = parsed["sdp"]
        assert isinstance(sdp, str)
        outcome = await self._open_session(sdp, "websocket", state.remote)
        if isinstance(outcome, _HttpError):
            await self._ws_error(ws, outcome.code, outcome.message)
            return True
        state.handle = outcome
        answer = {"type": "answer", "sdp": outcome.answer_sdp, "session": outcome.session_id}
        await self._ws_send(ws, answer)
        tasks.start_soon(self._forward_events, ws, state, outcome, tasks.cancel_scope)
        return True

    async def _forward_events(
        self,
        ws: trio_websocket.WebSocketConnection,
        state: _WsState,
        handle: SessionHandle,
        connection_scope: trio.CancelScope,
    ) -> None:
        """Forward the session's events until it ends; then end the connection too."""
        try:
            async with handle.events:
                async for item in handle.events:
                    text = self._event_text(item, handle.session_id)
                    if text is None:
                        continue
                    if item.get("event") == "session_ended":
                        state.ended_sent = True
                    await self._ws_send_text(ws, text)
                    self._count("events_forwarded")
            # the backend closed the channel: the session is over on the node's side
            if state.bye:
                return
            state.ended = True
            log.info("session ended by the node", extra={"session": handle.session_id})
            if not state.ended_sent:
                state.ended_sent = True
                await self._ws_send(
                    ws, {"type": "event", "event": "session_ended", "ts": time.time()}
                )
            with trio.move_on_after(self.limits.close_timeout):
                await ws.aclose(1000, "session ended")
        except _Gone:
            return
        finally:
            # the session ended, or the client cannot be written to: either way, we are done
            connection_scope.cancel()

    def _event_text(self, item: Mapping[str, object], session_id: str) -> str | None:
        name = item.get("event") if isinstance(item, Mapping) else None
        if not isinstance(name, str):
            self._count("events_dropped")
            log.error("backend event without a name dropped", extra={"session": session_id})
            return None
        message: dict[str, object] = {"type": "event", "event": name, "ts": time.time()}
        message.update((key, value) for key, value in item.items() if key not in ("type", "event"))
        try:
            return json.dumps(message, allow_nan=False)
        except (TypeError, ValueError):
            self._count("events_dropped")
            log.exception("backend event is not JSON", extra={"session": session_id, "event": name})
            return None

    async def _ws_error(self, ws: trio_websocket.WebSocketConnection, code: str, text: str) -> None:
        self._count(code)
        await self._ws_send(ws, _error_object(code, text))

    async def _ws_send(
        self, ws: trio_websocket.WebSocketConnection, message: Mapping[str, object]
    ) -> None:
        await self._ws_send_text(ws, json.dumps(message))

    async def _ws_send_text(self, ws: trio_websocket.WebSocketConnection, text: str) -> None:
        """Send, or raise :class:`_Gone`; a client that does not read within ``send_timeout``
        is treated as gone (its socket is closed by the connection's teardown)."""
        try:
            with trio.fail_after(self.limits.send_timeout):
                await ws.send_message(text)
        except trio_websocket.ConnectionClosed:
            raise _Gone("websocket closed") from None
        except trio.TooSlowError:
            self._count("stalled")
            log.info("websocket client stopped reading")
            raise _Gone("client is not reading") from None
