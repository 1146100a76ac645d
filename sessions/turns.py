"""Turn detection: when the user starts and stops speaking, and the audio of each turn.

:class:`TurnDetector` is sans-I/O: it is pushed every 20 ms frame of the user's decoded audio
(48 kHz mono int16, :data:`~sessions.audio.vad.FRAME_BYTES`) with the time it arrived, asks a
voice activity detector (:class:`~sessions.audio.vad.Vad` by default) whether the frame is
voiced, and returns :class:`SpeechStarted` and :class:`SpeechStopped` events. Nothing here
reads a clock. A frame pushed at ``now`` is taken to be the 20 ms of audio that ended at
``now``.

The rules, with the durations of :class:`TurnConfig` counted in whole 20 ms frames:

* Start. A turn starts when a window of ``min_speech_ms`` begins and ends with a voiced frame
  and at least ``start_ratio`` of its frames are voiced. Voiced bursts shorter than
  ``min_speech_ms`` (a click, a cough, a bump of the microphone) therefore never start a turn,
  and a few unvoiced frames inside a word (a stop consonant, a dropout of the detector) do not
  prevent one. :class:`SpeechStarted` is emitted on the frame that completes the window, so
  ``min_speech_ms`` after the speech began, and is back-dated: its ``at`` is the arrival time
  of the first voiced frame (``min_speech_ms`` - 20 ms before the event), which is also
  :attr:`TurnDetector.first_voiced_at` (barge-in latency is measured from there).
* Stop. The turn ends once ``end_silence_ms`` have passed since the last voiced frame;
  :class:`SpeechStopped` is emitted then, and its ``at`` is the end of that last voiced frame.
  Pauses shorter than that, between words or sentences, stay inside the turn. In a pause,
  voiced audio only counts as the speaker resuming once it lasts ``resume_ms``: a lone voiced
  frame (a click, a noise peak) does not hold the turn open, though the end of the turn
  waits for it to show that it is one (``resume_ms`` - 20 ms at most).
* Time without audio. A sender using DTX, or an outage, sends nothing for a while; call
  :meth:`TurnDetector.poll` to let time pass, so that a turn still ends on time.
  :meth:`TurnDetector.get_timer` says when that will be.

Turn audio. While a turn is open the detector keeps its PCM: ``padding_ms`` of pre-roll before
the first voiced frame (so that the soft beginning of the first word, which the detector may
not have called voiced, is kept), everything up to the last voiced frame, and ``padding_ms``
after it (never more than was heard before the turn ended). :meth:`TurnDetector.take_turn_audio`
hands out the audio of the last turn that ended. Consecutive turns never share audio: a
turn's pre-roll stops where the previous turn's audio ended.

Bounded memory. A turn's audio is capped at ``max_turn_ms`` (30 s by default, 2.9 MB). A
turn that reaches it is cut: :class:`SpeechStopped` is emitted with ``cut=True`` and ``at``
the last voiced frame so far, and the detector starts looking for a turn again from the next
frame. If the user is still talking, that is a new turn, started ``min_speech_ms`` later by the
ordinary rule and back-dated to the first voiced frame after the cut; the audio of the two
turns, one after the other, is exactly what was heard. At most two turns' worth of audio are
held (the open one and the last finished one, until taken) plus a pre-roll window.
"""

from __future__ import annotations

import collections
import math
from typing import Final, Protocol, TypeAlias, final

import attrs

from sessions.audio.vad import FRAME_BYTES, FRAME_MS, Vad

__all__ = [
    "SpeechClassifier",
    "SpeechStarted",
    "SpeechStopped",
    "TurnConfig",
    "TurnDetector",
    "TurnEvent",
]

_EPSILON: Final = 1e-6  # seconds: sums of 20 ms steps are not exact in binary floating point


class SpeechClassifier(Protocol):
    """What :class:`TurnDetector` needs from a voice activity detector (:class:`Vad` is one)."""

    def is_speech(self, frame: bytes) -> bool:
        """Whether the next 20 ms frame of the stream is voiced."""
        ...


_int = attrs.validators.instance_of(int)
_ge = attrs.validators.ge


def _frames(ms: int) -> int:
    """Whole 20 ms frames needed to cover ``ms`` milliseconds."""
    return -(-ms // FRAME_MS)


@final
@attrs.frozen
class TurnConfig:
    """Thresholds of a :class:`TurnDetector`, in milliseconds (rounded up to 20 ms frames).

    * ``min_speech_ms``: voiced audio needed to start a turn; shorter bursts are ignored, and
      :class:`SpeechStarted` comes this long after the speech began;
    * ``end_silence_ms``: silence after the last voiced frame that ends a turn;
    * ``padding_ms``: audio kept before the first and after the last voiced frame of a turn;
    * ``start_ratio``: fraction of the ``min_speech_ms`` window that must be voiced;
    * ``resume_ms``: voiced audio in a pause that counts as the speaker resuming;
    * ``max_turn_ms``: longest turn audio kept; a longer turn is cut in two.

    Barge-in, while an interruptible agent's reply is on the air (the voice loop's rules,
    :mod:`sessions.transceiver.barge`):

    * ``duck_after_ms``: voiced audio in a row that ducks the reply (fades it out and holds it);
    * ``interrupt_ms``: voiced audio (counted, at least ``min_speech_ms``) in an open turn that
      makes the interruption final; a shorter burst (a cough, an "mm-hm") is not a turn;
    * ``release_ms``: unvoiced audio after which a duck that did not become an interruption
      ends: the reply comes back where it stopped;
    * ``duck_max_ms``: longest a duck lasts without becoming an interruption;
    * ``ramp_ms``: length of the fade out and back in (no click);
    * ``echo_aware``: inbound audio explained by the agent's own voice coming back
      (:class:`sessions.audio.echo.EchoEstimator`) is not voiced, so it never ducks, interrupts
      or starts a turn; ``echo_max_delay_ms`` bounds the echo delays looked at, and
      ``echo_margin_db`` is how far above the predicted echo a frame must be to be the user.
    """

    min_speech_ms: int = attrs.field(default=200, validator=[_int, _ge(FRAME_MS)])
    end_silence_ms: int = attrs.field(default=600, validator=[_int, _ge(FRAME_MS)])
    padding_ms: int = attrs.field(default=200, validator=[_int, _ge(0)])
    start_ratio: float = attrs.field(
        default=0.7, validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)]
    )
    resume_ms: int = attrs.field(default=40, validator=[_int, _ge(FRAME_MS)])
    max_turn_ms: int = attrs.field(default=30_000, validator=_int)
    duck_after_ms: int = attrs.field(default=20, validator=[_int, _ge(FRAME_MS)])
    interrupt_ms: int = attrs.field(default=400, validator=[_int, _ge(FRAME_MS)])
    release_ms: int = attrs.field(default=200, validator=[_int, _ge(FRAME_MS)])
    duck_max_ms: int = attrs.field(default=2000, validator=[_int, _ge(FRAME_MS)])
    ramp_ms: int = attrs.field(default=5, validator=[_int, _ge(1), attrs.validators.le(FRAME_MS)])
    echo_aware: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    echo_max_delay_ms: int = attrs.field(
        default=600, validator=[_int, _ge(FRAME_MS), attrs.validators.le(2000)]
    )
    echo_margin_db: float = attrs.field(
        default=6.0, validator=[attrs.validators.ge(0.0), attrs.validators.le(40.0)]
    )

    @resume_ms.validator
    def _check_resume(self, _: attrs.Attribute[int], value: int) -> None:
        if value > self.min_speech_ms:
            raise ValueError("resume_ms is at most min_speech_ms")

    @max_turn_ms.validator
    def _check_max_turn(self, _: attrs.Attribute[int], value: int) -> None:
        # Room for the pre-roll, the start window and at least as much again.
        if _frames(value) < 2 * (_frames(self.padding_ms) + _frames(self.min_speech_ms)):
            raise ValueError("max_turn_ms is at least twice padding_ms + min_speech_ms")


@final
@attrs.frozen
class SpeechStarted:
    """The user started turn ``turn`` (1 for the first).

    ``at`` is the arrival of the turn's first voiced frame. The event itself comes with the
    frame that completes ``min_speech_ms`` of audio from that frame's start, so
    ``min_speech_ms`` - 20 ms after ``at``.
    """

    at: float
    turn: int


@final
@attrs.frozen
class SpeechStopped:
    """The user's turn ``turn`` ended; ``at``: end of its last voiced frame.

    ``duration_ms`` spans the voiced part, from the start of the first voiced frame to the end
    of the last (``at - started.at`` plus one frame). ``cut`` is true when the turn reached
    ``max_turn_ms`` rather than ending in silence: the user may still be talking.
    """

    at: float
    turn: int
    duration_ms: int
    cut: bool = False


TurnEvent: TypeAlias = SpeechStarted | SpeechStopped


@final
class _Frame:
    """One frame heard (never changed once made). A plain slotted class, not a frozen attrs
    one: one is made per frame, and a frozen attrs class's ``__init__`` sets each field through
    ``object.__setattr__``, several times the cost."""

    __slots__ = ("at", "index", "pcm", "voiced")

    def __init__(self, index: int, at: float, voiced: bool, pcm: bytes) -> None:
        self.index = index  # position in the stream, counted from 0
        self.at = at
        self.voiced = voiced
        self.pcm = pcm


@final
class TurnDetector:
    """Detects the user's turns in a stream of 20 ms frames (see the module docstring)."""

    def __init__(
        self, config: TurnConfig | None = None, *, vad: SpeechClassifier | None = None
    ) -> None:
        self._config = TurnConfig() if config is None else config
        self._vad: SpeechClassifier = Vad() if vad is None else vad
        cfg = self._config
        self._window = _frames(cfg.min_speech_ms)
        self._needed = math.ceil(cfg.start_ratio * self._window)
        self._padding = _frames(cfg.padding_ms)
        self._resume = _frames(cfg.resume_ms)
        self._max_frames = _frames(cfg.max_turn_ms)
        self._end_silence = cfg.end_silence_ms / 1000
        # The last frames heard, for the start window and the pre-roll.
        self._recent: collections.deque[_Frame] = collections.deque(
            maxlen=self._window + self._padding
        )
        self._index = 0  # index of the next frame
        self._last_now: float | None = None
        self._done_through = -1  # last frame index that belongs to an ended turn
        self._turns = 0
        self._in_speech = False
        self._turn: list[bytes] = []  # PCM of the open turn, one frame per item
        self._turn_first = 0  # stream index of the turn's first frame (pre-roll included)
        self._first_voiced: _Frame | None = None
        self._last_voiced: _Frame | None = None
        self._run = 0  # voiced frames in a row, up to the last one pushed
        self._unvoiced = 0  # and unvoiced ones
        self._finished = b""

    # --- state --------------------------------------------------------------------------------

    @property
    def config(self) -> TurnConfig:
        return self._config

    @property
    def in_speech(self) -> bool:
        """Whether a turn is open (between :class:`SpeechStarted` and :class:`SpeechStopped`)."""
        return self._in_speech

    @property
    def turns(self) -> int:
        """Turns started so far; the number of the open or last turn."""
        return self._turns

    @property
    def voiced(self) -> bool:
        """Whether the last frame pushed was voiced (the classifier's call)."""
        return self._run > 0

    @property
    def voiced_run(self) -> int:
        """Voiced frames in a row, up to the last one pushed."""
        return self._run

    @property
    def unvoiced_run(self) -> int:
        """Frames in a row the classifier called no speech, up to the last one pushed."""
        return self._unvoiced

    def dismiss(self) -> None:
        """The open turn was not one (a backchannel while the agent spoke): forget it, with no
        :class:`SpeechStopped`. Its number is used again and its audio is dropped; frames up
        to the last one pushed never start or join a later turn."""
        if not self._in_speech:
            return
        self._done_through = self._index - 1
        self._turn = []
        self._in_speech = False
        self._first_voiced = None
        self._last_voiced = None
        self._turns -= 1

    @property
    def first_voiced_at(self) -> float | None:
        """Arrival time of the open turn's first voiced frame; ``None`` when no turn is open."""
        first = self._first_voiced
        return first.at if self._in_speech and first is not None else None

    def get_timer(self) -> float | None:
        """When the open turn ends if no voiced audio comes; ``None`` when no turn is open."""
        if not self._in_speech or self._last_voiced is None:
            return None
        return self._last_voiced.at + self._end_silence

    def take_turn_audio(self) -> bytes:
        """PCM of the last turn that ended (pre-roll and padding included); ``b""`` if none.

        The audio is handed out once: a second call returns ``b""``, and a turn that ends
        before the previous one's audio was taken replaces it.
        """
        audio, self._finished = self._finished, b""
        return audio

    # --- input --------------------------------------------------------------------------------

    def push(self, frame: bytes, now: float) -> list[TurnEvent]:
        """The next 20 ms frame of the user's audio, which arrived at ``now``; the events."""
        if len(frame) != FRAME_BYTES:
            raise ValueError(f"a frame is {FRAME_BYTES} bytes, not {len(frame)}")
        self._advance(now)
        voiced = self._vad.is_speech(frame)
        current = _Frame(self._index, now, voiced, bytes(frame))
        self._index += 1
        self._recent.append(current)
        self._run = self._run + 1 if voiced else 0
        self._unvoiced = 0 if voiced else self._unvoiced + 1
        if not self._in_speech:
            return self._try_start()
        self._turn.append(current.pcm)
        # A voiced frame right after counted speech continues it; after a pause it only
        # counts once the run of voiced frames is long enough to be the speaker resuming.
        last = self._last_voiced
        pending = False  # a voiced frame in a pause, not yet long enough to be a resumption
        if voiced:
            if self._run >= self._resume or (last is not None and last.index == current.index - 1):
                self._last_voiced = current
            else:
                pending = True
        events: list[TurnEvent] = []
        # The end of a pause waits for a pending run to show whether the speaker resumed
        # (at most resume_ms - 20 ms).
        if not pending and now - self._last_voiced_at() >= self._end_silence - _EPSILON:
            events.append(self._stop(cut=False))
        elif len(self._turn) >= self._max_frames:
            events.append(self._stop(cut=True))
        return events

    def poll(self, now: float) -> list[TurnEvent]:
        """Let time pass without audio (DTX, an outage): ends a turn whose silence is over."""
        self._advance(now)
        if self._in_speech and now - self._last_voiced_at() >= self._end_silence - _EPSILON:
            return [self._stop(cut=False)]
        return []

    # --- internals ----------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        if self._last_now is not None and now < self._last_now:
            raise ValueError(f"time went backwards: {now} after {self._last_now}")
        self._last_now = now

    def _last_voiced_at(self) -> float:
        assert self._last_voiced is not None  # set whenever a turn is open
        return self._last_voiced.at

    def _try_start(self) -> list[TurnEvent]:
        recent = self._recent
        # The cheap tests first, on the deque itself (no copy): most frames outside a turn
        # fail them.
        if len(recent) < self._window or not recent[-1].voiced:
            return []
        first = recent[-self._window]
        if first.index <= self._done_through or not first.voiced:  # reaches an ended turn
            return []
        window = list(recent)[-self._window :]
        if sum(f.voiced for f in window) < self._needed:
            return []
        # Pre-roll: the frames before the window (``_recent`` holds at most ``padding`` of
        # them), less any that an ended turn already handed out.
        older = list(self._recent)[: len(self._recent) - self._window]
        kept = [f for f in older if f.index > self._done_through] + window
        self._turn = [f.pcm for f in kept]
        self._turn_first = kept[0].index
        self._first_voiced = first
        self._last_voiced = window[-1]
        self._in_speech = True
        self._turns += 1
        return [SpeechStarted(at=first.at, turn=self._turns)]

    def _stop(self, *, cut: bool) -> SpeechStopped:
        first, last = self._first_voiced, self._last_voiced
        assert first is not None and last is not None  # set whenever a turn is open
        if cut:
            keep = len(self._turn)  # everything so far, so that the next turn follows on
        else:
            keep = min(len(self._turn), last.index - self._turn_first + 1 + self._padding)
        self._finished = b"".join(self._turn[:keep])
        self._done_through = self._turn_first + keep - 1
        self._turn = []
        self._in_speech = False
        self._first_voiced = None
        self._last_voiced = None
        duration = round((last.at - first.at) * 1000) + FRAME_MS
        return SpeechStopped(at=last.at, turn=self._turns, duration_ms=duration, cut=cut)
