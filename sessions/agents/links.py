"""What one bridge connection is: its limits and its per-connection state.

Kept apart from :mod:`sessions.agents.bridge`, which drives them: :class:`BridgeLimits` (queue
bounds and timeouts of a bridge) and :class:`Link` (one established WebSocket connection to an
agent, with its outgoing queue and what the bridge counts per connection).
"""

from __future__ import annotations

import urllib.parse
from typing import final

import attrs
import trio
import trio_websocket

__all__ = ["BridgeLimits", "Link", "redact_url"]

_positive_int = attrs.validators.gt(0)
_positive_float = attrs.validators.gt(0.0)


@final
@attrs.frozen
class BridgeLimits:
    """Queue bounds and timeouts of one bridge (the defaults suit a real deployment)."""

    #: agent audio queued for playout, in ms; beyond it new audio is dropped and counted
    max_playout_ms: int = attrs.field(default=30_000, validator=_positive_int)
    #: frames of user audio that may wait for the socket
    send_backlog_frames: int = attrs.field(default=5, validator=_positive_int)
    #: a socket write in progress for longer than this makes new user frames drop
    stall_ms: float = attrs.field(default=40.0, validator=_positive_float)
    #: first and largest pause between connection attempts, in seconds (doubling, +-20 % jitter)
    backoff_initial: float = attrs.field(default=0.2, validator=_positive_float)
    backoff_max: float = attrs.field(default=5.0, validator=_positive_float)
    #: TCP connect plus WebSocket handshake
    connect_timeout: float = attrs.field(default=5.0, validator=_positive_float)
    #: from our hello until the agent's
    hello_timeout: float = attrs.field(default=5.0, validator=_positive_float)
    #: our closing handshake
    close_timeout: float = attrs.field(default=1.0, validator=_positive_float)
    #: WebSocket pings find a dead agent whose socket never said so (a half-open TCP connection)
    ping_interval: float = attrs.field(default=5.0, validator=_positive_float)
    ping_timeout: float = attrs.field(default=10.0, validator=_positive_float)
    #: any message from the agent; a larger one closes the connection (1009)
    max_message_bytes: int = attrs.field(default=1 << 20, validator=_positive_int)
    #: a text message from the agent larger than this is malformed (dropped, the link lives)
    max_text_chars: int = attrs.field(default=64 * 1024, validator=_positive_int)
    #: events waiting for :meth:`BridgeAgent.poll_events`; more are dropped and counted
    max_events: int = attrs.field(default=256, validator=_positive_int)


@final
class Link:
    """One established connection: the socket, its outgoing queue, and per-connection state."""

    __slots__ = (
        "audio_backlog",
        "audio_frames",
        "discarding",
        "outgoing",
        "played_ms",
        "reason",
        "scope",
        "send_started",
        "ws",
    )

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        outgoing: trio.MemorySendChannel[str | bytes],
    ) -> None:
        self.ws = ws
        self.outgoing = outgoing
        self.scope = trio.CancelScope()
        #: user frames queued but not yet taken by the writer
        self.audio_backlog = 0
        #: user frames queued on this connection: the agent's audio clock (FRAME_MS each)
        self.audio_frames = 0
        #: trio time at which the write in progress began, None when the writer is idle
        self.send_started: float | None = None
        #: after an interruption, agent audio is stale until the agent's ``clear``
        self.discarding = False
        #: agent audio from this connection played since its last ``clear``, in ms
        self.played_ms = 0
        #: why the link ended (the first reason given wins)
        self.reason: str | None = None

    def end(self, reason: str) -> None:
        """Tear the link down (from any task, or from the sync side)."""
        if self.reason is None:
            self.reason = reason
        self.scope.cancel()


def redact_url(parts: urllib.parse.SplitResult) -> str:
    """The URL as logs show it: no credentials, no query string (it may carry a token)."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
