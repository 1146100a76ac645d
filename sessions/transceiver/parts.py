"""What the voice loop hands out: encoded frames to send, and its parts for a planned move."""

from __future__ import annotations

from typing import final

import attrs

__all__ = ["MovingParts", "OutboundFrame"]


@final
@attrs.frozen
class OutboundFrame:
    """One encoded Opus frame for the transport to send now (RFC 7587): its RTP timestamp,
    whether it starts a talkspurt (RFC 3551 §4.1 marker) and the tick deadline it was due at."""

    payload: bytes
    timestamp: int
    marker: bool
    deadline: float


@final
@attrs.frozen
class MovingParts:
    """What a quiesced voice loop hands to the next owner (see :meth:`VoiceLoop.moving_parts`)."""

    #: RTP timestamp of our next frame, as of the quiesce
    next_timestamp: int
    #: user turns so far
    turns: int
    #: the client's packets not yet played out: (sequence number, timestamp, payload, seconds
    #: since it arrived)
    playout: tuple[tuple[int, int, bytes, float], ...]
    #: our PCM frames queued for sending
    pending: tuple[bytes, ...]
    #: the agent's :meth:`~sessions.agents.StatefulAgent.save_state`, or ``b""``
    agent_state: bytes
    #: seconds since the first voiced frame of the user turn still open (the last one), if any
    open_turn: float | None = None
