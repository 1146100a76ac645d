"""HTTP/1.1 framing for the signaling port: h11 over a trio stream, bounded and with deadlines.

Reads request heads (remembering their raw bytes, which a WebSocket upgrade replays), bounded
bodies, and writes complete responses. Closing without losing the response is here too. What a
request means is for the routes (:mod:`.whip`) and the server (:mod:`.server`).
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Sequence
from http import HTTPStatus
from typing import final
from urllib.parse import parse_qs

import h11
import trio

from sessions.node.signaling.messages import Gone, SignalingLimits, error_body

__all__ = [
    "HttpConnection",
    "HttpError",
    "ReplayStream",
    "header",
    "is_loopback",
    "is_websocket_upgrade",
    "linger_close",
    "peer",
    "peer_host",
    "refuse_connection",
    "request_token",
]

_RECEIVE_CHUNK = 4096
#: bytes read and discarded while closing a connection whose request we did not read in full
_MAX_DRAIN = 256 * 1024


class HttpError(Exception):
    """An error response to send: ``status``, the JSON error's ``code`` and ``message``, extra
    ``headers``; ``close`` ends the connection after it."""

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


def header(request: h11.Request, name: bytes) -> bytes | None:
    """The request's header ``name`` (lower case); repeated headers joined with commas."""
    values = [value for key, value in request.headers if key == name]
    return b", ".join(values) if values else None


def _tokens(value: bytes | None) -> set[str]:
    if value is None:
        return set()
    return {part.strip().lower() for part in value.decode("latin-1").split(",")}


def is_websocket_upgrade(request: h11.Request) -> bool:
    """A request asking to become a WebSocket (RFC 6455 §4.2.1: GET, Upgrade, Connection)."""
    return (
        request.method == b"GET"
        and "websocket" in _tokens(header(request, b"upgrade"))
        and "upgrade" in _tokens(header(request, b"connection"))
    )


def request_token(request: h11.Request) -> str | None:
    """The access token of ``request``: ``Authorization: Bearer`` (RFC 6750 §2.1), else the
    ``token`` query parameter (§2.3, for browsers, which cannot set headers on a WebSocket)."""
    value = header(request, b"authorization")
    if value is not None:
        scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
        return None
    _, _, query = request.target.decode("ascii", "replace").partition("?")
    values = parse_qs(query).get("token") if query else None
    return values[0] if values else None


def is_loopback(stream: trio.SocketStream) -> bool:
    """The connection comes from this host (127.0.0.0/8 or ::1)."""
    try:
        address = stream.socket.getpeername()
        return ipaddress.ip_address(address[0]).is_loopback
    except (OSError, ValueError, TypeError, IndexError):
        return False


def peer_host(stream: trio.SocketStream) -> str:
    """The remote host (IP address) of ``stream``, ``?`` if the socket cannot tell."""
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)


def peer(stream: trio.SocketStream) -> str:
    """The remote address of ``stream`` for logs, ``?`` if the socket cannot tell."""
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


@final
class ReplayStream(trio.abc.Stream):
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
class HttpConnection:
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
        """The request's body, at most ``max_body_bytes`` (more raises a 413 :class:`HttpError`)."""
        limit = self.limits.max_body_bytes
        length = header(request, b"content-length")
        if length is not None and int(length.split(b",")[0]) > limit:
            raise HttpError(413, "bad_message", f"request body too large (limit {limit} bytes)")
        if self.conn.client_is_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise HttpError(
                        413, "bad_message", f"request body too large (limit {limit} bytes)"
                    )
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise h11.RemoteProtocolError("connection closed inside the request body")

    @property
    def can_respond(self) -> bool:
        """No response to this request has begun yet."""
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
        reason = HTTPStatus(status).phrase.encode()
        await self._send(h11.Response(status_code=status, headers=all_headers, reason=reason))
        if body and not head_only:
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def respond_error(self, error: HttpError) -> None:
        """Send ``error`` with its JSON error object, unless a response has already begun."""
        if not self.can_respond:
            return
        await self.respond(
            error.status,
            body=error_body(error.code, error.message),
            headers=[("Content-Type", "application/json"), *error.headers],
            close=error.close,
        )

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if not data:
            return
        with trio.move_on_after(self.limits.send_timeout) as scope:
            await self.stream.send_all(data)
        if scope.cancelled_caught:
            raise Gone("client is not reading")

    def next_cycle(self) -> bool:
        """Start the next request cycle of a keep-alive connection; False if there is none."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False


async def linger_close(stream: trio.SocketStream, limits: SignalingLimits) -> None:
    """Close after the response without losing it: stop sending, read (and drop) what the
    client still sends until it closes, for a bounded time. Closing with unread data would
    reset the connection and could destroy the response before the client reads it."""
    with trio.move_on_after(limits.close_timeout):
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


async def refuse_connection(
    stream: trio.SocketStream,
    limits: SignalingLimits,
    status: int = 503,
    code: str = "node_over_capacity",
    message: str = "too many signaling connections",
    retry_after: int | None = None,
) -> None:
    """Answer a connection we will not serve with a bare error response (503 by default),
    without reading its request. A WebSocket client sees its upgrade refused with it."""
    body = error_body(code, message)
    extra = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"{extra}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with trio.move_on_after(limits.close_timeout):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(head.encode() + body)
    await linger_close(stream, limits)
