"""Voice activity detection on decoded user audio: an energy detector with an adaptive noise floor.

:class:`Vad` says of each 20 ms frame (48 kHz mono int16, 1920 bytes, like every frame the
jitter buffer plays out) whether it holds speech. It is sans-I/O and pure Python, and keeps
only a few numbers of state plus the last second of frame levels. :func:`level_dbfs` is the
frame level helper it is built on. Turns (speech started, speech stopped) are built on top of
it by :class:`sessions.turns.TurnDetector`.

How it decides. A frame is speech when its level (in dBFS, from the variance of its samples:
the frame's mean is removed, which takes out DC and most rumble below 50 Hz, never speech) is
at least ``margin`` above the current noise floor, and above ``min_level_dbfs`` whatever the
floor. While frames are speech the threshold is lowered by a hysteresis of half the margin, so
that the weak ends of syllables stay voiced. The noise floor follows the background:

* frames within 3 dB above the floor (noise, not speech) pull it towards their power with a
  time constant of 0.4 s (an average in the power domain, not a minimum: a minimum sits
  below fluctuating noise, and rumble would then cross the margin on every peak);
* a frame more than 10 dB below the floor resets it at once (the noise stopped, or the first
  frames were speech);
* louder frames leave it alone, so speech does not drag it up; but it is never below the
  quietest frame of the last second, so a background that gets louder (a fan switched on, a
  stream unmuted over noise) is learned within one second.

``aggressiveness`` (0 to 3, like WebRTC's) sets the margin: 4, 5, 6 or 8 dB. On the noisy
speech below, recall falls from 0.89-0.99 at 0 to 0.72-0.94 at 3, and the voiced fraction of
brown noise from 5 % to none.

Why not WebRTC's VAD. ``webrtcvad-wheels`` 2.0.14 (the GMM detector of the WebRTC project, in
C) was measured against this detector on the material of ``tests/audio/test_vad.py``, all at
48 kHz in 20 ms frames: three espeak-ng utterances (truth: frames within 40 dB of the loudest),
3 s of digital silence and of +-1 LSB dither, of white, pink and brown (rumble) noise at -60,
-45, -35 and -25 dBFS, the utterances in each noise at 10 dB SNR (truth: frames where the
speech is louder than the noise), and trains of clicks, 400 ms noise bursts and 400 ms tones
(one in every 1.4 s: 23 % of the frames). Recall / false positives, or the voiced fraction:

============================  ===========  ===========  ===========  ===========
material                      webrtc 0     webrtc 3     this, 2      both, 2 + 2
============================  ===========  ===========  ===========  ===========
clean speech: recall          0.96-0.99    0.92-0.99    1.00         0.94-0.99
clean speech: false pos. [1]  0.13-0.36    0.09-0.27    0.00-0.02    0.00-0.02
silence and dither            0.00-0.05    0.00         0.00         0.00
white noise                   0.03-1.00    0.00-0.03    0.00         0.00
pink noise                    0.03-1.00    0.00-1.00    0.00         0.00
brown noise                   0.03-1.00    0.00-1.00    0.01         0.00-0.01
10 dB SNR: recall             0.93-1.00    0.92-1.00    0.80-0.96    0.80-0.93
10 dB SNR: false pos.         0.34-1.00    0.28-0.98    0.00-0.05    0.00-0.05
clicks, 150 ms apart          0.31         0.24         0.11         0.06
noise bursts, tones, chords   0.34         0.30         0.23         0.23
us per 20 ms frame            18           18           28           46
============================  ===========  ===========  ===========  ===========

[1] WebRTC's detector has a hangover of its own, which the turn detector does better.

WebRTC's detector takes loud coloured noise for speech at every aggressiveness (pink or brown
noise at -25 dBFS: every frame; noisy speech: up to 98 % of the noise-only frames), which
would start phantom turns and barge in on the agent whenever a user sits near a fan or in a
car. It tells neither tones nor noise bursts from speech either. Gating it with this detector
("both") fixes the noise but only halves the single-frame clicks, which the turn detector's
minimum speech duration ignores anyway, and it loses up to 6 % of the clean speech frames. So
Parley uses the energy detector alone, and needs no C extension for it.

Known limits, shared by every energy detector: any sound well above the background is taken
for speech (a door, music, a television), and a new steady noise is speech for up to a second
until the floor learns it. Those are the cases for the model-based detector beside it
(:mod:`sessions.audio.neural_vad`, ``turns.vad = "silero"``; measured in ``ops/bench/vad.py``).

Cost. The frame's power is computed on every second sample (24 kHz is plenty for a level, and
it halves the pure-Python work): 28 us per 20 ms frame on the development machine, 0.14 % of
a core per session.
"""

from __future__ import annotations

import collections
import math
import sys
from typing import Final, final

from sessions.audio import levels

__all__ = [
    "FRAME_BYTES",
    "FRAME_MS",
    "SAMPLE_RATE",
    "SILENCE_DBFS",
    "Vad",
    "level_dbfs",
]

#: The audio the detector is made for: decoded Opus (RFC 7587 §4.1), 20 ms frames.
SAMPLE_RATE: Final = 48_000
FRAME_MS: Final = 20
FRAME_BYTES: Final = 2 * SAMPLE_RATE * FRAME_MS // 1000
#: Level reported for digital silence (and the lowest level ever reported).
SILENCE_DBFS: Final = -120.0

_SILENCE_POWER: Final = 10.0 ** (SILENCE_DBFS / 10.0)
#: Start margins in dB above the noise floor, by aggressiveness.
_MARGINS: Final = (4.0, 5.0, 6.0, 8.0)
_NOISE_BAND_DB: Final = 3.0  # frames this close above the floor are averaged into it
_RESET_DB: Final = 10.0  # a frame this far below the floor resets it
_FLOOR_TIME_CONSTANT: Final = 0.4  # seconds, for averaging noise frames into the floor
_FLOOR_WINDOW: Final = 1.0  # seconds: the floor is at least the quietest frame of this window

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("sessions.audio.vad assumes a little-endian machine (int16 LE PCM)")


def _power(frame: bytes) -> float:
    """Mean square of the samples, relative to full scale (1.0 = 0 dBFS)."""
    return levels.power(frame)


def _ac_power(frame: bytes, step: int) -> float:
    """Variance of every ``step``-th sample, relative to full scale.

    Removing the frame's mean takes out DC and most of the rumble below the frame rate
    (50 Hz), which is never speech but swings a frame's power by several dB from one frame
    to the next (brown noise at aggressiveness 2: 5 % of frames voiced with the plain power,
    1 % without the mean).
    """
    return levels.ac_power(frame, step)


def _to_db(power: float) -> float:
    return 10.0 * math.log10(power) if power > _SILENCE_POWER else SILENCE_DBFS


def level_dbfs(frame: bytes) -> float:
    """RMS level of mono int16 PCM in dBFS; :data:`SILENCE_DBFS` for digital silence.

    0 dBFS is the RMS of a full-scale square wave (a full-scale sine is -3 dBFS). One LSB of
    dither is about -90 dBFS, typical speech -35 to -15 dBFS.
    """
    if len(frame) % 2:
        raise ValueError("int16 PCM has an even number of bytes")
    return _to_db(_power(frame))


@final
class Vad:
    """Energy voice activity detector with an adaptive noise floor (see the module docstring).

    * ``aggressiveness``: 0 to 3; how far above the noise floor a frame must be to count as
      speech (4, 5, 6 or 8 dB). Higher rejects more noise and misses more quiet speech;
    * ``min_level_dbfs``: frames quieter than this are never speech, whatever the floor
      (the floor of digital silence is -120 dBFS; dither must not count as speech);
    * ``sample_rate`` and ``frame_ms``: the frames' format (48 kHz and 20 ms in Parley).

    The detector is stateful (noise floor, hysteresis): use one per audio stream, fed every
    frame in order.
    """

    __slots__ = (
        "_alpha",
        "_floor",
        "_floor_db",
        "_frame_bytes",
        "_hysteresis",
        "_margin",
        "_min_level",
        "_recent",
        "_speaking",
        "_step",
    )

    def __init__(
        self,
        *,
        aggressiveness: int = 2,
        min_level_dbfs: float = -60.0,
        sample_rate: int = SAMPLE_RATE,
        frame_ms: int = FRAME_MS,
    ) -> None:
        if aggressiveness not in range(len(_MARGINS)):
            raise ValueError(f"aggressiveness is 0, 1, 2 or 3, not {aggressiveness!r}")
        if not SILENCE_DBFS <= min_level_dbfs <= 0.0:
            raise ValueError(f"min_level_dbfs is between {SILENCE_DBFS} and 0 dBFS")
        if sample_rate <= 0 or frame_ms <= 0 or sample_rate * frame_ms % 1000:
            raise ValueError("frame_ms must hold a whole number of samples at sample_rate")
        samples = sample_rate * frame_ms // 1000
        if samples < 2:
            raise ValueError("a frame needs at least two samples")
        self._frame_bytes = 2 * samples
        # Every second sample at 16 kHz and above: still 8 kHz or more, and the power of a
        # signal does not change when its samples are thinned out.
        self._step = 2 if sample_rate >= 16_000 else 1
        self._margin = _MARGINS[aggressiveness]
        self._hysteresis = self._margin / 2
        self._min_level = min_level_dbfs
        frame_s = frame_ms / 1000
        self._alpha = 1.0 - math.exp(-frame_s / _FLOOR_TIME_CONSTANT)
        self._recent: collections.deque[float] = collections.deque(
            maxlen=max(1, round(_FLOOR_WINDOW / frame_s))
        )
        self._floor: float | None = None  # noise power relative to full scale
        self._floor_db = SILENCE_DBFS  # _to_db(self._floor), kept: a log10 less per frame
        self._speaking = False

    @property
    def frame_bytes(self) -> int:
        """Size of the frames :meth:`is_speech` takes."""
        return self._frame_bytes

    @property
    def noise_floor_dbfs(self) -> float:
        """The current noise floor estimate (:data:`SILENCE_DBFS` before the first frame)."""
        return SILENCE_DBFS if self._floor is None else _to_db(self._floor)

    def is_speech(self, frame: bytes) -> bool:
        """Whether ``frame`` (the next frame of the stream) holds speech."""
        if len(frame) != self._frame_bytes:
            raise ValueError(f"a frame is {self._frame_bytes} bytes, not {len(frame)}")
        power = _ac_power(frame, self._step)
        level = _to_db(power)
        self._recent.append(level)
        # The floor's level is kept with it (it is _to_db(floor), computed only when the floor
        # changes: the same figure, without a log10 per comparison).
        if self._floor is None:
            floor, floor_db = power, level
        else:
            floor, floor_db = self._floor, self._floor_db
        if level < floor_db - _RESET_DB:
            floor, floor_db = power, level
        elif level < floor_db + _NOISE_BAND_DB:
            floor += self._alpha * (power - floor)
            floor_db = _to_db(floor)
        # Louder frames leave the floor alone, so speech does not drag it up; this bound
        # lets it rise when the background itself got louder and stayed so for a window.
        quietest = min(self._recent)
        if floor_db < quietest:
            floor = 10.0 ** (quietest / 10.0)
            floor_db = _to_db(floor)
        self._floor, self._floor_db = floor, floor_db
        threshold = floor_db + self._margin
        if self._speaking:
            threshold -= self._hysteresis
        self._speaking = level >= threshold and level >= self._min_level
        return self._speaking
