"""The material the voice activity detectors are measured on (``ops/bench/vad.py``), made at run
time from seeded ``random`` and espeak-ng: nothing is downloaded or kept in the repository.

* **speech**: sentences said by several espeak-ng voices (American and British English, a female
  variant, German, French), 1 s of silence before and 0.5 s after; truth: the frames within
  40 dB of the utterance's loudest one (espeak-ng writes digital zeros between most words);
* **silence** and +-1 LSB dither;
* **noise**, the recipe of ``tests/audio/test_vad.py`` with the same seeds (the same samples):
  white (Gaussian), pink-ish (four one-pole low-passes of white noise at 50, 200, 800 and
  3200 Hz, weighted by the inverse square root of their corners: about -3 dB per octave) and
  brown (a leaky integrator: a rumble), at -60, -45, -35 and -25 dBFS;
* **speech in noise** and **speech over music** at 10 dB SNR (the noise or music 10 dB below
  the speech's RMS); truth: the frames where the speech is louder than the background;
* **music**, additive synthesis: a chord every second (C, A minor, F, G: bass and three voices),
  a melody of eighth notes drawn from the chord and the scale, each note six harmonics (1/h)
  under a piano-like envelope (10 ms attack, 300 ms decay); the second piece adds a kick drum
  (a falling 120 to 50 Hz sine) on every beat and a hi-hat (differenced noise) on every eighth;
* **clicks** (a 1 ms decaying 3 kHz impulse every 150 ms), and **noise bursts and tones**
  (400 ms of white noise, of a 440 Hz tone with its octave, and of a chord, one every 1.4 s).

Everything is 48 kHz mono int16 in 20 ms frames (:data:`sessions.audio.vad.FRAME_BYTES`).
"""

from __future__ import annotations

import array
import functools
import itertools
import math
import operator
import random
from typing import Final, final

import attrs

from sessions.audio.speech import SAMPLE_RATE, frames, rms, speak

__all__ = ["NOISE_SECONDS", "VOICES", "Item", "corpus", "mix", "music", "noise", "unit_noise"]

SECOND: Final = SAMPLE_RATE
#: (espeak-ng voice, sentences): the English ones are the corpus of tests/audio/test_vad.py
VOICES: Final = (
    (
        "en-us",
        (
            "Parley carries the voice of the caller to the agent, and the answer back again.",
            "Could you tell me the opening hours of the library on Saturday?",
            "Seven, three, nine. No, wait: seven, three, eight.",
        ),
    ),
    ("en-gb", ("I would like to move my flight to Monday morning, if that is possible.",)),
    ("en+f3", ("Please book a table for two at eight, near the window.",)),
    ("de", ("Können Sie mir sagen, wann die Bibliothek am Samstag öffnet?",)),
    ("fr", ("Je voudrais changer mon vol pour lundi matin, si c'est possible.",)),
)
NOISE_LEVELS: Final = (-60.0, -45.0, -35.0, -25.0)
COLOURS: Final = ("white", "pink", "brown")
NOISE_SECONDS: Final = 8
MUSIC_SECONDS: Final = 6.0
SNR_DB: Final = 10.0
TRUTH_RANGE: Final = 100.0  # 40 dB, in RMS


@final
@attrs.frozen
class Item:
    """One recording: its class (a row of the table), a name, the PCM and, for speech, the
    truth per 20 ms frame (None: nothing in it is speech)."""

    kind: str
    name: str
    pcm: bytes
    truth: tuple[bool, ...] | None = None


def _pcm(samples: list[float] | list[int]) -> bytes:
    return array.array("h", [max(-32768, min(32767, round(v))) for v in samples]).tobytes()


def _scaled(raw: list[float] | tuple[float, ...], level_dbfs: float) -> bytes:
    power = sum(v * v for v in raw) / len(raw)
    gain = 32768 * 10 ** (level_dbfs / 20) / math.sqrt(power)
    return _pcm([v * gain for v in raw])


@functools.cache
def unit_noise(colour: str) -> tuple[float, ...]:
    """Seeded unit-power-ish noise of ``colour`` (white, pink, brown), ``NOISE_SECONDS`` long:
    the corpus's, and the VAD tests' (tests/audio/test_vad.py)."""
    samples = NOISE_SECONDS * SECOND
    rnd = random.Random(colour)
    white = [rnd.gauss(0.0, 1.0) for _ in range(samples + SECOND)]
    out: list[float] = []
    if colour == "white":
        out = white
    elif colour == "pink":
        corners = (50, 200, 800, 3200)
        poles = [math.exp(-2 * math.pi * fc / SAMPLE_RATE) for fc in corners]
        gains = [(1 - p) / fc**0.5 for p, fc in zip(poles, corners, strict=True)]
        state = [0.0] * 4
        for w in white:
            state = [p * s + g * w for p, s, g in zip(poles, state, gains, strict=True)]
            out.append(sum(state))
    elif colour == "brown":
        x = 0.0
        for w in white:
            x = 0.995 * x + w
            out.append(x)
    else:
        raise ValueError(f"no {colour} noise")
    return tuple(out[SECOND:])  # the filters settle in the first second


def noise(colour: str, samples: int, level_dbfs: float, offset: int = 0) -> bytes:
    """``samples`` of seeded ``colour`` noise at an RMS of ``level_dbfs``."""
    raw = unit_noise(colour)[offset : offset + samples]
    if len(raw) < samples:
        raise ValueError(f"only {NOISE_SECONDS} s of noise are made")
    return _scaled(raw, level_dbfs)


def mix(a: bytes, b: bytes) -> bytes:
    """``a + b``, clipped, as long as ``a`` (``b`` is cut or padded with silence)."""
    x = array.array("h", a)
    y = array.array("h", b[: len(a)])
    y.extend(array.array("h", bytes(len(a) - 2 * len(y))))
    return _pcm(list(map(operator.add, x, y)))


# --- music ------------------------------------------------------------------------------------

_TABLE: Final = 2048
_CHORDS: Final = ((36, 60, 64, 67), (33, 60, 64, 69), (29, 60, 65, 69), (31, 59, 62, 67))
_SCALE: Final = (72, 74, 76, 77, 79, 81, 83, 84)


@functools.cache
def _wavetable() -> tuple[float, ...]:
    return tuple(
        sum(math.sin(2 * math.pi * h * n / _TABLE) / h for h in range(1, 7)) for n in range(_TABLE)
    )


@functools.cache
def _envelope(samples: int) -> tuple[float, ...]:
    attack = SAMPLE_RATE // 100
    return tuple(min(1.0, n / attack) * math.exp(-n / (0.3 * SAMPLE_RATE)) for n in range(samples))


def _add(out: list[float], start: int, part: list[float]) -> None:
    end = min(len(out), start + len(part))
    out[start:end] = map(operator.add, out[start:end], part)


def _note(midi: int, samples: int, amplitude: float) -> list[float]:
    table = _wavetable()
    step = 440.0 * 2 ** ((midi - 69) / 12) * _TABLE / SAMPLE_RATE
    return [amplitude * e * table[int(n * step) % _TABLE] for n, e in enumerate(_envelope(samples))]


def music(seconds: float, level_dbfs: float, *, drums: bool, seed: int = 0) -> bytes:
    """Seeded synthetic music at an RMS of ``level_dbfs`` (see the module docstring)."""
    rnd = random.Random(seed)
    total = round(seconds * SECOND)
    out = [0.0] * total
    eighth = SECOND // 4  # 120 beats a minute
    for bar, start in enumerate(range(0, total, SECOND)):
        chord = _CHORDS[bar % len(_CHORDS)]
        for i, midi in enumerate(chord):
            _add(out, start, _note(midi, SECOND, 0.6 if i == 0 else 0.35))
        for k in range(4):
            choices = [m + 12 for m in chord[1:]] + list(_SCALE)
            _add(out, start + k * eighth, _note(rnd.choice(choices), eighth, 0.5))
    if drums:
        for beat in range(0, total, SECOND // 2):
            length = SECOND // 8
            phase = 0.0
            kick = []
            for n in range(length):
                phase += 2 * math.pi * (50 + 70 * math.exp(-n / (0.03 * SAMPLE_RATE))) / SECOND
                kick.append(1.5 * math.exp(-n / (0.05 * SAMPLE_RATE)) * math.sin(phase))
            _add(out, beat, kick)
        for tick in range(0, total, eighth):
            hiss = [rnd.gauss(0.0, 1.0) for _ in range(SECOND // 30 + 1)]
            decay = [math.exp(-n / (0.01 * SAMPLE_RATE)) for n in range(len(hiss) - 1)]
            pairs = itertools.pairwise(hiss)
            hat = [0.3 * (b - a) * e for (a, b), e in zip(pairs, decay, strict=True)]
            _add(out, tick, hat)
    return _scaled(out, level_dbfs)


# --- transients -------------------------------------------------------------------------------


def _bursts(seconds: float, make: list[float], period: float) -> bytes:
    out = [0.0] * round(seconds * SECOND)
    for start in range(round(0.5 * SECOND), len(out), round(period * SECOND)):
        _add(out, start, make)
    return _pcm(out)


def clicks(seconds: float) -> bytes:
    click = [
        20000 * math.exp(-n / 8) * math.sin(2 * math.pi * 3000 * n / SAMPLE_RATE)
        for n in range(SECOND // 1000)
    ]
    background = noise("pink", round(seconds * SECOND), -60.0)
    return mix(background, _bursts(seconds, click, 0.15))


def bursts(seconds: float, what: str) -> bytes:
    """400 ms of ``what`` ("noise", "tone" or "chord") at about -20 dBFS every 1.4 s."""
    length = round(0.4 * SECOND)
    rnd = random.Random(what)
    if what == "noise":
        shape = [3300 * rnd.gauss(0.0, 1.0) for _ in range(length)]
    else:
        notes = (69, 81) if what == "tone" else (60, 64, 67, 72)
        table = _wavetable()
        shape = [0.0] * length
        for midi in notes:
            step = 440.0 * 2 ** ((midi - 69) / 12) * _TABLE / SAMPLE_RATE
            _add(shape, 0, [2500 * table[int(n * step) % _TABLE] for n in range(length)])
    return mix(noise("pink", round(seconds * SECOND), -60.0), _bursts(seconds, shape, 1.4))


# --- the corpus -------------------------------------------------------------------------------


def _clean_truth(pcm: bytes) -> tuple[bool, ...]:
    levels = [rms(f) for f in frames(pcm)]
    peak = max(levels)
    return tuple(level > peak / TRUTH_RANGE for level in levels)


def _louder(speech: bytes, background: bytes) -> tuple[bool, ...]:
    return tuple(rms(s) > rms(b) for s, b in zip(frames(speech), frames(background), strict=True))


def corpus(*, quick: bool = False) -> list[Item]:
    """Every item, in table order; ``quick``: one sentence a voice, fewer noise levels and
    shorter recordings (a smoke test, not a measurement)."""
    items: list[Item] = []
    silence = (bytes(SECOND), bytes(SECOND // 2))
    english: list[tuple[str, bytes]] = []
    for voice, texts in VOICES:
        for i, text in enumerate(texts[:1] if quick else texts):
            spoken = speak(text, voice=voice)
            pcm = silence[0] + spoken + silence[1]
            items.append(Item("clean speech", f"{voice} {i}", pcm, _clean_truth(pcm)))
            if voice == "en-us":
                english.append((f"{voice} {i}", pcm))
    seconds = 1.5 if quick else 3.0
    samples = round(seconds * SECOND)
    rnd = random.Random(1)
    dither = _pcm([rnd.choice((-1, 0, 0, 1)) for _ in range(samples)])
    items += [Item("silence and dither", "silence", bytes(2 * samples))]
    items += [Item("silence and dither", "dither", dither)]
    for colour in COLOURS:
        for level in NOISE_LEVELS[::3] if quick else NOISE_LEVELS:
            pcm = noise(colour, samples, level)
            items.append(Item(f"{colour} noise", f"{level:.0f} dBFS", pcm))
    pieces = {"music": music(seconds if quick else MUSIC_SECONDS, -20.0, drums=False)}
    pieces["music, drums"] = music(seconds if quick else MUSIC_SECONDS, -20.0, drums=True, seed=1)
    for name, pcm in pieces.items():
        items.append(Item("music", f"{name}, -20 dBFS", pcm))
        quiet = array.array("h", [v // 6 for v in array.array("h", pcm)]).tobytes()  # -15.6 dB
        items.append(Item("music", f"{name}, -36 dBFS", quiet))
    for index, (name, clean) in enumerate(english):
        level = 20 * math.log10(rms(clean[2 * SECOND : -SECOND]) / 32768) - SNR_DB
        for colour in COLOURS:
            background = noise(colour, len(clean) // 2, level, offset=SECOND * index)
            truth = _louder(clean, background)
            items.append(Item("10 dB SNR", f"{name}, {colour}", mix(clean, background), truth))
        song = music(len(clean) / 2 / SECOND, level, drums=index % 2 == 1, seed=10 + index)
        items.append(Item("over music", f"{name}", mix(clean, song), _louder(clean, song)))
    items.append(Item("clicks, 150 ms apart", "clicks", clicks(seconds)))
    for what in ("noise", "tone", "chord"):
        items.append(Item("bursts, tones, chords", what, bursts(seconds + 1.5, what)))
    return items
