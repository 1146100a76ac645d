"""The node's signaling server: a WebSocket and a WHIP-style HTTP endpoint on one TCP port.

One port for both: each accepted connection's request head is read with h11. A WebSocket upgrade
on ``GET /v1/session`` is handed to trio-websocket together with the bytes already read (a stream
that replays them first); anything else is answered with h11, keep-alive included. Heads, bodies
and WebSocket messages are bounded, every read has a deadline, and closes are bounded: a slow or
malicious client costs one connection task for a bounded time and never the server.

Modules by layer, each importing only those above it in this list:

- :mod:`.messages`: client messages, error objects, the backend seam, limits (no I/O);
- :mod:`.admission`: the :class:`Gate`: access tokens and what each subject holds;
- :mod:`.limits`: fair admission: connections, offers per second and half-open sessions per
  source and subject, the setup deadline, the node's capacity held atomically;
- :mod:`.backend`: opening, attaching to and ending sessions through the backend, bounded and
  counted;
- :mod:`.http`: HTTP/1.1 framing with h11, the replay stream, bounded closes;
- :mod:`.whip`: the WHIP routes (RFC 9725 shape), health and static pages;
- :mod:`.websocket`: WebSocket sessions and their event forwarding (the message protocol);
- :mod:`.server`: :class:`SignalingServer`, the accept loop routing each connection.

Sessions survive their socket and their node (issue #13): the answer gives the client a
per-session secret (32 random bytes, URL-safe; never in the SDP, the ufrag or a log). With it a
new socket to any node takes the session over (``{"type": "attach", "session", "secret"}``,
answered ``attached``, or ``redirect`` to the owner), and a WHIP session URL
(``/v1/session/<id>/<secret>``) ends it with ``DELETE`` on any node. The session id alone, public
in every STUN check, controls nothing (issue #15). Close codes: 4001 the session moved, 4000 the
node is going away (both: re-attach), 4003 another socket attached (do not). The message protocol
is in :mod:`.websocket`, the HTTP routes in :mod:`.whip`, the backend's side of it in
:class:`SessionBackend` and :class:`SessionHandle`.
"""

from sessions.node.signaling.admission import Gate, node_gate
from sessions.node.signaling.limits import Capacity, Limiter, node_limits
from sessions.node.signaling.messages import (
    ATTACHED_ELSEWHERE,
    REATTACH,
    REATTACH_GOING_AWAY,
    SESSION_PATH,
    ClientMessageError,
    Redirect,
    SessionBackend,
    SessionHandle,
    SignalingLimits,
    SignalingRefused,
    parse_client_message,
)
from sessions.node.signaling.server import SignalingServer

__all__ = [
    "ATTACHED_ELSEWHERE",
    "REATTACH",
    "REATTACH_GOING_AWAY",
    "SESSION_PATH",
    "Capacity",
    "ClientMessageError",
    "Gate",
    "Limiter",
    "Redirect",
    "SessionBackend",
    "SessionHandle",
    "SignalingLimits",
    "SignalingRefused",
    "SignalingServer",
    "node_gate",
    "node_limits",
    "parse_client_message",
]
