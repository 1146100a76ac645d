"""The codec bench: its fidelity measure and a small run (not a measurement)."""

from __future__ import annotations

import array
import random

import pytest

from ops.bench import codec
from sessions.audio.speech import SAMPLE_RATE, speak


def _tone_with_noise(noise_ratio: float) -> tuple[bytes, bytes]:
    rnd = random.Random(3)
    clean = array.array("h", (int(8000 * ((n // 40) % 2 * 2 - 1)) for n in range(SAMPLE_RATE)))
    noisy = array.array("h", (x + int(rnd.gauss(0, 8000 * noise_ratio)) for x in clean))
    return clean.tobytes(), noisy.tobytes()


def test_segmental_snr_measures_the_noise_added_and_skips_silence() -> None:
    clean, noisy = _tone_with_noise(0.1)  # noise 20 dB below the signal
    snr, frames = codec.segmental_snr(clean, noisy)
    assert frames == 50 and snr == pytest.approx(20.0, abs=0.5)
    assert codec.segmental_snr(clean, clean)[0] == 35.0  # clipped at the top
    assert codec.segmental_snr(bytes(len(clean)), noisy)[1] == 0  # silence is not scored


def test_align_finds_the_delay_of_a_delayed_copy() -> None:
    spoken = speak("one two three", voice="en-us")
    assert codec.align(spoken, bytes(2 * 309) + spoken) == 309


@pytest.mark.slow
def test_bench_codec_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    rows = codec.main(["--quick"])
    printed = capsys.readouterr().out
    assert [r.complexity for r in rows] == list(range(11)) and "5*" in printed
    # Dearer at 10 than at 0, and what comes out is the speech that went in.
    assert rows[10].encode_us > 2 * rows[0].encode_us
    assert all(5.0 < r.snr_db < 20.0 and 50 < r.mean_bytes < 90 for r in rows)
