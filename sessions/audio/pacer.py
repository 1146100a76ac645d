"""Sans-I/O outbound pacing: one 20 ms frame per tick, on a schedule that never drifts.

An agent produces speech in bursts (a TTS engine is usually faster than real time), but RTP
audio must leave at the rate it is played. :class:`Pacer` holds the agent's frames and hands
out one per 20 ms tick with its RTP timestamp and marker bit. Time is passed in; nothing here
reads a clock or sleeps. The frames are opaque bytes: queue PCM and encode at the tick, so that
:meth:`Pacer.flush` (barge-in) throws away audio that was never encoded and the encoder only
ever sees what is sent.

Schedule. Tick ``n`` of a talkspurt is due at ``start + n * 0.020``, computed from ``n`` each
time rather than by adding 20 ms to the last deadline or by sleeping 20 ms after each send, so
neither rounding nor a late wake-up accumulates into drift. A tick handled more than
``late_threshold`` after its deadline counts as late; a caller that fell behind gets the
missed ticks one call at a time (a burst the receiver's jitter buffer absorbs), unless it fell
more than ``max_catchup`` ticks behind: then those ticks are skipped, nothing is sent for them
and the audio is delayed rather than rushed.

RTP timestamps (RFC 3550 §5.1, RFC 7587 §4.1). The timestamp advances by 960 for every tick,
whether or not a frame was sent, so it keeps tracking real time across gaps; a talkspurt that
starts after an idle period continues from where the last one ended plus the whole 20 ms ticks
that passed. The marker bit is set on the first packet after any tick that sent nothing - the
first packet of a talkspurt (RFC 3551 §4.1) - so that the receiver can re-anchor its playout.

Underruns. A tick that finds the queue empty in the middle of a talkspurt (the agent did not
call :meth:`Pacer.end_talkspurt`) is an underrun, and nothing is sent. Not sending is the
ordinary discontinuous transmission of Opus over RTP (RFC 7587 §3.1.3): the receiver conceals
the gap and the timestamp jump plus marker bit tell it exactly how long the gap was.
Comfort silence would cost an encode and about 10 kbit/s per idle session, and would hide the
gap from the peer's jitter buffer rather than let it re-anchor. After ``hangover`` empty ticks
in a row the talkspurt is taken to have ended and the pacer goes idle (no timer) until the next
:meth:`Pacer.push`.

Holding (a duck while the user may be barging in). :meth:`Pacer.hold` keeps the queue but sends
nothing from the next tick on, until :meth:`Pacer.release`: ticks go on (the timestamp keeps
real time, the marker bit is set on the first frame after), none counts as an underrun, and the
talkspurt does not end. :meth:`Pacer.give_back` puts the frame just handed out back at the head
of the queue and takes it off the played counters: the caller sent it faded out and will send it
again, faded in, on release, so that the reply comes back where it stopped.
"""

from __future__ import annotations

import collections
import math
from typing import Final, final

import attrs

from sessions.audio.fixed import Fixed

__all__ = [
    "FRAME_MS",
    "FRAME_SECONDS",
    "FRAME_TIMESTAMP",
    "GRID_SLACK",
    "PacedFrame",
    "Pacer",
    "PacerStats",
]

#: Duration of one frame and one tick.
FRAME_MS: Final = 20
FRAME_SECONDS: Final = FRAME_MS / 1000
#: RTP timestamp units per frame (RFC 7587 §4.1: the Opus RTP clock is 48 kHz).
FRAME_TIMESTAMP: Final = 960

_TS_MOD: Final = 1 << 32


@final
@attrs.frozen
class PacedFrame:
    """One frame to send now: its RTP timestamp, marker bit and the deadline it was due at."""

    payload: bytes
    timestamp: int
    marker: bool
    deadline: float


@final
@attrs.frozen
class PacerStats:
    """Counters of a :class:`Pacer` (durations in milliseconds)."""

    ticks: int
    """Ticks handled, with or without a frame (skipped ticks not included)."""
    sent: int
    late: int
    """Ticks handled more than ``late_threshold`` after their deadline."""
    underruns: int
    """Ticks inside a talkspurt that found nothing to send."""
    skipped: int
    """Ticks given up because the caller fell more than ``max_catchup`` ticks behind."""
    held: int
    """Ticks that sent nothing because the pacer was held (:meth:`Pacer.hold`)."""
    talkspurts: int
    played_ms: int
    """Audio actually handed out, over the pacer's life."""
    talkspurt_ms: int
    """Audio handed out in the current (or last) talkspurt: what a barged-in user heard."""
    flushed_ms: int
    queued_ms: int


#: how far a time may sit before a grid point and still count as on it (float rounding)
GRID_SLACK: Final = 1e-6


def _nearest(now: float, grid: float) -> float:
    """The point of the grid (multiples of ``grid``) nearest ``now``."""
    below = math.floor((now + GRID_SLACK) / grid) * grid
    return below if now - below < grid / 2 else below + grid


@final
@attrs.define(on_setattr=attrs.setters.NO_OP)  # see sessions/audio/fixed.py
class Pacer:
    """Paces queued frames out at one per 20 ms (see the module docstring).

    Settings, fixed at construction:

    * ``initial_timestamp``: RTP timestamp of the first frame (RFC 3550 §5.1 wants it random;
      the RTP sender picks it). To move a session, carry :attr:`next_timestamp` over;
    * ``late_threshold``: seconds after its deadline from which a tick counts as late;
    * ``hangover``: empty ticks after which a talkspurt the agent did not end is over;
    * ``max_catchup``: how many ticks behind a caller may be before ticks are skipped.

    ``grid`` (seconds; 0: none) may change at any time: a caller that handles its timers only
    on a shared grid of this period (a node's media tick) sets it, and each talkspurt then
    starts on the grid point nearest its first frame, so that every later tick falls on the
    grid too. Without it a talkspurt that started a little after a grid point (the caller's
    wake-up latency) has every tick due just after one, and a later wake-up a little later
    than that first one finds two ticks due at once: two frames in one packet train, then none.
    """

    _initial_timestamp: int = attrs.field(
        default=0, validator=[attrs.validators.ge(0), attrs.validators.lt(_TS_MOD)]
    )
    _late_threshold: float = attrs.field(default=0.005, validator=attrs.validators.ge(0.0))
    _hangover: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    _max_catchup: int = attrs.field(default=5, validator=attrs.validators.ge(0))
    _grid: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))

    _queue: collections.deque[bytes] = attrs.field(init=False, factory=collections.deque)
    _start: float = attrs.field(init=False, default=0.0)  # deadline of tick 0 of the talkspurt
    _tick: int = attrs.field(init=False, default=0)  # index of the next tick in the talkspurt
    _active: bool = attrs.field(init=False, default=False)
    _next_ts: int = attrs.field(init=False)  # timestamp of the next tick, not wrapped
    _idle_deadline: float | None = attrs.field(init=False, default=None)  # first unused tick
    _marker: bool = attrs.field(init=False, default=True)
    _ending: bool = attrs.field(init=False, default=False)  # end_talkspurt() was called
    _empty_run: int = attrs.field(init=False, default=0)
    _held: bool = attrs.field(init=False, default=False)
    _counts: collections.Counter[str] = attrs.field(init=False, factory=collections.Counter)

    initial_timestamp = Fixed[int]()
    late_threshold = Fixed[float]()
    hangover = Fixed[int]()
    max_catchup = Fixed[int]()

    @_next_ts.default
    def _next_ts_default(self) -> int:
        return self._initial_timestamp

    @property
    def grid(self) -> float:
        """The caller's timer grid, seconds (0: none); see the class docstring."""
        return self._grid

    @grid.setter
    def grid(self, value: float) -> None:
        # The field's validator, which attrs runs at construction only (see Fixed).
        if not value >= 0.0:
            raise ValueError(f"'grid' must be >= 0.0: {value}")
        self._grid = value

    # --- input --------------------------------------------------------------------------------

    def push(self, frame: bytes, now: float) -> None:
        """Queue one 20 ms frame; starts a talkspurt (first tick due at once) if idle."""
        self._queue.append(frame)
        self._ending = False
        if not self._active:
            self._begin(now)

    def end_talkspurt(self) -> None:
        """The agent has queued the whole utterance: once it is sent, go idle quietly.

        Without this the empty ticks after the last frame count as underruns until
        ``hangover`` of them end the talkspurt.
        """
        self._ending = True
        if self._active and not self._queue:
            self._go_idle()

    def flush(self) -> int:
        """Drop everything queued (barge-in); return how many milliseconds were dropped.

        The talkspurt ends; the next :meth:`push` starts a new one, marker bit set.
        """
        dropped = len(self._queue) * FRAME_MS
        self._queue.clear()
        self._held = False
        self._counts["flushed_ms"] += dropped
        if self._active:
            self._go_idle()
        return dropped

    def hold(self) -> None:
        """Send nothing from the next tick on, keeping the queue (see the module docstring)."""
        self._held = True

    def release(self) -> None:
        """Send again after :meth:`hold`, from the next tick, marker bit set."""
        self._held = False

    @property
    def held(self) -> bool:
        """Whether the pacer is held."""
        return self._held

    def give_back(self, frame: bytes) -> None:
        """Put ``frame``, the last one :meth:`pop` handed out, back at the head of the queue; it
        no longer counts as played (it was sent faded out and goes again on release)."""
        self._queue.appendleft(frame)
        self._counts["played_ms"] -= FRAME_MS
        self._counts["talkspurt_ms"] -= FRAME_MS
        self._counts["sent"] -= 1
        if not self._active:  # it was the last frame of an ended utterance
            self._active = True
            self._idle_deadline = None
            self._ending = True

    def _begin(self, now: float) -> None:
        # Never earlier than the tick the last talkspurt left unused, so consecutive packets
        # are at least 20 ms apart and the timestamp never runs ahead of real time.
        if self._grid > 0:
            now = _nearest(now, self._grid)
        if self._idle_deadline is None:
            self._start = now
        else:
            self._start = max(now, self._idle_deadline)
            # The timestamp keeps tracking real time across the idle period, in whole ticks.
            elapsed = round((self._start - self._idle_deadline) / FRAME_SECONDS)
            self._next_ts += FRAME_TIMESTAMP * elapsed
        self._tick = 0
        self._active = True
        self._marker = True
        self._empty_run = 0
        self._counts["talkspurts"] += 1
        self._counts["talkspurt_ms"] = 0

    def _go_idle(self) -> None:
        self._idle_deadline = self._deadline()
        self._active = False
        self._ending = False

    # --- output -------------------------------------------------------------------------------

    def _deadline(self) -> float:
        # Always from the tick index, never accumulated: no drift.
        return self._start + self._tick * FRAME_SECONDS

    def get_timer(self) -> float | None:
        """Deadline of the next tick, or ``None`` while idle (nothing queued)."""
        return self._deadline() if self._active else None

    def pop(self, now: float) -> PacedFrame | None:
        """Handle the next tick if it is due at ``now``; the frame to send, if there is one.

        ``None`` means either that no tick is due or that the tick had nothing to send, so a
        caller drives the pacer with ``while (t := pacer.get_timer()) is not None and
        t <= now: pacer.pop(now)``, sending every frame it gets.
        """
        if not self._active:
            return None
        deadline = self._deadline()
        if now < deadline:
            return None
        behind = self._ticks_behind(now, deadline)
        if behind > self._max_catchup:
            # A long stall: skip to the tick that is due now instead of bursting them all.
            self._tick += behind
            self._next_ts += FRAME_TIMESTAMP * behind
            self._counts["skipped"] += behind
            self._marker = True  # nothing was sent for the skipped ticks
            deadline = self._deadline()
        self._counts["ticks"] += 1
        if now - deadline > self._late_threshold:
            self._counts["late"] += 1
        timestamp = self._next_ts % _TS_MOD
        self._tick += 1
        self._next_ts += FRAME_TIMESTAMP

        if self._held:
            self._counts["held"] += 1
            self._marker = True  # the frame after the hold starts after a silence
            return None
        if not self._queue:
            self._counts["underruns"] += 1
            self._empty_run += 1
            self._marker = True  # RFC 3551 §4.1: the next packet starts after a silence
            if self._empty_run >= self._hangover:
                self._go_idle()
            return None

        frame = PacedFrame(self._queue.popleft(), timestamp, self._marker, deadline)
        self._marker = False
        self._empty_run = 0
        self._counts["sent"] += 1
        self._counts["played_ms"] += FRAME_MS
        self._counts["talkspurt_ms"] += FRAME_MS
        if not self._queue and self._ending:
            self._go_idle()
        return frame

    def due(self, now: float) -> int:
        """How many ticks :meth:`pop` hands out at ``now``, each a frame if one is queued: 0
        before the next tick's deadline, one more for each tick the caller fell behind, and 1
        after a stall longer than ``max_catchup`` ticks (those are skipped). A caller that
        queues frames just in time queues this many before popping, so that a late tick sends
        a catch-up burst rather than finding the queue empty."""
        if not self._active:
            return 0
        deadline = self._deadline()
        if now < deadline:
            return 0
        # a later tick whose deadline is a float's rounding after ``now`` is counted as due
        behind = self._ticks_behind(now + GRID_SLACK, deadline)
        return 1 if behind > self._max_catchup else behind + 1

    @staticmethod
    def _ticks_behind(now: float, deadline: float) -> int:
        """Whole ticks between the due tick's ``deadline`` and ``now``."""
        return math.floor((now - deadline) / FRAME_SECONDS)

    # --- state --------------------------------------------------------------------------------

    @property
    def next_timestamp(self) -> int:
        """RTP timestamp the next tick will carry (what a session move must carry over)."""
        return self._next_ts % _TS_MOD

    @property
    def queued_ms(self) -> int:
        """Milliseconds of audio waiting to be sent."""
        return len(self._queue) * FRAME_MS

    def stats(self) -> PacerStats:
        """A snapshot of the counters."""
        c = self._counts
        return PacerStats(
            ticks=c["ticks"],
            sent=c["sent"],
            late=c["late"],
            underruns=c["underruns"],
            skipped=c["skipped"],
            held=c["held"],
            talkspurts=c["talkspurts"],
            played_ms=c["played_ms"],
            talkspurt_ms=c["talkspurt_ms"],
            flushed_ms=c["flushed_ms"],
            queued_ms=self.queued_ms,
        )
