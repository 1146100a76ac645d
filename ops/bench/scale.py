"""What a node costs per session at scale, each figure beside a baseline measured in the same run.

    python -m ops.bench.scale [--counts 100,1000] [--talking 10,20] [--window 60] [--quick] [--json]

A real cluster, ``parley up --nodes 1 --relays 1`` (ops/bench/sessions_servers.py's
:class:`~ops.bench.sessions_servers.ClusterServer`: its etcd with client-certificate TLS, a
relay, a node with the immediate echo agent, admission limits raised because every client is on
127.0.0.1, and here the node's capacity raised above the largest count). The node is pinned to
one core, everything else (this process, its clients, etcd, the relay) to the other(s). The
clients are light WebRTC sessions in this process (ops/bench/scale_clients.py): ICE, DTLS,
SRTP keyed, then a consent check every 5 s, each on its own UDP socket through the relay.

Figures, after the cluster settled with no session (**0 sessions: the baseline**); then with only
``--talking`` sessions, all talking (espeak-ng speech, 20 ms Opus frames: **the talkers alone**,
the baseline of figure 3); then at each of ``--counts`` connected sessions (connected in batches
of ``--batch``), idle, and with ``--talking`` of them talking:

1. **memory per idle session**: the node's RSS and PSS (``/proc/PID/smaps_rollup``) minus the
   baseline's, divided by the sessions; beside it, the same count of bare Trio tasks each
   blocked on a UDP socket's ``recv`` in a fresh process (``python -m ops.bench.scale tasks``):
   the floor of "a task and a socket per session", which a node in cluster mode does not even
   have (its sessions share the relay's tunnel).
2. **etcd writes per session per minute**: etcd's own counters (``/metrics`` on its client URL:
   ``etcd_mvcc_put_total``, ``etcd_mvcc_delete_total``, ``etcd_mvcc_txn_total``,
   ``etcd_server_proposals_committed_total``) over a ``--window``, minus the baseline's rate,
   divided by the sessions and the minutes. An idle session checkpoints once a minute
   (``CHECKPOINT_IDLE_INTERVAL``), so the idle windows are ``--window`` rounded up to whole
   minutes; ``--quick``'s 10 s windows undercount the idle sessions' writes.
3. **node CPU** per wall second (``/proc/PID/stat``) over the window, and for the talking
   sessions their echoed frames late or missing and the echo's jitter (as ops/bench/sessions.py
   counts them: late = more than 5 ms after the previous one beyond their timestamps' spacing;
   jitter = p99 of the echo delay above its least).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Final, final

import attrs
import trio
from prometheus_client.parser import text_string_to_metric_families

from ops.bench import sessions_servers
from ops.bench.common import percentile, process_cpu, split_cores, whole_intervals
from ops.bench.scale_clients import Fleet, speech_payloads
from ops.bench.sessions_clients import lateness
from ops.bench.sessions_servers import ClusterServer
from sessions.transceiver.checkpoints import CHECKPOINT_IDLE_INTERVAL, CHECKPOINT_INTERVAL

__all__ = ["Memory", "ScaleResult", "Step", "etcd_counters", "main", "memory", "render"]

#: etcd's counters of writes (samples of its /metrics)
WRITE_COUNTERS: Final = (
    "etcd_mvcc_put_total",
    "etcd_mvcc_delete_total",
    "etcd_mvcc_txn_total",
    "etcd_server_proposals_committed_total",
)
#: what etcd's clients sent it, bytes (the size of those writes, and of reads and keepalives)
RECEIVED_BYTES: Final = "etcd_network_client_grpc_received_bytes_total"
#: how long talking sessions send before their window starts
WARMUP: Final = 3.0


@final
@attrs.frozen
class Memory:
    """A process's resident set and proportional set size, bytes."""

    rss: int
    pss: int


def memory(pid: int) -> Memory:
    """RSS and PSS of ``pid`` from ``/proc/PID/smaps_rollup``."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0]) * 1024
    return Memory(fields["Rss"], fields["Pss"])


def etcd_counters(text: str) -> dict[str, float]:
    """The write counters of :data:`WRITE_COUNTERS` and :data:`RECEIVED_BYTES` in an etcd
    ``/metrics`` page (0 where absent), summed over their labels."""
    out = dict.fromkeys((*WRITE_COUNTERS, RECEIVED_BYTES), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] += sample.value
    return out


def _fetch_counters(url: str, tls: ssl.SSLContext | None) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10, context=tls) as response:
        return etcd_counters(response.read().decode())


@final
@attrs.frozen
class Step:
    """One window: ``sessions`` connected, ``talking`` of them talking."""

    sessions: int
    talking: int
    window: float
    memory: Memory
    #: node CPU seconds per wall second
    node_cpu: float
    relay_cpu: float
    #: etcd counters' increase per minute over the window
    writes_per_minute: dict[str, float]
    #: the talking sessions' echoed frames, late ones, missing ones, jitter p99 (s)
    frames: int = 0
    late: int = 0
    missing: int = 0
    jitter: float | None = None
    #: how late this process sent the talkers' frames (p99 of sleep overshoot), seconds
    send_lag: float | None = None


@final
@attrs.frozen
class ScaleResult:
    """A run's figures: the 0-session baseline, each window, the bare-task baseline, setups."""

    counts: tuple[int, ...]
    talking: tuple[int, ...]
    window: float
    #: the idle sessions' windows (whole CHECKPOINT_IDLE_INTERVALs unless --quick)
    idle_window: float
    baseline: Step
    steps: tuple[Step, ...]
    #: (count, bytes per task) of bare Trio tasks on a UDP socket: RSS, PSS
    bare_tasks: tuple[tuple[int, float, float], ...]
    #: setups attempted, failed (by reason), the largest count held
    attempts: int
    failures: dict[str, int]
    largest: int
    setup_p50: float | None
    setup_p99: float | None

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


def _per_minute(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> dict[str, float]:
    return {k: (after[k] - before[k]) * 60 / seconds for k in before}


async def _window(server: ClusterServer, fleet: Fleet | None, talking: int, seconds: float) -> Step:
    """Measure over ``seconds``: node CPU, relay CPU, etcd's counters, the talkers' echoes."""
    gc.collect()  # our own collector would stall every client at once
    gc.freeze()
    sessions = fleet.sessions if fleet is not None else []
    for session in sessions[:talking]:
        session.send_lags.clear()
    counters = await trio.to_thread.run_sync(_fetch_counters, server.etcd, server._tls)
    start, cpu, relay = time.monotonic(), process_cpu(server.pid), _relay_cpu(server)
    await trio.sleep(seconds)
    end, cpu_end, relay_end = time.monotonic(), process_cpu(server.pid), _relay_cpu(server)
    counters_end = await trio.to_thread.run_sync(_fetch_counters, server.etcd, server._tls)
    elapsed = end - start
    frames = late = missing = 0
    delays: list[float] = []
    lags: list[float] = []
    for session in sessions[:talking]:
        lags += session.send_lags
        result = lateness(session.client.echoes, start, end)
        frames += result.frames
        late += result.late
        missing += result.missing
        delays += result.delays
    return Step(
        sessions=len(sessions),
        talking=talking,
        window=round(elapsed, 2),
        memory=memory(server.pid),
        node_cpu=(cpu_end - cpu) / elapsed,
        relay_cpu=(relay_end - relay) / elapsed,
        writes_per_minute=_per_minute(counters, counters_end, elapsed),
        frames=frames,
        late=late,
        missing=missing,
        jitter=percentile(delays, 99) if delays else None,
        send_lag=percentile(lags, 99) if lags else None,
    )


def _relay_cpu(server: ClusterServer) -> float:
    pid = server.relay_pid
    return process_cpu(pid) if pid is not None else 0.0


async def _grow(fleet: Fleet, count: int, batch: int) -> None:
    started = time.monotonic()
    await fleet.grow(count, batch=batch)
    print(
        f"  {len(fleet.sessions)} sessions connected in {time.monotonic() - started:.0f} s; "
        f"failures {fleet.failures or 'none'}",
        file=sys.stderr,
    )


async def _measure(
    server: ClusterServer,
    counts: Sequence[int],
    talking: Sequence[int],
    window: float,
    idle_window: float,
    batch: int,
    settle: float,
) -> tuple[Step, list[Step], Fleet]:
    payloads = speech_payloads()
    await trio.sleep(settle)
    baseline = await _window(server, None, 0, window)
    steps: list[Step] = []
    async with trio.open_nursery() as nursery:
        fleet = Fleet(server.url, server.token, nursery)

        async def talk_steps() -> None:
            for count in talking:
                talkers = await fleet.talk(min(count, len(fleet.sessions)), payloads)
                await trio.sleep(WARMUP)
                steps.append(await _window(server, fleet, len(talkers), window))
                fleet.quiet()

        # the talking baseline: the talkers alone, no idle session beside them
        await _grow(fleet, max(talking, default=0), batch)
        await talk_steps()
        for count in counts:
            await _grow(fleet, count, batch)
            # A checkpoint interval (10 s) or more: every session's first checkpoints are done.
            await trio.sleep(settle)
            steps.append(await _window(server, fleet, 0, idle_window))
            await talk_steps()
        nursery.cancel_scope.cancel()
    return baseline, steps, fleet


# --- the baseline: bare Trio tasks, each on a UDP socket -----------------------------------------


async def _bare_tasks(count: int) -> dict[str, int]:
    import socket

    gc.collect()
    before = memory(os.getpid())
    sockets = []
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
            nursery.start_soon(sock.recv, 2048)
        await trio.sleep(0.5)
        gc.collect()
        after = memory(os.getpid())
        nursery.cancel_scope.cancel()
    return {"rss": after.rss - before.rss, "pss": after.pss - before.pss}


def bare_tasks(count: int) -> tuple[float, float]:
    """Bytes of RSS and PSS per bare Trio task blocked on its own UDP socket, in a fresh
    process."""
    out = subprocess.run(
        [sys.executable, "-m", "ops.bench.scale", "tasks", "--count", str(count)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=sessions_servers._repo_env(),
    )
    grown = json.loads(out.stdout)
    return grown["rss"] / count, grown["pss"] / count


# --- the run ---------------------------------------------------------------------------------


def measure(
    *,
    counts: Sequence[int],
    talking: Sequence[int],
    window: float,
    idle_window: float | None = None,
    batch: int = 20,
    settle: float = 12.0,
) -> ScaleResult:
    """Start a cluster, measure (see the module docstring), stop it. ``idle_window`` (the
    idle sessions' windows) is by default ``window`` rounded up to a
    whole number of :data:`CHECKPOINT_IDLE_INTERVAL`, so each idle session's checkpoint is seen
    once."""
    if idle_window is None:
        idle_window = whole_intervals(window, CHECKPOINT_IDLE_INTERVAL)
    top = max(counts)
    workdir = Path(tempfile.mkdtemp(prefix="parley-scale-"))
    saved = dict(sessions_servers.NODE_SETTINGS)
    sessions_servers.NODE_SETTINGS["PARLEY_NODE_CAPACITY"] = str(top + 100)
    try:
        with split_cores() as cores:
            server = ClusterServer(workdir, *cores)
            try:
                server.start()
                asyncio.run(server.ready())
                baseline, steps, fleet = trio.run(
                    _measure, server, counts, talking, window, idle_window, batch, settle
                )
            finally:
                server.stop()
        bare = tuple((c, *bare_tasks(c)) for c in counts)
    finally:
        sessions_servers.NODE_SETTINGS.clear()
        sessions_servers.NODE_SETTINGS.update(saved)
        shutil.rmtree(workdir, ignore_errors=True)
    setups = fleet.setup_seconds
    return ScaleResult(
        counts=tuple(counts),
        talking=tuple(talking),
        window=window,
        idle_window=idle_window,
        baseline=baseline,
        steps=tuple(steps),
        bare_tasks=bare,
        attempts=len(setups) + sum(fleet.failures.values()),
        failures=dict(fleet.failures),
        largest=max((s.sessions for s in steps), default=0),
        setup_p50=percentile(setups, 50) if setups else None,
        setup_p99=percentile(setups, 99) if setups else None,
    )


def _writes(step: Step, base: Step, name: str = WRITE_COUNTERS[3]) -> float:
    """etcd writes (raft proposals committed; or another counter) per session per minute above
    the baseline."""
    if not step.sessions:
        return 0.0
    return (step.writes_per_minute[name] - base.writes_per_minute[name]) / step.sessions


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def render(result: ScaleResult) -> str:
    """The figures as tables: idle sessions beside bare tasks, talking sessions beside the
    talkers alone."""
    base = result.baseline
    kib, mib = 1024, 1024**2
    failed = sum(result.failures.values())
    lines = [
        f"scale: {result.window:g} s windows ({result.idle_window:g} s idle); setups "
        f"{result.attempts}, failed {failed}"
        + (f" {result.failures}" if failed else "")
        + f"; largest count held {result.largest}; setup (POST to SRTP keyed) p50 "
        f"{_ms(result.setup_p50)}, p99 {_ms(result.setup_p99)}",
        f"baseline, 0 sessions: node RSS {base.memory.rss / mib:.1f} MiB, PSS "
        f"{base.memory.pss / mib:.1f} MiB, CPU {base.node_cpu * 100:.1f}%; etcd writes "
        f"{base.writes_per_minute[WRITE_COUNTERS[3]]:.0f} a minute, etcd received "
        f"{base.writes_per_minute[RECEIVED_BYTES] / kib:.0f} KiB a minute",
        "",
        "idle     node RSS   node PSS   bare task+socket   etcd writes   etcd KiB     node CPU"
        "  relay CPU",
        "sessions /session   /session   RSS / PSS          /session/min  /session/min",
    ]
    bare = {c: (r, p) for c, r, p in result.bare_tasks}
    for step in result.steps:
        n = step.sessions
        if step.talking or not n:
            continue
        rss = (step.memory.rss - base.memory.rss) / n / kib
        pss = (step.memory.pss - base.memory.pss) / n / kib
        task = "-"
        if n in bare:
            task = f"{bare[n][0] / kib:.1f} / {bare[n][1] / kib:.1f} KiB"
        lines.append(
            f"{n:>8} {rss:>6.1f} KiB {pss:>6.1f} KiB {task:>18} {_writes(step, base):>12.2f}"
            f"  {_writes(step, base, RECEIVED_BYTES) / kib:>12.1f}  {step.node_cpu * 100:>7.1f}%"
            f"  {step.relay_cpu * 100:>8.1f}%"
        )
    lines += [
        "",
        "sessions talking  node CPU  relay CPU  etcd writes   echoed   late  missing  jitter"
        "    send lag",
        "                                       /session/min  frames                  p99"
        "       p99 (client)",
    ]
    for step in result.steps:
        if not step.talking:
            continue
        jitter = "-" if step.jitter is None else f"{step.jitter * 1000:.1f} ms"
        lag = "-" if step.send_lag is None else f"{step.send_lag * 1000:.1f} ms"
        lines.append(
            f"{step.sessions:>8} {step.talking:>7}  {step.node_cpu * 100:>7.1f}% "
            f"{step.relay_cpu * 100:>9.1f}%  {_writes(step, base):>12.2f}  {step.frames:>7}  "
            f"{step.late:>5}  {step.missing:>7}  {jitter:>8}  {lag:>10}"
        )
    lines.append(
        "memory and etcd writes: minus the 0-session baseline, per session; bare task+socket: "
        "that many Trio tasks each blocked on its own UDP socket, per task, in a fresh process"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> ScaleResult | None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.scale")
    sub = parser.add_subparsers(dest="command")
    tasks = sub.add_parser("tasks", help="(the baseline) bare Trio tasks on UDP sockets")
    tasks.add_argument("--count", type=int, required=True)
    parser.add_argument("--counts", default="100,1000", help="idle sessions, comma-separated")
    parser.add_argument("--talking", default="10,20", help="talking sessions, at each count")
    parser.add_argument(
        "--window",
        type=float,
        default=60.0,
        help="seconds per measurement (a multiple of 10; idle: of 60)",
    )
    parser.add_argument("--batch", type=int, default=20, help="setups at a time")
    parser.add_argument(
        "--quick", action="store_true", help="a small run: 5,20 sessions, 2 talking, 10 s windows"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "tasks":
        print(json.dumps(trio.run(_bare_tasks, args.count)))
        return None
    try:
        counts = [int(c) for c in args.counts.split(",") if c.strip()]
        talking = [int(c) for c in args.talking.split(",") if c.strip()]
    except ValueError:
        parser.error("--counts and --talking are comma-separated integers")
    settle = 12.0
    idle_window = None
    if args.quick:
        counts, talking, args.window, settle = [5, 20], [2], CHECKPOINT_INTERVAL, 3.0
        idle_window = CHECKPOINT_INTERVAL  # quick: idle sessions' etcd writes undercounted
    # Sessions set up together checkpoint together, every CHECKPOINT_INTERVAL while talking
    # and every CHECKPOINT_IDLE_INTERVAL while idle: a window of a whole number of intervals
    # sees each session's checkpoints the same number of times.
    args.window = whole_intervals(args.window, CHECKPOINT_INTERVAL)
    if not counts or min(counts) < 1 or min(talking, default=0) < 0:
        parser.error("--counts are at least 1")
    result = measure(
        counts=counts,
        talking=talking,
        window=args.window,
        idle_window=idle_window,
        batch=args.batch,
        settle=settle,
    )
    print(json.dumps(result.as_dict(), indent=2) if args.json else render(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
