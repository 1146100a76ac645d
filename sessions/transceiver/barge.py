"""Barge-in in two steps: react at once (duck the agent), decide later (interrupt or resume).

The voice loop (:mod:`sessions.transceiver.voice`) asks :class:`BargeIn` on every frame it
plays out what to do with the agent's reply while an interruptible agent is on the air. The
rules, with the durations of :class:`~sessions.turns.TurnConfig` in whole 20 ms frames, as a
transition table (state, input -> action, next state):

====================  ==========================================  ===========  ==========
state                 input                                        action       next
====================  ==========================================  ===========  ==========
listening             ``duck_after_ms`` of voice in a row          duck         ducked
ducked                ``interrupt_ms`` of voice counted since the  interrupt    listening
                      onset, and the turn detector started a turn
ducked                ``release_ms`` without voice, or             resume       listening
                      ``duck_max_ms`` since the duck
====================  ==========================================  ===========  ==========

* **duck**: the next frame the pacer sends is faded out over ``ramp_ms`` (a raised cosine: no
  click), then given back to the pacer, which is held: the reply stops where it was, nothing
  is dropped. The agent is told (``maybe_interrupted``), the client gets ``agent_ducked``.
  With the default ``duck_after_ms`` of 20 ms the duck is decided on the first voiced frame
  played out, and the first faded frame is the very next one the pacer sends: in the same
  tick, or up to a frame later when the pacer's tick falls just before the playout's.
  :class:`Duck` records each one's timing, from the voiced frame's arrival at the node.
* **interrupt**: as barge-in always was: the held reply is dropped, the agent hears
  ``played_ms`` (what was played in full before the duck) and the client
  ``agent_interrupted``. The turn detector's ``speech_started`` for the turn, held while the
  duck lasted, goes out just before, back-dated as always.
* **resume**: it was not a turn (a cough, a click, an "mm-hm"). The pacer is released and the
  frame that was faded out is played again, faded in; the agent hears ``agent_resumed``, so
  does the client. A turn the detector started on the burst is dismissed
  (:meth:`~sessions.turns.TurnDetector.dismiss`): neither the agent nor the client ever hears
  of it.

Echo. The voiced decisions come from the turn detector's classifier behind :class:`EchoGate`:
a frame the session's :class:`~sessions.audio.echo.EchoEstimator` explains as the agent's own
voice coming back is not voiced, for ducking, for barge-in and for turns alike.
"""

from __future__ import annotations

import array
import collections
import enum
import math
from collections.abc import Sequence
from typing import Final, final

import attrs

from sessions.audio.echo import EchoEstimator
from sessions.audio.vad import FRAME_MS
from sessions.turns import SpeechClassifier, TurnConfig

__all__ = ["Action", "BargeIn", "Duck", "DuckLog", "EchoGate", "fade_in", "fade_out"]

_SAMPLE_RATE: Final = 48_000


class Action(enum.Enum):
    """What the voice loop does with the agent's reply after a frame."""

    DUCK = "duck"
    RESUME = "resume"


@final
@attrs.frozen
class Duck:
    """The timing of one duck, on the session's clock: the first voiced frame of the burst
    reached the node at ``arrived`` and was played out at ``onset``; the first faded agent
    frame was due at ``sent`` with RTP timestamp ``timestamp`` (``None``: nothing was left to
    fade, the duck was silence already, at ``sent``)."""

    arrived: float
    onset: float
    sent: float
    timestamp: int | None


@final
class DuckLog:
    """Every duck's timing (:class:`Duck`), kept as the voice loop plays frames out, ducks and
    sends the faded frame."""

    def __init__(self, remember: int = 64) -> None:
        #: (first voiced frame played out, first faded agent frame sent), per duck
        self.ducks: list[tuple[float, float]] = []
        self.log: list[Duck] = []
        # sequence numbers of the frames played out last (None: concealed)
        self._played: collections.deque[int | None] = collections.deque(maxlen=remember)
        self._pending: tuple[float, float] | None = None  # (arrived, onset)

    def played(self, seq: int | None) -> None:
        """A frame was played out from the packet with RTP sequence number ``seq`` (``None``:
        concealed)."""
        self._played.append(seq)

    def ducked(
        self, run: int, onset: float, heard: Sequence[tuple[int, int, bytes, float]]
    ) -> float:
        """The agent was ducked on the last ``run`` voiced frames, the first played out at
        ``onset``; ``heard``: the latest packets received, (sequence number, timestamp,
        payload, arrival). Returns when that first voiced frame arrived (``onset`` when it is
        not known: concealed, or no longer remembered)."""
        arrived = onset
        if 0 < run <= len(self._played) and (seq := self._played[-run]) is not None:
            arrived = next((at for s, _, _, at in reversed(heard) if s == seq), onset)
        self._pending = (arrived, onset)
        return arrived

    def sent(self, at: float, timestamp: int | None) -> None:
        """The first faded frame of the pending duck was due at ``at`` (``timestamp``: its RTP
        timestamp; ``None``: there was nothing left to fade)."""
        if self._pending is not None:
            arrived, onset = self._pending
            self.ducks.append((onset, at))
            self.log.append(Duck(arrived, onset, at, timestamp))
            self._pending = None

    def cancel(self) -> None:
        """The pending duck ended before a frame was faded: nothing to record."""
        self._pending = None


def _frames(ms: int) -> int:
    return -(-ms // FRAME_MS)


@final
class BargeIn:
    """The duck/interrupt/resume state machine (see the module docstring)."""

    def __init__(self, config: TurnConfig) -> None:
        self._duck_after = _frames(config.duck_after_ms)
        self._confirm = max(_frames(config.interrupt_ms), _frames(config.min_speech_ms))
        self._release = _frames(config.release_ms)
        self._max = _frames(config.duck_max_ms)
        self._ducked = False
        self._onset: float | None = None
        self._voiced = 0  # voiced frames since the onset
        self._gap = 0  # unvoiced frames in a row
        self._frames = 0  # frames since the duck

    @property
    def ducked(self) -> bool:
        return self._ducked

    @property
    def onset(self) -> float | None:
        """When the first voiced frame of the burst that ducked the agent was played out."""
        return self._onset if self._ducked else None

    @property
    def confirmed(self) -> bool:
        """Whether enough voice was heard since the onset to make the interruption final."""
        return self._ducked and self._voiced >= self._confirm

    def frame(self, voiced: bool, run: int, now: float, *, may_duck: bool) -> Action | None:
        """One frame played out at ``now``: ``voiced`` as the (echo-gated) classifier called
        it, ``run`` voiced frames in a row up to it; ``may_duck``: an interruptible agent is
        on the air and no user turn is already open."""
        if not self._ducked:
            if may_duck and run >= self._duck_after:
                self.duck(now - (run - 1) * FRAME_MS / 1000, run)
                return Action.DUCK
            return None
        self._frames += 1
        if voiced:
            self._voiced += 1
            self._gap = 0
        else:
            self._gap += 1
        if self._gap >= self._release or (self._frames >= self._max and not self.confirmed):
            self.end()
            return Action.RESUME
        return None

    def duck(self, onset: float, voiced: int) -> None:
        """Duck now: the burst began at ``onset`` and had ``voiced`` voiced frames so far."""
        self._ducked = True
        self._onset = onset
        self._voiced = voiced
        self._gap = 0
        self._frames = 0

    def end(self) -> None:
        """The duck is over (interrupted or resumed)."""
        self._ducked = False
        self._onset = None


@final
class EchoGate:
    """A :class:`~sessions.turns.SpeechClassifier` that calls a frame unvoiced when the echo
    estimator explained it (set :attr:`echo` before each frame is classified). The inner
    classifier hears every frame, so that its noise floor follows the real input."""

    def __init__(self, inner: SpeechClassifier, estimator: EchoEstimator) -> None:
        self.inner = inner
        self.estimator = estimator
        #: whether the frame about to be classified is explained by echo
        self.echo = False
        #: voiced frames the gate turned unvoiced
        self.suppressed = 0

    def is_speech(self, frame: bytes) -> bool:
        voiced = self.inner.is_speech(frame)
        if voiced and self.echo:
            self.suppressed += 1
            return False
        return voiced


def _ramp(ms: int) -> list[float]:
    count = max(1, ms * _SAMPLE_RATE // 1000)
    return [0.5 - 0.5 * math.cos(math.pi * (i + 0.5) / count) for i in range(count)]


def fade_out(pcm: bytes, ramp_ms: int) -> bytes:
    """``pcm`` (int16 mono, 48 kHz) faded from full to nothing over its first ``ramp_ms`` (a
    raised cosine), silent after."""
    samples = memoryview(pcm).cast("h")
    ramp = _ramp(ramp_ms)[::-1]
    out = [round(s * g) for s, g in zip(samples, ramp, strict=False)]
    out.extend([0] * (len(samples) - len(out)))
    return _pack(out)


def fade_in(pcm: bytes, ramp_ms: int) -> bytes:
    """``pcm`` faded in from nothing to full over its first ``ramp_ms`` (a raised cosine)."""
    samples = memoryview(pcm).cast("h")
    ramp = _ramp(ramp_ms)
    head = [round(s * g) for s, g in zip(samples, ramp, strict=False)]
    return _pack(head) + bytes(samples[len(head) :])


def _pack(samples: list[int]) -> bytes:
    return array.array("h", samples).tobytes()
