"""One tunnel connection's protocol, sans I/O: handshake, authentication, greeting, control lines.

A :class:`Link` wraps one aioquic :class:`~aioquic.quic.connection.QuicConnection` (itself sans
I/O) and turns what it reports into the few events a tunnel endpoint acts on (:data:`LinkEvent`).
It takes datagrams and ``now`` in, and hands events out; it owns no socket, timer or task —
relay/tunnel/quic.py is the Trio glue that feeds it.

**Phases** (the table :data:`TRANSITIONS` below is the only authority; ``Link._set_phase`` is the
only place a phase changes, and a move the table does not list is a bug of ours and raises
:class:`LinkStateError`)::

    handshake ──TLS done, peer authenticated──► greeting ──hello/welcome──► open
        │                                          │                          │
        └──────── rejected, broken, lost, or closed by either side ───────────┴──► closing
                                                                                      │
                                                                 aioquic is done ──► done

**Greeting.** Control travels as JSON objects, one per line, on the bidirectional stream 0 (RFC
9000 §2.1: the client's first bidirectional stream). The client opens it right after the TLS
handshake with a hello line; the server answers with a welcome line once it has authenticated
the client. Only then is the link open on either side, and only later lines are reported.

**Authentication** is TLS 1.3 with certificates from the cluster CA (relay/tunnel/certs.py), in
both directions, and the identity is the certificate's ``parley://`` URI, not a host name. Once
TLS is done, each side runs :func:`~relay.tunnel.certs.verify_peer` on the peer's chain and,
if it dialed, checks the identity it expected (``Link._authenticate``); a peer that fails is
closed with a TLS alert code, counted in ``auth_failures``, and never opens. (aioquic verifies
a server's chain for its client but nothing for a server: relay/tunnel/connection.py says how
a server gets the client's certificate at all.)

Everything from the peer is remote input: bad control lines are counted and dropped, a broken
greeting or control stream closes the link; nothing the peer sends raises.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, Literal, final

import attrs
from aioquic.buffer import size_uint_var
from aioquic.quic import events
from aioquic.quic.packet import QuicErrorCode

from relay.addresses import Address
from relay.tunnel.certs import Identity, TunnelAuthError, verify_peer
from relay.tunnel.connection import ALPN, LinkConfig, TunnelConnection

__all__ = [
    "TRANSITIONS",
    "Closing",
    "ConnectionIdIssued",
    "ConnectionIdRetired",
    "ControlReceived",
    "DatagramReceived",
    "Link",
    "LinkEvent",
    "LinkStateError",
    "Opened",
    "Phase",
    "Terminated",
]

log = logging.getLogger("parley.tunnel")

Phase = Literal["handshake", "greeting", "open", "closing", "done"]

#: Every phase a link may move to from each phase; nothing else. ``closing`` is reachable from
#: every live phase because either side may give up at any time; ``done`` only through it, so
#: whoever waits on a link hears of its end exactly once.
TRANSITIONS: Final[Mapping[Phase, frozenset[Phase]]] = MappingProxyType(
    {
        "handshake": frozenset({"greeting", "closing"}),
        "greeting": frozenset({"open", "closing"}),
        "open": frozenset({"closing"}),
        "closing": frozenset({"done"}),
        "done": frozenset(),
    }
)

#: the control stream: the client's first bidirectional stream (RFC 9000 §2.1)
CONTROL_STREAM: Final = 0
#: the first control line each way; later lines belong to the endpoint's handler
HELLO: Final = {"type": "parley-hello", "version": 1}
WELCOME: Final = {"type": "parley-welcome", "version": 1}
#: DATAGRAM frames queued on one connection and not yet sent (congestion-limited): real-time
#: media is better dropped than delivered late
MAX_QUEUED_DATAGRAMS: Final = 1024
MAX_CONTROL_LINE: Final = 65536
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
APP_CLOSED: Final = 0
APP_PROTOCOL_ERROR: Final = 1

#: what each tunnel counts (its endpoint counts the same, over all its links, and more)
TUNNEL_COUNTERS: Final = (
    "datagrams_in",
    "datagrams_out",
    "dropped_too_big",
    "dropped_closed",
    "dropped_backlog",
    "control_in",
    "control_out",
    "malformed",
)


class LinkStateError(RuntimeError):
    """A phase change the transition table does not allow: a local programming error."""


# -- events ------------------------------------------------------------------------------------


@final
@attrs.frozen
class Opened:
    """Both sides authenticated and greeted: the link is a tunnel now."""


@final
@attrs.frozen
class DatagramReceived:
    """A DATAGRAM frame (RFC 9221) on an open link."""

    data: bytes


@final
@attrs.frozen
class ControlReceived:
    """A control line after the greeting, as its JSON object."""

    message: dict[str, Any]


@final
@attrs.frozen
class Closing:
    """The link started to close. ``graceful``: a close without error (RFC 9000 §20: NO_ERROR
    or our APPLICATION_CLOSE 0), as when either side stops; otherwise the link was lost or
    broken (idle timeout, protocol or authentication failure, an error code from the peer)."""

    reason: str
    graceful: bool


@final
@attrs.frozen
class ConnectionIdIssued:
    """A connection ID of ours that the peer may now use (route it to this link)."""

    cid: bytes


@final
@attrs.frozen
class ConnectionIdRetired:
    """A connection ID of ours the peer gave up (stop routing it)."""

    cid: bytes


@final
@attrs.frozen
class Terminated:
    """aioquic is done with the connection (its closing or draining period ended, RFC 9000
    §10.2): forget the link. ``reason`` and ``graceful`` as for :class:`Closing`."""

    reason: str
    graceful: bool


LinkEvent = (
    Opened
    | DatagramReceived
    | ControlReceived
    | Closing
    | ConnectionIdIssued
    | ConnectionIdRetired
    | Terminated
)


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


def _graceful(event: events.ConnectionTerminated) -> bool:
    # NO_ERROR (RFC 9000 §20.1) and our APPLICATION_CLOSE 0 are the same number. aioquic's own
    # verdicts (idle timeout, no viable path) carry an error code, so they are not graceful.
    return event.error_code == QuicErrorCode.NO_ERROR


@final
class Link:
    """One QUIC connection of an endpoint, from its first packet until aioquic terminates it.

    Make one with :meth:`dial` or :meth:`accept`; feed it with :meth:`receive` and
    :meth:`handle_timer`; take its events with :meth:`next_event` until None; send what it
    queued with ``conn.datagrams_to_send`` (by the endpoint). ``totals`` is the endpoint's
    counters, which every link adds to; ``counters`` are this link's own, the tunnel's once open.
    """

    __slots__ = (
        "_control",
        "_ended",
        "_lines",
        "_ping_uid",
        "_skipping",
        "cids",
        "client",
        "config",
        "conn",
        "counters",
        "error",
        "expect",
        "last_ping",
        "last_rx",
        "max_datagram",
        "opened",
        "peer",
        "phase",
        "remote",
        "totals",
    )

    def __init__(
        self,
        config: LinkConfig,
        conn: TunnelConnection,
        remote: Address,
        now: float,
        *,
        client: bool,
        totals: dict[str, int],
        expect: Identity | None = None,
    ) -> None:
        self.config = config
        self.conn = conn
        self.remote = remote
        self.client = client
        self.totals = totals
        #: the identity the peer must prove (a client pins the relay it dials), if any
        self.expect = expect
        self.counters: dict[str, int] = dict.fromkeys(TUNNEL_COUNTERS, 0)
        self.cids: set[bytes] = set()
        self.phase: Phase = "handshake"
        #: whether the link was ever open (it has a tunnel, closed or not)
        self.opened = False
        #: who the peer proved to be, once authenticated
        self.peer: Identity | None = None
        #: why the link failed or closed, once it has
        self.error: str | None = None
        #: the largest DATAGRAM payload the open link takes (0 before)
        self.max_datagram = 0
        self.last_rx = now
        self.last_ping = now
        self._control = bytearray()
        self._skipping = False
        self._lines: deque[bytes] = deque()
        self._ended = False
        self._ping_uid = 0

    @classmethod
    def dial(
        cls,
        config: LinkConfig,
        remote: Address,
        now: float,
        *,
        totals: dict[str, int],
        expect: Identity | None = None,
    ) -> Link:
        """A client link to ``remote``; its first Initial is queued."""
        conn = TunnelConnection(configuration=config.quic(is_client=True))
        conn.connect(remote, now)
        return cls(config, conn, remote, now, client=True, totals=totals, expect=expect)

    @classmethod
    def accept(
        cls, config: LinkConfig, remote: Address, now: float, dcid: bytes, *, totals: dict[str, int]
    ) -> Link:
        """A server link for a client whose first Initial was addressed to ``dcid``."""
        conn = TunnelConnection(
            configuration=config.quic(is_client=False), original_destination_connection_id=dcid
        )
        return cls(config, conn, remote, now, client=False, totals=totals)

    def __repr__(self) -> str:
        return f"<Link {self.peer or '?'} at {self.remote[0]}:{self.remote[1]} {self.phase}>"

    # -- the one place a phase changes -----------------------------------------------------------

    def _set_phase(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise LinkStateError(f"a link cannot go from {self.phase} to {phase}")
        self.phase = phase
        if phase == "open":
            self.opened = True

    def _mark_closing(self, reason: str) -> bool:
        """Enter ``closing`` (keeping the first reason as ``error``); False if already there."""
        if self.phase in ("closing", "done"):
            return False
        self._set_phase("closing")
        if self.error is None:
            self.error = reason
        return True

    def _closing(self, reason: str, *, graceful: bool) -> Closing | None:
        return Closing(reason, graceful) if self._mark_closing(reason) else None

    # -- input -----------------------------------------------------------------------------------

    def receive(self, data: bytes, addr: Address, now: float) -> None:
        """One UDP datagram for this connection. aioquic turns protocol errors into a
        CONNECTION_CLOSE itself; whatever else it raises is a bug of aioquic's (the endpoint
        drops the link)."""
        self.last_rx = now
        self.conn.receive_datagram(data, addr, now)

    def deadline(self) -> float:
        """When :meth:`handle_timer` is due next (aioquic's timer, or a keepalive)."""
        timer = self.conn.get_timer()
        deadline = math.inf if timer is None else timer
        if self.phase == "open":
            deadline = min(deadline, self._keepalive_at())
        return deadline

    def _keepalive_at(self) -> float:
        # RFC 9000 §10.1.2: an ack-eliciting packet before a third of the idle timeout keeps
        # the peer's idle timer from firing even if one PING (or its ACK) is lost.
        return max(self.last_rx, self.last_ping) + self.config.idle_timeout / 3

    def handle_timer(self, now: float) -> None:
        """Run aioquic's timer if due, and send a keepalive PING if one is due."""
        timer = self.conn.get_timer()
        if timer is not None and timer <= now:
            self.conn.handle_timer(now)
        if self.phase == "open" and now >= self._keepalive_at():
            self._ping_uid += 1
            self.conn.send_ping(self._ping_uid)
            self.last_ping = now
            self.totals["keepalives"] += 1

    # -- events ----------------------------------------------------------------------------------

    def next_event(self) -> LinkEvent | None:
        """The next event the endpoint must act on; None when there is none until more input.

        Lazy on purpose: what the endpoint does about one event (a handler closing the tunnel)
        decides what becomes of the next (a datagram after it is dropped, not reported).
        """
        while self.phase != "done":
            if self._lines or self._ended:
                event = self._next_line()
            else:
                quic_event = self.conn.next_event()
                if type(quic_event) is events.DatagramFrameReceived and self.phase == "open":
                    # Media, nearly every event of an open tunnel: the short way.
                    self.totals["datagrams_in"] += 1
                    self.counters["datagrams_in"] += 1
                    return DatagramReceived(quic_event.data)
                if quic_event is None:
                    close = self.conn.close_event
                    if close is None:
                        return None
                    return self._closing(_describe(close), graceful=_graceful(close))
                event = self._on_quic_event(quic_event)
            if event is not None:
                return event
        return None

    def _on_quic_event(self, event: events.QuicEvent) -> LinkEvent | None:
        if isinstance(event, events.DatagramFrameReceived):
            if self.phase != "open":
                self.totals["early_dropped"] += 1
                return None
            self._count("datagrams_in")
            return DatagramReceived(event.data)
        if isinstance(event, events.StreamDataReceived):
            return self._on_stream(event)
        if isinstance(event, events.HandshakeCompleted):
            return self._authenticate(event)
        if isinstance(event, events.StreamReset | events.StopSendingReceived):
            if event.stream_id == CONTROL_STREAM:
                return self._fail("control stream reset by peer")
            return None
        if isinstance(event, events.ConnectionIdIssued):
            return ConnectionIdIssued(event.connection_id)
        if isinstance(event, events.ConnectionIdRetired):
            return ConnectionIdRetired(event.connection_id)
        if isinstance(event, events.ConnectionTerminated):
            return Terminated(_describe(event), _graceful(event))
        return None

    def _authenticate(self, event: events.HandshakeCompleted) -> LinkEvent | None:
        """The authentication policy: our ALPN, a cluster certificate, the expected identity."""
        if self.phase != "handshake":
            return None
        if event.alpn_protocol != ALPN:
            reason = f"ALPN {event.alpn_protocol!r} is not {ALPN}"
            return self._reject(reason, _ALERT_NO_APPLICATION_PROTOCOL)
        chain = self.conn.peer_certificates()
        try:
            peer = verify_peer(chain, self.config.ca, now=self.config.wall_clock())
        except TunnelAuthError as exc:
            code = _ALERT_BAD_CERTIFICATE if chain else _ALERT_CERTIFICATE_REQUIRED
            return self._reject(str(exc), code)
        if self.expect is not None and peer != self.expect:
            return self._reject(f"peer is {peer}, expected {self.expect}", _ALERT_BAD_CERTIFICATE)
        self.peer = peer
        self._set_phase("greeting")
        if self.client:
            self.conn.send_stream_data(CONTROL_STREAM, _line(HELLO))
        return None

    def _reject(self, reason: str, code: int) -> Closing | None:
        """Refuse a peer that did not authenticate: close with a TLS alert (RFC 9001 §4.8)."""
        self.totals["auth_failures"] += 1
        log.warning("tunnel peer rejected", extra={"remote": _show(self.remote), "reason": reason})
        self.error = f"peer rejected: {reason}"
        self.conn.close(error_code=code, frame_type=0, reason_phrase=reason[:200])
        return self._closing(self.error, graceful=False)

    def _on_stream(self, event: events.StreamDataReceived) -> LinkEvent | None:
        if event.stream_id != CONTROL_STREAM:
            self.totals["malformed"] += 1
            return None
        if self.phase not in ("greeting", "open"):
            self.totals["early_dropped"] += 1
            return None
        lines, dropped = self._split(event.data)
        self._count("malformed", dropped)
        self._lines.extend(lines)
        # The control stream lives as long as the tunnel; a peer that ends it is broken.
        self._ended = event.end_stream
        return None

    def _split(self, data: bytes) -> tuple[list[bytes], int]:
        """Complete control lines in ``data`` (after what came before) and how many over-long
        lines were dropped. A line longer than MAX_CONTROL_LINE is discarded up to its end, so
        the stream stays in step without holding unbounded bytes."""
        buf = self._control
        buf += data
        out: list[bytes] = []
        dropped = 0
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            if self._skipping:
                self._skipping = False
            else:
                out.append(bytes(buf[start:end]))
            start = end + 1
        del buf[:start]
        if len(buf) > MAX_CONTROL_LINE:
            if not self._skipping:
                dropped += 1
            self._skipping = True
            buf.clear()
        return out, dropped

    def _next_line(self) -> LinkEvent | None:
        if self.phase not in ("greeting", "open"):
            # Closed meanwhile: the rest of what the peer sent is moot.
            self._lines.clear()
            self._ended = False
            return None
        if not self._lines:
            self._ended = False
            return self._fail("control stream finished by peer")
        line = self._lines.popleft()
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
            message = None
        if not isinstance(message, dict):
            self._count("malformed")
            return None
        if self.phase == "greeting":
            return self._greet(message)
        self._count("control_in")
        return ControlReceived(message)

    def _greet(self, message: dict[str, Any]) -> LinkEvent | None:
        expected = WELCOME if self.client else HELLO
        if message.get("type") != expected["type"]:
            return self._fail(f"expected a {expected['type']} line, got {message.get('type')!r}")
        if not self.client:
            self.conn.send_stream_data(CONTROL_STREAM, _line(WELCOME))
        self._set_phase("open")
        by_peer = _largest_payload(self.conn.peer_max_datagram_frame_size or 0)
        by_packet = _largest_payload(self.config.max_datagram_size - _SHORT_PACKET_OVERHEAD)
        self.max_datagram = min(by_peer, by_packet)
        self.totals["handshakes"] += 1
        return Opened()

    def _fail(self, reason: str) -> Closing | None:
        """Close a connection whose peer broke the control protocol."""
        if self.phase in ("closing", "done"):
            return None
        if not self.opened:  # an open tunnel's end is logged by the endpoint, with this reason
            log.warning(
                "tunnel protocol error", extra={"remote": _show(self.remote), "reason": reason}
            )
        self.totals["malformed"] += 1
        self.conn.close(error_code=APP_PROTOCOL_ERROR, reason_phrase=reason[:200])
        return self._closing(reason, graceful=False)

    def _count(self, name: str, n: int = 1) -> None:
        """Count on the endpoint and, once the link has been a tunnel, on the tunnel."""
        if n:
            self.totals[name] += n
            if self.opened:
                self.counters[name] += n

    # -- output ----------------------------------------------------------------------------------

    def send_datagram(self, data: bytes) -> bool:
        """Queue ``data`` as one DATAGRAM frame; False (counted) when the link is not open,
        ``data`` is longer than :attr:`max_datagram`, or too many datagrams already wait."""
        if self.phase != "open":
            self._count("dropped_closed")
            return False
        if len(data) > self.max_datagram:
            self._count("dropped_too_big")
            return False
        conn = self.conn
        if conn.queued_datagrams >= MAX_QUEUED_DATAGRAMS:
            self._count("dropped_backlog")
            return False
        conn.send_datagram_frame(data)
        # _count's work, without its call: an open link counts on the tunnel too.
        self.totals["datagrams_out"] += 1
        self.counters["datagrams_out"] += 1
        return True

    def send_control(self, message: dict[str, Any]) -> bool | Closing:
        """Queue one control line: True if queued, False (counted) if the link is not open, a
        :class:`Closing` if the peer had ended the control stream (the link fails and closes:
        without its control stream a tunnel is broken). ``message`` must be JSON-serializable
        (TypeError or ValueError otherwise: a local error)."""
        if self.phase != "open":
            self._count("dropped_closed")
            return False
        data = _line(message)
        try:
            self.conn.send_stream_data(CONTROL_STREAM, data)
        except ValueError:
            # aioquic refuses once the stream is finished, which only the peer can cause
            # (a reset; RFC 9000 §3.1).
            return self._fail("control stream closed by peer") or False
        self._count("control_out")
        return True

    def close(self, code: int, reason: str) -> bool:
        """Queue a CONNECTION_CLOSE with the application ``code`` (RFC 9000 §19.19) and start
        closing; True if this started it (whoever waits on the link must hear of it)."""
        if self.phase == "done":
            return False
        self.conn.close(error_code=code, reason_phrase=reason[:200])
        return self._mark_closing(reason)

    def finish(self, reason: str) -> bool:
        """aioquic is done with the connection, or the endpoint gives up on it: ``done``. True
        if it had not started closing before (whoever waits on the link must hear of it)."""
        started = self._mark_closing(reason)
        self._set_phase("done")
        return started


def _show(addr: Address) -> str:
    return f"{addr[0]}:{addr[1]}"
