"""A process's ops port: ``GET /metrics`` (Prometheus text format) and ``GET /healthz``.

Every relay and node serves one, apart from anything a client reaches: its address is a setting
(``relay.ops_listen``, ``node.ops_listen``), on loopback unless an operator says otherwise, so
that what it tells (sessions, packet rates, drops) is for whoever runs the cluster. Each process
has its own :class:`~prometheus_client.CollectorRegistry` (never the library's global one),
whose collectors read the counters the packet paths keep anyway, at scrape time: a scrape costs
the process some work once, a packet costs nothing more than before.

HTTP/1.1 through h11 (:class:`OneRequestHttp`, which ``ops/opsview.py`` serves its page with too),
one request per connection (``Connection: close``); a request must arrive whole within
:data:`REQUEST_WITHIN` seconds and :data:`MAX_REQUEST` bytes, and at most :data:`MAX_CONNECTIONS`
connections are served at once: a stuck or hostile scraper holds a bounded share of the process.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import Final, final

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from relay.addresses import Address

__all__ = ["MAX_CONNECTIONS", "OneRequestHttp", "OpsPort", "new_registry", "respond"]

log = logging.getLogger("parley.ops")

#: connections served at once; more are closed at once
MAX_CONNECTIONS: Final = 16
#: seconds a connection has to send its request and take the answer
REQUEST_WITHIN: Final = 5.0
#: the largest request head taken
MAX_REQUEST: Final = 16 * 1024
_TEXT: Final = "text/plain; charset=utf-8"

#: what a server answers a request with: ``route(method, target)`` -> (status, type, body)
Route = Callable[[bytes, bytes], tuple[int, str, bytes]]


def new_registry(*collectors: Collector) -> CollectorRegistry:
    """A private registry with ``collectors`` and the process' own (CPU, memory, descriptors,
    Python version: ``process_*``, ``python_info``)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


@final
class OneRequestHttp:
    """An HTTP/1.1 server's connection handler (for ``trio.serve_listeners``), through h11: one
    request a connection, answered by ``route`` and closed. The ops port's and the ops page's
    (``ops/opsview.py``): a request must arrive whole within :data:`REQUEST_WITHIN` seconds and
    :data:`MAX_REQUEST` bytes, and at most :data:`MAX_CONNECTIONS` are served at once. A request
    h11 cannot parse gets its error status; a ``route`` that raises costs its request a 500
    (``failed`` is its body and the log's message), never the server."""

    def __init__(self, route: Route, *, failed: str) -> None:
        self.route = route
        self.failed = failed
        self.active = 0

    async def __call__(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self.active >= MAX_CONNECTIONS:
                return
            self.active += 1
            try:
                with trio.move_on_after(REQUEST_WITHIN):
                    await self._answer(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError):
                pass  # the peer went away or spoke nonsense; nothing of ours is hurt
            finally:
                self.active -= 1

    async def _answer(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            while (event := conn.next_event()) is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(4096))
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                body = f"bad request: {exc}\n".encode()
                await respond(stream, conn, exc.error_status_hint, _TEXT, body)
            return
        if not isinstance(event, h11.Request):
            return  # the peer closed before a request
        try:
            status, content_type, body = self.route(event.method, event.target)
        except Exception:
            log.exception(self.failed)
            status, content_type, body = 500, _TEXT, f"{self.failed}; see the log\n".encode()
        # a HEAD is answered as a GET, without the body
        await respond(stream, conn, status, content_type, body, head=event.method == b"HEAD")


@final
class OpsPort:
    """Serves ``registry`` on ``host:port``; start :meth:`run` with ``nursery.start``, which
    reports the bound address (port 0: a free one)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        healthy: Callable[[], bool] = lambda: True,
    ) -> None:
        self.registry = registry
        self.host = host
        self.requested_port = port
        #: what ``GET /healthz`` asks (200 when true, 503 when not)
        self.healthy = healthy
        self.address: Address = (host, 0)
        self.scrapes = 0
        # A collector's bug must cost a scrape, never the relay or node that serves it.
        self._http = OneRequestHttp(self._route, failed="metrics collection failed")

    @property
    def url(self) -> str:
        """Where Prometheus scrapes this process (an unspecified host: this machine's name)."""
        host, port = self.address
        if ipaddress.ip_address(host).is_unspecified:
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/metrics"

    async def run(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(self.requested_port, host=self.host)
        async with trio.open_nursery() as nursery:
            name = listeners[0].socket.getsockname()
            self.address = (name[0], name[1])
            log.info("ops port open", extra={"url": self.url})
            await nursery.start(trio.serve_listeners, self._http, listeners)
            task_status.started(self.address)

    def _route(self, method: bytes, target: bytes) -> tuple[int, str, bytes]:
        path = target.split(b"?", 1)[0]
        if path not in (b"/metrics", b"/healthz"):
            return 404, _TEXT, b"not found: GET /metrics or /healthz\n"
        if method not in (b"GET", b"HEAD"):
            return 405, _TEXT, b"only GET\n"
        if path == b"/healthz":
            return (200, _TEXT, b"ok\n") if self.healthy() else (503, _TEXT, b"unhealthy\n")
        self.scrapes += 1
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)


async def respond(
    stream: trio.SocketStream,
    conn: h11.Connection,
    status: int,
    content_type: str,
    body: bytes,
    *,
    head: bool = False,
) -> None:
    """One whole response on a one-request connection (ours and ``ops/opsview.py``'s): never
    cached, the connection closed after it; a HEAD gets the headers only."""
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("Connection", "close"),
    ]
    if status == 405:
        headers.append(("Allow", "GET, HEAD"))
    reason = HTTPStatus(status).phrase.encode()
    await stream.send_all(
        conn.send(h11.Response(status_code=status, headers=headers, reason=reason))
    )
    if not head:
        await stream.send_all(conn.send(h11.Data(data=body)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
