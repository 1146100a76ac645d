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

Moves. A session that moves to another node in a planned move (see
:meth:`Transceiver.quiesce <sessions.transceiver.Transceiver.quiesce>`) takes its agent's state
along if the agent is a :class:`StatefulAgent`: the old node's agent saves it, a fresh agent of
the same kind on the new node loads it and goes on (the turn-echo agent keeps playing the reply
it was playing). An agent with a life elsewhere (the WebSocket bridge) is also a
:class:`MoveAwareAgent`: the new node's is told where the session came from, the old node's that
the session lives on elsewhere, so that neither ends the conversation. :class:`EchoAgent` has no
state worth moving.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sessions.agents.echo import FRAME_BYTES, EchoAgent
from sessions.agents.turn_echo import TurnEchoAgent
from sessions.turns import TurnEvent

if TYPE_CHECKING:
    from trio import TaskStatus

__all__ = [
    "FRAME_BYTES",
    "Agent",
    "DuckAwareAgent",
    "EchoAgent",
    "MoveAwareAgent",
    "ReactiveAgent",
    "RunningAgent",
    "StatefulAgent",
    "TurnEchoAgent",
]


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
class DuckAwareAgent(Protocol):
    """An agent that wants to hear of the first, tentative step of a barge-in.

    The session ducks an interruptible agent's reply (fades it out and holds it) within a frame
    or two of the user's voice coming in, before it knows whether the user is taking the turn.
    Either :meth:`Agent.on_interrupted` follows (it was a turn: the reply is dropped) or
    :meth:`on_resumed` (a cough, an "mm-hm": the reply goes on where it stopped). Both calls are
    optional: an agent without them is simply not told, and keeps working as before.
    """

    def on_maybe_interrupted(self, played_ms: int, now: float) -> None:
        """The reply is ducked at ``played_ms``; the user may be taking the turn. Keep the
        reply: nothing is dropped yet (a model may start thinking ahead)."""
        ...

    def on_resumed(self, now: float) -> None:
        """It was not a turn: the reply plays on from where it was ducked."""
        ...


@runtime_checkable
class ReactiveAgent(Protocol):
    """An agent with audio and events only in answer to the session's calls: what it heard
    (:meth:`Agent.on_audio`), a turn, an interruption, or audio it was already giving.

    While nothing plays (the client sends no audio and the agent's reply is over), the session
    then stops asking it for audio every 20 ms, and an idle session costs no work at all between
    its consent checks. ``reactive`` says so (:class:`EchoAgent` and :class:`TurnEchoAgent` are);
    an agent whose audio comes on its own (:class:`~sessions.agents.bridge.BridgeAgent`, from the
    network) is not, and is asked every 20 ms.
    """

    @property
    def reactive(self) -> bool:
        """True: nothing to pull or poll unless the session just gave the agent something."""
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


@runtime_checkable
class StatefulAgent(Agent, Protocol):
    """An :class:`Agent` whose state moves with its session in a planned move.

    Both calls are synchronous and made from the session's media tick: keep them quick and
    bounded (the state travels in the session's snapshot, at most
    :data:`~sessions.snapshot.MAX_AGENT_STATE` bytes).
    """

    def save_state(self, now: float) -> bytes:
        """The agent's state as bytes, at ``now``, for a fresh agent of the same kind on the
        session's next node. Times in it are ages: another node's clock has another origin."""
        ...

    def load_state(self, data: bytes, now: float) -> None:
        """Take up a state another node's agent saved (:meth:`save_state`), at ``now``; raise
        :class:`ValueError` for one that is not of this kind or not well-formed (the agent
        then starts fresh)."""
        ...


@runtime_checkable
class MoveAwareAgent(Protocol):
    """An agent that is told about its session's planned moves (the WebSocket bridge)."""

    def moved_in(self, *, from_node: str, to_node: str, epoch: int) -> None:
        """On the new node, once the move is final: the session came from ``from_node`` and is
        owned by ``to_node`` from ownership epoch ``epoch`` on."""
        ...

    def moved_out(self) -> None:
        """On the old node, when the session is handed off: it lives on elsewhere, so its
        agent must let go without ending the conversation."""
        ...
