"""The echo agent: plays the user's voice straight back, the classic echo test.

It is sans-I/O like the transceiver that drives it: :meth:`EchoAgent.on_audio` is handed each
20 ms frame the jitter buffer plays out and :meth:`EchoAgent.pull` is asked for the next frame to
send, both with the caller's clock. Nothing is delayed on purpose, so what the user hears back
lags by the network round trip plus both jitter buffers, which is what an echo test measures.
"""

from __future__ import annotations

import collections
from typing import Any, Final, final

from sessions.audio.pacer import FRAME_TIMESTAMP
from sessions.turns import TurnEvent

__all__ = ["FRAME_BYTES", "EchoAgent"]

#: One 20 ms frame of 48 kHz mono int16 PCM: 960 samples of 2 bytes (RFC 7587 §4.1 clock).
FRAME_BYTES: Final = 2 * FRAME_TIMESTAMP
#: Default bound on frames waiting to be pulled (half a second).
DEFAULT_MAX_FRAMES: Final = 25


@final
class EchoAgent:
    """Echoes every frame heard, in order, as soon as it is pulled.

    The queue is bounded by ``max_frames``: when the caller pulls more slowly than frames
    arrive (it is not sending, or it stalled) the oldest frames are dropped, so the echo never
    lags by more than ``max_frames * 20 ms``. The agent holds no state worth moving with a
    session: a restored session starts with a fresh, empty echo.
    """

    __slots__ = ("_queue", "dropped", "max_frames")

    #: the echo talks while the user talks: that is the point, not a barge-in
    interruptible: Final = False
    #: it has nothing but what it heard (sessions.agents.ReactiveAgent)
    reactive: Final = True

    def __init__(self, max_frames: int = DEFAULT_MAX_FRAMES) -> None:
        if max_frames < 1:
            raise ValueError("max_frames must be at least 1")
        self.max_frames: Final = max_frames
        self._queue: collections.deque[bytes] = collections.deque()
        #: frames thrown away because nobody pulled them in time
        self.dropped = 0

    def on_audio(self, pcm: bytes, now: float) -> None:
        """Take one 20 ms frame of 48 kHz mono int16 PCM from the user."""
        if len(pcm) != FRAME_BYTES:
            # The transceiver always hands out whole frames: anything else is a local bug.
            raise ValueError(f"a frame is {FRAME_BYTES} bytes of PCM, got {len(pcm)}")
        self._queue.append(pcm)
        while len(self._queue) > self.max_frames:
            self._queue.popleft()
            self.dropped += 1

    def pull(self, now: float) -> bytes | None:
        """The next 20 ms frame to play, or ``None`` if nothing is waiting."""
        return self._queue.popleft() if self._queue else None

    def on_turn(self, event: TurnEvent, now: float) -> None:
        """Turns do not matter to an immediate echo."""

    def on_interrupted(self, played_ms: int, now: float) -> None:
        """The user talked over the echo: what was waiting is stale."""
        self._queue.clear()

    def poll_events(self) -> list[dict[str, Any]]:
        return []

    @property
    def queued(self) -> int:
        """Frames waiting to be pulled."""
        return len(self._queue)
