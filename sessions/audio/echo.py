"""Echo awareness: is what the user's microphone sent us our own agent's voice coming back?

A phone on speaker, or a laptop without good echo cancellation, plays the agent's reply and
picks it up again: it reaches the node delayed (both network legs, the client's playout and
capture, our jitter buffer), attenuated and filtered (the loudspeaker, the room, the client's
echo canceller if any). An energy detector takes that for the user talking and the agent
barges in on itself. :class:`EchoEstimator` is sans-I/O and pure Python: it is told what the
node sent and when (:meth:`EchoEstimator.sent`, the PCM of each outbound frame at its tick), and
says of each inbound frame whether it is explained by that echo (:meth:`EchoEstimator.heard`).

The echo path is estimated per session, as a delay and a gain, on 20 ms frame levels (dB):

* **delay**: the normalised cross-correlation of the inbound level envelope with the sent one,
  for every lag from 0 to ``max_delay_ms`` in 20 ms frames, with exponential forgetting
  (``time_constant``); the lag with the highest correlation is the delay. Speech envelopes
  swing by 30 dB or more at the syllable rate, so the peak is sharp; the lags next to it are
  taken in too (a delay is rarely a whole number of frames, and the send and playout ticks
  have different phases).
* **gain**: a running median (a step of ``_GAIN_STEP_DB`` towards each new difference) of
  inbound level minus sent level at that delay, over the frames where the agent was loud,
  adapting only while the inbound frame looks like echo (the user's speech on top would drag
  it up) and, slowly, otherwise (so an echo path that got louder is still learned).

A frame is echo when it is no louder than the predicted echo (gain plus the loudest sent level
at the delay and its neighbours) plus ``margin_db``. For the first ``_MIN_FRAMES`` frames heard
with the agent on the air (half a second of the first reply) the rule is the conservative one
of the Geigel double-talk detector: echo unless louder than the loudest frame sent over the
whole delay range plus ``max_gain_db``. After that, if the inbound envelope does not follow the
sent one (correlation peak below ``_MIN_CORRELATION``: a headset, a good echo canceller), no
frame is echo. When nothing was sent over the delay range, nothing heard is echo.

Cost: one level per frame each way (every ``_STEP``-th sample) and a few list operations over
the lags; see ``ops/bench/turns.py`` for the measured figure per frame.
"""

from __future__ import annotations

import math
from typing import Final, final

from sessions.audio import levels

__all__ = ["EchoEstimator"]

FRAME_SECONDS: Final = 0.020
_FLOOR_DB: Final = -80.0  # levels are clipped here: silence, dither and nothing sent are equal
_ACTIVE_DB: Final = -55.0  # the agent counts as on the air above this sent level
_LOUD_DB: Final = -45.0  # frames the gain is learned on: the agent well above silence
_STEP: Final = 6  # every 6th sample: 8 kHz is plenty for a level
_MIN_FRAMES: Final = 25.0  # weighted frames with the agent on the air before trusting
_MIN_CORRELATION: Final = 0.6
_GAIN_STEP_DB: Final = 0.5
_GAIN_CREEP_DB: Final = 0.05  # upward step while the frame does not look like echo
_SEARCH_EVERY: Final = 4  # frames between searches for the best lag (the delay drifts slowly)


def frame_level_db(pcm: bytes) -> float:
    """Level of int16 PCM in dBFS from every ``_STEP``-th sample, clipped at ``_FLOOR_DB``."""
    power = levels.power(pcm, _STEP)
    return max(_FLOOR_DB, 10.0 * math.log10(power)) if power > 0 else _FLOOR_DB


@final
class EchoEstimator:
    """Estimates a session's echo path and tells echo from the user (see the module docstring).

    * ``max_delay_ms``: the longest echo delay looked for (sent tick to inbound playout);
    * ``margin_db``: how far above the predicted echo an inbound frame is the user;
    * ``max_gain_db``: before the path is known, the loudest echo assumed relative to what
      was sent (0 dB: never louder than the agent itself);
    * ``time_constant``: seconds of history the correlation weighs most.
    """

    def __init__(
        self,
        *,
        max_delay_ms: int = 600,
        margin_db: float = 6.0,
        max_gain_db: float = 0.0,
        time_constant: float = 8.0,
    ) -> None:
        self._lags = max(1, max_delay_ms // 20) + 1
        self._margin = margin_db
        self._max_gain = max_gain_db
        self._keep = 1.0 - FRAME_SECONDS / time_constant
        size = self._lags + 2
        self._size = size
        # sent levels by frame slot (round(at / 20 ms)), a ring with the slot each holds; each
        # entry is stored twice (index i and i + size), so that the lags looked at are always
        # one contiguous slice, taken in C rather than index by index
        self._sent_level = [_FLOOR_DB] * (2 * size)
        self._sent_slot = [-1] * (2 * size)
        # correlation sums, exponentially weighted: shared inbound ones, one set per lag
        self._w = 0.0
        self._sx = 0.0
        self._sxx = 0.0
        self._sy = [0.0] * self._lags
        self._syy = [0.0] * self._lags
        self._sxy = [0.0] * self._lags
        self._delay = 0
        self._correlation = 0.0
        self._gain = max_gain_db - 10.0
        self._gain_frames = 0
        self._learned = 0
        self.frames_echo = 0
        self.frames_heard = 0

    # --- state --------------------------------------------------------------------------------

    @property
    def converged(self) -> bool:
        """Whether the delay and gain estimates are trusted."""
        return (
            self._w >= _MIN_FRAMES
            and self._correlation >= _MIN_CORRELATION
            and self._gain_frames >= _MIN_FRAMES
        )

    @property
    def delay_ms(self) -> int:
        """The estimated echo delay (sent tick to inbound playout), in milliseconds."""
        return self._delay * 20

    @property
    def gain_db(self) -> float:
        """The estimated echo gain (inbound level over sent level), in dB."""
        return self._gain

    @property
    def correlation(self) -> float:
        """The normalised cross-correlation at the estimated delay (-1 to 1)."""
        return self._correlation

    # --- input --------------------------------------------------------------------------------

    def sent(self, pcm: bytes | None, at: float) -> None:
        """The node sent ``pcm`` (the frame as played, after any fade) on the tick at ``at``;
        ``None`` or a tick not reported: nothing was sent."""
        slot = round(at / FRAME_SECONDS)
        index = slot % self._size
        level = _FLOOR_DB if pcm is None else frame_level_db(pcm)
        self._sent_slot[index] = self._sent_slot[index + self._size] = slot
        self._sent_level[index] = self._sent_level[index + self._size] = level

    def heard(self, pcm: bytes, at: float) -> bool:
        """The inbound frame played out at ``at``: whether it is explained by echo."""
        self.frames_heard += 1
        slot = round(at / FRAME_SECONDS)
        lags = self._lags
        # The sent level of each lag, newest first: slots slot, slot - 1, ... are at ring index
        # (slot - lag) % size, which in the doubled ring is the slice from slot % size + size
        # down (it stays above 0: size is lags + 2).
        top = slot % self._size + self._size
        sent = self._sent_level[top : top - lags : -1]
        held = self._sent_slot[top : top - lags : -1]
        expected = list(range(slot, slot - lags, -1))
        if held != expected:
            # Some entries hold another slot: nothing was sent on that tick. In a voice loop
            # that is the newest one or two (the agent's frame for this tick is sent after the
            # inbound frame is heard): check those alone when the rest matches.
            if held[1:] == expected[1:]:
                sent[0] = _FLOOR_DB
            elif held[2:] == expected[2:]:
                for lag in (0, 1):
                    if held[lag] != expected[lag]:
                        sent[lag] = _FLOOR_DB
            else:
                sent = [
                    y if s == e else _FLOOR_DB for y, s, e in zip(sent, held, expected, strict=True)
                ]
        loudest = max(sent)
        if loudest < _ACTIVE_DB:
            return False  # the agent was silent over the whole delay range
        level = frame_level_db(pcm)
        echo = self._explained(level, sent, loudest)
        self._learn(level, sent, echo)
        if echo:
            self.frames_echo += 1
        return echo

    # --- internals ----------------------------------------------------------------------------

    def _explained(self, level: float, sent: list[float], loudest: float) -> bool:
        if self._w < _MIN_FRAMES:
            # Not enough heard yet: assume the worst echo at any delay (Geigel).
            return level <= loudest + self._max_gain
        if self._correlation < _MIN_CORRELATION:
            return False  # what comes in does not follow what we send: no echo to speak of
        if self._gain_frames < _MIN_FRAMES:
            return level <= loudest + self._max_gain
        d = self._delay
        near = max(sent[max(0, d - 1) : d + 2])
        return level <= near + self._gain + self._margin

    def _learn(self, level: float, sent: list[float], echo: bool) -> None:
        keep = self._keep
        self._w = keep * self._w + 1.0
        self._sx = keep * self._sx + level
        self._sxx = keep * self._sxx + level * level
        # Every lag's sums, updated in place in one pass: the same operations as building
        # three new lists (keep * a + y, ...), at about half the cost; this runs every frame
        # over all the lags. ``sent`` has one entry per lag, like the sums.
        sy, syy, sxy = self._sy, self._syy, self._sxy
        for lag, y in enumerate(sent):
            sy[lag] = keep * sy[lag] + y
            syy[lag] = keep * syy[lag] + y * y
            sxy[lag] = keep * sxy[lag] + level * y
        self._learned += 1
        if self._learned % _SEARCH_EVERY == 0 or self._w < _MIN_FRAMES:
            self._search()
        self._learn_gain(level, sent, echo)

    def _search(self) -> None:
        """The lag of the highest normalised cross-correlation."""
        w = self._w
        vx = self._sxx - self._sx * self._sx / w
        best, best_lag = -2.0, 0
        if vx > 1e-9:
            mx = self._sx / w
            sqrt = math.sqrt
            for lag, (sy, syy, sxy) in enumerate(zip(self._sy, self._syy, self._sxy, strict=True)):
                vy = syy - sy * sy / w
                if vy <= 1e-9:
                    continue
                r = (sxy - mx * sy) / sqrt(vx * vy)
                if r > best:
                    best, best_lag = r, lag
        if best > -2.0:
            self._delay, self._correlation = best_lag, best

    def _learn_gain(self, level: float, sent: list[float], echo: bool) -> None:
        at_delay = sent[self._delay]
        if at_delay >= _LOUD_DB:
            diff = level - at_delay
            step = _GAIN_STEP_DB if echo or not self.converged else _GAIN_CREEP_DB
            if diff > self._gain:
                self._gain += step
            elif diff < self._gain:
                self._gain -= _GAIN_STEP_DB
            self._gain_frames += 1
