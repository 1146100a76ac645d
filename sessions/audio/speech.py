"""Real speech for tests and benchmarks: espeak-ng at run time, 48 kHz mono int16 PCM.

Nothing here is on the media path. :func:`speak` runs Debian's ``espeak-ng`` (no audio files are
kept in the repository), :func:`resample` brings its 22 050 Hz output to the 48 kHz our Opus
frames use, :func:`frames` cuts PCM into 20 ms frames and :func:`correlation` proves that audio
which came back through codecs and the network still carries the speech that was sent.

Everything is pure Python on ``array('h')`` so that neither numpy nor the deprecated ``audioop``
is needed. PCM is always signed 16-bit little-endian, mono, like the frames the Opus wrappers take;
the byte order is that of the machine (``array('h')``), which is little-endian on every platform
Parley supports (x86-64, aarch64).
"""

from __future__ import annotations

import array
import itertools
import math
import operator
import shutil
import subprocess
import sys
from typing import Final

__all__ = [
    "SAMPLE_RATE",
    "SpeechUnavailableError",
    "correlation",
    "frames",
    "resample",
    "rms",
    "speak",
]

#: Sample rate of everything this module returns (RFC 7587 §4.1: Opus RTP runs at 48 kHz).
SAMPLE_RATE: Final = 48_000

_ESPEAK: Final = "espeak-ng"
_ENVELOPE_MS: Final = 1  # coarse search resolution: one envelope value per millisecond
_DECIMATE: Final = 8  # middle search runs at 6 kHz, where most speech energy lies
_CANDIDATES: Final = 3  # envelope peaks refined on the waveform (guards against a wrong peak)

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("sessions.audio.speech assumes a little-endian machine (int16 LE PCM)")


class SpeechUnavailableError(RuntimeError):
    """espeak-ng is not installed (Debian: ``apt-get install espeak-ng``) or it failed."""


# --- synthesis --------------------------------------------------------------------------------


def speak(text: str, *, voice: str = "en", rate: int | None = None) -> bytes:
    """Synthesize ``text`` with espeak-ng; return 48 kHz mono int16 PCM.

    ``voice`` is an espeak-ng voice name (``-v``), ``rate`` the speed in words per minute
    (``-s``; espeak-ng's default is 175). Raises :class:`SpeechUnavailableError` when espeak-ng
    is missing or fails.
    """
    exe = shutil.which(_ESPEAK)
    if exe is None:
        raise SpeechUnavailableError(
            "espeak-ng is not installed; on Debian/Ubuntu: apt-get install espeak-ng"
        )
    argv = [exe, "--stdout", "--stdin", "-v", voice]
    if rate is not None:
        argv += ["-s", str(rate)]
    # The text goes on stdin so that text starting with "-" is never taken for an option.
    try:
        done = subprocess.run(
            argv, input=text.encode("utf-8"), capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SpeechUnavailableError(f"espeak-ng could not run: {exc}") from exc
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip()
        raise SpeechUnavailableError(f"espeak-ng exited with {done.returncode}: {message}")
    rate_in, pcm = _parse_wav(done.stdout)
    return resample(pcm, rate_in, SAMPLE_RATE)


def _parse_wav(data: bytes) -> tuple[int, bytes]:
    """Sample rate and PCM of espeak-ng's WAV output (mono int16).

    With ``--stdout`` espeak-ng cannot seek back to fix the RIFF and data sizes, so it writes
    placeholders (0x7fffffff-ish); the data chunk is therefore taken to run to the end of the
    output rather than trusting its declared size.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise SpeechUnavailableError("espeak-ng did not write a WAV file")
    pos = 12
    rate: int | None = None
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk_id == b"fmt ":
            fmt = data[body : body + 16]
            if len(fmt) < 16:
                break
            channels = int.from_bytes(fmt[2:4], "little")
            bits = int.from_bytes(fmt[14:16], "little")
            if int.from_bytes(fmt[0:2], "little") != 1 or channels != 1 or bits != 16:
                raise SpeechUnavailableError("espeak-ng wrote something other than mono int16")
            rate = int.from_bytes(fmt[4:8], "little")
        elif chunk_id == b"data":
            if rate is None:
                break
            pcm = data[body : min(len(data), body + size)]
            return rate, pcm[: len(pcm) // 2 * 2]
        pos = body + size + (size & 1)  # RIFF chunks are padded to an even length
    raise SpeechUnavailableError("espeak-ng's WAV output has no fmt or data chunk")


def resample(pcm: bytes, rate_in: int, rate_out: int) -> bytes:
    """Resample mono int16 PCM by linear interpolation.

    Linear interpolation is deliberately simple: it is exact at the input samples, and its
    triangular kernel attenuates the spectral images of upsampling (the only direction used
    here, 22 050 Hz to 48 kHz) enough for intelligible test speech. It has no anti-aliasing
    filter, so downsampling content above the new Nyquist frequency would alias. Output sample
    ``k`` sits at input position ``k * rate_in / rate_out``, computed in integers so that long
    signals never drift.
    """
    if rate_in <= 0 or rate_out <= 0:
        raise ValueError("sample rates must be positive")
    src = _samples(pcm)
    if rate_in == rate_out or not src:
        return bytes(pcm)
    count = len(src) * rate_out // rate_in
    last = len(src) - 1
    out = array.array("h", bytes(2 * count))
    for k in range(count):
        i, frac = divmod(k * rate_in, rate_out)
        a = src[i]
        b = src[i + 1] if i < last else a
        out[k] = a + (b - a) * frac // rate_out
    return out.tobytes()


def frames(pcm: bytes, frame_ms: int = 20, *, sample_rate: int = SAMPLE_RATE) -> list[bytes]:
    """Cut mono int16 PCM into ``frame_ms`` frames; the last one is padded with silence."""
    if len(pcm) % 2:
        raise ValueError("int16 PCM has an even number of bytes")
    size = 2 * sample_rate * frame_ms // 1000
    if size <= 0:
        raise ValueError("frame_ms is too short for the sample rate")
    out = [pcm[i : i + size] for i in range(0, len(pcm), size)]
    if out and len(out[-1]) < size:
        out[-1] += bytes(size - len(out[-1]))
    return out


def rms(pcm: bytes) -> float:
    """Root-mean-square level of mono int16 PCM (0 for silence, 32767 for a full-scale square)."""
    samples = _samples(pcm)
    if not samples:
        return 0.0
    return math.sqrt(sum(map(operator.mul, samples, samples)) / len(samples))


# --- correlation ------------------------------------------------------------------------------


def correlation(
    a: bytes, b: bytes, max_lag_samples: int, *, sample_rate: int = SAMPLE_RATE
) -> tuple[float, int]:
    """Best normalized cross-correlation of two mono int16 signals, and its lag in samples.

    A positive lag means ``b`` is ``a`` delayed: ``b[n + lag] ~ a[n]``. The correlation is the
    Pearson coefficient (means removed) over the samples where the shifted signals overlap, so
    1.0 means identical up to gain, and lags where the overlap is shorter than half the shorter
    signal are not considered (a few overlapping samples correlate well by chance).

    Pure Python cannot afford the full-rate correlation at every lag (48 000 samples times
    thousands of lags), so the search narrows down in three steps: the amplitude envelopes
    (1 ms means of ``|x|``) over the whole lag range, then the waveforms decimated to 6 kHz
    around the best few envelope peaks, then the full-rate waveforms within one decimation step
    of the winner. The returned correlation is the full-rate one at the returned lag. numpy is
    not used; it is not installed in this project's environments.
    """
    if max_lag_samples < 0:
        raise ValueError("max_lag_samples is not negative")
    x = _samples(a)
    y = _samples(b)
    min_overlap = min(len(x), len(y)) // 2
    if min_overlap == 0:
        raise ValueError("both signals need samples")

    # Step 1: envelopes, whole lag range.
    block = max(1, sample_rate * _ENVELOPE_MS // 1000)
    env_x = _envelope(x, block)
    env_y = _envelope(y, block)
    env_lag = -(-max_lag_samples // block)
    scores = _scan(env_x, env_y, range(-env_lag, env_lag + 1), max(1, min_overlap // block))
    if not scores:
        raise ValueError("max_lag_samples leaves no lag with enough overlap")
    candidates = _peaks(scores, _CANDIDATES)

    # Step 2: decimated waveforms around each candidate, one envelope block either side.
    dec_x = _decimate(x, _DECIMATE)
    dec_y = _decimate(y, _DECIMATE)
    reach = block // _DECIMATE + 2
    dec_min = max(1, min_overlap // _DECIMATE)
    best_dec: tuple[float, int] | None = None
    for env_best in candidates:
        centre = env_best * block // _DECIMATE
        lags = range(centre - reach, centre + reach + 1)
        for lag, score in _scan(dec_x, dec_y, lags, dec_min).items():
            if abs(lag * _DECIMATE) <= max_lag_samples + _DECIMATE and (
                best_dec is None or score > best_dec[0]
            ):
                best_dec = (score, lag)
    if best_dec is None:
        raise ValueError("max_lag_samples leaves no lag with enough overlap")

    # Step 3: full rate within one decimation step of the winner.
    centre = best_dec[1] * _DECIMATE
    lags = range(
        max(-max_lag_samples, centre - _DECIMATE), min(max_lag_samples, centre + _DECIMATE) + 1
    )
    full = _scan(x, y, lags, min_overlap)
    if not full:
        raise ValueError("max_lag_samples leaves no lag with enough overlap")
    lag = max(full, key=lambda k: full[k])
    return full[lag], lag


def _samples(pcm: bytes) -> array.array[int]:
    if len(pcm) % 2:
        raise ValueError("int16 PCM has an even number of bytes")
    out = array.array("h")
    out.frombytes(pcm)
    return out


def _envelope(x: array.array[int], block: int) -> list[float]:
    return [sum(map(abs, x[i : i + block])) / block for i in range(0, len(x) - block + 1, block)]


def _decimate(x: array.array[int], factor: int) -> list[float]:
    # A moving average over each block is a crude low-pass filter, but enough to keep the
    # 6 kHz signal's correlation peak where the full-rate one is.
    return [sum(x[i : i + factor]) / factor for i in range(0, len(x) - factor + 1, factor)]


def _scan(
    x: array.array[int] | list[float],
    y: array.array[int] | list[float],
    lags: range,
    min_overlap: int,
) -> dict[int, float]:
    """Pearson correlation of ``x[i]`` with ``y[i + lag]`` for every lag with enough overlap."""
    px = [0.0, *itertools.accumulate(x)]
    py = [0.0, *itertools.accumulate(y)]
    pxx = [0.0, *itertools.accumulate(v * v for v in x)]
    pyy = [0.0, *itertools.accumulate(v * v for v in y)]
    out: dict[int, float] = {}
    for lag in lags:
        start = max(0, -lag)
        stop = min(len(x), len(y) - lag)
        count = stop - start
        if count < min_overlap:
            continue
        sx = px[stop] - px[start]
        sy = py[stop + lag] - py[start + lag]
        var_x = pxx[stop] - pxx[start] - sx * sx / count
        var_y = pyy[stop + lag] - pyy[start + lag] - sy * sy / count
        if var_x <= 0 or var_y <= 0:
            out[lag] = 0.0
            continue
        sxy = sum(map(operator.mul, x[start:stop], y[start + lag : stop + lag]))
        out[lag] = (sxy - sx * sy / count) / math.sqrt(var_x * var_y)
    return out


def _peaks(scores: dict[int, float], count: int) -> list[int]:
    """The ``count`` highest local maxima of ``scores`` (by lag), best first."""
    maxima = [
        lag
        for lag, score in scores.items()
        if score >= scores.get(lag - 1, -math.inf) and score >= scores.get(lag + 1, -math.inf)
    ]
    return sorted(maxima, key=lambda lag: scores[lag], reverse=True)[:count]
