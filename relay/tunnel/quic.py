"""Mutually authenticated QUIC tunnels between relays and nodes, driven by Trio.

The protocol core is aioquic's sans-I/O :class:`~aioquic.quic.connection.QuicConnection`; this
module is only the glue: one UDP socket per :class:`TunnelEndpoint`, every connection of the
endpoint demultiplexed on it by connection ID, one task for receiving and one for timers. Relays
run server endpoints; nodes dial them from a client endpoint (one per node, however many relays).

What crosses a tunnel:

* media, as QUIC DATAGRAM frames (RFC 9221): unreliable and unordered like the UDP they carry.
  :meth:`Tunnel.send_datagram` only queues; :meth:`TunnelEndpoint.flush` transmits, so a caller
  forwarding a burst pays for packet building once per batch (aioquic sends queued datagrams only
  when ``datagrams_to_send`` is called, and never checks them against the peer's limit — we do).
* control, as JSON objects, one per line, on the bidirectional stream 0 (RFC 9000 §2.1: the
  client's first bidirectional stream). The client opens it right after the TLS handshake with a
  hello line; the server answers with a welcome line once it has authenticated the client. Only
  then does either side report the tunnel open, and only later lines reach the handler.

Authentication is TLS 1.3 with certificates from the cluster CA (relay/tunnel/certs.py), in both
directions, and the identity is the certificate's ``parley://`` URI, not a host name. aioquic
cannot do the server half on its own (this module relies on two aioquic internals for it, both
named in :class:`_QuicConnection`):

* an aioquic server only sends a CertificateRequest when the private
  ``tls.Context._request_client_certificate`` is set ("for test purposes only"); we set it in
  ``_initialize``, right after aioquic creates the TLS context;
* the server then checks the client's CertificateVerify signature (proof that the client holds
  the key) but neither verifies the client's chain nor refuses an empty Certificate message. So
  after ``HandshakeCompleted`` we read the peer's certificates from ``tls._peer_certificate`` and
  ``tls._peer_certificate_chain`` and run :func:`relay.tunnel.certs.verify_peer`; a peer that
  fails is closed with a TLS alert code, counted in ``auth_failures``, and never reaches the
  handler.

Clients also run ``verify_peer`` on the server's certificate (aioquic has already verified its
chain against the CA, without host name checks) to learn and pin its identity.

Everything that arrives from the network is remote input: malformed datagrams, unknown
connection IDs and bad control lines are counted and dropped, and never raise.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import json
import logging
import math
import socket
import ssl
from typing import Any, Final, Literal, Protocol, final

import trio
from aioquic._buffer import Buffer  # aioquic.buffer re-exports it without telling mypy
from aioquic.buffer import size_uint_var
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode, QuicPacketType, pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from relay.tunnel.certs import Credentials, Identity, TunnelAuthError, verify_peer
from sessions.node.media import bound_udp, kernel_drops

__all__ = [
    "ALPN",
    "Tunnel",
    "TunnelEndpoint",
    "TunnelError",
    "TunnelHandler",
]

log = logging.getLogger("parley.tunnel")

Address = tuple[str, int]

ALPN: Final = "parley-tunnel/1"
#: the control stream: the client's first bidirectional stream (RFC 9000 §2.1)
CONTROL_STREAM: Final = 0
#: the first control line each way; later lines belong to the handler
HELLO: Final = {"type": "parley-hello", "version": 1}
WELCOME: Final = {"type": "parley-welcome", "version": 1}

CID_LENGTH: Final = 8
#: what we accept (RFC 9221 §3: it bounds the whole frame); media never comes close
MAX_DATAGRAM_FRAME_SIZE: Final = 65536
#: RFC 9000 §14.1: a server drops client Initials in datagrams smaller than this
MIN_INITIAL_DATAGRAM: Final = 1200
#: connections that have not (yet) become tunnels, on a server: bounds what an unauthenticated
#: peer can make us hold; aioquic's idle timeout reaps them
MAX_HALF_OPEN: Final = 64
#: DATAGRAM frames queued on one connection and not yet sent (congestion-limited): real-time
#: media is better dropped than delivered late
MAX_QUEUED_DATAGRAMS: Final = 1024
MAX_CONTROL_LINE: Final = 65536
RECV_BATCH: Final = 1024
#: how long a tunnel waits before acknowledging what it received. aioquic acknowledges after
#: 1 ms (its timer granularity), which at media rates means one ACK-only packet, one timer and
#: one wake-up on each side for every datagram. The tunnels carry DATAGRAM frames, which nobody
#: retransmits: RFC 9221 §5.2 asks receivers to delay those ACKs within max_ack_delay (25 ms,
#: aioquic's default, RFC 9000 §18.2). An ACK due by then rides on the next packet either way.
ACK_DELAY: Final = 0.020
RECV_BUFFER: Final = 65536
# A 1-RTT packet's worst-case overhead (RFC 9000 §17.3.1): first byte, a destination connection
# ID of up to 20 bytes, a packet number of up to 4, then the AEAD tag (16 for every QUIC v1
# cipher suite). A DATAGRAM frame must fit in one packet (RFC 9221 §5), or aioquic would keep it
# at the head of its queue forever and block every datagram behind it.
_SHORT_PACKET_OVERHEAD: Final = 1 + 20 + 4 + 16

# RFC 9001 §4.8: a TLS alert travels as CRYPTO_ERROR + the alert's code (RFC 8446 §6.2).
_ALERT_BAD_CERTIFICATE: Final = QuicErrorCode.CRYPTO_ERROR + 42
_ALERT_CERTIFICATE_REQUIRED: Final = QuicErrorCode.CRYPTO_ERROR + 116
_ALERT_NO_APPLICATION_PROTOCOL: Final = QuicErrorCode.CRYPTO_ERROR + 120
# Application error codes, in APPLICATION_CLOSE frames (RFC 9000 §20.2).
_APP_CLOSED: Final = 0
_APP_PROTOCOL_ERROR: Final = 1

_ENDPOINT_COUNTERS: Final = (
    "packets_in",  # UDP datagrams: QUIC packets, coalesced or not, ACK-only ones included
    "packets_out",
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
_TUNNEL_COUNTERS: Final = (
    "datagrams_in",
    "datagrams_out",
    "dropped_too_big",
    "dropped_closed",
    "dropped_backlog",
    "control_in",
    "control_out",
    "malformed",
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
    closed it, including from :meth:`Tunnel.close` itself and when the endpoint stops.
    """

    def tunnel_opened(self, tunnel: Tunnel) -> None: ...

    def datagram_received(self, tunnel: Tunnel, data: bytes) -> None: ...

    def control_received(self, tunnel: Tunnel, message: dict[str, Any]) -> None: ...

    def tunnel_closed(self, tunnel: Tunnel, reason: str) -> None: ...


class _QuicConnection(QuicConnection):
    """aioquic's connection, with the internals this module relies on in one place."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # aioquic internal: its ACK delay is fixed at 1 ms (see ACK_DELAY).
        self._ack_delay = ACK_DELAY

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            # aioquic internal: only this private flag makes its server send a
            # CertificateRequest (RFC 8446 §4.3.2). aioquic creates ``self.tls`` in
            # ``_initialize`` (on the first Initial), so this is the earliest point to set it.
            self.tls._request_client_certificate = True

    def peer_certificates(self) -> list[x509.Certificate]:
        """The peer's certificate chain, leaf first; empty if it sent none (aioquic internal)."""
        leaf = self.tls._peer_certificate
        return [] if leaf is None else [leaf, *self.tls._peer_certificate_chain]

    @property
    def peer_max_datagram_frame_size(self) -> int | None:
        """The peer's max_datagram_frame_size transport parameter (RFC 9221 §3); None if it
        does not accept DATAGRAM frames at all."""
        return self._remote_max_datagram_frame_size

    @property
    def queued_datagrams(self) -> int:
        return len(self._datagrams_pending)

    @property
    def close_event(self) -> events.ConnectionTerminated | None:
        """Why the connection is closing, as soon as it starts to (aioquic reports
        ConnectionTerminated only after the closing or draining period, RFC 9000 §10.2)."""
        return self._close_event


def _largest_payload(frame_budget: int) -> int:
    """The largest DATAGRAM payload whose frame (type, length, payload) fits ``frame_budget``."""
    n = frame_budget - 2
    while n > 0 and 1 + size_uint_var(n) + n > frame_budget:
        n -= 1
    return max(n, 0)


def _line(message: dict[str, Any]) -> bytes:
    # json.dumps escapes control characters inside strings, so a line never holds a raw "\n".
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _describe(event: events.ConnectionTerminated) -> str:
    if event.reason_phrase:
        return event.reason_phrase
    return f"closed with error 0x{event.error_code:x}" if event.error_code else "closed"


Phase = Literal["handshake", "greeting", "open", "closing", "done"]


@final
class _Link:
    """One QUIC connection of an endpoint, from its first packet until aioquic terminates it.

    ``handshake`` → (TLS done, peer verified) ``greeting`` → (hello/welcome) ``open`` → ``closing``
    → ``done``; a rejected or failed connection goes to ``closing`` from anywhere.
    """

    __slots__ = (
        "cids",
        "client",
        "conn",
        "control",
        "error",
        "expect",
        "last_ping",
        "last_rx",
        "peer",
        "phase",
        "remote",
        "skipping",
        "tunnel",
        "waiter",
    )

    def __init__(self, conn: _QuicConnection, remote: Address, now: float, client: bool) -> None:
        self.conn = conn
        self.remote = remote
        self.client = client
        self.cids: set[bytes] = set()
        self.phase: Phase = "handshake"
        self.peer: Identity | None = None
        self.expect: Identity | None = None
        self.tunnel: Tunnel | None = None
        self.waiter: trio.Event | None = None
        self.error: str | None = None
        self.control = bytearray()
        self.skipping = False
        self.last_rx = now
        self.last_ping = now

    def lines(self, data: bytes) -> tuple[list[bytes], int]:
        """Complete control lines in ``data`` (after what came before) and how many over-long
        lines were dropped. A line longer than MAX_CONTROL_LINE is discarded up to its end, so
        the stream stays in step without holding unbounded bytes."""
        buf = self.control
        buf += data
        out: list[bytes] = []
        dropped = 0
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            if self.skipping:
                self.skipping = False
            else:
                out.append(bytes(buf[start:end]))
            start = end + 1
        del buf[:start]
        if len(buf) > MAX_CONTROL_LINE:
            if not self.skipping:
                dropped += 1
            self.skipping = True
            buf.clear()
        return out, dropped


@final
class Tunnel:
    """One established and authenticated connection, seen from either side.

    ``peer`` is the identity the peer's certificate proved; ``closed`` turns True once either
    side closed it (and the handler's ``tunnel_closed`` has been called, exactly once).
    """

    def __init__(self, endpoint: TunnelEndpoint, link: _Link, peer: Identity) -> None:
        self.peer = peer
        self.remote: Address = link.remote
        self.closed = False
        self.counters: dict[str, int] = dict.fromkeys(_TUNNEL_COUNTERS, 0)
        self._endpoint = endpoint
        self._link = link
        by_peer = _largest_payload(link.conn.peer_max_datagram_frame_size or 0)
        by_packet = _largest_payload(endpoint.max_datagram_size - _SHORT_PACKET_OVERHEAD)
        #: the largest payload :meth:`send_datagram` accepts on this tunnel
        self.max_datagram = min(by_peer, by_packet)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Tunnel {self.peer} at {self.remote[0]}:{self.remote[1]} {state}>"

    def send_datagram(self, data: bytes) -> bool:
        """Queue ``data`` as one DATAGRAM frame; it leaves at the endpoint's next flush.

        Returns False, and counts why, when the tunnel is closed, ``data`` is longer than
        :attr:`max_datagram`, or too many datagrams already wait (congestion). Never raises
        for size: a too-big datagram is the sender's loss, like on UDP.
        """
        endpoint = self._endpoint
        if self.closed:
            self.counters["dropped_closed"] += 1
            endpoint.counters["dropped_closed"] += 1
            return False
        if len(data) > self.max_datagram:
            self.counters["dropped_too_big"] += 1
            endpoint.counters["dropped_too_big"] += 1
            return False
        conn = self._link.conn
        if conn.queued_datagrams >= MAX_QUEUED_DATAGRAMS:
            self.counters["dropped_backlog"] += 1
            endpoint.counters["dropped_backlog"] += 1
            return False
        conn.send_datagram_frame(data)
        endpoint._pending[self._link] = None
        self.counters["datagrams_out"] += 1
        endpoint.counters["datagrams_out"] += 1
        return True

    def send_control(self, message: dict[str, Any]) -> None:
        """Send one JSON object on the control stream (reliable, ordered), now.

        Dropped (counted) if the tunnel is closed. ``message`` must be JSON-serializable
        (TypeError otherwise: a local error).
        """
        if self.closed:
            self.counters["dropped_closed"] += 1
            self._endpoint.counters["dropped_closed"] += 1
            return
        data = _line(message)
        try:
            self._link.conn.send_stream_data(CONTROL_STREAM, data)
        except ValueError:
            # aioquic refuses once the stream is finished, which only the peer can cause
            # (a reset; RFC 9000 §3.1). Without the control stream the tunnel is broken.
            self._endpoint._fail(self._link, "control stream closed by peer")
            return
        self.counters["control_out"] += 1
        self._endpoint.counters["control_out"] += 1
        self._endpoint._transmit(self._link)

    def close(self, reason: str = "") -> None:
        """Close the tunnel (a CONNECTION_CLOSE goes out now). Calls the handler's
        ``tunnel_closed`` before returning, unless the tunnel was already closed."""
        self._endpoint._close_tunnel(self._link, reason or "closed", code=_APP_CLOSED)


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
    ) -> None:
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
        #: who we are, from our own certificate
        self.identity = credentials.identity
        self.counters: dict[str, int] = dict.fromkeys(_ENDPOINT_COUNTERS, 0)
        self._ca = x509.load_pem_x509_certificate(credentials.ca_pem)
        self._cert = x509.load_pem_x509_certificate(credentials.cert_pem)
        self._key = load_pem_private_key(credentials.key_pem, password=None)
        self._supported_versions = QuicConfiguration().supported_versions
        self._port = 0
        self._sock: socket.socket | None = None
        self._stopping = False
        self._by_cid: dict[bytes, _Link] = {}
        self._links: dict[_Link, None] = {}  # insertion-ordered set
        self._touched: dict[_Link, None] = {}
        self._pending: dict[_Link, None] = {}  # queued on since the last flush
        self._flush_wanted = trio.Event()
        self._wake = trio.Event()
        self._armed_at = math.inf
        self._ping_uid = 0

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
        return [
            link.tunnel
            for link in self._links
            if link.tunnel is not None and not link.tunnel.closed
        ]

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
        # Sends never wait (a full buffer drops, and QUIC recovers). A tunnel carries every
        # session between a relay and a node: room for a burst while this process is busy
        # elsewhere (the kernel's default holds ~150 full packets; the kernel may cap this).
        async with bound_udp(self.host, self.requested_port, receive_buffer=4 << 20) as raw:
            self._port = raw.getsockname()[1]
            self._sock = raw
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._timer_loop)
                    nursery.start_soon(self._flush_loop)
                    task_status.started(self)
                    await self._receive_loop(raw)
            finally:
                self._shutdown()
                self._sock = None

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
        conn = _QuicConnection(configuration=self._configuration(is_client=True))
        now = trio.current_time()
        link = _Link(conn, remote, now, client=True)
        link.expect = expect
        waiter = link.waiter = trio.Event()
        conn.connect(remote, now)
        self._links[link] = None
        self._register(link, conn.host_cid)
        self._transmit(link, now)
        tunnel: Tunnel | None = None
        try:
            with trio.move_on_after(timeout):
                await waiter.wait()
            if link.phase == "open" and link.tunnel is not None and not link.tunnel.closed:
                tunnel = link.tunnel
                return tunnel
            if link.error is None:
                self.counters["handshake_failures"] += 1
                raise TunnelError(f"no tunnel to {host}:{port} within {timeout} s")
            if link.tunnel is None and link.peer is None:
                self.counters["handshake_failures"] += 1
            raise TunnelError(f"tunnel to {host}:{port} failed: {link.error}")
        finally:
            if tunnel is None:
                self._abandon(link, "connect abandoned")

    # -- configuration ---------------------------------------------------------------------------

    def _configuration(self, *, is_client: bool) -> QuicConfiguration:
        return QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            idle_timeout=self.idle_timeout,
            max_datagram_size=self.max_datagram_size,
            max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
            connection_id_length=CID_LENGTH,
            certificate=self._cert,
            private_key=self._key,
            cadata=self.credentials.ca_pem,
            # aioquic clients verify the server's chain against ``cadata``; without a
            # server_name they skip host names, which mean nothing here (we check the URI
            # identity ourselves). aioquic servers verify nothing: see _on_handshake.
            server_name=None,
            verify_mode=ssl.CERT_REQUIRED if is_client else ssl.CERT_NONE,
        )

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

    def _register(self, link: _Link, cid: bytes) -> None:
        self._by_cid[cid] = link
        link.cids.add(cid)

    def _unregister(self, link: _Link, cid: bytes) -> None:
        link.cids.discard(cid)
        if self._by_cid.get(cid) is link:
            del self._by_cid[cid]

    # -- receiving -------------------------------------------------------------------------------

    async def _receive_loop(self, sock: socket.socket) -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            for _ in range(RECV_BATCH):  # bounded, so one flood cannot starve other tasks
                try:
                    data, addr = sock.recvfrom(RECV_BUFFER)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                        continue  # ICMP from an earlier send; QUIC's timers deal with it
                    raise
                self.counters["packets_in"] += 1
                self._on_datagram(data, (addr[0], addr[1]), now)
            # One transmit per touched connection per batch: ACKs, answers, and whatever the
            # handler queued from its callbacks.
            touched, self._touched = self._touched, {}
            for link in touched:
                self._transmit(link, now)
            await trio.lowlevel.checkpoint()

    def _on_datagram(self, data: bytes, addr: Address, now: float) -> None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            self.counters["malformed"] += 1
            return
        link = self._by_cid.get(header.destination_cid)
        if link is None:
            link = self._accept(
                header.packet_type, header.version, header.destination_cid, data, addr, now
            )
            if link is None:
                return
        link.last_rx = now
        try:
            link.conn.receive_datagram(data, addr, now)
        except Exception:
            # aioquic turns protocol errors into CONNECTION_CLOSE itself; anything escaping is a
            # bug reached by remote input. It must cost this connection only, not the endpoint.
            log.exception("tunnel %s: aioquic failed on a datagram; dropping the connection", addr)
            self.counters["internal_errors"] += 1
            self._finish(link, "internal error")
            return
        self._process(link)
        self._touched[link] = None

    def _accept(
        self,
        packet_type: QuicPacketType,
        version: int | None,
        dcid: bytes,
        data: bytes,
        addr: Address,
        now: float,
    ) -> _Link | None:
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
        if sum(1 for link in self._links if link.tunnel is None) >= MAX_HALF_OPEN:
            self.counters["half_open_full"] += 1
            return None
        conn = _QuicConnection(
            configuration=self._configuration(is_client=False),
            original_destination_connection_id=dcid,
        )
        link = _Link(conn, addr, now, client=False)
        self._links[link] = None
        # The client's Initials (and retransmissions) use the DCID it chose; everything after
        # them uses ours (RFC 9000 §7.2), and later ones arrive as ConnectionIdIssued.
        self._register(link, dcid)
        self._register(link, conn.host_cid)
        return link

    def _process(self, link: _Link) -> None:
        """Handle every event the connection has, in order."""
        conn = link.conn
        while (event := conn.next_event()) is not None:
            if isinstance(event, events.DatagramFrameReceived):
                tunnel = link.tunnel
                if tunnel is None or tunnel.closed:
                    self.counters["early_dropped"] += 1
                    continue
                tunnel.counters["datagrams_in"] += 1
                self.counters["datagrams_in"] += 1
                self.handler.datagram_received(tunnel, event.data)
            elif isinstance(event, events.StreamDataReceived):
                self._on_stream(link, event)
            elif isinstance(event, events.HandshakeCompleted):
                self._on_handshake(link, event)
            elif isinstance(event, events.StreamReset | events.StopSendingReceived):
                if event.stream_id == CONTROL_STREAM:
                    self._fail(link, "control stream reset by peer")
            elif isinstance(event, events.ConnectionIdIssued):
                self._register(link, event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                self._unregister(link, event.connection_id)
            elif isinstance(event, events.ConnectionTerminated):
                self._finish(link, _describe(event))
                return
        close = conn.close_event
        if close is not None and link.phase != "done":
            self._closing(link, _describe(close))

    def _on_handshake(self, link: _Link, event: events.HandshakeCompleted) -> None:
        if link.phase != "handshake":
            return
        if event.alpn_protocol != ALPN:
            self._reject(
                link, f"ALPN {event.alpn_protocol!r} is not {ALPN}", _ALERT_NO_APPLICATION_PROTOCOL
            )
            return
        chain = link.conn.peer_certificates()
        try:
            # The wall clock, not Trio's: certificates expire in calendar time.
            peer = verify_peer(chain, self._ca, now=datetime.datetime.now(datetime.UTC))
        except TunnelAuthError as exc:
            code = _ALERT_BAD_CERTIFICATE if chain else _ALERT_CERTIFICATE_REQUIRED
            self._reject(link, str(exc), code)
            return
        if link.expect is not None and peer != link.expect:
            self._reject(link, f"peer is {peer}, expected {link.expect}", _ALERT_BAD_CERTIFICATE)
            return
        link.peer = peer
        link.phase = "greeting"
        if link.client:
            link.conn.send_stream_data(CONTROL_STREAM, _line(HELLO))

    def _on_stream(self, link: _Link, event: events.StreamDataReceived) -> None:
        if event.stream_id != CONTROL_STREAM:
            self.counters["malformed"] += 1
            return
        if link.phase not in ("greeting", "open"):
            self.counters["early_dropped"] += 1
            return
        lines, dropped = link.lines(event.data)
        self._count_malformed(link, dropped)
        for line in lines:
            if link.phase not in ("greeting", "open"):
                return
            try:
                message = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
                message = None
            if not isinstance(message, dict):
                self._count_malformed(link, 1)
                continue
            if link.phase == "greeting":
                self._on_greeting(link, message)
                continue
            tunnel = link.tunnel
            assert tunnel is not None
            if tunnel.closed:
                return
            tunnel.counters["control_in"] += 1
            self.counters["control_in"] += 1
            self.handler.control_received(tunnel, message)
        if event.end_stream:
            # The control stream lives as long as the tunnel; a peer that ends it is broken.
            self._fail(link, "control stream finished by peer")

    def _on_greeting(self, link: _Link, message: dict[str, Any]) -> None:
        expected = WELCOME if link.client else HELLO
        if message.get("type") != expected["type"]:
            self._fail(link, f"expected a {expected['type']} line, got {message.get('type')!r}")
            return
        if not link.client:
            link.conn.send_stream_data(CONTROL_STREAM, _line(WELCOME))
        assert link.peer is not None
        tunnel = Tunnel(self, link, link.peer)
        link.tunnel = tunnel
        link.phase = "open"
        self.counters["handshakes"] += 1
        log.info("tunnel open: %s at %s:%d", link.peer, *link.remote)
        if link.waiter is not None:
            link.waiter.set()
        self.handler.tunnel_opened(tunnel)

    def _count_malformed(self, link: _Link, n: int) -> None:
        if n:
            self.counters["malformed"] += n
            if link.tunnel is not None:
                link.tunnel.counters["malformed"] += n

    # -- closing ---------------------------------------------------------------------------------

    def _reject(self, link: _Link, reason: str, code: int) -> None:
        """Refuse a peer that did not authenticate: close with a TLS alert (RFC 9001 §4.8)."""
        self.counters["auth_failures"] += 1
        log.warning("tunnel peer at %s:%d rejected: %s", *link.remote, reason)
        link.error = f"peer rejected: {reason}"
        link.conn.close(error_code=code, frame_type=0, reason_phrase=reason[:200])
        self._closing(link, link.error)
        self._touched[link] = None

    def _fail(self, link: _Link, reason: str) -> None:
        """Close a connection whose peer broke the control protocol."""
        if link.phase in ("closing", "done"):
            return
        log.warning("tunnel %s:%d: %s", *link.remote, reason)
        self.counters["malformed"] += 1
        link.conn.close(error_code=_APP_PROTOCOL_ERROR, reason_phrase=reason[:200])
        self._transmit(link)
        self._closing(link, reason)

    def _close_tunnel(self, link: _Link, reason: str, *, code: int) -> None:
        tunnel = link.tunnel
        if tunnel is None or tunnel.closed:
            return
        link.conn.close(error_code=code, reason_phrase=reason[:200])
        self._transmit(link)
        self._closing(link, reason)

    def _closing(self, link: _Link, reason: str) -> None:
        """The connection is going away (either side, any cause): tell whoever waits, once."""
        if link.phase in ("closing", "done"):
            return
        link.phase = "closing"
        if link.error is None:
            link.error = reason
        if link.waiter is not None:
            link.waiter.set()
        tunnel = link.tunnel
        if tunnel is not None and not tunnel.closed:
            tunnel.closed = True
            self.counters["closed"] += 1
            log.info("tunnel closed: %s at %s:%d: %s", tunnel.peer, *link.remote, reason)
            self.handler.tunnel_closed(tunnel, reason)

    def _finish(self, link: _Link, reason: str) -> None:
        """aioquic is done with the connection: forget it."""
        self._closing(link, reason)
        link.phase = "done"
        for cid in list(link.cids):
            self._unregister(link, cid)
        self._links.pop(link, None)
        self._touched.pop(link, None)
        self._pending.pop(link, None)

    def _abandon(self, link: _Link, reason: str) -> None:
        """Give up on a connection we dialed (timeout, failure, cancellation)."""
        if link.phase == "done":
            return
        if link.tunnel is not None and not link.tunnel.closed:
            self._close_tunnel(link, reason, code=_APP_CLOSED)
            return
        link.conn.close(error_code=_APP_CLOSED, reason_phrase=reason)
        self._transmit(link)
        self._closing(link, reason)

    def _shutdown(self) -> None:
        self._stopping = True
        now = trio.current_time()
        for link in list(self._links):
            if link.tunnel is not None and not link.tunnel.closed:
                self._close_tunnel(link, "endpoint stopped", code=_APP_CLOSED)
            else:
                link.conn.close(error_code=_APP_CLOSED, reason_phrase="endpoint stopped")
                self._transmit(link, now)
            self._finish(link, "endpoint stopped")

    # -- sending and timers ----------------------------------------------------------------------

    def _transmit(self, link: _Link, now: float | None = None) -> None:
        sock = self._sock
        if sock is None or link.phase == "done":
            return
        if now is None:
            now = trio.current_time()
        for data, addr in link.conn.datagrams_to_send(now):
            try:
                sock.sendto(data, addr)
                self.counters["packets_out"] += 1
            except (BlockingIOError, InterruptedError):
                self.counters["send_failed"] += 1  # a full buffer is loss; QUIC recovers
            except OSError as exc:
                self.counters["send_failed"] += 1
                log.debug("sendto %s failed: %s", addr, exc)
        if self._deadline(link) < self._armed_at:
            self._wake.set()

    def _deadline(self, link: _Link) -> float:
        timer = link.conn.get_timer()
        deadline = math.inf if timer is None else timer
        if link.phase == "open":
            deadline = min(deadline, self._keepalive_at(link))
        return deadline

    def _keepalive_at(self, link: _Link) -> float:
        # RFC 9000 §10.1.2: an ack-eliciting packet before a third of the idle timeout keeps
        # the peer's idle timer from firing even if one PING (or its ACK) is lost.
        return max(link.last_rx, link.last_ping) + self.idle_timeout / 3

    async def _timer_loop(self) -> None:
        while True:
            self._wake = trio.Event()
            self._armed_at = min((self._deadline(link) for link in self._links), default=math.inf)
            with trio.move_on_at(self._armed_at):
                await self._wake.wait()
            self._armed_at = -math.inf  # nobody needs to wake us while we work
            now = trio.current_time()
            for link in list(self._links):
                if self._deadline(link) <= now:
                    self._on_timer(link, now)

    def _on_timer(self, link: _Link, now: float) -> None:
        conn = link.conn
        timer = conn.get_timer()
        try:
            if timer is not None and timer <= now:
                conn.handle_timer(now)
            if link.phase == "open" and now >= self._keepalive_at(link):
                self._ping_uid += 1
                conn.send_ping(self._ping_uid)
                link.last_ping = now
                self.counters["keepalives"] += 1
        except Exception:
            log.exception("tunnel %s:%d: aioquic failed on a timer; dropping it", *link.remote)
            self.counters["internal_errors"] += 1
            self._finish(link, "internal error")
            return
        self._process(link)
        self._transmit(link, now)
