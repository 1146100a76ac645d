"""What ops/bench/sessions.py measures, and how it is printed: the figures of each side (parley
cluster, parley direct, aiortc echo), the codec floor, and the profile's top entries."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Final, final

import attrs

from ops.bench.common import percentile

__all__ = [
    "LABELS",
    "BenchResult",
    "FloorFigures",
    "Params",
    "ProfileTop",
    "ServerFigures",
    "StepFigures",
    "render",
]

#: an echoed frame arriving later than this after its schedule is late
LATE_SLACK: Final = 0.005
#: a ramp step passes with fewer bad (late or missing) frames than this
BAD_LIMIT: Final = 0.01
#: ... and if the echo's delay moved less than this over the window (it grows when a server
#: falls behind, shrinks when it catches up)
DRIFT_LIMIT: Final = 0.020
#: a server this busy (CPU seconds per second) is saturated
SATURATED: Final = 0.9


# --- results ---------------------------------------------------------------------------------


@final
@attrs.frozen
class StepFigures:
    """One ramp step: ``sessions`` concurrent echo sessions over a measured window."""

    sessions: int
    window: float
    server_cpu: float
    """server CPU seconds per wall second (1.0 is one core busy)"""
    client_cpu: float
    """this process's CPU seconds per wall second, over its cores"""
    cpu_per_session: float
    frames: int
    """echoed frames expected in the window, over all sessions"""
    late: int
    """frames that came more than 5 ms later after the previous one than their timestamps say"""
    missing: int
    """frames whose RTP timestamp never came"""
    jitter: float
    """99th percentile of the echo's delay beyond its least in the window, seconds"""
    drift: float
    """growth of the echo's delay over the window (median over sessions), seconds"""
    server_late: float | None
    """parley only: late frames (``late_frames``) / pacer ticks, from the node's own stats"""
    failed_setups: int
    attempts: int
    """windows measured; a failing step is measured once more and the better window kept"""
    others_cpu: float
    """CPU seconds per second used by every other process on the machine (etcd included):
    this machine may be shared"""
    client_lag: float
    """the clients' event loop: longest wake-up delay in the window, seconds"""
    relay_cpu: float | None = None
    """cluster only: the relay's CPU seconds per wall second (it is on every packet's path)"""

    @property
    def relay_cpu_per_session(self) -> float | None:
        if self.relay_cpu is None or not self.sessions:
            return None
        return self.relay_cpu / self.sessions

    @property
    def bad_fraction(self) -> float:
        return (self.late + self.missing) / self.frames if self.frames else 1.0

    @property
    def keeps_up(self) -> bool:
        """No failed setup, under 1% missing, and the echo delay did not move 20 ms."""
        return (
            self.failed_setups == 0
            and self.frames > 0
            and self.missing / self.frames < BAD_LIMIT
            and not abs(self.drift) >= DRIFT_LIMIT
        )

    @property
    def passed(self) -> bool:
        return self.keeps_up and self.bad_fraction < BAD_LIMIT

    @property
    def clear_failure(self) -> bool:
        """Failed by far: not worth another window."""
        return bool(self.failed_setups) or self.bad_fraction > 0.1 or abs(self.drift) > 0.1


@final
@attrs.frozen
class ServerFigures:
    """Everything measured about one server."""

    name: str
    setups: int
    failed_setups: int
    answer_times: list[float]
    rtp_times: list[float]
    frame_times: list[float]
    setup_cpu: float
    """server CPU seconds per session set up"""
    steps: list[StepFigures]
    capacity: int
    """largest ramp step that passed (0: none did)"""
    stopped_by: str

    def setup_percentile(self, which: str, q: float) -> float:
        return percentile(getattr(self, f"{which}_times"), q)

    def step_at(self, sessions: int) -> StepFigures | None:
        for step in self.steps:
            if step.sessions == sessions and step.frames:
                return step
        return None

    def cpu_per_session_at(self, sessions: int) -> float | None:
        step = self.step_at(sessions)
        return None if step is None else step.cpu_per_session

    def relay_cpu_per_session_at(self, sessions: int) -> float | None:
        step = self.step_at(sessions)
        return None if step is None else step.relay_cpu_per_session

    @property
    def cpu_ceiling(self) -> float:
        """Sessions a core would hold if CPU were the only limit: N / server CPU of the
        largest step below 90% server CPU whose echo kept up (missing and delay move in
        bounds, whatever the late frames)."""
        below = [
            s
            for s in self.steps
            if s.server_cpu < SATURATED and s.frames and s.keeps_up and s.server_cpu > 0
        ]
        if not below:
            return math.nan
        step = max(below, key=lambda s: s.sessions)
        return step.sessions / step.server_cpu


@final
@attrs.frozen
class FloorFigures:
    """The codec floor: libopus decoding and re-encoding the clients' speech, what an echo
    session costs if nothing but the codec cost anything."""

    complexity: int
    bitrate: int
    frames: int
    """20 ms frames decoded and encoded per run (the best of a few runs is kept)"""
    cpu_per_session: float
    """CPU seconds per session-second: 50 frames decoded and encoded"""

    @property
    def sessions_per_core(self) -> float:
        """Sessions one core would hold if Python cost nothing."""
        return 1 / self.cpu_per_session if self.cpu_per_session > 0 else math.nan


@final
@attrs.frozen
class ProfileTop:
    """The top entries of one py-spy profile (``--format raw``) of the node."""

    kind: str
    """``gil``: only the thread holding the GIL is sampled; ``all``: every running thread"""
    path: str
    samples: int
    other_threads: int
    """samples of other threads than the main (Trio) one, left out (``all`` only)"""
    self_time: list[tuple[str, int]]
    """(function (file), samples where it was the innermost frame), most first"""
    inclusive: list[tuple[str, int]]
    """(function (file), samples with it anywhere on the stack), most first"""


#: how each side is shown, in order
LABELS: Final = {"cluster": "parley cluster", "parley": "parley direct", "aiortc": "aiortc echo"}


@final
@attrs.frozen
class BenchResult:
    machine: dict[str, object]
    params: dict[str, object]
    floor: list[FloorFigures]
    complexity: int
    """the nodes' Opus complexity (``node.opus_complexity``)"""
    cluster: ServerFigures | None = None
    """through ``parley up --nodes 1 --relays 1``: a relay, its QUIC tunnel and a node"""
    parley: ServerFigures | None = None
    """a node in direct mode (clients' UDP straight to it)"""
    aiortc: ServerFigures | None = None
    profile: list[ProfileTop] = attrs.field(factory=list)

    @property
    def sides(self) -> list[ServerFigures]:
        return [s for s in (self.cluster, self.parley, self.aiortc) if s is not None]

    def floor_at(self, complexity: int) -> FloorFigures | None:
        return next((f for f in self.floor if f.complexity == complexity), None)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN, for a figure that could not be measured, becomes None)."""
        out = attrs.asdict(self)
        for side in self.sides:
            summary: dict[str, Any] = out[side.name]
            for which in ("answer", "rtp", "frame"):
                for q in (50, 99):
                    summary[f"{which}_p{q}"] = side.setup_percentile(which, q)
            summary["cpu_ceiling"] = side.cpu_ceiling
            floor = self.floor_at(self.complexity)
            if floor is not None and side.name != "aiortc":
                summary["floor_fraction"] = side.capacity / floor.sessions_per_core
                summary["ceiling_floor_fraction"] = side.cpu_ceiling / floor.sessions_per_core
            for step, raw in zip(side.steps, summary["steps"], strict=True):
                raw["bad_fraction"] = step.bad_fraction
                raw["keeps_up"] = step.keeps_up
                raw["passed"] = step.passed
        for floor, raw in zip(self.floor, out["floor"], strict=True):
            raw["sessions_per_core"] = floor.sessions_per_core
        cleaned: dict[str, Any] = _no_nan(out)
        return cleaned


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


@final
@attrs.frozen
class Params:
    setups: int
    max_sessions: int
    warmup: float
    window: float
    decode_all: bool
    time_budget: float
    """seconds per server for the ramp; steps that would start later are skipped"""
    sides: tuple[str, ...] = ("cluster", "parley", "aiortc")
    """which sides are measured, in this order (``parley``: direct mode)"""
    profile: str | None = None
    """a directory: profile the cluster's node with py-spy at N=10 and keep the profiles there"""
    tick_ms: int | None = None
    """``node.media_tick_ms`` of both parley sides (None: the node's default)"""
    complexity: int | None = None
    """``node.opus_complexity`` of both parley sides (None: the node's default)"""

    def steps(self) -> list[int]:
        steps = []
        n = 5
        while n < self.max_sessions:
            steps.append(n)
            n *= 2
        steps.append(self.max_sessions)
        return steps


def _why(step: StepFigures) -> str:
    if step.failed_setups:
        cause = f"{step.failed_setups} failed setups"
    elif step.bad_fraction >= BAD_LIMIT:
        cause = f"{100 * step.bad_fraction:.1f}% bad frames"
    else:
        cause = f"echo delay moved {1000 * step.drift:+.0f} ms"
    if step.server_cpu >= SATURATED:
        return f"{cause} at N={step.sessions}; server core saturated"
    if step.client_cpu >= SATURATED:
        return f"{cause} at N={step.sessions}; client cores saturated first"
    return f"{cause} at N={step.sessions}; neither saturated"


# --- output --------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{1000 * value:.1f} ms"


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or math.isnan(ours) or math.isnan(theirs) or not theirs:
        return "-"
    return f"{ours / theirs:.2f}x"


def _count(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0f}"


def _num(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def _header(result: BenchResult) -> list[str]:
    m, p = result.machine, result.params
    return [
        f"machine: nproc {m['nproc']}, {m['cpu_model']}, python {m['python']}, "
        f"aiortc {m['aiortc']}, libopus {m.get('libopus', '?')}, linux {m['kernel']}",
        f"server (the node; aiortc's process) pinned to cpu {m['server_cores']}; clients (this"
        " process), etcd, and in cluster mode `parley up` and the relay, to the rest"
        if m["pinned"]
        else "one cpu: servers, clients and etcd share it (nothing pinned)",
        f"params: {p['setups']} sequential setups; ramp {Params(**p).steps()} sessions "  # type: ignore[arg-type]
        f"(max {p['max_sessions']}), warm-up {p['warmup']}s, window {p['window']}s; "
        f"clients decode {'every frame' if p['decode_all'] else 'the first frame only'}; "
        "node.media_tick_ms "
        + ("default" if p.get("tick_ms") is None else str(p["tick_ms"]))
        + ", node.opus_complexity "
        + ("default" if p.get("complexity") is None else str(p["complexity"])),
        "measured at the client the same way for every side, a ramp step passes with < "
        f"{BAD_LIMIT:.0%} bad frames (late: came > {LATE_SLACK * 1000:.0f} ms later after the"
        " previous echoed frame than their RTP timestamps are apart; or missing) and an echo"
        f" delay that moved < {DRIFT_LIMIT * 1000:.0f} ms over the window",
        "",
    ]


def render(result: BenchResult) -> str:
    sides = result.sides
    baseline = result.aiortc
    ours = [s for s in sides if s is not baseline]
    ratio_heads = [f"{s.name if s.name == 'cluster' else 'direct'}/aiortc" for s in ours]
    if baseline is None:
        ratio_heads = []
    floor = result.floor_at(result.complexity)
    rows: list[list[str]] = []

    def row(
        label: str, get: Callable[[ServerFigures], float | None], fmt: Callable[..., str]
    ) -> None:
        values = [get(s) for s in sides]
        cells = [label, *(fmt(v) for v in values)]
        if baseline is not None:
            cells += [_ratio(get(s), get(baseline)) for s in ours]
        rows.append(cells)

    for which, label in (("answer", "answer"), ("rtp", "first echo RTP"), ("frame", "1st decoded")):
        for q in (50, 99):
            row(
                f"setup POST->{label} p{q}",
                functools.partial(ServerFigures.setup_percentile, which=which, q=q),
                _ms,
            )
    rows.append(
        ["setups ok / tried", *(f"{s.setups - s.failed_setups}/{s.setups}" for s in sides)]
        + [""] * len(ratio_heads)
    )
    row("server CPU per setup", lambda s: s.setup_cpu, _ms)
    for n in sorted({st.sessions for s in sides for st in s.steps[:2]}):
        row(
            f"server CPU/session @N={n} (/s)",
            functools.partial(ServerFigures.cpu_per_session_at, sessions=n),
            _ms,
        )
    if result.cluster is not None:
        for n in sorted({st.sessions for st in result.cluster.steps[:2]}):
            row(
                f"relay CPU/session @N={n} (/s)",
                functools.partial(ServerFigures.relay_cpu_per_session_at, sessions=n),
                _ms,
            )
    row(f"sessions/core, bad < {BAD_LIMIT:.0%}", lambda s: float(s.capacity), _count)
    row("CPU ceiling, sessions/core", lambda s: s.cpu_ceiling, _num)
    if floor is not None:
        share = floor.sessions_per_core
        rows.append(
            [f"sessions/core / codec floor (c{floor.complexity})"]
            + [_pct(s.capacity / share) if s is not baseline else "-" for s in sides]
            + [""] * len(ratio_heads)
        )
        rows.append(
            [f"CPU ceiling / codec floor (c{floor.complexity})"]
            + [_pct(s.cpu_ceiling / share) if s is not baseline else "-" for s in sides]
            + [""] * len(ratio_heads)
        )
    heads = ["figure", *(LABELS[s.name] for s in sides), *ratio_heads]
    widths = [max(len(r[i]) for r in [*rows, heads]) for i in range(len(heads))]
    lines = _header(result)
    if ratio_heads:
        lines.insert(-1, "ratio = parley side / aiortc echo")
    for cells in [heads, *rows]:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
    lines.append("")
    lines += _floor_lines(result)
    lines.append("")
    lines += _ramp_table(*sides)
    lines.append(
        "bad = late + missing; jitter p99: of the echo delay above its least in the window;"
        " drift: how the echo delay moved over the window; node late: the node's own late"
        " frames (ticks handled, or frames handed to the port, > 5 ms after their grid point);"
        " relay: the relay's CPU (cluster); others: CPU of every other process on the"
        " machine (etcd included), 100% = one core; lag: the clients' worst event-loop delay."
        " CPU ceiling: N / server CPU at the largest step under 90% CPU that kept up (< 1%"
        " missing, delay moved < 20 ms)"
    )
    for top in result.profile:
        lines.append("")
        lines += profile_lines(top)
    return "\n".join(lines)


def _floor_lines(result: BenchResult) -> list[str]:
    """The codec floor, and the fraction of it each parley side reaches."""
    lines = [
        "codec floor: opuslib decode + encode of the clients' speech frames, one thread, as the"
        f" node's encoder (node.opus_complexity {result.complexity})"
    ]
    for f in result.floor:
        lines.append(
            f"  complexity {f.complexity:>2}, {f.bitrate // 1000} kbit/s: "
            f"{_ms(f.cpu_per_session)} CPU per session-second -> "
            f"{f.sessions_per_core:.0f} sessions/core if Python cost nothing"
        )
    configured = result.floor_at(result.complexity)
    for side in (result.cluster, result.parley):
        if side is None or configured is None:
            continue
        label = LABELS[side.name]
        lines.append(
            f"  {label}: {side.capacity} sessions/core = "
            f"{_pct(side.capacity / configured.sessions_per_core)} of the floor at complexity "
            f"{configured.complexity}; CPU ceiling {_num(side.cpu_ceiling)} = "
            f"{_pct(side.cpu_ceiling / configured.sessions_per_core)}"
        )
        # The node encodes at its configured complexity only: at another one, its cost per
        # session would move by what the codec's cost moves (an estimate, not a measurement).
        at = side.cpu_per_session_at(10) or side.cpu_per_session_at(5)
        for other in result.floor:
            if other is configured or at is None or math.isnan(at):
                continue
            more = other.cpu_per_session - configured.cpu_per_session
            estimate = 1 / (at + more)
            lines.append(
                f"    estimated at complexity {other.complexity}: {estimate:.1f} sessions/core"
                f" (its CPU/session at N=10, {_ms(at)}, + {_ms(more)} more codec) ="
                f" {_pct(estimate / other.sessions_per_core)} of that floor"
            )
    return lines


def profile_lines(top: ProfileTop, count: int = 15) -> list[str]:
    """The top self-time and inclusive entries of one profile, as percentages of its samples."""
    what = (
        "the GIL holder (--gil)"
        if top.kind == "gil"
        else f"the main (Trio) thread, holding the GIL or not (no --gil; {top.other_threads}"
        " samples of worker threads left out)"
    )
    lines = [f"py-spy of the cluster's node, {what}: {top.samples} samples, {top.path}"]
    # the frames under every sample (the interpreter's and the node's start) say nothing
    inclusive = [(name, n) for name, n in top.inclusive if n < top.samples]
    for title, entries in (("self", top.self_time), ("inclusive", inclusive)):
        lines.append(f"  top {title}:")
        for name, samples in entries[:count]:
            lines.append(f"    {100 * samples / max(1, top.samples):5.1f}%  {name}")
    return lines


def _ramp_table(*sides: ServerFigures) -> list[str]:
    columns: list[tuple[str, Callable[[ServerFigures, StepFigures], str]]] = [
        ("ramp", lambda side, s: LABELS[side.name]),
        ("N", lambda side, s: str(s.sessions)),
        ("server CPU", lambda side, s: _pct(s.server_cpu)),
        ("relay", lambda side, s: _pct(s.relay_cpu)),
        ("client CPU", lambda side, s: _pct(s.client_cpu)),
        ("CPU/session", lambda side, s: _ms(s.cpu_per_session)),
        ("frames", lambda side, s: str(s.frames)),
        ("late", lambda side, s: str(s.late)),
        ("missing", lambda side, s: str(s.missing)),
        ("bad", lambda side, s: _pct(s.bad_fraction)),
        ("jitter p99", lambda side, s: _ms(s.jitter)),
        ("drift", lambda side, s: _ms(s.drift)),
        ("node late", lambda side, s: _pct(s.server_late)),
        ("others", lambda side, s: _pct(s.others_cpu)),
        ("lag", lambda side, s: _ms(s.client_lag)),
        (
            "",
            lambda side, s: (
                ("ok" if s.passed else "FAIL")
                + (f" (best of {s.attempts} windows)" if s.attempts > 1 else "")
                + (f" ({s.failed_setups} setups failed)" if s.failed_setups else "")
            ),
        ),
    ]
    cells = [[name for name, _ in columns]]
    cells += [[cell(side, s) for _, cell in columns] for side in sides for s in side.steps]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        "  ".join(
            c.ljust(w) if i in (0, len(columns) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]
    lines += [f"{LABELS[side.name]}: ramp stopped: {side.stopped_by}" for side in sides]
    return lines
