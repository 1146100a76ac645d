"""Sans-I/O ICE-lite responder (RFC 8445 §2.5) with consent freshness (RFC 7675).

Parley's media port is a public server address, so it runs ICE in lite mode: it gathers no
candidates, sends no checks and nominates nothing. The client (a browser, aiortc) is a full
agent in the controlling role (RFC 8445 §6.1.1); it sends the connectivity checks, and this
module answers them (RFC 8445 §7.3), learns which source addresses are valid, and follows the
client's nomination (RFC 8445 §7.3.1.5, §7.3.2). Afterwards the client keeps checking the
selected pair every 5 s or so for its own consent freshness (RFC 7675 §5.1); we use those same
checks as our evidence that the client is still there and still wants our media, and declare
consent expired 30 s after the last one.

Nothing here does I/O or reads a clock: datagrams come in through :meth:`IceLiteResponder.
receive_stun` with their source address and the current time, replies come back as a list of
``(datagram, address)`` to send, and the owner drives the one timer with :meth:`~IceLiteResponder.
get_timer` / :meth:`~IceLiteResponder.handle_timer`. Every byte string a peer can send is
handled without raising: it is answered, or counted and dropped.

The package: :mod:`~sessions.webrtc.ice.responder` (the state machine, its transition table
and its events) and :mod:`~sessions.webrtc.ice.state` (credentials and the
:class:`IceState` value a session moves with, and :class:`PeerAddress`, where a client's
datagrams come from: its transport address and the relay they came through).
"""

from __future__ import annotations

from sessions.webrtc.ice.responder import (
    CONSENT_TIMEOUT,
    ConsentExpired,
    IceEvent,
    IceLiteResponder,
    PairNominated,
    PairValidated,
    ResponderState,
)
from sessions.webrtc.ice.state import MAX_PAIRS, IceState, PeerAddress, mint_credentials

__all__ = [
    "CONSENT_TIMEOUT",
    "MAX_PAIRS",
    "ConsentExpired",
    "IceEvent",
    "IceLiteResponder",
    "IceState",
    "PairNominated",
    "PairValidated",
    "PeerAddress",
    "ResponderState",
    "mint_credentials",
]
