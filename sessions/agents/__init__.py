"""Agents: what the user of a voice session talks to.

An agent is sans-I/O, like the :class:`~sessions.transceiver.Transceiver` that drives it. Every
20 ms the transceiver hands it the next frame of the user's voice (decoded, loss-concealed,
in playout order) with :meth:`Agent.on_audio`, and asks it for frames to send back with
:meth:`Agent.pull`. Frames are always :data:`FRAME_BYTES` of 48 kHz mono int16 PCM (20 ms,
RFC 7587 §4.1). Both calls must return quickly: they run inside the session's media tick.
The user's turns arrive typed, as :data:`~sessions.turns.TurnEvent` values.

An agent with a life of its own beside the media (a connection to keep, like the WebSocket
:class:`~sessions.agents.bridge.BridgeAgent`) is a :class:`RunningAgent`: the session actor
starts its :meth:`RunningAgent.run` in its nursery and cancels it when the session ends.

:class:`EchoAgent` plays the user's voice straight back; :class:`TurnEchoAgent` plays each
finished turn back (the demo's default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sessions.agents.echo import FRAME_BYTES, EchoAgent
from sessions.agents.turn_echo import TurnEchoAgent
from sessions.turns import TurnEvent

if TYPE_CHECKING:
    from trio import TaskStatus

__all__ = ["FRAME_BYTES", "Agent", "EchoAgent", "RunningAgent", "TurnEchoAgent"]


class Agent(Protocol):
    """What a transceiver needs from an agent (:class:`EchoAgent` is one)."""

    @property
    def interruptible(self) -> bool:
        """Whether the user talking over the agent stops it (barge-in); an immediate echo is
        full-duplex by nature and is not interruptible."""
        ...

    def on_audio(self, pcm: bytes, now: float) -> None:
        """One 20 ms frame of 48 kHz mono int16 PCM heard from the user at ``now``."""
        ...

    def pull(self, now: float) -> bytes | None:
        """The next 20 ms frame to play to the user, or ``None`` if there is nothing yet."""
        ...

    def on_turn(self, event: TurnEvent, now: float) -> None:
        """The user's turn started (:class:`~sessions.turns.SpeechStarted`) or ended
        (:class:`~sessions.turns.SpeechStopped`)."""
        ...

    def on_interrupted(self, played_ms: int, now: float) -> None:
        """Barge-in: the session dropped the agent's queued audio; ``played_ms`` of the current
        reply reached the user. Drop whatever is still waiting."""
        ...

    def poll_events(self) -> list[dict[str, Any]]:
        """The agent's own events since the last call (``{"event": "agent_started", ...}``),
        forwarded to the client."""
        ...


@runtime_checkable
class RunningAgent(Agent, Protocol):
    """An :class:`Agent` that also runs a task of its own for as long as the session lives.

    The session actor tells one apart with ``isinstance(agent, RunningAgent)`` and starts it
    with ``nursery.start(agent.run)``, Trio's way: :meth:`run` calls
    ``task_status.started()`` once it is under way, never returns while the session lives,
    and stops when cancelled. It must not raise into the session: what goes wrong on its own
    side is counted and retried there.
    """

    async def run(self, *, task_status: TaskStatus[None] = ...) -> None:
        """Serve until cancelled (see the class docstring)."""
        ...
