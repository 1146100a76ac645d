"""The signaling server: one TCP port, each connection read with h11 and routed by its request.

A WebSocket upgrade on ``GET /v1/session`` goes to :class:`WebSocketSessions` with the bytes
already read; anything else to :class:`HttpRoutes`, keep-alive included. Each connection is one
task of the server's nursery; a connection task's failure is logged and counted, never the
server's. Connections beyond ``max_connections`` are answered 503 and closed, and beyond
``source_connections`` of one source 429 ``source_limit``. Who may open sessions is the
:class:`Gate`'s to say (:mod:`.admission`); how many, how fast, and how long they may take to
connect, the :class:`Limiter`'s (:mod:`.limits`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, final

import h11
import trio

from sessions.node.settings import NodeSettings
from sessions.node.signaling.admission import Gate, node_gate
from sessions.node.signaling.backend import BackendCalls
from sessions.node.signaling.http import (
    HttpConnection,
    HttpError,
    is_websocket_upgrade,
    linger_close,
    peer,
    peer_host,
    refuse_connection,
    request_token,
)
from sessions.node.signaling.limits import SETUP_TIMEOUT, Capacity, Limiter, node_limits, source_of
from sessions.node.signaling.messages import (
    SESSION_PATH,
    Gone,
    Redirect,
    SessionBackend,
    SignalingLimits,
)
from sessions.node.signaling.websocket import WebSocketSessions
from sessions.node.signaling.whip import HttpRoutes
from sessions.node.tokens import TokenVerifier

__all__ = ["SignalingServer"]

log = logging.getLogger("parley.signaling")

_COUNTERS = (
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
    "attached",
    "redirects",
    "sessions_handed_over",
    "bad_json",
    "bad_message",
    "forbidden",
    "unknown_session",
    "session_recovering",
    "refused",
    "internal",
    "token_missing",
    "token_invalid",
    "token_expired",
    "token_forbidden",
    "demo_tokens",
    "events_forwarded",
    "events_dropped",
    # fair admission (sessions/node/signaling/limits.py): refusals by their code, and the
    # sessions ended for not connecting in time
    "source_limit",
    "rate_limited",
    "half_open_limit",
    "node_over_capacity",
    "node_busy",
    SETUP_TIMEOUT,
)


def _gate_of(backend: SessionBackend) -> Gate:
    """The gate a node's backend asks for. A node's frontend should pass ``gate=`` itself; until
    it does, the node's settings are read through the backend (a NodeSessions has the node). A
    backend without settings gets a gate that admits no offer at all: fail closed."""
    config = getattr(getattr(backend, "node", None), "config", None)
    if config is None:
        log.warning("signaling has no gate and no node settings: no offer will be admitted")
        return Gate("token", verifier=TokenVerifier({}))
    return node_gate(config)


def _node_settings(backend: SessionBackend) -> tuple[Any, NodeSettings | None]:
    """The node behind a node's backend, and its settings (None for other backends)."""
    node = getattr(backend, "node", None)
    settings = getattr(getattr(node, "config", None), "node", None)
    return node, settings if isinstance(settings, NodeSettings) else None


def _limits_of(backend: SessionBackend) -> SignalingLimits:
    """The limits a node's settings ask for (``node.source_connections``, ...); the defaults
    for a backend without settings."""
    _, settings = _node_settings(backend)
    return node_limits(settings) if settings is not None else SignalingLimits()


def _capacity_of(backend: SessionBackend) -> Capacity | None:
    """A node's capacity and the sessions it holds (opened, moved in or adopted)."""
    node, settings = _node_settings(backend)
    if settings is None or not isinstance(getattr(node, "sessions", None), dict):
        return None
    busy = getattr(node, "busy", None)
    return Capacity(
        settings.capacity,
        lambda: len(node.sessions),
        busy if callable(busy) else lambda: False,
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


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
        public_url: str = "",
        gate: Gate | None = None,
        capacity: Capacity | None = None,
        placer: Callable[[str | None], Awaitable[Redirect | None]] | None = None,
        region_header: str = "",
        region_lookup: Callable[[str], str | None] | None = None,
    ) -> None:
        self.backend = backend
        self.host = host
        self.port = port
        #: the WebSocket URL clients reach this server at when it is not the bound address
        #: (a load balancer, an ingress, a NAT): ``ws[s]://HOST[:PORT][/PREFIX]/v1/session``
        self.public_url = public_url
        self.limits = limits or _limits_of(backend)
        #: what happened, by name (error codes sent count under their code)
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        #: connections being served right now
        self.active_connections = 0
        #: who may open sessions (tokens, per-subject limits)
        self.gate = gate if gate is not None else _gate_of(backend)
        #: fair admission: per source and subject, half-open sessions, the node's capacity
        self.limiter = Limiter(
            self.limits, capacity if capacity is not None else _capacity_of(backend)
        )
        self._calls = BackendCalls(
            backend,
            self.limits,
            self.counters,
            self.gate,
            self.limiter,
            placer=placer,
            region_header=region_header.strip().lower().encode("latin-1") or None,
            region_lookup=region_lookup,
        )
        self._publish(backend)
        self._routes = HttpRoutes(self._calls, pages or {})
        self._websockets = WebSocketSessions(self._calls, self.limits)
        self._nursery: trio.Nursery | None = None

    def urls(self) -> dict[str, str]:
        """Where clients reach this server: the WebSocket and the WHIP endpoint."""
        if self.public_url:
            return {"signaling": self.public_url, "whip": "http" + self.public_url[2:]}
        host = _url_host(self.host)
        return {
            "signaling": f"ws://{host}:{self.port}{SESSION_PATH}",
            "whip": f"http://{host}:{self.port}{SESSION_PATH}",
        }

    def published_counters(self) -> dict[str, int]:
        """The counters a node publishes (``parley status --json``), named ``signaling_*``."""
        return {f"signaling_{name}": value for name, value in self.counters.items()}

    def _publish(self, backend: SessionBackend) -> None:
        """Publish the auth mode and these counters in the node's registration, when the
        backend is a node's (its frontend sets the node's counter source before this server)."""
        node = getattr(backend, "node", None)
        if node is not None and hasattr(node, "places_reserved"):
            # a session moving in or adopted leaves the places of offers being answered free
            limiter = self.limiter
            node.places_reserved = lambda: limiter.pending
        addresses = getattr(node, "addresses", None)
        if isinstance(addresses, dict):
            addresses["auth"] = self.gate.mode
        if node is None or not hasattr(node, "counters_source"):
            return
        before = node.counters_source

        def counters() -> dict[str, int]:
            return {**(before() if before is not None else {}), **self.published_counters()}

        node.counters_source = counters

    async def wind_down(self) -> None:
        """Wait until every WebSocket client whose session ended has had its last events and its
        close frame (a stopping node calls this, bounded, before it stops serving)."""
        await self._websockets.wind_down()

    async def run(
        self, *, task_status: trio.TaskStatus[SignalingServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report this server once listening, serve until cancelled."""
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

    # -- connections ----------------------------------------------------------------------------

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        self._calls.count("connections")
        remote = peer(stream)
        if self.active_connections >= self.limits.max_connections:
            self._calls.count("connections_refused")
            log.warning("signaling connection refused: too many", extra={"remote": remote})
            await refuse_connection(stream, self.limits)
            return
        source = source_of(peer_host(stream))
        refused = self.limiter.connect(source)
        if refused is not None:
            # issue #15: one source cannot take the connections everyone shares
            self._calls.count("connections_refused")
            self._calls.count(refused.code)
            log.warning(
                "signaling connection refused: too many from one source",
                extra={"remote": remote, "source": source},
            )
            await refuse_connection(
                stream,
                self.limits,
                refused.status,
                refused.code,
                refused.message,
                refused.retry_after,
            )
            return
        self.active_connections += 1
        try:
            await self._serve(stream, remote, source)
        except Exception:
            self._calls.count("internal")
            log.exception("signaling connection failed", extra={"remote": remote})
        finally:
            self.active_connections -= 1
            self.limiter.disconnect(source)
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream, remote: str, source: str) -> None:
        """HTTP request cycles until the connection closes or turns into a WebSocket."""
        connection = HttpConnection(stream, self.limits)
        try:
            while True:
                outcome = await self._serve_request(connection, remote, source)
                if outcome == "websocket":
                    return
                if outcome == "close" or not connection.next_cycle():
                    break
        except (Gone, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        await linger_close(stream, self.limits)

    async def _serve_request(
        self, connection: HttpConnection, remote: str, source: str
    ) -> Literal["next", "close", "websocket"]:
        deadline = trio.current_time() + self.limits.request_timeout
        request: h11.Request | None = None
        body = b""
        try:
            with trio.move_on_at(deadline) as scope:
                request = await connection.read_request()
                if request is None:
                    return "close"
                self._calls.count("http_requests")
                if not is_websocket_upgrade(request):
                    body = await connection.read_body(request)
            if scope.cancelled_caught:
                if request is None and not connection.raw:
                    return "close"  # an idle keep-alive connection: just close it
                self._calls.count("timeouts")
                log.info("signaling request timed out", extra={"remote": remote})
                raise HttpError(408, "timeout", "request not received in time", close=True)
            assert request is not None
            if is_websocket_upgrade(request):
                self._websockets.check_upgrade(request)
                await self._websockets.serve(
                    connection.stream,
                    bytes(connection.raw),
                    remote,
                    request_token(request),
                    source,
                    self._calls.region_of(request, remote),
                )
                return "websocket"
            nursery = self._nursery
            assert nursery is not None  # connections are only served while run() runs
            await self._routes.route(connection, request, body, remote, nursery, source)
            return "next"
        except h11.RemoteProtocolError as exc:
            self._calls.count("malformed_http")
            status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
            log.info("malformed HTTP request", extra={"remote": remote, "status": status})
            # h11's message may quote request bytes (headers, tokens): debug only
            log.debug("malformed HTTP request: %s", exc, extra={"remote": remote})
            error = HttpError(status, "bad_request", "malformed HTTP request", close=True)
            await self._send_http_error(connection, error)
            return "close"
        except HttpError as exc:
            await self._send_http_error(connection, exc)
            return "close" if exc.close else "next"

    async def _send_http_error(self, connection: HttpConnection, error: HttpError) -> None:
        self._calls.count("http_errors")
        self._calls.count(error.code)
        await connection.respond_error(error)
