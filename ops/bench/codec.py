"""What ``node.opus_complexity`` buys and costs: libopus's CPU per session-second and the
fidelity of what it encodes, at every complexity, beside the configured one in the same run.

Every espeak-ng voice and sentence of the VAD corpus (``ops/bench/vad_corpus.py``), with a
quarter second of silence around each, is encoded in 20 ms frames the way a session encodes
what its agent says (``VoiceCodec(complexity, bitrate).encoder()``: VoIP mode, voice signal,
in-band FEC) and decoded again, one thread, timed with that thread's CPU clock (the best of a
few passes). Fidelity is the **segmental SNR** of the decoded speech against what went in, in
dB (the mean over 20 ms frames louder than -45 dBFS of each frame's SNR, each clipped to
[-10, 35] dB; the codec's fixed delay taken out first). It is a waveform measure: it does not
know what an ear forgives (it is not a perceptual measure such as PESQ), so it ranks
complexities rather than scoring them, and a few tenths of a dB are no audible difference.

``python -m ops.bench.codec`` (``--quick``: one sentence a voice, one pass); ``--bitrate``.
"""

from __future__ import annotations

import argparse
import array
import math
import time
from collections.abc import Sequence
from typing import Final

import attrs

from ops.bench.vad_corpus import VOICES
from sessions.audio.levels import power
from sessions.audio.opus import OpusDecoder, VoiceCodec
from sessions.audio.speech import SAMPLE_RATE, correlation, frames, speak

__all__ = ["CodecRow", "align", "measure", "segmental_snr"]

FRAME_SAMPLES: Final = SAMPLE_RATE // 50
FRAMES_PER_SECOND: Final = 50
#: frames quieter than this in the original are left out of the SNR (silence and breath)
_FLOOR_DBFS: Final = -45.0
_SNR_RANGE: Final = (-10.0, 35.0)
#: the longest codec delay looked for, samples (libopus's is 6.5 ms at 48 kHz)
_MAX_DELAY: Final = 960


@attrs.frozen
class CodecRow:
    complexity: int
    bitrate: int
    encode_us: float  # CPU per 20 ms frame encoded
    decode_us: float  # CPU per 20 ms frame decoded
    mean_bytes: float  # payload per frame
    snr_db: float  # segmental SNR of the decoded speech

    @property
    def per_session_ms(self) -> float:
        """What an echo session's codec costs, ms of CPU per second: a decode and an encode."""
        return (self.encode_us + self.decode_us) * FRAMES_PER_SECOND / 1000

    @property
    def sessions_per_core(self) -> float:
        return 1000 / self.per_session_ms


def corpus(quick: bool) -> list[bytes]:
    """The VAD corpus's speech, each utterance framed by a quarter second of silence."""
    pad = bytes(2 * SAMPLE_RATE // 4)
    return [
        pad + speak(text, voice=voice) + pad
        for voice, texts in VOICES
        for text in (texts[:1] if quick else texts)
    ]


def _dbfs(pcm: bytes) -> float:
    level = power(pcm)  # of a full-scale square wave: 1
    return 10 * math.log10(level) if level > 0 else -math.inf


def segmental_snr(original: bytes, decoded: bytes) -> tuple[float, int]:
    """Mean per-frame SNR (dB) of ``decoded`` against ``original`` (aligned, same length) over
    the frames of ``original`` above -45 dBFS, and how many frames that was."""
    total, counted = 0.0, 0
    a, b = array.array("h", original), array.array("h", decoded)
    for start in range(0, min(len(a), len(b)) - FRAME_SAMPLES + 1, FRAME_SAMPLES):
        ref = a[start : start + FRAME_SAMPLES]
        if _dbfs(ref.tobytes()) < _FLOOR_DBFS:
            continue
        out = b[start : start + FRAME_SAMPLES]
        # a difference of two int16 signals needs 17 bits: halve both, the ratio is the same
        error = array.array("h", ((x >> 1) - (y >> 1) for x, y in zip(ref, out, strict=True)))
        signal = power(array.array("h", (x >> 1 for x in ref)).tobytes())
        noise = power(error.tobytes())
        snr = _SNR_RANGE[1] if noise == 0 else 10 * math.log10(signal / noise)
        total += min(max(snr, _SNR_RANGE[0]), _SNR_RANGE[1])
        counted += 1
    return (total / counted if counted else math.nan), counted


def align(original: bytes, decoded: bytes) -> int:
    """The codec's delay in samples: ``decoded[n + delay]`` is ``original[n]``."""
    _, lag = correlation(original, decoded, _MAX_DELAY)
    if not 0 <= lag <= _MAX_DELAY:
        raise ValueError(f"decoded audio is not a delayed copy of the input (lag {lag})")
    return lag


def measure(
    utterances: Sequence[bytes], complexity: int, bitrate: int, passes: int
) -> tuple[CodecRow, list[bytes]]:
    """One complexity over the whole corpus; also the decoded audio, one per utterance."""
    codec = VoiceCodec(complexity=complexity, bitrate=bitrate)
    framed = [frames(pcm) for pcm in utterances]
    count = sum(len(f) for f in framed)
    best_encode = best_decode = math.inf
    decoded: list[bytes] = []
    size = 0
    for _ in range(passes):
        encode = decode = 0.0
        decoded, size = [], 0
        for utterance in framed:
            encoder, decoder = codec.encoder(), OpusDecoder()
            started = time.thread_time()
            packets = [encoder.encode(frame) for frame in utterance]
            encode += time.thread_time() - started
            started = time.thread_time()
            pcm = [decoder.decode(packet) for packet in packets]
            decode += time.thread_time() - started
            decoded.append(b"".join(pcm))
            size += sum(len(p) for p in packets)
        best_encode, best_decode = min(best_encode, encode), min(best_decode, decode)
    row = CodecRow(
        complexity=complexity,
        bitrate=bitrate,
        encode_us=best_encode / count * 1e6,
        decode_us=best_decode / count * 1e6,
        mean_bytes=size / count,
        snr_db=math.nan,
    )
    return row, decoded


def fidelity(utterances: Sequence[bytes], decoded: Sequence[bytes], delay: int) -> float:
    """Segmental SNR over the whole corpus, frames weighted equally."""
    total = counted = 0.0
    for original, out in zip(utterances, decoded, strict=True):
        snr, n = segmental_snr(original, out[2 * delay :])
        if n:
            total += snr * n
            counted += n
    return total / counted if counted else math.nan


def table(rows: Sequence[CodecRow], configured: int) -> str:
    base = next(r for r in rows if r.complexity == configured)
    lines = [
        f"complexity  encode us/frame  decode us/frame  codec ms/session-s  sessions/core"
        f"  bytes/frame  seg. SNR dB  cost vs {configured}  SNR vs {configured}"
    ]
    for r in rows:
        mark = "*" if r.complexity == configured else " "
        lines.append(
            f"{r.complexity:>9}{mark} {r.encode_us:>16.1f} {r.decode_us:>16.1f}"
            f" {r.per_session_ms:>19.2f} {r.sessions_per_core:>14.0f} {r.mean_bytes:>12.1f}"
            f" {r.snr_db:>12.2f} {r.per_session_ms / base.per_session_ms:>11.2f}x"
            f" {r.snr_db - base.snr_db:>+11.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[CodecRow]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="one sentence a voice, one pass")
    parser.add_argument("--bitrate", type=int, default=VoiceCodec().bitrate)
    parser.add_argument(
        "--complexity", type=int, default=VoiceCodec().complexity, help="the configured one"
    )
    args = parser.parse_args(argv)
    utterances = corpus(args.quick)
    passes = 1 if args.quick else 3
    rows: list[CodecRow] = []
    delay: int | None = None
    for complexity in range(11):
        row, decoded = measure(utterances, complexity, args.bitrate, passes)
        if delay is None:
            delay = align(utterances[0], decoded[0])
        rows.append(attrs.evolve(row, snr_db=fidelity(utterances, decoded, delay)))
    seconds = sum(len(u) for u in utterances) / 2 / SAMPLE_RATE
    print(
        f"libopus at {args.bitrate} bit/s, {len(utterances)} utterances ({seconds:.0f} s of"
        f" espeak-ng speech, {len(VOICES)} voices), codec delay {delay} samples; * configured"
    )
    print(table(rows, args.complexity))
    return rows


if __name__ == "__main__":
    main()
