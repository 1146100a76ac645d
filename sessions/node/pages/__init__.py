"""Static pages the node's signaling port serves (``SignalingServer(pages=...)``).

``echo.html`` is the demo page: a browser client that calls the node over the WebSocket on the same
host and port, plays the agent back (the turn-echo by default), and shows the session's turn and
agent events, its state and live WebRTC stats (RTT, jitter, loss, levels). It loads nothing else.
"""

from __future__ import annotations

import functools
from importlib import resources

HTML = "text/html; charset=utf-8"


@functools.cache
def echo_page() -> bytes:
    """The bytes of ``echo.html`` (package data, read once)."""
    return resources.files(__name__).joinpath("echo.html").read_bytes()
