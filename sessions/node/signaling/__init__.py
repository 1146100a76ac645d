"""The node's signaling server: a WebSocket and a WHIP-style HTTP endpoint on one TCP port.

One port for both: each accepted connection's request head is read with h11. A WebSocket upgrade
on ``GET /v1/session`` is handed to trio-websocket together with the bytes already read (a stream
that replays them first); anything else is answered with h11, keep-alive included. Heads, bodies
and WebSocket messages are bounded, every read has a deadline, and closes are bounded: a slow or
malicious client costs one connection task for a bounded time and never the server.

Modules by layer, each importing only those above it in this list:

- :mod:`.messages`: client messages, error objects, the backend seam, limits (no I/O);
- :mod:`.backend`: opening and closing sessions through the backend, bounded and counted;
- :mod:`.http`: HTTP/1.1 framing with h11, the replay stream, bounded closes;
- :mod:`.whip`: the WHIP routes (RFC 9725 shape), health and static pages;
- :mod:`.websocket`: WebSocket sessions and their event forwarding (the message protocol);
- :mod:`.server`: :class:`SignalingServer`, the accept loop routing each connection.
"""

from sessions.node.signaling.messages import (
    SESSION_PATH,
    ClientMessageError,
    SessionBackend,
    SessionHandle,
    SignalingLimits,
    SignalingRefused,
    parse_client_message,
)
from sessions.node.signaling.server import SignalingServer

__all__ = [
    "SESSION_PATH",
    "ClientMessageError",
    "SessionBackend",
    "SessionHandle",
    "SignalingLimits",
    "SignalingRefused",
    "SignalingServer",
    "parse_client_message",
]
