"""What a session sends and receives through: its port on a packet path.

A session actor (sessions/session.py) never sees a socket: datagrams reach it through a bounded
inbox and leave through a callable. What stands behind the port is the node daemon's business —
its own UDP port (sessions/node/media.py ``MediaPort``) or the cluster's relays through QUIC
tunnels (sessions/node/relayed.py ``RelayedMedia``) — and both offer the same
:class:`PacketPath`, so session code runs unchanged on either. A client's address, either way,
is a :class:`~sessions.webrtc.ice.PeerAddress`: its transport address and the relay (if any) its
datagrams come through; the path sends to ``addr.socket_address`` through ``addr.relay``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol, final

import attrs
import trio

from relay.addresses import Address
from sessions.webrtc.ice import PeerAddress

__all__ = [
    "INBOX_SIZE",
    "Datagram",
    "Inbound",
    "PacketPath",
    "PeerAddress",
    "SendFn",
    "SessionPort",
]

#: a datagram as a session receives it: (payload, the client address it came from)
Datagram = tuple[bytes, PeerAddress]
#: a datagram in a session's inbox: payload, client address, and when it arrived (Trio's
#: clock), so that a session that takes its inbox on its own tick still times each packet
#: from its arrival (the jitter buffer's transit), not from the tick
Inbound = tuple[bytes, PeerAddress, float]
#: how a session sends: (payload, client address)
SendFn = Callable[[bytes, PeerAddress], None]

#: datagrams a session's inbox holds; past it, that session (and only it) loses what arrives
INBOX_SIZE: Final = 256


class PacketPath(Protocol):
    """What the node's session backend needs of a packet path: the node's own port, or the
    relays' tunnels in a cluster."""

    def candidates(self, session_id: str, region: str = "") -> list[Address]: ...
    def hop(self, relay: str) -> tuple[float | None, str]: ...
    def mint_ufrag(self, session_id: str) -> str | None: ...
    def register(self, session_id: str, ufrag: str) -> SessionPort: ...
    def unregister(self, session_id: str) -> None: ...


@final
@attrs.define(eq=False)
class SessionPort:
    """What a session sees of the packet path: an inbox and a way to send."""

    session_id: str
    ufrag: str
    inbox_send: trio.MemorySendChannel[Inbound]
    inbox: trio.MemoryReceiveChannel[Inbound]
    send: SendFn
    #: client addresses the path has delivered from (for routing, and to forget them at the end)
    addresses: set[PeerAddress] = attrs.field(factory=set)
    dropped_full: int = 0
    #: called after a batch of sends: a tunnel transmits what the batch queued at once
    flush: Callable[[], None] = lambda: None
