"""The turn-echo agent: once the user's turn ends, it plays the whole turn back.

It is the demo's default: talk, stop, and hear yourself — which exercises everything a real voice
agent needs from the session (turn detection, an agent reply after the turn, barge-in).

The agent keeps the user's recent audio itself (a bounded ring of timestamped frames), because
its sync side is all an agent gets. When ``SpeechStopped`` arrives it queues the frames from a
little before ``SpeechStarted.at`` (the first voiced frame, so the onset is not cut) to a little
after ``SpeechStopped.at`` (the last voiced frame) for playback. If the user talks
over the reply (barge-in), the rest of the reply is dropped.
"""

from __future__ import annotations

import collections
from typing import Any, Final, final

from sessions.agents.echo import FRAME_BYTES
from sessions.turns import SpeechStarted, TurnEvent

__all__ = ["TurnEchoAgent"]

#: frames kept from before a turn starts
PRE_ROLL_FRAMES: Final = 50
#: the reply starts this long before the turn's first voiced frame, so no onset is cut
PRE_ROLL_SECONDS: Final = 0.2
#: after the last voiced frame, this much of the following silence is part of the reply
TAIL_SECONDS: Final = 0.2
#: a turn longer than this is cut (bounded memory); the reply is the first part
MAX_TURN_FRAMES: Final = 30 * 50


@final
class TurnEchoAgent:
    """Plays each finished user turn back; stops when interrupted."""

    interruptible: Final = True

    def __init__(self) -> None:
        self._recent: collections.deque[tuple[float, bytes]] = collections.deque(
            maxlen=PRE_ROLL_FRAMES + MAX_TURN_FRAMES
        )
        self._turn_start: float | None = None
        self._reply: collections.deque[bytes] = collections.deque()
        self._events: list[dict[str, Any]] = []
        self._speaking = False
        self.turns_played = 0
        self.interruptions = 0

    def on_audio(self, pcm: bytes, now: float) -> None:
        if len(pcm) != FRAME_BYTES:
            raise ValueError(f"a frame is {FRAME_BYTES} bytes of PCM, got {len(pcm)}")
        self._recent.append((now, pcm))

    def on_turn(self, event: TurnEvent, now: float) -> None:
        if isinstance(event, SpeechStarted):
            self._turn_start = event.at
        elif self._turn_start is not None:
            start = self._turn_start - PRE_ROLL_SECONDS
            end = event.at + TAIL_SECONDS
            frames = [pcm for at, pcm in self._recent if start - 0.001 <= at <= end]
            self._turn_start = None
            if frames:
                self._reply.extend(frames[:MAX_TURN_FRAMES])
                self._speaking = True
                self.turns_played += 1
                self._events.append(
                    {"event": "agent_started", "turn": event.turn, "ms": 20 * len(frames)}
                )

    def on_interrupted(self, played_ms: int, now: float) -> None:
        if self._speaking or self._reply:
            self.interruptions += 1
            self._reply.clear()
            self._speaking = False

    def pull(self, now: float) -> bytes | None:
        if self._reply:
            return self._reply.popleft()
        if self._speaking:
            self._speaking = False
            self._events.append({"event": "agent_finished"})
        return None

    def poll_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events
