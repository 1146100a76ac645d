"""Mutually authenticated QUIC tunnels between relays and nodes: the Trio glue.

One UDP socket per :class:`TunnelEndpoint`, every connection of the endpoint demultiplexed on it
by connection ID, one task for receiving (relay/udp.py's drain loop), one for timers and one for
flushing. Relays run server endpoints; nodes dial them from a client endpoint (one per node,
however many relays). Each connection's protocol — handshake phases, authentication, greeting,
control lines — is a sans-I/O :class:`~relay.tunnel.link.Link`; this module only feeds links
with datagrams and time and acts on their events.

What crosses a tunnel:

* media, as QUIC DATAGRAM frames (RFC 9221): unreliable and unordered like the UDP they carry.
  :meth:`Tunnel.send_datagram` only queues; :meth:`TunnelEndpoint.flush` transmits, so a caller
  forwarding a burst pays for packet building once per batch (aioquic sends queued datagrams only
  when ``datagrams_to_send`` is called, and never checks them against the peer's limit — the
  link does).
* control, as JSON objects, one per line, on the control stream, once both sides have
  authenticated and greeted each other (relay/tunnel/link.py).

Everything that arrives from the network is remote input: malformed datagrams, unknown
connection IDs and bad control lines are counted and dropped, and never raise. Each tunnel's
opening and closing is logged once, here: a close without error (either side stopping) at info,
a lost or broken tunnel at warning.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import sys
from typing import Any, Final, Protocol, final

import trio
from aioquic._buffer import Buffer  # aioquic.buffer re-exports it without telling mypy
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from relay.tunnel.certs import Credentials, Identity
from relay.tunnel.connection import CID_LENGTH, LinkConfig
from relay.tunnel.link import (
    APP_CLOSED,
    Closing,
    ConnectionIdIssued,
    ConnectionIdRetired,
    ControlReceived,
    DatagramReceived,
    Link,
    Opened,
    Terminated,
)
from relay.udp import Address, BatchSender, bound_udp, drain_forever, kernel_drops

__all__ = ["MAX_HOLD", "Tunnel", "TunnelEndpoint", "TunnelError", "TunnelHandler"]

log = logging.getLogger("parley.tunnel")

#: RFC 9000 §14.1: a server drops client Initials in datagrams smaller than this
MIN_INITIAL_DATAGRAM: Final = 1200
#: connections that have not (yet) become tunnels, on a server: bounds what an unauthenticated
#: peer can make us hold; aioquic's idle timeout reaps them
MAX_HALF_OPEN: Final = 64
RECV_BATCH: Final = 1024
#: the largest UDP datagram read: any QUIC packet (the path's limit is the sender's business)
RECV_BUFFER: Final = 65536
#: bytes the kernel may queue on a tunnel socket while this process is busy elsewhere (the
#: kernel's default holds ~150 full packets; a tunnel carries every session between a relay and
#: a node, and the kernel may cap this)
RECEIVE_BUFFER: Final = 4 << 20
#: the longest an endpoint may hold datagrams for :meth:`TunnelEndpoint.transmit_pending`
MAX_HOLD: Final = 0.010

_ENDPOINT_COUNTERS: Final = (
    "packets_in",  # UDP datagrams: QUIC packets, coalesced or not, ACK-only ones included
    "packets_out",
    "segmented_sends",  # sendmsg calls that carried several packets (UDP_SEGMENT)
    "handshakes",
    "auth_failures",
    "handshake_failures",
    "datagrams_in",
    "datagrams_out",
    "dropped_too_big",
    "dropped_closed",
    "dropped_backlog",
    "early_dropped",
    "control_in",
    "control_out",
    "malformed",
    "unknown_connection",
    "half_open_full",
    "keepalives",
    "send_failed",
    "internal_errors",
    "closed",
)


class TunnelError(Exception):
    """A tunnel could not be set up: connect failed, the handshake failed, or the peer is not
    who it must be (not authenticated by the cluster CA, or not the expected identity)."""


class TunnelHandler(Protocol):
    """What an endpoint tells its owner.

    Called synchronously from the endpoint's tasks, so a callback must not block; sending on a
    tunnel from a callback is fine (the endpoint flushes after each batch). An exception from a
    callback is a local bug: it stops the endpoint (and so reaches its supervisor).
    ``tunnel_closed`` comes exactly once for every tunnel ``tunnel_opened`` announced, whoever
    closed it, including from :meth:`Tunnel.close` itself and when the endpoint stops. The
    endpoint logs both; a handler need not.
    """

    def tunnel_opened(self, tunnel: Tunnel) -> None: ...

    def datagram_received(self, tunnel: Tunnel, data: bytes) -> None: ...

    def control_received(self, tunnel: Tunnel, message: dict[str, Any]) -> None: ...

    def tunnel_closed(self, tunnel: Tunnel, reason: str) -> None: ...


@final
class Tunnel:
    """One established and authenticated connection, seen from either side.

    ``peer`` is the identity the peer's certificate proved; ``closed`` turns True once either
    side closed it (and the handler's ``tunnel_closed`` is called then, exactly once).
    """

    def __init__(self, endpoint: TunnelEndpoint, link: Link) -> None:
        assert link.peer is not None, "a link opens only once its peer is authenticated"
        self.peer: Identity = link.peer
        self.remote: Address = link.remote
        #: this tunnel's counters (its endpoint's count the same, and more)
        self.counters: dict[str, int] = link.counters
        #: the largest payload :meth:`send_datagram` accepts on this tunnel
        self.max_datagram = link.max_datagram
        self._endpoint = endpoint
        self._link = link

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Tunnel {self.peer} at {self.remote[0]}:{self.remote[1]} {state}>"

    @property
    def closed(self) -> bool:
        return self._link.phase != "open"

    @property
    def rtt(self) -> float | None:
        """QUIC's smoothed round-trip time of this tunnel in seconds (RFC 9002 §5.3), from the
        acknowledgements of what it carries; None before the first sample.

        aioquic keeps it in its loss recovery and has no public accessor: read here, and only
        here, so that an aioquic that renames it costs this figure (None), not the tunnel.
        """
        recovery = getattr(self._link.conn, "_loss", None)
        if not getattr(recovery, "_rtt_initialized", False):
            return None
        value = getattr(recovery, "_rtt_smoothed", None)
        return float(value) if isinstance(value, int | float) else None

    def send_datagram(self, data: bytes, *, may_wait: bool = False) -> bool:
        """Queue ``data`` as one DATAGRAM frame; it leaves at the endpoint's next flush.

        ``may_wait``: the datagram is media that may wait up to the endpoint's :attr:`hold`
        for others to share its QUIC packet (see :meth:`TunnelEndpoint.transmit_pending`).
        It waits only while the tunnel is busy (the previous such datagram came less than a
        hold ago), so a quiet tunnel adds no delay. One that may not wait takes whatever
        waits with it.

        Returns False, and counts why, when the tunnel is closed, ``data`` is longer than
        :attr:`max_datagram`, or too many datagrams already wait (congestion). Never raises
        for size: a too-big datagram is the sender's loss, like on UDP.
        """
        link = self._link
        if not link.send_datagram(data):
            return False
        endpoint = self._endpoint
        endpoint._pending[link] = None
        if endpoint.hold:
            held = endpoint._held.get(link)
            if may_wait:
                now = trio.current_time()
                last = endpoint._last_wait.get(link, -math.inf)
                endpoint._last_wait[link] = now
                if held is not None:
                    held[1] += len(data)
                elif now - last < endpoint.hold:
                    endpoint._held[link] = [now, len(data)]
            elif held is not None:
                del endpoint._held[link]  # this one may not wait: what waits leaves with it
        return True

    def send_control(self, message: dict[str, Any]) -> None:
        """Send one JSON object on the control stream (reliable, ordered), now.

        Dropped (counted) if the tunnel is closed. ``message`` must be JSON-serializable
        (TypeError or ValueError otherwise: a local error). If the peer had ended the control
        stream, the tunnel is broken: it closes, and the handler hears of it before this returns.
        """
        outcome = self._link.send_control(message)
        if outcome is False:
            return
        self._endpoint._transmit(self._link)
        if isinstance(outcome, Closing):
            self._endpoint._closed(self._link, outcome)

    def close(self, reason: str = "") -> None:
        """Close the tunnel (a CONNECTION_CLOSE goes out now). Calls the handler's
        ``tunnel_closed`` before returning, unless the tunnel was already closed."""
        self._endpoint._close_tunnel(self._link, reason or "closed")


@final
class TunnelEndpoint:
    """One UDP socket and every tunnel on it. Start :meth:`run` with ``nursery.start``.

    A server endpoint (``server=True``, relays) accepts tunnels; a client endpoint (nodes) dials
    with :meth:`connect`, to as many relays as it likes. Either way a tunnel is only handed out
    once both sides have proved a cluster identity.
    """

    def __init__(
        self,
        credentials: Credentials,
        handler: TunnelHandler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        server: bool,
        idle_timeout: float = 10.0,
        max_datagram_size: int = 1452,
        gso: bool = True,
        hold: float = 0.0,
    ) -> None:
        if not 0 <= hold <= MAX_HOLD:
            raise ValueError(f"hold must be between 0 and {MAX_HOLD} s, not {hold}")
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be positive, not {idle_timeout}")
        if max_datagram_size < MIN_INITIAL_DATAGRAM:
            # RFC 9000 §14: every QUIC path must carry 1200-byte datagrams.
            raise ValueError(f"max_datagram_size must be at least {MIN_INITIAL_DATAGRAM}")
        self.credentials = credentials
        self.handler = handler
        self.host = host
        self.requested_port = port
        self.server = server
        self.idle_timeout = idle_timeout
        self.max_datagram_size = max_datagram_size
        #: send runs of equal-sized packets in one segmented send where Linux allows it
        #: (relay/udp.py ``BatchSender``); False: one ``sendto`` per packet
        self.gso = gso and sys.platform.startswith("linux")
        #: how long :meth:`transmit_pending` may hold a tunnel's datagrams to pack more of them
        #: into one QUIC packet (seconds; 0: never)
        self.hold = hold
        #: who we are, from our own certificate
        self.identity = credentials.identity
        self.counters: dict[str, int] = dict.fromkeys(_ENDPOINT_COUNTERS, 0)
        self._config = LinkConfig(
            credentials, idle_timeout=idle_timeout, max_datagram_size=max_datagram_size
        )
        self._supported_versions = QuicConfiguration().supported_versions
        self._port = 0
        self._sock: socket.socket | None = None
        self._sender: BatchSender | None = None  # the socket's, while it is bound
        self._stopping = False
        self._by_cid: dict[bytes, Link] = {}
        #: every live link (insertion-ordered) and its tunnel once it has one
        self._links: dict[Link, Tunnel | None] = {}
        self._waiters: dict[Link, trio.Event] = {}  # connect() calls waiting on their link
        #: received on in this batch: True if it must transmit at the batch's end (see
        #: _batch_done), False if it only delivered media
        self._touched: dict[Link, bool] = {}
        self._pending: dict[Link, None] = {}  # queued on since the last flush
        #: links whose queued datagrams transmit_pending holds: when the first was queued,
        #: and how many bytes wait
        self._held: dict[Link, list[float]] = {}
        #: when each link was last given a datagram that may wait
        self._last_wait: dict[Link, float] = {}
        self._batch_now: float | None = None
        self._flush_wanted = trio.Event()
        self._timer_scope: trio.CancelScope | None = None  # the timer task's, while it sleeps
        self._armed_at = math.inf

    # -- public ----------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound UDP port (0 until :meth:`run` has started)."""
        return self._port

    @property
    def address(self) -> Address:
        return (self.host, self._port)

    @property
    def tunnels(self) -> list[Tunnel]:
        """The open tunnels, oldest first."""
        return [t for t in self._links.values() if t is not None and not t.closed]

    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped at this endpoint's socket (its buffer was full)."""
        return kernel_drops(self._sock)

    def flush(self) -> None:
        """Send what was queued on the tunnels from outside the endpoint's own callbacks.

        It leaves once the tasks that are ready now have run (Trio's next batch), not at once:
        the sessions a node ticks together each queue a frame and call this, and their frames
        share QUIC packets instead of taking one packet, one encryption and one ``sendto``
        each. Call it after queuing a batch.
        """
        if self._pending:
            self._flush_wanted.set()

    def transmit_pending(self) -> None:
        """Send what was queued on the tunnels now, from the caller's own batch.

        For a caller that already batches, as the relay's public port does (one call per
        drained batch of client datagrams): it costs no extra task switch per batch, which at
        a few thousand datagrams per second is most of what a flush costs.

        With :attr:`hold`, a busy tunnel whose media (``send_datagram(..., may_wait=True)``)
        fills less than a packet keeps it until the first datagram has waited ``hold`` (the
        timer task sends them then), so that datagrams arriving a little apart share a QUIC
        packet: one packet to build and seal here, and one to open at the other end, instead
        of one per datagram.
        """
        if self._pending:
            now = trio.current_time()
            pending, self._pending = self._pending, {}
            held, hold = self._held, self.hold
            for link in pending:
                waiting = held.get(link)
                if waiting is not None and waiting[1] < link.max_datagram:
                    due = waiting[0] + hold
                    if now < due:
                        self._pending[link] = None
                        if due < self._armed_at:
                            self._arm(due)
                        continue
                self._transmit(link, now)

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            now = trio.current_time()
            pending, self._pending = self._pending, {}
            for link in pending:
                self._transmit(link, now)

    async def run(
        self, *, task_status: trio.TaskStatus[TunnelEndpoint] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report started, then receive, time and send until cancelled.

        On the way out every connection is closed (one best-effort CONNECTION_CLOSE each, no
        waiting) and ``tunnel_closed`` is called for every tunnel still open; pending
        :meth:`connect` calls fail with TunnelError.
        """
        if self._sock is not None or self._stopping:
            raise RuntimeError("a TunnelEndpoint runs once")
        # Sends never wait (a full buffer drops, and QUIC recovers).
        async with bound_udp(self.host, self.requested_port, receive_buffer=RECEIVE_BUFFER) as raw:
            self._port = raw.getsockname()[1]
            self._sock = raw
            self._sender = BatchSender(raw, gso=self.gso)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._timer_loop)
                    nursery.start_soon(self._flush_loop)
                    task_status.started(self)
                    await drain_forever(
                        raw, self._on_datagram, self._batch_done, batch=RECV_BATCH, size=RECV_BUFFER
                    )
            finally:
                self._shutdown()
                self._sock = None
                self._sender = None

    # The timeout bounds the handshake only (and is part of the agreed API), hence the noqa.
    async def connect(
        self,
        host: str,
        port: int,
        *,
        expect: Identity | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> Tunnel:
        """Dial a server endpoint and return the open tunnel.

        The server's certificate must come from our cluster CA and, if ``expect`` is given,
        name that identity; the server must in turn accept ours. Raises TunnelError otherwise,
        or if nothing is settled within ``timeout`` seconds.
        """
        if self.server:
            raise RuntimeError("a server endpoint does not dial")
        if self._sock is None or self._stopping:
            raise RuntimeError("the endpoint is not running; start run() first")
        remote = await self._resolve(host, port)
        if self._sock is None or self._stopping:
            raise TunnelError("the endpoint stopped")
        now = trio.current_time()
        link = Link.dial(self._config, remote, now, totals=self.counters, expect=expect)
        waiter = self._waiters[link] = trio.Event()
        self._links[link] = None
        self._register(link, link.conn.host_cid)
        self._transmit(link, now)
        tunnel: Tunnel | None = None
        try:
            with trio.move_on_after(timeout):
                await waiter.wait()
            if link.phase == "open":
                tunnel = self._links[link]
                assert tunnel is not None
                return tunnel
            if link.error is None:
                self.counters["handshake_failures"] += 1
                raise TunnelError(f"no tunnel to {host}:{port} within {timeout} s")
            if not link.opened and link.peer is None:
                self.counters["handshake_failures"] += 1
            raise TunnelError(f"tunnel to {host}:{port} failed: {link.error}")
        finally:
            self._waiters.pop(link, None)
            if tunnel is None:
                self._abandon(link, "connect abandoned")

    async def _resolve(self, host: str, port: int) -> Address:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            try:
                infos = await trio.socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)
            except OSError as exc:  # socket.gaierror: a name that does not resolve (now)
                raise TunnelError(f"cannot resolve {host!r}: {exc}") from None
            if not infos:
                raise TunnelError(f"cannot resolve {host!r}") from None
            sockaddr = infos[0][4]
            return (str(sockaddr[0]), int(sockaddr[1]))
        return (host, port)

    # -- connection IDs --------------------------------------------------------------------------

    def _register(self, link: Link, cid: bytes) -> None:
        self._by_cid[cid] = link
        link.cids.add(cid)

    def _unregister(self, link: Link, cid: bytes) -> None:
        link.cids.discard(cid)
        if self._by_cid.get(cid) is link:
            del self._by_cid[cid]

    # -- receiving -------------------------------------------------------------------------------

    def _now(self) -> float:
        # One clock reading per received batch, as the packets of a batch arrived together.
        now = self._batch_now
        if now is None:
            now = self._batch_now = trio.current_time()
        return now

    def _batch_done(self, count: int) -> None:
        self.counters["packets_in"] += count
        # One transmit per touched connection per batch: ACKs, answers, and whatever the
        # handler queued from its callbacks.
        now = self._now()
        self._batch_now = None
        touched, self._touched = self._touched, {}
        pending = self._pending
        for link, must in touched.items():
            if must or link in pending:
                self._transmit(link, now)
            else:
                # Only media arrived. DATAGRAM frames are ack-eliciting, so aioquic has set its
                # ACK timer (ACK_DELAY ahead) and the timer task's transmit sends the ACK and
                # whatever else aioquic queued meanwhile (a retransmission a piggybacked ACK
                # revealed, say), unless a send of ours takes it sooner. Asking aioquic now
                # builds an empty packet: at one client frame per QUIC packet that was a fifth
                # of the tunnel's cost on a node.
                deadline = link.deadline()
                if deadline < self._armed_at:
                    self._arm(deadline)

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        now = self._now()
        # An open tunnel's packets have short headers (RFC 9000 §17.3: form bit clear, fixed bit
        # set, then our connection ID): find the link without parsing the header in Python.
        # Anything else, and a short header for no link of ours, is read in full below.
        link = None
        if len(data) > CID_LENGTH and data[0] & 0xC0 == 0x40:
            link = self._by_cid.get(data[1 : 1 + CID_LENGTH])
        if link is None:
            link = self._link_for(data, addr, now)
            if link is None:
                return
        try:
            link.receive(data, addr, now)
        except Exception:
            # aioquic turns protocol errors into CONNECTION_CLOSE itself; anything escaping is a
            # bug reached by remote input. It must cost this connection only, not the endpoint.
            log.exception("tunnel %s: aioquic failed on a datagram; dropping the connection", addr)
            self.counters["internal_errors"] += 1
            self._finish(link, Closing("internal error", graceful=False))
            return
        media_only = self._process(link)
        touched = self._touched
        touched[link] = touched.get(link, False) or not media_only

    def _link_for(self, data: bytes, addr: Address, now: float) -> Link | None:
        """The link a datagram is for, from its parsed header: a known connection ID, or a new
        server-side connection (:meth:`_accept`); None (counted) for anything else."""
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            self.counters["malformed"] += 1
            return None
        link = self._by_cid.get(header.destination_cid)
        if link is None:
            link = self._accept(
                header.packet_type, header.version, header.destination_cid, data, addr, now
            )
        return link

    def _accept(
        self,
        packet_type: QuicPacketType,
        version: int | None,
        dcid: bytes,
        data: bytes,
        addr: Address,
        now: float,
    ) -> Link | None:
        """A new server-side connection for a client's first Initial, or None (counted)."""
        if not self.server or self._stopping or packet_type != QuicPacketType.INITIAL:
            self.counters["unknown_connection"] += 1
            return None
        if (
            version not in self._supported_versions
            or len(data) < MIN_INITIAL_DATAGRAM  # RFC 9000 §14.1
            or len(dcid) < 8  # RFC 9000 §7.2: a client's first DCID has at least 8 bytes
        ):
            self.counters["malformed"] += 1
            return None
        if sum(1 for tunnel in self._links.values() if tunnel is None) >= MAX_HALF_OPEN:
            self.counters["half_open_full"] += 1
            return None
        link = Link.accept(self._config, addr, now, dcid, totals=self.counters)
        self._links[link] = None
        # The client's Initials (and retransmissions) use the DCID it chose; everything after
        # them uses ours (RFC 9000 §7.2), and later ones arrive as ConnectionIdIssued.
        self._register(link, dcid)
        self._register(link, link.conn.host_cid)
        return link

    def _process(self, link: Link) -> bool:
        """Act on every event the link has, in order. True if there was at least one and all
        were media (DatagramReceived)."""
        handler = self.handler
        media_only = None
        while (event := link.next_event()) is not None:
            if type(event) is DatagramReceived:  # an open link's: it has a tunnel
                handler.datagram_received(self._links[link], event.data)  # type: ignore[arg-type]
                if media_only is None:
                    media_only = True
                continue
            media_only = False
            if isinstance(event, ControlReceived):
                self.handler.control_received(self._tunnel(link), event.message)
            elif isinstance(event, Opened):
                self._opened(link)
            elif isinstance(event, Closing):
                self._closed(link, event)
            elif isinstance(event, ConnectionIdIssued):
                self._register(link, event.cid)
            elif isinstance(event, ConnectionIdRetired):
                self._unregister(link, event.cid)
            elif isinstance(event, Terminated):
                self._finish(link, Closing(event.reason, event.graceful))
                return False
        return bool(media_only)

    def _tunnel(self, link: Link) -> Tunnel:
        tunnel = self._links.get(link)
        assert tunnel is not None, "an open link has a tunnel"
        return tunnel

    def _opened(self, link: Link) -> None:
        tunnel = self._links[link] = Tunnel(self, link)
        log.info("tunnel open", extra={"peer": str(tunnel.peer), "remote": _show(link.remote)})
        waiter = self._waiters.get(link)
        if waiter is not None:
            waiter.set()
        self.handler.tunnel_opened(tunnel)

    # -- closing ---------------------------------------------------------------------------------

    def _closed(self, link: Link, closing: Closing) -> None:
        """The link started closing (either side, any cause): tell whoever waits, once."""
        waiter = self._waiters.get(link)
        if waiter is not None:
            waiter.set()
        tunnel = self._links.get(link)
        if tunnel is not None:
            self.counters["closed"] += 1
            log.log(
                logging.INFO if closing.graceful else logging.WARNING,
                "tunnel closed",
                extra={
                    "peer": str(tunnel.peer),
                    "remote": _show(link.remote),
                    "reason": closing.reason,
                },
            )
            self.handler.tunnel_closed(tunnel, closing.reason)

    def _close_tunnel(self, link: Link, reason: str) -> None:
        """Close an open tunnel from our side, without error."""
        if link.phase != "open":
            return
        link.close(APP_CLOSED, reason)
        self._transmit(link)
        self._closed(link, Closing(reason, graceful=True))

    def _finish(self, link: Link, closing: Closing) -> None:
        """aioquic is done with the connection (or we are): forget it."""
        if link.phase == "done":
            return
        if link.finish(closing.reason):
            self._closed(link, closing)
        for cid in list(link.cids):
            self._unregister(link, cid)
        self._links.pop(link, None)
        self._touched.pop(link, None)
        self._pending.pop(link, None)
        self._held.pop(link, None)
        self._last_wait.pop(link, None)

    def _abandon(self, link: Link, reason: str) -> None:
        """Give up on a connection we dialed (timeout, failure, cancellation)."""
        if link.phase == "done":
            return
        if link.phase == "open":
            self._close_tunnel(link, reason)
            return
        started = link.close(APP_CLOSED, reason)
        self._transmit(link)
        if started:
            self._closed(link, Closing(reason, graceful=True))

    def _shutdown(self) -> None:
        self._stopping = True
        now = trio.current_time()
        stopped = Closing("endpoint stopped", graceful=True)
        for link in list(self._links):
            if link.phase == "open":
                self._close_tunnel(link, stopped.reason)
            else:
                link.conn.close(error_code=APP_CLOSED, reason_phrase=stopped.reason)
                self._transmit(link, now)
            self._finish(link, stopped)

    # -- sending and timers ----------------------------------------------------------------------

    def _transmit(self, link: Link, now: float | None = None) -> None:
        self._pending.pop(link, None)  # whatever was queued or held leaves now
        if self._held:
            self._held.pop(link, None)
        sender = self._sender
        if sender is None or link.phase == "done":
            return
        if now is None:
            now = trio.current_time()
        datagrams = link.conn.datagrams_to_send(now)
        if datagrams:
            # Equal-sized packets (a burst of media) leave in one segmented send.
            batches = sender.batches
            sent, failed = sender.send(datagrams)
            counters = self.counters
            counters["packets_out"] += sent
            counters["send_failed"] += failed  # a full buffer is loss; QUIC recovers
            counters["segmented_sends"] += sender.batches - batches
        deadline = link.deadline()
        if deadline < self._armed_at:
            self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        # Moving the sleeping timer task's deadline is a heap push in Trio's run loop; waking the
        # task to re-arm cost a task switch and a new cancel scope each time aioquic's timer moved
        # earlier (after nearly every send and receive: ACK delay, loss detection), which was a
        # fifth of a busy node's time in its run loop.
        self._armed_at = deadline
        scope = self._timer_scope
        if scope is not None:
            scope.deadline = deadline

    async def _timer_loop(self) -> None:
        while True:
            with trio.CancelScope() as scope:
                self._timer_scope = scope
                self._arm(min((self._deadline(link) for link in self._links), default=math.inf))
                await trio.sleep_forever()
            self._timer_scope = None
            self._armed_at = -math.inf  # nobody needs to re-arm us while we work
            now = trio.current_time()
            held, hold = self._held, self.hold
            for link in list(self._links):
                if link.deadline() <= now:
                    self._on_timer(link, now)
                elif (waiting := held.get(link)) is not None and waiting[0] + hold <= now:
                    self._transmit(link, now)  # held datagrams waited long enough

    def _deadline(self, link: Link) -> float:
        """When the link needs the timer task: its own deadline, or its held datagrams'."""
        deadline = link.deadline()
        held = self._held.get(link)
        if held is not None:
            deadline = min(deadline, held[0] + self.hold)
        return deadline

    def _on_timer(self, link: Link, now: float) -> None:
        try:
            link.handle_timer(now)
        except Exception:
            log.exception("tunnel %s:%d: aioquic failed on a timer; dropping it", *link.remote)
            self.counters["internal_errors"] += 1
            self._finish(link, Closing("internal error", graceful=False))
            return
        self._process(link)
        self._transmit(link, now)


def _show(addr: Address) -> str:
    return f"{addr[0]}:{addr[1]}"
