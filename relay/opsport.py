"""A process's ops port: ``GET /metrics`` (Prometheus text format) and ``GET /healthz``.

Every relay and node serves one, apart from anything a client reaches: its address is a setting
(``relay.ops_listen``, ``node.ops_listen``), on loopback unless an operator says otherwise, so
that what it tells (sessions, packet rates, drops) is for whoever runs the cluster. Each process
has its own :class:`~prometheus_client.CollectorRegistry` (never the library's global one),
whose collectors read the counters the packet paths keep anyway, at scrape time: a scrape costs
the process some work once, a packet costs nothing more than before.

HTTP/1.1 through h11, one request per connection (``Connection: close``); a request must arrive
whole within :data:`REQUEST_WITHIN` seconds and :data:`MAX_REQUEST` bytes, and at most
:data:`MAX_CONNECTIONS` connections are served at once: a stuck or hostile scraper holds a
bounded share of the process.
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

__all__ = ["MAX_CONNECTIONS", "OpsPort", "new_registry", "respond"]

log = logging.getLogger("parley.ops")

#: connections served at once; more are closed at once
MAX_CONNECTIONS: Final = 16
#: seconds a connection has to send its request and take the answer
REQUEST_WITHIN: Final = 5.0
#: the largest request head taken
MAX_REQUEST: Final = 16 * 1024
_TEXT: Final = "text/plain; charset=utf-8"


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
        self._active = 0

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
            await nursery.start(trio.serve_listeners, self._connection, listeners)
            task_status.started(self.address)

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self._active >= MAX_CONNECTIONS:
                return
            self._active += 1
            try:
                with trio.move_on_after(REQUEST_WITHIN):
                    await self._answer(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError):
                pass  # the scraper went away or spoke nonsense; nothing of ours is hurt
            finally:
                self._active -= 1

    async def _answer(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            while (event := conn.next_event()) is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(4096))
        except h11.RemoteProtocolError:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await respond(stream, conn, 400, _TEXT, b"bad request\n")
            return
        if not isinstance(event, h11.Request):
            return  # the peer closed before a request
        try:
            status, content_type, body = self._route(event.method, event.target)
        except Exception:
            # A collector's bug must cost a scrape, never the relay or node that serves it.
            log.exception("metrics collection failed")
            status, content_type, body = 500, _TEXT, b"collection failed; see the log\n"
        # a HEAD is answered as a GET, without the body
        await respond(stream, conn, status, content_type, body, head=event.method == b"HEAD")

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
