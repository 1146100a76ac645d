"""What crash failover costs etcd: checkpoint writes and bytes per session-minute.

    python -m ops.bench.checkpoints [--sessions 20] [--window 60] [--silent-window 60] [--json]

The cluster and the clients are the migration bench's (ops/bench/migration.py): ``parley up``
(etcd, one relay, three nodes in relay mode, the immediate echo agent) on free local ports, and
aiortc peers in this process playing espeak-ng speech.

Three windows on the same cluster in the same run:

1. **Baseline** (``--window`` seconds): the cluster with no session. What etcd does for an idle
   cluster (leases kept alive, nodes' and relays' registrations refreshed with their counters):
   revisions per minute.
2. **Talking** (``--window``): ``--sessions`` sessions spread over the three nodes, each
   talking, measured from :data:`SETTLE` seconds after the last one connected (their first
   checkpoints, made as DTLS completes, are setup cost, not steady cost). The nodes count each
   checkpoint made durable in etcd and its sealed size (``checkpoints_stored``,
   ``checkpoint_bytes`` in ``parley status --json``); etcd's revision counts every write of
   anyone.
3. **Silent** (``--silent-window``, by default ``--window`` rounded up to whole minutes): the
   same sessions once their clients stopped sending (a muted browser with Opus DTX sends almost
   nothing) and the echo ran dry, from ``CHECKPOINT_INTERVAL`` + :data:`SETTLE` seconds after.
   Connected, consent checks answered, nothing a restore uses changing.

Per session-minute: checkpoints stored, their sealed bytes, and the etcd revisions above the
baseline's rate (checkpoints and anything else sessions make the cluster write: session stats,
routes). The checkpoint policy (sessions/transceiver/checkpoints.py) predicts 6 checkpoints per
talking session-minute (one every 10 s, none sooner while the SRTP reservation lasts) and 1 per
silent one (one every ``CHECKPOINT_IDLE_INTERVAL``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any, Final, final

import attrs

from ops.bench import migration
from ops.bench.common import whole_intervals
from ops.bench.migration import Cluster, EchoCall, scratch_cluster
from ops.bench.sessions import machine, speech_packets
from sessions.transceiver.checkpoints import CHECKPOINT_IDLE_INTERVAL, CHECKPOINT_INTERVAL

__all__ = ["BenchResult", "Params", "Window", "main", "measure", "render"]

NODES: Final = ("node-1", "node-2", "node-3")
#: seconds after the last session connected before the talking window opens
SETTLE: Final = 5.0
#: the node counters this bench reads
COUNTERS: Final = ("checkpoints_stored", "checkpoint_bytes", "checkpoints_failed")


@final
@attrs.frozen
class Params:
    sessions: int
    window: float
    #: the silent window (see the module docstring)
    silent_window: float


@final
@attrs.frozen
class Window:
    """What etcd and the nodes did in one window."""

    seconds: float
    sessions: int
    revisions: int
    #: the nodes' checkpoint counters over the window, summed over the nodes
    counters: dict[str, int]

    @property
    def revisions_per_minute(self) -> float:
        return self.revisions * 60.0 / self.seconds


@final
@attrs.frozen
class BenchResult:
    machine: dict[str, Any]
    params: dict[str, Any]
    baseline: Window
    talking: Window
    silent: Window
    #: sessions still owned at the end of the silent window (all of them, or the run is void)
    owned_at_end: int

    def per_session_minute(self, window: Window | None = None) -> dict[str, float]:
        """A window's cost per session-minute, the talking one's by default (revisions: above
        the baseline)."""
        t, b = window or self.talking, self.baseline
        minutes = t.sessions * t.seconds / 60.0
        stored = t.counters["checkpoints_stored"]
        extra = t.revisions_per_minute - b.revisions_per_minute
        return {
            "checkpoints": round(stored / minutes, 2),
            "checkpoint_bytes": round(t.counters["checkpoint_bytes"] / minutes),
            "bytes_per_checkpoint": round(t.counters["checkpoint_bytes"] / max(1, stored)),
            "etcd_revisions": round(extra / t.sessions, 2),
        }

    def as_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["per_session_minute"] = self.per_session_minute()
        out["silent_per_session_minute"] = self.per_session_minute(self.silent)
        return out


def _snapshot(cluster: Cluster) -> tuple[int, dict[str, int], int]:
    """(etcd revision, the nodes' checkpoint counters summed, sessions owned), read at once."""
    status = cluster.status()
    totals = dict.fromkeys(COUNTERS, 0)
    for node in status["nodes"]:
        for name in COUNTERS:
            totals[name] += int((node.get("counters") or {}).get(name, 0))
    return int(status["revision"]), totals, len(status["sessions"])


async def _window(cluster: Cluster, seconds: float, sessions: int) -> tuple[Window, int]:
    revision, before, _ = await asyncio.to_thread(_snapshot, cluster)
    started = time.monotonic()
    await asyncio.sleep(seconds)
    end_revision, after, owned = await asyncio.to_thread(_snapshot, cluster)
    took = time.monotonic() - started
    counters = {name: after[name] - before[name] for name in COUNTERS}
    return Window(round(took, 2), sessions, end_revision - revision, counters), owned


async def _run(cluster: Cluster, params: Params) -> BenchResult:
    baseline, _ = await _window(cluster, params.window, 0)
    packets = speech_packets()
    calls: list[EchoCall] = []
    urls: dict[str, str] = {}
    try:
        for index, node in enumerate(NODES):
            count = len(range(index, params.sessions, len(NODES)))
            if count:
                url = cluster.whip[node]
                placed = await migration._connect_all(url, packets, count, cluster.token)
                calls += placed
                urls.update((c.session, url) for c in placed)
        await asyncio.sleep(SETTLE)
        talking, _ = await _window(cluster, params.window, len(calls))
        for call in calls:
            call.track.mute()
        # the echo runs dry, and the checkpoint after its last packet is taken
        await asyncio.sleep(CHECKPOINT_INTERVAL + SETTLE)
        silent, owned = await _window(cluster, params.silent_window, len(calls))
    finally:
        await asyncio.gather(*(c.close(urls.get(c.session, cluster.whip[NODES[0]])) for c in calls))
    return BenchResult(
        machine=machine(),
        params=attrs.asdict(params),
        baseline=baseline,
        talking=talking,
        silent=silent,
        owned_at_end=owned,
    )


def measure(params: Params, *, keep: bool = False) -> BenchResult:
    """Both windows on one ``parley up``; ``keep`` leaves the cluster's directory behind."""
    with scratch_cluster("checkpoints", keep=keep) as cluster:
        return asyncio.run(_run(cluster, params))


def render(result: BenchResult) -> str:
    m, b, t, q = result.machine, result.baseline, result.talking, result.silent
    per, quiet = result.per_session_minute(), result.per_session_minute(q)
    idle_policy = round(60 / CHECKPOINT_IDLE_INTERVAL)
    rows = [
        (
            "checkpoints stored",
            f"{per['checkpoints']:g}",
            f"{quiet['checkpoints']:g}",
            f"{round(60 / CHECKPOINT_INTERVAL)} / {idle_policy} (one every "
            f"{CHECKPOINT_INTERVAL:g} s / {CHECKPOINT_IDLE_INTERVAL:g} s)",
        ),
        (
            "sealed checkpoint bytes",
            f"{per['checkpoint_bytes']:g}",
            f"{quiet['checkpoint_bytes']:g}",
            "-",
        ),
        (
            "etcd revisions above the idle cluster's",
            f"{per['etcd_revisions']:g}",
            f"{quiet['etcd_revisions']:g}",
            "-",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [
        f"machine: nproc {m['nproc']}, {m['cpu_model']}, python {m['python']}, linux {m['kernel']}",
        "cluster: parley up (etcd, 1 relay, 3 nodes in relay mode, echo agent); clients: aiortc",
        f"baseline: no session, {b.seconds:g} s: {b.revisions_per_minute:.1f} etcd revisions/min",
    ]
    for name, w, p in (("talking", t, per), ("silent", q, quiet)):
        lines.append(
            f"{name}: {w.sessions} sessions, {w.seconds:g} s: {w.revisions_per_minute:.1f} etcd "
            f"revisions/min; {w.counters['checkpoints_stored']} checkpoints stored, "
            f"{w.counters['checkpoints_failed']} not, {p['bytes_per_checkpoint']} B each sealed"
        )
    lines += [
        f"{result.owned_at_end} sessions owned at the end",
        "",
        f"{'per session-minute':<{width}}  {'talking':>9}  {'silent':>9}  policy",
    ]
    lines += [f"{label:<{width}}  {a:>9}  {c:>9}  {note}" for label, a, c, note in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> BenchResult:
    """Command line entry point; prints the table (or JSON) and returns the figures."""
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.checkpoints",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sessions", type=int, default=20, help="talking sessions (20)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per window (60)")
    parser.add_argument(
        "--silent-window",
        type=float,
        default=None,
        help="seconds of the silent window (--window in whole minutes)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--keep", action="store_true", help="keep the cluster's directory (its logs)"
    )
    args = parser.parse_args(argv)
    silent = args.silent_window
    if silent is None:
        silent = whole_intervals(args.window, CHECKPOINT_IDLE_INTERVAL)
    if args.sessions < 1 or args.window <= 0 or silent <= 0:
        parser.error("--sessions at least 1, --window and --silent-window above 0")
    result = measure(Params(args.sessions, args.window, silent), keep=args.keep)
    print(json.dumps(result.as_dict(), indent=2) if args.json else render(result))
    return result


if __name__ == "__main__":
    main()
