"""The C-speed frame sums equal the plain Python sums they replaced, to rounding."""

from __future__ import annotations

import array
import math
from typing import Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sessions.audio.levels import ac_power, power

FULL = 32768.0 * 32768.0


def _reference(samples: list[int], step: int) -> tuple[float, float, float]:
    picked = samples[::step]
    if not picked:
        return 0.0, 0.0, 0.0
    square = sum(s * s for s in picked) / len(picked)
    mean = sum(picked) / len(picked)
    return square / FULL, max(0.0, square - mean * mean) / FULL, mean


#: audioop's rms and mean of the widened samples truncate to 1/65536 of a sample
ULP: Final = 1 / 65536


@given(
    st.lists(st.integers(-32768, 32767), min_size=0, max_size=960),
    st.sampled_from([1, 2, 3, 6]),
)
def test_power_and_ac_power_equal_the_python_sums(samples: list[int], step: int) -> None:
    pcm = array.array("h", samples).tobytes()
    want_power, want_ac, mean = _reference(samples, step)
    # (rms - e)^2 = rms^2 - 2 rms e + e^2, with e below one ULP: the truncation's whole effect
    off = (2 * math.sqrt(want_power * FULL) * ULP + ULP * ULP) / FULL
    assert power(pcm, step) == pytest.approx(want_power, rel=1e-9, abs=off + 1e-18)
    # the variance also takes the truncated mean's square off
    off_ac = off + (2 * abs(mean) * ULP + ULP * ULP) / FULL
    assert ac_power(pcm, step) == pytest.approx(want_ac, rel=1e-9, abs=off_ac + 1e-18)


def test_quiet_frames_keep_their_precision() -> None:
    # one LSB of dither: audioop's integer rms of the raw samples would say 1 or 0, not 0.5
    pcm = array.array("h", [1, 0] * 480).tobytes()
    assert power(pcm) == pytest.approx(0.5 / FULL, rel=1e-6)
    assert ac_power(pcm) == pytest.approx(0.25 / FULL, rel=1e-5)
    assert power(b"") == 0.0 and ac_power(b"") == 0.0
