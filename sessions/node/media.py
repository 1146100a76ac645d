"""The node's own media port: one UDP socket for every session on this node.

A new client is routed by the server ufrag in the USERNAME of its first STUN binding request (the
node minted that ufrag when it answered the offer); after that, by the client's address. Session
code never sees the socket: it gets datagrams from a bounded inbox and sends through a callable,
so the relays of the cluster (which deliver through QUIC tunnels) can replace this port without
touching a session.

The receive loop is relay/udp.py's: it waits for readability once and then drains the socket
without blocking until it would block. What a session holds of this port (``SessionPort``) is
library-level and lives in sessions/ports.py.
"""

from __future__ import annotations

import logging
import socket
from typing import final

import trio

from relay.udp import Address, bound_udp, drain_forever, kernel_drops, send_nowait
from sessions.ports import INBOX_SIZE, Inbound, PeerAddress, SessionPort
from sessions.webrtc import stun
from sessions.webrtc.errors import StunError

__all__ = ["MediaPort"]

log = logging.getLogger("parley.media")


@final
class MediaPort:
    """One UDP socket, many sessions. Start ``run`` with ``nursery.start``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.requested_port = port
        self.port = 0
        self._sock: socket.socket | None = None
        self._by_ufrag: dict[str, SessionPort] = {}
        self._by_addr: dict[Address, SessionPort] = {}
        self._by_session: dict[str, SessionPort] = {}
        self.counters = {
            "received": 0,
            "sent": 0,
            "unknown_source": 0,
            "unknown_ufrag": 0,
            "malformed_stun": 0,
            "inbox_full": 0,
            "send_failed": 0,
        }

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    def candidates(self, session_id: str, region: str = "") -> list[Address]:
        """The candidates of an answer: this port, the same for every session and region."""
        return [self.address]

    def hop(self, relay: str) -> tuple[float | None, str]:
        """No tunnel between the client and this port: the first hop is the whole way."""
        return 0.0, ""

    def mint_ufrag(self, session_id: str) -> str | None:
        """None: a node's own port routes any ufrag; the session's ICE core picks a random one."""
        return None

    def flush(self) -> None:
        """Nothing to do: every send went out at once."""

    def all_counters(self) -> dict[str, int]:
        """The counters, and what the kernel dropped at the port (its buffer was full)."""
        return {**self.counters, "kernel_drops": kernel_drops(self._sock)}

    def register(self, session_id: str, ufrag: str) -> SessionPort:
        """Route packets for ``ufrag`` to a new inbox for ``session_id``."""
        if ufrag in self._by_ufrag:
            raise ValueError(f"ufrag {ufrag!r} already routed")
        send, receive = trio.open_memory_channel[Inbound](INBOX_SIZE)
        port = SessionPort(session_id, ufrag, send, receive, self.send)
        self._by_ufrag[ufrag] = port
        self._by_session[session_id] = port
        return port

    def unregister(self, session_id: str) -> None:
        port = self._by_session.pop(session_id, None)
        if port is None:
            return
        self._by_ufrag.pop(port.ufrag, None)
        for addr in port.addresses:
            self._by_addr.pop(addr.socket_address, None)
        port.inbox_send.close()

    def send(self, data: bytes, addr: PeerAddress) -> None:
        """Send without waiting; a full socket buffer drops the datagram (counted)."""
        if self._sock is None:
            self.counters["send_failed"] += 1
            return
        # Only (host, port) goes to the socket: a direct client has no relay.
        if send_nowait(self._sock, data, addr.socket_address):
            self.counters["sent"] += 1
        else:
            self.counters["send_failed"] += 1

    def _route(self, data: bytes, addr: Address) -> SessionPort | None:
        port = self._by_addr.get(addr)
        if port is not None:
            return port
        # RFC 7983: only STUN (first byte 0-3) may introduce a new address.
        if not data or data[0] > 3:
            self.counters["unknown_source"] += 1
            return None
        try:
            username = stun.username_of(data)
        except StunError:
            self.counters["malformed_stun"] += 1
            return None
        if username is None:
            self.counters["unknown_source"] += 1
            return None
        # RFC 8445 §7.2.2: USERNAME is "<receiver ufrag>:<sender ufrag>"; ours comes first.
        port = self._by_ufrag.get(username.partition(":")[0])
        if port is None:
            self.counters["unknown_ufrag"] += 1
            return None
        # The session's ICE core still checks MESSAGE-INTEGRITY; an address is only cached here
        # for routing, and a forged check cannot make the session answer or send media to it.
        self._by_addr[addr] = port
        port.addresses.add(PeerAddress(*addr))
        return port

    def _deliver(self, data: bytes, addr: Address) -> None:
        self.counters["received"] += 1
        port = self._route(data, addr)
        if port is None:
            return
        try:
            port.inbox_send.send_nowait((data, PeerAddress(*addr), trio.current_time()))
        except trio.WouldBlock:
            # A session that cannot keep up loses its own packets, not everyone's.
            port.dropped_full += 1
            self.counters["inbox_full"] += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def run(
        self, *, task_status: trio.TaskStatus[MediaPort] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with bound_udp(self.host, self.requested_port) as raw:
            self.port = raw.getsockname()[1]
            self._sock = raw
            try:
                task_status.started(self)
                await drain_forever(raw, self._deliver)
            finally:
                self._sock = None
