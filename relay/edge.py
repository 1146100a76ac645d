"""The relay's packet path: one public UDP port in front of every session of the cluster.

For each datagram from a client the relay reads as little as it can:

1. **A known client address** (the cache): its session is known; look the session's owner up in
   the route table (relay/routes.py) and forward through that node's tunnel. STUN from a known
   address is still read (below): it is rare (a consent check every few seconds) and it is how a
   client that reuses its socket for a new session is re-routed.
2. **A new address**: only a STUN Binding request may introduce one (RFC 7983 demultiplexing:
   first byte 0 to 3). Its USERNAME is ``"<server ufrag>:<client ufrag>"`` (RFC 8445 §7.2.2); the
   server ufrag carries a routing hint the node minted (relay/tunnel/hint.py), whose MAC is checked
   before anything is looked up. A forged or mutated hint is dropped. The address is cached.
3. Anything else is counted and dropped.

Datagrams from nodes (tunnel frames, relay/tunnel/frames.py) go out to their client from the public
socket of the client's address family — but only if the node's epoch is current for the session
(fencing, :meth:`RouteTable.admit_from_node`) and the client address is one that proved, with
an authenticated hint, that it belongs to that session: a node cannot make the relay send to an
arbitrary address.

**Floods.** Datagrams from addresses the relay does not know are dropped unless they look like
STUN (one byte compared), and STUN from them is rate limited per source IP before its bytes are
parsed or its MAC computed; every known client is rate limited per address. A flood costs a
byte comparison or a dict lookup per packet and cannot crowd out real sessions' forwarding.
The caches are bounded; idle clients expire after ``idle_timeout`` (clients send consent
checks every ~5 s, RFC 7675).

The receive loop is relay/udp.py's: it waits for readability once and then drains the socket
without blocking; tunnels are flushed once per drained batch (one ``datagrams_to_send`` per
connection, not per packet). STUN is read by relay/stun_username.py, which reads the USERNAME and
nothing else.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Final, Protocol, final

import attrs
import trio

from relay.audit import IndexAuditor, rtp_or_rtcp
from relay.routes import RouteTable
from relay.stun_username import MalformedStun, read_username
from relay.tunnel import frames
from relay.tunnel.hint import read_hint
from relay.udp import Address, bound_udp, drain_forever, kernel_drops

__all__ = ["Client", "DatagramSink", "Limits", "RelayEdge", "TokenBucket"]

log = logging.getLogger("parley.relay")

_AF_INET: Final = socket.AF_INET
_AF_INET6: Final = socket.AF_INET6

#: datagrams read per wakeup before yielding to other tasks (half relay/udp.py's default: the
#: tunnels and the route table's watch share this process)
BATCH: Final = 512

_COUNTERS: Final = (
    "client_in",  # datagrams received on the public port(s)
    "client_out",  # datagrams sent to clients
    "forwarded",  # client datagrams sent into a node's tunnel
    "unknown_source",  # non-STUN (or STUN without USERNAME) from an unknown address
    "malformed_stun",  # STUN-looking datagrams that are not well-framed STUN
    "forged_hint",  # USERNAMEs whose ufrag hint does not authenticate
    "new_clients",  # addresses admitted by an authenticated hint
    "rerouted",  # known addresses that switched session
    "rate_limited_new",  # datagrams from unknown sources over their source's rate
    "rate_limited",  # datagrams from known clients over their rate
    "no_route",  # the session has no owner the relay knows of
    "no_tunnel",  # the owner has no tunnel to this relay (yet)
    "tunnel_full",  # the tunnel refused the datagram (closed, too big)
    "node_in",  # frames received from nodes
    "malformed_frame",  # frames that did not decode, or the wrong kind
    "fenced",  # frames from a node whose epoch is stale for the session
    "unknown_client",  # frames for an address not admitted for that session
    "send_failed",  # sendto to a client failed (buffer full, unreachable)
    "handed_on",  # client datagrams an old owner handed on to a session's new owner
    "expired",  # idle clients forgotten
    "evicted",  # clients forgotten early because the cache was full
)


@final
@attrs.frozen
class Limits:
    """The relay's flood protection and cache bounds."""

    #: STUN datagrams per second that one unknown source IP may have inspected (burst: the same)
    new_source_rate: float = 200.0
    #: datagrams per second that one known client address may send (burst: a quarter second)
    client_rate: float = 1000.0
    #: most client addresses cached; beyond it, the least recently admitted is forgotten
    max_clients: int = 100_000
    #: most unknown sources tracked for rate limiting
    max_sources: int = 65_536
    #: seconds without a datagram after which a client address is forgotten
    idle_timeout: float = 60.0
    #: bytes the kernel may queue on the public port while the relay is not running (a stall of
    #: the process under a flood otherwise loses real clients' packets with the flood's). 16 MiB
    #: holds about 2 s of a 10k/s flood of mixed sizes. Past net.core.rmem_max it needs
    #: CAP_NET_ADMIN; without it the relay warns and runs with what it got.
    receive_buffer: int = 16 << 20
    #: count SRTP/SRTCP indexes seen twice per session and direction (relay/audit.py); for
    #: tests and diagnostics, it costs some work per packet
    audit_indexes: bool = False


@final
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


@final
class Client:
    """A cached client address: its session and when it was last heard.

    ``header`` is the tunnel frame header for this address and session
    (:func:`frames.client_header`), made at the client's first forwarded datagram and again
    whenever the session changes; empty until then.
    """

    __slots__ = ("bucket", "header", "last_seen", "session")

    def __init__(self, session: str, bucket: TokenBucket, now: float) -> None:
        self.session = session
        self.bucket = bucket
        self.last_seen = now
        self.header = b""


class DatagramSink(Protocol):
    """What the edge needs of a tunnel (relay/tunnel/quic.py ``Tunnel``)."""

    def send_datagram(self, data: bytes, *, may_wait: bool = False) -> bool: ...


@final
class RelayEdge:
    """The public side of one relay. Feed it with :meth:`serve` (or the ``from_*`` methods).

    ``tunnels`` maps node id → that node's tunnel; the relay daemon (relay/daemon.py) keeps it
    current as nodes connect. ``flush`` is called once per batch of forwarded datagrams.
    """

    def __init__(
        self,
        relay_id: str,
        secrets: Sequence[bytes],
        routes: RouteTable,
        *,
        limits: Limits | None = None,
        clock: Callable[[], float] = trio.current_time,
        flush: Callable[[], None] = lambda: None,
        reuse_port: bool = False,
    ) -> None:
        if not secrets:
            raise ValueError("a relay needs the cluster secret to read routing hints")
        self.relay_id = relay_id
        self.secrets = list(secrets)
        self.routes = routes
        self.limits = limits or Limits()
        self.clock = clock
        self.flush = flush
        #: bind the public port shared with the relay's other workers (SO_REUSEPORT)
        self.reuse_port = reuse_port
        self.tunnels: dict[str, DatagramSink] = {}
        self.clients: dict[Address, Client] = {}
        self._sources: dict[str, TokenBucket] = {}
        self._socks: dict[int, socket.socket] = {}
        #: the public addresses the relay listens on, once bound
        self.addresses: list[Address] = []
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        #: the optional index audit; it adds its own counters to ``counters``
        self.auditor = IndexAuditor(self.counters) if self.limits.audit_indexes else None
        self._to_client = frames.ToClientReader(limit=self.limits.max_clients)

    # -- clients -> nodes ------------------------------------------------------------------------

    def _admit_source(self, host: str, now: float) -> bool:
        bucket = self._sources.get(host)
        if bucket is None:
            if len(self._sources) >= self.limits.max_sources:
                # Forget the oldest tracked source: a spoofing flood churns this map, it cannot
                # grow it.
                del self._sources[next(iter(self._sources))]
            rate = self.limits.new_source_rate
            bucket = self._sources[host] = TokenBucket(rate, rate, now)
        return bucket.take(now)

    def _new_client(self, addr: Address, session: str, now: float) -> Client:
        clients = self.clients
        if len(clients) >= self.limits.max_clients:
            del clients[next(iter(clients))]
            self.counters["evicted"] += 1
        rate = self.limits.client_rate
        client = clients[addr] = Client(session, TokenBucket(rate, rate / 4, now), now)
        self.counters["new_clients"] += 1
        return client

    def from_client(self, data: bytes, addr: Address) -> None:
        """Route one datagram from a client; never raises for its content."""
        counters = self.counters
        now = self.clock()
        client = self.clients.get(addr)
        stun_like = bool(data) and data[0] < 4  # RFC 7983 §7: STUN
        if client is None:
            if not stun_like:
                counters["unknown_source"] += 1  # cheap to drop: no budget spent on it
                return
            # Parsing and a MAC cost real time: a source gets a budget for them. (Real clients
            # behind one NAT address share it; a consent check every few seconds each is small.)
            if not self._admit_source(addr[0], now):
                counters["rate_limited_new"] += 1
                return
        if stun_like:
            try:
                username = read_username(data)
            except MalformedStun:
                counters["malformed_stun"] += 1
                return
            if username is not None:
                hint = read_hint(username.partition(":")[0], self.secrets)
                if hint is None:
                    counters["forged_hint"] += 1
                    return
                if client is None:
                    client = self._new_client(addr, hint.session, now)
                elif client.session != hint.session:
                    client.session = hint.session  # the client's socket serves a new session
                    client.header = b""
                    counters["rerouted"] += 1
                if self.routes.lookup(hint.session) is None:
                    self.routes.hint_route(hint)
        if client is None:
            counters["unknown_source"] += 1
            return
        if not client.bucket.take(now):
            counters["rate_limited"] += 1
            return
        client.last_seen = now
        route = self.routes.lookup(client.session)
        if route is None:
            counters["no_route"] += 1
            return
        tunnel = self.tunnels.get(route.node)
        if tunnel is None:
            counters["no_tunnel"] += 1
            return
        header = client.header
        if not header:
            header = client.header = frames.client_header(client.session, addr)
        # SRTP and SRTCP may wait a moment to share a QUIC packet; the handshakes and consent
        # checks (STUN, DTLS) go at once.
        if tunnel.send_datagram(header + data, may_wait=rtp_or_rtcp(data)):
            counters["forwarded"] += 1
            if self.auditor is not None and not stun_like:
                self.auditor.observe(client.session, "in", data)
        else:
            counters["tunnel_full"] += 1

    # -- nodes -> clients ------------------------------------------------------------------------

    def from_node(self, node: str, frame: bytes) -> None:
        """Send a node's frame on to its client, if the node may still speak for the session."""
        counters = self.counters
        counters["node_in"] += 1
        try:
            fields = self._to_client.read(frame)  # media: the common case, read cheaply
            if fields is None:
                decoded = frames.decode(frame)
                if isinstance(decoded, frames.HandOn):
                    self._hand_on(node, decoded)
                    return
                counters["malformed_frame"] += 1  # a FROM_CLIENT frame has no business here
                return
        except frames.FrameError:
            counters["malformed_frame"] += 1
            return
        session, epoch, addr, payload = fields
        if not self.routes.admit_from_node(session, node, epoch):
            counters["fenced"] += 1
            return
        client = self.clients.get(addr)
        if client is None or client.session != session:
            counters["unknown_client"] += 1
            return
        if self.auditor is not None:
            self.auditor.observe(session, "out", payload)
        self.send_to_client(payload, addr)

    def _hand_on(self, node: str, frame: frames.HandOn) -> None:
        """A session's old owner passes on a client datagram that reached it after the move.

        Only for a client admitted for that session, only to another node, and only forward
        in ownership: the frame names the new owner's epoch, which (if newer than what the
        route table knows) becomes the route now, as a newer epoch from a node does.
        """
        counters = self.counters
        client = self.clients.get(frame.client)
        if client is None or client.session != frame.session:
            counters["unknown_client"] += 1
            return
        route = self.routes.lookup(frame.session)
        # Before the switch the owner forwards at its own epoch (the target queues it until it
        # runs the session): the route stays. Once the target owns the session, what is still
        # being forwarded goes to it as well (it is the owner); a newer epoch than the route's
        # moves the route, as a newer epoch from a node does.
        ahead_of_switch = route is not None and route.node == node and route.epoch == frame.epoch
        to_the_owner = route is not None and not route.provisional and route.node == frame.to
        if frame.to == node or not (
            ahead_of_switch
            or to_the_owner
            or self.routes.admit_from_node(frame.session, frame.to, frame.epoch)
        ):
            counters["fenced"] += 1
            return
        tunnel = self.tunnels.get(frame.to)
        if tunnel is None:
            counters["no_tunnel"] += 1
            return
        data = frames.encode_from_client(frame.session, frame.client, frame.payload)
        if tunnel.send_datagram(data):
            counters["handed_on"] += 1
        else:
            counters["tunnel_full"] += 1

    def send_to_client(self, data: bytes, addr: Address) -> None:
        sock = self._socks.get(_AF_INET6 if ":" in addr[0] else _AF_INET)
        if sock is not None:
            # relay/udp.py send_nowait's work, inline on the hot path: a full buffer or an
            # unreachable client is loss, counted, as on the network.
            try:
                sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                log.debug("sendto %s failed: %s", addr, exc)
            else:
                self.counters["client_out"] += 1
                return
        self.counters["send_failed"] += 1

    # -- housekeeping ----------------------------------------------------------------------------

    def expire(self) -> int:
        """Forget clients idle for ``idle_timeout``; returns how many."""
        deadline = self.clock() - self.limits.idle_timeout
        stale = [addr for addr, c in self.clients.items() if c.last_seen <= deadline]
        for addr in stale:
            del self.clients[addr]
        self.counters["expired"] += len(stale)
        return len(stale)

    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped at the public port(s) because the relay fell behind."""
        return kernel_drops(*self._socks.values())

    def sessions(self) -> int:
        """Distinct sessions with at least one cached client address."""
        return len({c.session for c in self.clients.values()})

    # -- sockets ---------------------------------------------------------------------------------

    async def serve(
        self,
        listen: Sequence[Address],
        *,
        task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind every ``listen`` address (at most one per address family) and serve them.

        Reports the bound addresses (ports resolved). A client is answered from the socket of
        its own address family, which is the one it sent to.
        """
        families = [socket.AF_INET6 if ":" in host else socket.AF_INET for host, _ in listen]
        if len(set(families)) != len(families):
            raise ValueError("a relay listens on at most one IPv4 and one IPv6 address")
        async with trio.open_nursery() as nursery:
            bound: list[Address] = []
            for (host, port), family in zip(listen, families, strict=True):
                bound.append(await nursery.start(self._serve_one, host, port, family))
            self.addresses = bound
            task_status.started(bound)
            nursery.start_soon(self._expire_loop)

    def _batch_done(self, count: int) -> None:
        self.counters["client_in"] += count
        self.flush()  # read at each batch: the relay daemon sets it once its endpoint runs

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(max(self.limits.idle_timeout / 4, 0.25))
            self.expire()

    async def _serve_one(
        self, host: str, port: int, family: int, *, task_status: trio.TaskStatus[Address]
    ) -> None:
        # Room for a burst while the loop serves the tunnels.
        async with bound_udp(
            host,
            port,
            v6only=True,
            receive_buffer=self.limits.receive_buffer,
            reuse_port=self.reuse_port,
        ) as raw:
            self._socks[family] = raw
            try:
                name = raw.getsockname()
                task_status.started((name[0], name[1]))
                await drain_forever(raw, self.from_client, self._batch_done, batch=BATCH)
            finally:
                self._socks.pop(family, None)
