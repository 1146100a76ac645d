"""The energy VAD on real speech (espeak-ng), silence, coloured noise and noisy speech.

The noise is made here from a seeded ``random`` so every run sees the same samples:

* white: Gaussian samples;
* pink-ish: the sum of four one-pole low-passes of white noise at 50, 200, 800 and 3200 Hz,
  each weighted by the inverse square root of its corner, which falls at about 3 dB per
  octave across the speech band (like a room, a crowd far away, a fan);
* brown: a leaky integrator of white noise (6 dB per octave, a rumble: a car, wind).

Truth for clean speech is every frame within 40 dB of the utterance's loudest frame (espeak-ng
writes digital zeros between most words); for speech in noise it is every frame where the
speech is louder than the noise (frames with a worse SNR are lost to any detector).
The thresholds below leave room under the figures measured when they were written, which the
module docstring of :mod:`sessions.audio.vad` quotes.
"""

from __future__ import annotations

import array
import math
import operator
import random
from functools import cache

import pytest

from ops.bench.vad_corpus import NOISE_SECONDS, unit_noise
from sessions.audio.speech import SAMPLE_RATE, frames, rms, speak
from sessions.audio.vad import FRAME_BYTES, SILENCE_DBFS, Vad, level_dbfs

TEXTS = (
    "Parley carries the voice of the caller to the agent, and the answer back again.",
    "Could you tell me the opening hours of the library on Saturday?",
    "Seven, three, nine. No, wait: seven, three, eight.",
)
SECOND = SAMPLE_RATE  # samples
NOISE_LEVELS = (-60.0, -45.0, -35.0, -25.0)  # dBFS


# --- material ---------------------------------------------------------------------------------


def noise(colour: str, samples: int, level_dbfs: float, offset: int = 0) -> bytes:
    """``samples`` of ``colour`` noise ("white", "pink" or "brown") at an RMS of ``level_dbfs``.

    ``offset`` picks another stretch of the same seeded noise.
    """
    raw = unit_noise(colour)[offset : offset + samples]
    if len(raw) < samples:
        raise ValueError(f"only {NOISE_SECONDS} s of noise are made")
    gain = 32768 * 10 ** (level_dbfs / 20) / math.sqrt(sum(v * v for v in raw) / samples)
    scaled = list(map(round, map(gain.__mul__, raw)))
    if max(scaled) > 32767 or min(scaled) < -32768:
        raise ValueError("noise this loud would clip")
    return array.array("h", scaled).tobytes()


COLOURS = ("white", "pink", "brown")


def mix(a: bytes, b: bytes) -> bytes:
    """Sum of two int16 signals, clipped; the result is as long as ``a``."""
    x = array.array("h", a)
    y = array.array("h", b)
    y.extend(bytes(max(0, len(x) - len(y))))
    total = list(map(operator.add, x, y))
    if max(total) > 32767 or min(total) < -32768:
        total = [min(32767, max(-32768, v)) for v in total]
    return array.array("h", total).tobytes()


def silence(seconds: float) -> bytes:
    return bytes(2 * round(seconds * SECOND))


@cache
def spoken(index: int) -> bytes:
    """``TEXTS[index]`` said by espeak-ng."""
    return speak(TEXTS[index])


@cache
def utterance(index: int) -> bytes:
    """``TEXTS[index]`` with 1 s of silence before and 0.5 s after."""
    return silence(1.0) + spoken(index) + silence(0.5)


def speech_dbfs(index: int) -> float:
    """RMS level of ``TEXTS[index]``, pauses between words included (SNRs refer to it)."""
    return 20 * math.log10(rms(spoken(index)) / 32768)


def clean_truth(pcm: bytes) -> list[bool]:
    levels = [rms(f) for f in frames(pcm)]
    peak = max(levels)
    return [level > peak / 100 for level in levels]  # within 40 dB of the loudest frame


def voiced(pcm: bytes, vad: Vad | None = None) -> list[bool]:
    detector = Vad() if vad is None else vad
    return [detector.is_speech(f) for f in frames(pcm)]


def rates(found: list[bool], truth: list[bool]) -> tuple[float, float]:
    """Recall on the truth's speech frames and false-positive rate on the others."""
    hits = sum(f and t for f, t in zip(found, truth, strict=True))
    false = sum(f and not t for f, t in zip(found, truth, strict=True))
    positives = sum(truth)
    return hits / positives, false / max(1, len(truth) - positives)


# --- level ------------------------------------------------------------------------------------


def test_level_dbfs_of_known_signals() -> None:
    square = array.array("h", [32767, -32767] * 480).tobytes()
    assert level_dbfs(square) == pytest.approx(0.0, abs=0.01)
    sine = array.array(
        "h", [round(32767 * math.sin(2 * math.pi * 1000 * n / SAMPLE_RATE)) for n in range(960)]
    ).tobytes()
    assert level_dbfs(sine) == pytest.approx(-3.01, abs=0.01)
    assert level_dbfs(bytes(FRAME_BYTES)) == SILENCE_DBFS
    one_lsb = array.array("h", [1, -1] * 480).tobytes()
    assert level_dbfs(one_lsb) == pytest.approx(-90.3, abs=0.1)
    with pytest.raises(ValueError, match="even"):
        level_dbfs(b"\x00\x01\x02")


def test_settings_are_validated() -> None:
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="aggressiveness"):
            Vad(aggressiveness=bad)
    with pytest.raises(ValueError, match="min_level_dbfs"):
        Vad(min_level_dbfs=3.0)
    with pytest.raises(ValueError, match="whole number"):
        Vad(sample_rate=44_100, frame_ms=15)
    vad = Vad()
    assert vad.frame_bytes == FRAME_BYTES
    with pytest.raises(ValueError, match="1920"):
        vad.is_speech(bytes(960))
    assert Vad(sample_rate=16_000, frame_ms=10).frame_bytes == 320


# --- accuracy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_clean_speech_is_voiced(index: int) -> None:
    pcm = utterance(index)
    recall, false = rates(voiced(pcm), clean_truth(pcm))
    assert recall >= 0.95  # measured 1.00
    assert false <= 0.05  # measured 0.00-0.02: the frame after a word, by hysteresis


def test_silence_is_never_voiced() -> None:
    rnd = random.Random(1)
    dither = array.array("h", [rnd.choice((-1, 0, 0, 1)) for _ in range(3 * SECOND)]).tobytes()
    for pcm in (silence(3.0), dither):
        assert not any(voiced(pcm))


@pytest.mark.parametrize("colour", COLOURS)
def test_steady_noise_is_rarely_voiced(colour: str) -> None:
    for level in NOISE_LEVELS:
        found = voiced(noise(colour, 3 * SECOND, level))
        # Measured: at most 2 % of frames, and never at the start (the floor starts at the
        # first frame). A turn needs 200 ms of speech, so isolated frames start none.
        assert sum(found) / len(found) <= 0.05, (colour, level)
        assert not any(found[:10]), (colour, level)


@pytest.mark.parametrize("colour", COLOURS)
@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_speech_in_noise_at_10_db_snr(colour: str, index: int) -> None:
    clean = utterance(index)
    background = noise(colour, len(clean) // 2, speech_dbfs(index) - 10, offset=SECOND * index)
    truth = [rms(s) > rms(n) for s, n in zip(frames(clean), frames(background), strict=True)]
    recall, false = rates(voiced(mix(clean, background)), truth)
    assert recall >= 0.7  # measured 0.80-0.95
    assert false <= 0.15  # measured 0.00-0.08, mostly frames next to speech


def test_floor_learns_a_louder_background_within_a_second() -> None:
    # Noise appearing after digital silence is speech until the floor learns it; the
    # quietest-frame bound limits that to the one-second window (documented limitation).
    found = voiced(silence(1.0) + noise("pink", 4 * SECOND, -35.0))
    assert not any(found[50 + 55 :])
    found = voiced(
        noise("pink", 2 * SECOND, -55.0) + noise("pink", 4 * SECOND, -30.0, offset=2 * SECOND)
    )
    assert not any(found[100 + 55 :])


def test_aggressiveness_trades_recall_for_rejection() -> None:
    clean = utterance(0)
    noisy = mix(clean, noise("pink", len(clean) // 2, -32.0))
    counts = [sum(voiced(noisy, Vad(aggressiveness=a))) for a in range(4)]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] > counts[3]


def test_quiet_speech_below_min_level_is_not_voiced() -> None:
    pcm = array.array("h", utterance(1))
    quiet = array.array("h", [v // 1000 for v in pcm]).tobytes()  # -60 dB: peaks near -70 dBFS
    assert not any(voiced(quiet))
    assert any(voiced(quiet, Vad(min_level_dbfs=-90.0)))


def test_energy_vad_rejects_the_coloured_noise_webrtcvad_takes_for_speech() -> None:
    """The measurement behind the choice of detector (module docstring of the VAD).

    Runs only where ``webrtcvad-wheels`` happens to be installed; Parley does not depend on it.
    """
    webrtcvad = pytest.importorskip("webrtcvad")
    fan = frames(noise("pink", 3 * SECOND, -25.0))
    for mode in range(4):
        other = webrtcvad.Vad(mode)
        assert sum(other.is_speech(f, SAMPLE_RATE) for f in fan) / len(fan) > 0.5
    for aggressiveness in range(4):
        ours = Vad(aggressiveness=aggressiveness)
        assert sum(ours.is_speech(f) for f in fan) / len(fan) < 0.05
