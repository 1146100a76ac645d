"""Agents: what the user of a voice session talks to.

An agent is sans-I/O, like the :class:`~sessions.transceiver.Transceiver` that drives it. Every
20 ms the transceiver hands it the next frame of the user's voice (decoded, loss-concealed,
in playout order) with :meth:`Agent.on_audio`, and asks it for frames to send back with
:meth:`Agent.pull`. Frames are always :data:`FRAME_BYTES` of 48 kHz mono int16 PCM (20 ms,
RFC 7587 §4.1). Both calls must return quickly: they run inside the session's media tick.

:class:`EchoAgent` is the only agent so far: it plays the user's voice straight back.
"""

from __future__ import annotations

from typing import Protocol

from sessions.agents.echo import FRAME_BYTES, EchoAgent

__all__ = ["FRAME_BYTES", "Agent", "EchoAgent"]


class Agent(Protocol):
    """What a transceiver needs from an agent (:class:`EchoAgent` is one)."""

    def on_audio(self, pcm: bytes, now: float) -> None:
        """One 20 ms frame of 48 kHz mono int16 PCM heard from the user at ``now``."""
        ...

    def pull(self, now: float) -> bytes | None:
        """The next 20 ms frame to play to the user, or ``None`` if there is nothing yet."""
        ...
