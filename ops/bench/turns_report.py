"""The turns bench's report: its figures as text (see :mod:`ops.bench.turns`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from ops.bench.barge import render_barge

if TYPE_CHECKING:
    from ops.bench.turns import BenchResult, Percentiles

__all__ = ["AIM_MS", "render"]

#: the issue's aim for the reaction at the client, p99
AIM_MS: Final = 60.0


def _met(p: Percentiles) -> str:
    if p.p99_ms is None:
        return "-"
    return "yes" if p.p99_ms <= AIM_MS else "no"


def _table(header: list[str], rows: list[list[str]], left: Sequence[int] = (0,)) -> str:
    """Columns padded to their widest cell: those in ``left`` to the left, others to the right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = enumerate(zip(row, widths, strict=True))
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in cells).rstrip()

    return "\n".join(line(row) for row in [header, *rows])


def _cells(p: Percentiles) -> list[str]:
    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    return [str(p.count), show(p.p50_ms), show(p.p99_ms), show(p.p50_frames), show(p.p99_frames)]


def render(result: BenchResult) -> str:
    noise = "digital silence" if result.noise_dbfs is None else f"{result.noise_dbfs:g} dBFS"
    out = [
        f"turns bench: {result.turns} turns, {result.interrupted} talked over; espeak-ng "
        f"speech, white noise {noise}; {result.delay_ms:g} ms each way; virtual clock, "
        f"seed {result.seed}",
        f"turn detection: min_speech_ms={result.min_speech_ms} "
        f"end_silence_ms={result.end_silence_ms} padding_ms={result.padding_ms}; "
        f"VAD aggressiveness {result.aggressiveness} (parley, webrtcvad)",
        "",
    ]
    measured = [d for d in result.detectors if d.available]
    stats = ["n", "p50 ms", "p99 ms", "p50 fr", "p99 fr"]
    for title, first, second in (
        (
            'the transceiver\'s own figures (its clock; "voiced" as the detector calls it)\n'
            "  eot: last voiced frame -> first agent frame    "
            "b-i: first voiced frame -> last agent frame sent",
            "end_of_turn",
            "barge_in",
        ),
        (
            "from the truth, at the client (both network legs and the jitter buffer included)\n"
            "  eot: end of speech -> first reply packet    "
            "b-i: onset of the interruption -> last agent packet",
            "truth_end_of_turn",
            "truth_barge_in",
        ),
    ):
        rows = [
            [d.name, *_cells(getattr(d, first)), "|", *_cells(getattr(d, second))] for d in measured
        ]
        header = ["detector", *[f"eot {s}" for s in stats], "|", *[f"b-i {s}" for s in stats]]
        out += [title, _table(header, rows), ""]
    rows = [
        [
            d.name,
            *_cells(d.voice_to_duck),
            _met(d.voice_to_duck),
            "|",
            *_cells(d.truth_voice_to_duck),
            _met(d.truth_voice_to_duck),
        ]
        for d in measured
    ]
    out += [
        "reaction, the issue's figure: the interruption's first voiced frame reaching the node "
        "-> the first ducked agent packet\n  reaching the client (the node's jitter buffer and "
        f"the {result.delay_ms:g} ms downlink included; aim: p99 <= 60 ms); left: the first "
        "frame\n  the detector called voiced; right: the onset of the clean utterance (the "
        "truth), detectors compared on the same ground",
        _table(["detector", *stats, "<= 60", "|", *stats, "<= 60"], rows),
        "",
    ]
    rows = [
        [
            d.name,
            f"{d.turns_started}/{d.turns_expected}",
            str(d.replies),
            f"{d.barge_ins_caught}/{d.barge_ins_attempted}",
            str(d.false_barge_ins),
            f"{d.virtual_seconds:.0f}",
            f"{d.wall_seconds:.1f}",
            d.description,
        ]
        for d in measured
    ]
    header = ["detector", "turns", "replies", "barge-ins", "made up", "virtual s", "wall s", ""]
    out += ["turns started/expected, barge-ins caught/attempted", _table(header, rows, (0, 7))]
    for d in result.detectors:
        if not d.available:
            out.append(f"{d.name}: {d.description}")
    if result.barge:
        out += ["", render_barge(list(result.barge), result.barge_replies, result.echo_cpu_us)]
    return "\n".join(out)
