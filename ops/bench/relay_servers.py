"""The server processes of ops/bench/relay.py: the parley relay (one or several workers on
one public port), its echo node, the bare forwarder and its echo node. Each is started as
``python -m ops.bench.relay serve-ROLE`` and driven by JSON lines on stdin and stdout: the
first line is its configuration, then ``{"cmd": "routes", ...}`` and ``{"cmd": "stats"}``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import socket
import struct
import sys
import time
from typing import Any, Final, final

import trio

from relay.edge import Limits, RelayEdge
from relay.routes import RouteTable
from relay.settings import RelaySettings
from relay.tunnel import frames
from relay.tunnel.certs import Credentials, Identity
from relay.tunnel.quic import Tunnel, TunnelEndpoint
from storage.ownership import OwnershipChange

__all__ = ["HOST", "NODE_ID", "RELAY_ID", "SECRET", "serve"]

Address = tuple[str, int]

RELAY_ID: Final = "bench-relay"
NODE_ID: Final = "bench-node"
SECRET: Final = b"parley bench cluster secret, 32b"
HOST: Final = "127.0.0.1"
_PORT: Final = struct.Struct("!H")


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


@final
class _Control:
    """Newline-delimited JSON commands from the parent, on stdin (EOF: stop)."""

    def __init__(self) -> None:
        self._stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        self._buffer = b""

    async def receive(self) -> dict[str, Any] | None:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message


def _credentials(config: dict[str, Any]) -> Credentials:
    return Credentials(
        config["ca_pem"].encode(), config["cert_pem"].encode(), config["key_pem"].encode()
    )


@final
class _RelayHandler:
    """The relay daemon's tunnel handler (relay/daemon.py), without etcd around it."""

    def __init__(self, edge: RelayEdge) -> None:
        self.edge = edge

    def tunnel_opened(self, tunnel: Tunnel) -> None:
        if tunnel.peer.role != "node":
            tunnel.close("only nodes tunnel to a relay")
            return
        self.edge.tunnels[tunnel.peer.ident] = tunnel

    def datagram_received(self, tunnel: Tunnel, data: bytes) -> None:
        self.edge.from_node(tunnel.peer.ident, data)

    def control_received(self, tunnel: Tunnel, message: dict[str, Any]) -> None:
        pass

    def tunnel_closed(self, tunnel: Tunnel, reason: str) -> None:
        if self.edge.tunnels.get(tunnel.peer.ident) is tunnel:
            del self.edge.tunnels[tunnel.peer.ident]


async def _serve_parley_relay() -> None:
    control = _Control()
    config = await control.receive()
    assert config is not None
    routes = RouteTable()
    limits = Limits(client_rate=1e9, new_source_rate=1e9, max_clients=1_000_000, idle_timeout=600.0)
    # A worker of several shares the public port (SO_REUSEPORT), as ``parley relay --workers``.
    edge = RelayEdge(RELAY_ID, [SECRET], routes, limits=limits, reuse_port=config["reuse_port"])
    # The tunnel holds client datagrams as a relay does by default (relay.tunnel_hold_ms), or as
    # the bench was told (--hold-ms).
    hold = config.get("hold_ms", RelaySettings().tunnel_hold_ms) / 1000
    endpoint = TunnelEndpoint(
        _credentials(config), _RelayHandler(edge), host=HOST, server=True, hold=hold
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        edge.flush = endpoint.transmit_pending
        (public,) = await nursery.start(edge.serve, [(HOST, config["port"])])
        _reply({"public": list(public), "tunnel": endpoint.port})
        while (message := await control.receive()) is not None:
            if message["cmd"] == "routes":
                for session, epoch in message["sessions"]:
                    routes.apply(OwnershipChange(session, NODE_ID, epoch, epoch))
                _reply({"ok": True})
            else:
                _reply(
                    {
                        "cpu": time.process_time(),
                        "up": edge.counters["forwarded"],
                        "down": edge.counters["client_out"],
                        "tunnel": NODE_ID in edge.tunnels,
                        "counters": edge.counters,
                        "tunnel_counters": endpoint.counters,
                    }
                )
        nursery.cancel_scope.cancel()


@final
class _EchoNode:
    """A node that sends every client datagram back, stamped with the session's epoch: at once,
    or, with a ``tick``, at the next point of a grid of that period, every echo due at a point
    in one flush, as a node's media grid sends its sessions' frames (``node.media_tick_ms``)."""

    def __init__(self) -> None:
        self.epochs: dict[str, int] = {}
        self.echoed = 0
        self.dropped = 0
        self.tick = 0.0
        self.queued: list[tuple[Tunnel, bytes]] = []
        self.ticking = trio.Event()

    def set_tick(self, seconds: float) -> None:
        self.tick = seconds
        if seconds > 0:
            self.ticking.set()
        else:
            self.ticking = trio.Event()
            self.send_queued()

    def tunnel_opened(self, tunnel: Tunnel) -> None:
        pass

    def datagram_received(self, tunnel: Tunnel, data: bytes) -> None:
        try:
            frame = frames.decode(data)
        except frames.FrameError:
            self.dropped += 1
            return
        epoch = self.epochs.get(frame.session)
        if not isinstance(frame, frames.FromClient) or epoch is None:
            self.dropped += 1
            return
        answer = frames.encode_to_client(frame.session, epoch, frame.client, frame.payload)
        if self.tick > 0:
            self.queued.append((tunnel, answer))
        else:
            self._send(tunnel, answer)  # the endpoint flushes once after each received batch

    def _send(self, tunnel: Tunnel, answer: bytes) -> None:
        if tunnel.send_datagram(answer):
            self.echoed += 1
        else:
            self.dropped += 1

    def send_queued(self) -> None:
        queued, self.queued = self.queued, []
        for tunnel, answer in queued:
            self._send(tunnel, answer)

    async def grid(self, endpoint: TunnelEndpoint) -> None:
        """While ticking: at each grid point, send what was queued, then flush the tunnels."""
        while True:
            await self.ticking.wait()
            tick = self.tick
            if tick <= 0:
                continue
            await trio.sleep_until((math.floor(trio.current_time() / tick) + 1) * tick)
            if self.queued:
                self.send_queued()
                endpoint.flush()

    def control_received(self, tunnel: Tunnel, message: dict[str, Any]) -> None:
        pass

    def tunnel_closed(self, tunnel: Tunnel, reason: str) -> None:
        pass


async def _serve_parley_node() -> None:
    control = _Control()
    config = await control.receive()
    assert config is not None
    node = _EchoNode()
    endpoint = TunnelEndpoint(_credentials(config), node, host=HOST, server=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        for port in config["relays"]:  # one tunnel to each relay worker
            await endpoint.connect(HOST, port, expect=Identity("relay", RELAY_ID))
        nursery.start_soon(node.grid, endpoint)
        _reply({"ok": True})
        while (message := await control.receive()) is not None:
            if message["cmd"] == "routes":
                node.epochs.update((session, epoch) for session, epoch in message["sessions"])
                _reply({"ok": True})
            elif message["cmd"] == "tick":
                node.set_tick(float(message["seconds"]))
                endpoint.flush()
                _reply({"ok": True})
            else:
                _reply({"cpu": time.process_time(), "echoed": node.echoed, "dropped": node.dropped})
        nursery.cancel_scope.cancel()


@final
class _BareForwarder:
    """Client datagrams to one upstream with the client's address in front; echoes back."""

    BATCH: Final = 512

    def __init__(self) -> None:
        self.up = 0
        self.down = 0
        self._prefixes: dict[Address, bytes] = {}
        self._clients: dict[bytes, Address] = {}

    def _prefix(self, addr: Address) -> bytes:
        prefix = socket.inet_aton(addr[0]) + _PORT.pack(addr[1])
        self._prefixes[addr] = prefix
        self._clients[prefix] = addr
        return prefix

    async def _upward(self, public: socket.socket, upstream: socket.socket) -> None:
        prefixes = self._prefixes
        while True:
            await trio.lowlevel.wait_readable(public)
            count = 0
            for _ in range(self.BATCH):
                try:
                    data, addr = public.recvfrom(2048)
                except (BlockingIOError, InterruptedError):
                    break
                prefix = prefixes.get(addr) or self._prefix(addr)
                with contextlib.suppress(BlockingIOError):
                    upstream.send(prefix + data)
                    count += 1
            self.up += count
            await trio.lowlevel.checkpoint()

    async def _downward(self, public: socket.socket, upstream: socket.socket) -> None:
        clients = self._clients
        while True:
            await trio.lowlevel.wait_readable(upstream)
            count = 0
            for _ in range(self.BATCH):
                try:
                    data = upstream.recv(2048)
                except (BlockingIOError, InterruptedError):
                    break
                addr = clients.get(data[:6])
                if addr is not None:
                    with contextlib.suppress(BlockingIOError):
                        public.sendto(data[6:], addr)
                        count += 1
            self.down += count
            await trio.lowlevel.checkpoint()

    async def run(self, node: Address, *, task_status: trio.TaskStatus[Address]) -> None:
        public, upstream = _udp_socket(), _udp_socket()
        with public, upstream:
            upstream.connect(node)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._upward, public, upstream)
                nursery.start_soon(self._downward, public, upstream)
                name = public.getsockname()
                task_status.started((name[0], name[1]))


def _udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # as the edge does
    return sock


async def _serve_bare_relay() -> None:
    control = _Control()
    config = await control.receive()
    assert config is not None
    forwarder = _BareForwarder()
    async with trio.open_nursery() as nursery:
        public = await nursery.start(forwarder.run, (HOST, config["node"]))
        _reply({"public": list(public)})
        while (message := await control.receive()) is not None:
            if message["cmd"] == "routes":
                _reply({"ok": True})
            else:
                _reply({"cpu": time.process_time(), "up": forwarder.up, "down": forwarder.down})
        nursery.cancel_scope.cancel()


def _serve_bare_node() -> None:
    """Echo every datagram to its sender: a plain loop, as cheap as Python gets; with a tick
    (``{"cmd": "tick"}``), at the next point of that grid, as the parley echo node does."""
    sock = _udp_socket()
    echoed = 0
    buffer = b""
    tick = 0.0
    queued: list[tuple[bytes, Address]] = []

    def send(data: bytes, addr: Address) -> None:
        nonlocal echoed
        with contextlib.suppress(BlockingIOError):
            sock.sendto(data, addr)
            echoed += 1

    with sock, selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
        started = False
        while True:
            timeout, point = None, math.inf
            if queued:
                point = (math.floor(time.monotonic() / tick) + 1) * tick
                timeout = max(point - time.monotonic(), 0.0)
            ready = selector.select(timeout)
            if queued and time.monotonic() >= point:
                for data, addr in queued:
                    send(data, addr)
                queued = []
            for key, _ in ready:
                if key.fileobj is sock:
                    while True:
                        try:
                            data, addr = sock.recvfrom(2048)
                        except (BlockingIOError, InterruptedError):
                            break
                        if tick > 0:
                            queued.append((data, addr))
                        else:
                            send(data, addr)
                    continue
                chunk = os.read(sys.stdin.fileno(), 1 << 16)
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    if not started:  # the first line is the configuration
                        started = True
                        _reply({"port": sock.getsockname()[1]})
                        continue
                    message = json.loads(line)
                    if message["cmd"] == "routes":
                        _reply({"ok": True})
                    elif message["cmd"] == "tick":
                        tick = float(message["seconds"])
                        if tick <= 0:
                            for data, addr in queued:
                                send(data, addr)
                            queued = []
                        _reply({"ok": True})
                    else:
                        _reply({"cpu": time.process_time(), "echoed": echoed})


_SERVERS: Final = {
    "serve-parley-relay": _serve_parley_relay,
    "serve-parley-node": _serve_parley_node,
    "serve-bare-relay": _serve_bare_relay,
}


def serve(role: str) -> None:
    """Run the server ``role`` (``serve-parley-relay``...) until its stdin closes."""
    if role == "serve-bare-node":
        _serve_bare_node()
    else:
        trio.run(_SERVERS[role])
