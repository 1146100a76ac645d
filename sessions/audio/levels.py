"""Sample sums of 16-bit PCM frames at C speed: the power and the AC power (variance) that the
energy VAD and the echo estimator take of every frame.

A Python loop over a frame's samples costs 5-20 µs; at 50 frames a second each way it was about
a tenth of a node's Python time per session (``ops/bench/sessions.py --profile``). ``audioop``
does the sums in C. It is in the standard library up to Python 3.12 (deprecated, PEP 594) and is
the ``audioop-lts`` package from 3.13 on (a dependency with that marker in pyproject.toml);
numpy would do it too, but as a dependency of the node's media path for two sums it is much
more than we need. Widening the samples to 32 bits first (``lin2lin``: value x 65536) keeps
audioop's integer results (``rms`` and ``avg`` truncate) within 1/65536 of a sample, so the
figures equal the Python loops' to a few parts in a million above a sample's rms, and to
within 1e-13 of full scale below it (one LSB of dither reads 0.5 LSB², not 1 or 0).
"""

from __future__ import annotations

import array
import warnings
from typing import Final

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.11-3.12: PEP 594
    import audioop

__all__ = ["ac_power", "power"]

_WIDE: Final = 65536.0  # lin2lin(2 -> 4) multiplies each sample by this
_FULL_SCALE_POWER: Final = 32768.0 * 32768.0


def _wide(pcm: bytes, step: int) -> bytes:
    """Every ``step``-th sample of int16 PCM (native order), widened to int32."""
    # An array's strided slice copies the samples about twice as fast as a memoryview's
    # ``[::step].tobytes()`` (the same native int16 values), and audioop reads the array's
    # buffer as it is.
    samples = pcm if step == 1 else array.array("h", pcm)[::step]
    return audioop.lin2lin(samples, 2, 4)


def power(pcm: bytes, step: int = 1) -> float:
    """Mean square of every ``step``-th sample, relative to full scale (1.0 = 0 dBFS); 0.0 for
    no samples."""
    if len(pcm) < 2:
        return 0.0
    rms = audioop.rms(_wide(pcm, step), 4) / _WIDE
    return rms * rms / _FULL_SCALE_POWER


def ac_power(pcm: bytes, step: int = 1) -> float:
    """Variance of every ``step``-th sample (the power without the frame's mean, DC and the
    rumble below the frame rate), relative to full scale; 0.0 for no samples."""
    if len(pcm) < 2:
        return 0.0
    wide = _wide(pcm, step)
    rms = audioop.rms(wide, 4) / _WIDE
    mean = audioop.avg(wide, 4) / _WIDE
    return max(0.0, rms * rms - mean * mean) / _FULL_SCALE_POWER
