"""What a client hears when the node that owns its session is SIGKILLed, beside a full reconnect.

    python -m ops.bench.failover [--kills 30] [--clients 4] [--reconnects 20] [--ttl N] [--json]

The cluster and the clients are the migration bench's (ops/bench/migration.py): ``parley up``
(etcd, one relay, three nodes in relay mode, each its own process, the immediate echo agent) on
free local ports, and aiortc peers in this process playing espeak-ng speech whose echoed RTP
packets are stamped by the kernel as they reach the client's socket. The nodes' lease TTL is
``--ttl`` (default: the node's own default, ``node.lease_ttl``).

Two phases, one after the other:

1. **Kills.** ``--clients`` sessions talk, spread over the three nodes. ``--kills`` times: the
   node that owns the most of them (etcd says; of equals, the one killed longest ago) gets
   SIGKILL. ``parley up`` restarts it; its lease expires in etcd, and the surviving nodes adopt
   its sessions from their sealed checkpoints (sessions/node/failover.py). At every client
   whose session was on the killed node, in the window from the kill to :data:`SETTLE` seconds
   after the later of the bound and the adoption seen in etcd: the time from the kill to the
   first echoed packet again, the longest gap between echoed packets (the last one before the
   kill to the first one after), the 20 ms frames not heard across it, how far the RTP sequence
   number jumped across it (a restored session continues above its reservation), packets lost
   elsewhere in the window, and whether the echo was back within the bound (lease TTL + the
   node's safety margin + :data:`BOUND_SLACK`). The longest gap at the other clients in the
   same window is the control. The adopting node logs when it adopted (``session adopted ...
   at=``, its wall clock, the same machine's): the kill to that line is the nodes' own figure.
   Before the next kill, the killed node must be back (a new process, registered active, its
   tunnel at the relay) and every session owned again. One kill gives one sample per session
   on the killed node: with several clients per node, ``--kills`` kills give more samples than
   kills.
2. **Reconnects**, the client's alternative: the migration bench's own reconnect phase (a new
   ``RTCPeerConnection`` and offer to another live node, until its first echoed RTP packet),
   measured in the same run on the same cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, final

import attrs

from ops.bench import migration
from ops.bench.migration import Cluster, EchoCall, Gap, echo_gap, scratch_cluster
from ops.bench.sessions import machine, speech_packets
from sessions.node.settings import NodeSettings
from storage.etcd import EtcdUnavailable
from storage.lease import default_margin

__all__ = ["Affected", "BenchResult", "KillFigures", "Params", "main", "measure", "render"]

NODES: Final = ("node-1", "node-2", "node-3")
#: the constant in the bound on a failover: lease TTL + safety margin + this, seconds
BOUND_SLACK: Final = 2.0
#: seconds after the bound (or the adoption, if later) that still belong to a kill's window
SETTLE: Final = 1.0
#: seconds the calls talk before the first kill
WARMUP: Final = 2.0
#: seconds between polls of etcd while waiting for adoption or a restarted node
POLL: Final = 0.2
#: seconds a killed node may take to be back (parley up's restart backoff grows to 10 s)
BACK_WITHIN: Final = 60.0
#: seconds the restarted node runs before the next kill (its tunnel settles, its lease ages)
REST: Final = 1.0
#: echoed packets after the silence that count as the call having come back
HEARD_AFTER: Final = 10
FRAME: Final = 0.020
_ADOPTED: Final = re.compile(r"session adopted .*?session=(\S+).*?at=([\d.]+)")


# --- results ---------------------------------------------------------------------------------


@final
@attrs.frozen
class Affected:
    """One session whose owner was killed, as its client heard it."""

    session: str
    epoch_before: int
    adopter: str | None
    """the session's owner afterwards, as etcd says (None: nobody adopted it)"""
    epoch_after: int | None
    heard_again: float | None
    """seconds from the kill to the first echoed packet after the silence (None: never, in
    the window)"""
    gap: Gap
    """the longest gap in the window (the last echo before the kill to the first after)"""
    missed: int
    """20 ms echo frames not heard across the longest gap"""
    seq_jump: int | None
    """RTP sequence numbers skipped across the longest gap (a restore continues above its
    reservation)"""
    lost_other: int
    """sequence numbers missing in the window apart from that jump"""
    within_bound: bool
    """the echo came back within the bound and went on"""
    adopted_logged: float | None
    """seconds from the kill to the adopter's ``session adopted`` log line"""


@final
@attrs.frozen
class KillFigures:
    number: int
    node: str
    pid: int
    sessions: list[Affected]
    control: float | None
    """the longest gap at the clients whose node lived, in the same window, seconds"""
    adopted_seen: float | None
    """seconds from the kill until etcd showed every affected session owned again (polled)"""
    back: float | None
    """seconds from the kill until the killed node was back (a new process, active)"""


@final
@attrs.frozen
class BenchResult:
    machine: dict[str, object]
    params: dict[str, object]
    ttl: int
    margin: float
    bound: float
    """seconds within which a client must hear its echo again"""
    kills: list[KillFigures]
    lost_sessions: list[str]
    """sessions with no owner at a later epoch when the wait after their node's kill ended"""
    reconnects: list[float]
    """seconds from deciding to reconnect to the new session's first echoed RTP"""
    failed_reconnects: int

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = attrs.asdict(self)
        out["summary"] = summary(self)
        return out


def summary(result: BenchResult) -> dict[str, Any]:
    """The headline figures (milliseconds unless said), for the table and for JSON."""
    spread = migration._spread
    affected = [a for k in result.kills for a in k.sessions]
    back = [a for a in affected if a.heard_again is not None]
    return {
        "kills": len(result.kills),
        "samples": len(affected),
        "within_bound": sum(a.within_bound for a in affected),
        "not_back": len(affected) - len(back),
        "lost_sessions": len(result.lost_sessions),
        "ttl_s": result.ttl,
        "margin_s": result.margin,
        "bound_s": result.bound,
        "heard_again_ms": spread([1000 * a.heard_again for a in back if a.heard_again]),
        "gap_ms": spread([1000 * a.gap.longest for a in back]),
        "control_gap_ms": spread([1000 * k.control for k in result.kills if k.control is not None]),
        "missed_frames": spread([a.missed for a in back]),
        "seq_jump": spread([a.seq_jump for a in back if a.seq_jump is not None]),
        "lost_other": spread([a.lost_other for a in back]),
        "lost_other_total": sum(a.lost_other for a in back),
        "delay_step_ms": spread(
            [abs(1000 * a.gap.delay_step) for a in back if a.gap.delay_step is not None]
        ),
        "adopted_logged_ms": spread(
            [1000 * a.adopted_logged for a in affected if a.adopted_logged is not None]
        ),
        "node_back_ms": spread([1000 * k.back for k in result.kills if k.back is not None]),
        "reconnect_ms": spread([1000 * r for r in result.reconnects]),
        "failed_reconnects": result.failed_reconnects,
    }


# --- measuring one kill ----------------------------------------------------------------------


def _silence(
    arrivals: Sequence[tuple[float, int, int]], start: float, end: float
) -> tuple[tuple[float, int, int], tuple[float, int, int]] | None:
    """The two echoed packets furthest apart in [start, end)."""
    inside = [p for p in arrivals if start <= p[0] < end]
    if len(inside) < 2:
        return None
    return max(itertools.pairwise(inside), key=lambda pair: pair[1][0] - pair[0][0])


def affected_figures(
    call: EchoCall,
    killed_at: float,
    end: float,
    bound: float,
    *,
    epoch_before: int,
    owner: tuple[str, int] | None,
    adopted_logged: float | None,
) -> Affected:
    """What the client of a session on the killed node heard in [kill, end)."""
    start = killed_at - 0.05
    arrivals = list(call.arrivals)
    gap = echo_gap(arrivals, start, end)
    pair = _silence(arrivals, start, end)
    heard_again = seq_jump = None
    missed = lost_other = 0
    within = False
    if pair is not None and pair[1][0] > killed_at:
        (a_at, a_seq, _), (b_at, b_seq, _) = pair
        heard_again = b_at - killed_at
        missed = max(0, round((b_at - a_at) / FRAME) - 1)
        seq_jump = (b_seq - a_seq - 1) % (1 << 16)
        before, after_gap = echo_gap(arrivals, start, a_at + 1e-9), echo_gap(arrivals, b_at, end)
        lost_other = before.lost + after_gap.lost
        after = sum(1 for p in arrivals if b_at <= p[0] < end)
        within = heard_again <= bound and after >= HEARD_AFTER
    return Affected(
        session=call.session,
        epoch_before=epoch_before,
        adopter=None if owner is None else owner[0],
        epoch_after=None if owner is None else owner[1],
        heard_again=heard_again,
        gap=gap,
        missed=missed,
        seq_jump=seq_jump,
        lost_other=lost_other,
        within_bound=within,
        adopted_logged=adopted_logged,
    )


def adoptions(workdir: Path) -> list[tuple[str, float]]:
    """Every (session, wall-clock time) the nodes logged as adopted, in log order per node."""
    found: list[tuple[str, float]] = []
    for path in sorted((workdir / "up" / "logs").glob("node-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            match = _ADOPTED.search(line)
            if match:
                found.append((match[1], float(match[2])))
    return found


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _status(cluster: Cluster) -> dict[str, Any] | None:
    try:
        return cluster.status()
    except (EtcdUnavailable, OSError):
        return None


def _owners(status: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {s["id"]: (str(s["owner"]), int(s["epoch"])) for s in status["sessions"]}


def _wait_adopted(
    cluster: Cluster, sessions: dict[str, int], until: float
) -> tuple[float | None, dict[str, tuple[str, int]]]:
    """Poll etcd until every session in ``sessions`` (id → epoch before the kill) has an owner
    at a later epoch, or ``until`` (monotonic) passes: (when, the owners last seen)."""
    owners: dict[str, tuple[str, int]] = {}
    while True:
        status = _status(cluster)
        if status is not None:
            owners = _owners(status)
            if all(s in owners and owners[s][1] > e for s, e in sessions.items()):
                return time.monotonic(), owners
        if time.monotonic() >= until:
            return None, owners
        time.sleep(POLL)


def _wait_back(cluster: Cluster, node: str, old_pid: int, until: float) -> float | None:
    """Poll etcd until ``node`` is registered active by a process other than ``old_pid`` and
    the relay has a tunnel from it; the monotonic time then (None: not by ``until``)."""
    while time.monotonic() < until:
        status = _status(cluster)
        if status is not None:
            ok = any(
                n["id"] == node and n["state"] == "active" and int(n["pid"]) != old_pid
                for n in status["nodes"]
            )
            tunnels = [set(r.get("tunnels", [])) for r in status["relays"]]
            if ok and tunnels and all(node in t for t in tunnels):
                return time.monotonic()
        time.sleep(POLL)
    return None


# --- the phases ------------------------------------------------------------------------------


@final
@attrs.frozen
class Params:
    kills: int
    clients: int
    reconnects: int
    ttl: int


async def _kills_phase(
    cluster: Cluster, packets: list[bytes], params: Params, bound: float
) -> tuple[list[KillFigures], list[str]]:
    assert cluster.process is not None
    up_pid = cluster.process.pid
    calls: list[EchoCall] = []
    urls: dict[str, str] = {}
    for index, node in enumerate(NODES):
        count = len(range(index, params.clients, len(NODES)))
        if count:
            placed = await migration._connect_all(cluster.whip[node], packets, count, cluster.token)
            calls += placed
            urls.update((c.session, cluster.whip[node]) for c in placed)
    by_session = {c.session: c for c in calls}
    lost: list[str] = []
    figures: list[KillFigures] = []
    last_killed: dict[str, int] = {}
    try:
        await asyncio.sleep(WARMUP)
        for number in range(params.kills):
            status = await asyncio.to_thread(_status, cluster)
            if status is None:
                raise RuntimeError("etcd did not answer before a kill")
            owners = {s: o for s, o in _owners(status).items() if s in by_session}
            counts = Counter(node for node, _ in owners.values())
            node = max(NODES, key=lambda n: (counts[n], -last_killed.get(n, -1)))
            if not counts[node]:
                break  # no session left to fail over
            pid = next(int(n["pid"]) for n in status["nodes"] if n["id"] == node)
            if _parent_of(pid) != up_pid:  # never signal a process that is not our cluster's
                raise RuntimeError(f"{node}'s registered pid {pid} is not a child of parley up")
            before = {s: epoch for s, (owner, epoch) in owners.items() if owner == node}
            wall = time.time()
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            last_killed[node] = number
            seen, after = await asyncio.to_thread(
                _wait_adopted, cluster, before, killed_at + bound + 5.0
            )
            end = max(killed_at + bound, seen or 0.0) + SETTLE
            back = await asyncio.to_thread(_wait_back, cluster, node, pid, killed_at + BACK_WITHIN)
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            logged: dict[str, float] = {}
            for session, at in await asyncio.to_thread(adoptions, cluster.workdir):
                if session in before and at >= wall:
                    logged.setdefault(session, at - wall)  # the first adoption after the kill
            affected = []
            for session, epoch in sorted(before.items()):
                owner = after.get(session)
                if owner is None or owner[1] <= epoch:
                    owner = None
                    if session not in lost:
                        lost.append(session)
                affected.append(
                    affected_figures(
                        by_session[session],
                        killed_at,
                        end,
                        bound,
                        epoch_before=epoch,
                        owner=owner,
                        adopted_logged=logged.get(session),
                    )
                )
            others = [
                echo_gap(c.arrivals, killed_at - 0.05, end).longest
                for c in calls
                if c.session not in before and c.session not in lost
            ]
            figures.append(
                KillFigures(
                    number=number,
                    node=node,
                    pid=pid,
                    sessions=affected,
                    control=max(others) if others else None,
                    adopted_seen=None if seen is None else seen - killed_at,
                    back=None if back is None else back - killed_at,
                )
            )
            if back is None:
                raise RuntimeError(f"{node} was not back within {BACK_WITHIN:.0f} s of its kill")
            await asyncio.sleep(REST)
        return figures, lost
    finally:
        await asyncio.gather(*(c.close(urls[c.session]) for c in calls))


async def _run(cluster: Cluster, params: Params, bound: float, margin: float) -> BenchResult:
    packets = speech_packets()
    kills, lost = await _kills_phase(cluster, packets, params, bound)
    reconnects: list[float] = []
    failed = 0
    if params.reconnects:
        reconnects, failed = await migration._reconnect_phase(
            cluster, packets, migration.Params(0, 1, params.reconnects, 0)
        )
    return BenchResult(
        machine=machine(),
        params=attrs.asdict(params),
        ttl=params.ttl,
        margin=margin,
        bound=bound,
        kills=kills,
        lost_sessions=lost,
        reconnects=reconnects,
        failed_reconnects=failed,
    )


def measure(params: Params, *, keep: bool = False) -> BenchResult:
    """Run both phases; ``keep`` leaves the cluster's directory (its logs) behind."""
    margin = NodeSettings().lease_margin or default_margin(params.ttl)
    bound = params.ttl + margin + BOUND_SLACK
    settings = {"PARLEY_NODE_LEASE_TTL": str(params.ttl)}
    with scratch_cluster("failover", keep=keep, settings=settings) as cluster:
        return asyncio.run(_run(cluster, params, bound, margin))


# --- the table -------------------------------------------------------------------------------


def render(result: BenchResult) -> str:
    m, p, s = result.machine, result.params, summary(result)
    lines = [
        f"machine: nproc {m['nproc']}, {m['cpu_model']}, python {m['python']}, "
        f"aiortc {m['aiortc']}, linux {m['kernel']}",
        "cluster: parley up (etcd, 1 relay, 3 nodes in relay mode, echo agent); clients: "
        "aiortc in this process, echoed RTP stamped by the kernel",
        f"params: {s['kills']} SIGKILLs of the node owning most of {p['clients']} talking "
        f"sessions ({s['samples']} affected sessions); node lease TTL {result.ttl} s, margin "
        f"{result.margin:g} s, bound {result.bound:g} s; {p['reconnects']} reconnects",
        "",
    ]
    rows: list[tuple[str, str, str, str, str]] = []

    def row(label: str, spread: dict[str, Any], unit: str = " ms") -> None:
        def cell(key: str) -> str:
            value = spread.get(key)
            return "-" if value is None else f"{value:g}{unit}"

        rows.append((label, cell("p50"), cell("p99"), cell("max"), str(spread.get("n", 0))))

    row("kill: to first echo again, its clients", s["heard_again_ms"])
    row("kill: longest echo gap, its clients", s["gap_ms"])
    row("kill: same window, other clients", s["control_gap_ms"])
    row("kill: echo frames not heard", s["missed_frames"], "")
    row("kill: RTP sequence jump", s["seq_jump"], "")
    row("kill: other echo packets lost", s["lost_other"], "")
    row("kill: echo delay step across the gap", s["delay_step_ms"])
    row("kill: to adoption, as the nodes log it", s["adopted_logged_ms"])
    row("kill: to the node restarted, active", s["node_back_ms"])
    row("reconnect: new offer to first echo", s["reconnect_ms"])
    head = ("figure", "p50", "p99", "max", "n")
    widths = [max(len(r[i]) for r in [*rows, head]) for i in range(5)]
    for r in [head, *rows]:
        lines.append(
            f"{r[0]:<{widths[0]}}  "
            + "  ".join(f"{c:>{w}}" for c, w in zip(r[1:], widths[1:], strict=True))
        )
    lines.append("")
    lines.append(
        f"affected sessions: {s['samples']} over {s['kills']} kills; back within the bound: "
        f"{s['within_bound']}; never heard again: {s['not_back']}; never owned again: "
        f"{s['lost_sessions']}; reconnects failed: {s['failed_reconnects']}"
    )
    lines.append(
        "to first echo again: from the SIGKILL to the first echoed packet at the client after "
        "the silence; gap: the last echo before the kill to that one; frames not heard: that "
        "gap in 20 ms frames; sequence jump: numbers skipped across it (a restore continues "
        "above its reservation); delay step: how arrival minus RTP timestamp moved across it; "
        "reconnect: a new RTCPeerConnection and offer to another node until its first echoed "
        "RTP (what a client does without failover, after first noticing the silence)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> BenchResult:
    """Command line entry point; prints the table (or JSON) and returns the figures."""
    default_ttl = NodeSettings().lease_ttl
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.failover",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kills", type=int, default=30, help="node kills (30)")
    parser.add_argument("--clients", type=int, default=4, help="talking sessions (4)")
    parser.add_argument("--reconnects", type=int, default=20, help="reconnects measured (20)")
    parser.add_argument(
        "--ttl",
        type=int,
        default=default_ttl,
        help=f"the nodes' lease TTL, seconds (node.lease_ttl, default {default_ttl})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--keep", action="store_true", help="keep the cluster's directory (its logs)"
    )
    args = parser.parse_args(argv)
    if args.kills < 1 or args.clients < 1 or args.reconnects < 0 or args.ttl < 2:
        parser.error("--kills and --clients at least 1, --reconnects 0 or more, --ttl at least 2")
    params = Params(args.kills, args.clients, args.reconnects, args.ttl)
    result = measure(params, keep=args.keep)
    print(json.dumps(result.as_dict(), indent=2) if args.json else render(result))
    return result


if __name__ == "__main__":
    main()
