"""How fast a node sets up voice sessions and how many echo sessions one of its cores holds, in
cluster mode (through a real relay and its QUIC tunnel) and in direct mode, beside an aiortc echo
server and the codec floor, all measured in the same run on the same machine.

    python -m ops.bench.sessions [--sessions 80] [--setups 50] [--quick] [--json]
                                 [--sides cluster,direct,aiortc] [--profile DIR]

The sides are measured one after the other (ops/bench/sessions_servers.py), each server in
processes of its own so that its CPU time can be read from ``/proc/PID/stat``:

* **parley cluster**: ``parley up --nodes 1 --relays 1`` (its etcd with client-certificate TLS,
  a relay, a node with ``node.agent = "echo"``, the immediate echo): the clients' UDP goes to
  the relay, which forwards it to the node over the QUIC tunnel, as deployed. Only the node is
  the server under test; the relay's CPU is reported beside it (it is on every packet's path);
* **parley direct**: ``python -m ops.cli node`` with the echo agent and a local etcd, the
  clients' UDP straight to it;
* **aiortc echo**: what a Python user would reach for, an asyncio process (``serve-aiortc``)
  answering each offer with an ``RTCPeerConnection`` that sends every received audio track
  straight back (``pc.addTrack(track)``, no ``MediaRelay``).

All three speak the same WHIP-style HTTP (``POST /v1/session`` with the offer, ``201`` with the
answer and a ``Location`` that ``DELETE`` ends). The clients (ops/bench/sessions_clients.py) are
aiortc peers in this process playing espeak-ng speech, pre-encoded, paced like a microphone. With
two CPUs or more the server (the node; aiortc's process) is pinned to one core and everything
else (this process, etcd, ``parley up``, the relay) to the others.

**Codec floor** (ops/bench/sessions_profile.py), measured first, on the server's core: libopus
(through sessions/audio/opus.py, as a session uses it) decoding each of the clients' packets and
encoding the PCM again, at the node's ``node.opus_complexity`` (5 unless ``--complexity``;
32 kbit/s) and at 10: CPU per session-second and "sessions per core if Python cost nothing";
each parley side's sessions/core is shown as a fraction of it.

Figures, for each side:

1. **Setup time**, sessions set up one after the other, each closed after its first decoded
   echo: from the POST to the answer, to the first echoed RTP packet and to the first frame
   aiortc decoded. Server CPU per setup: its CPU over the phase / sessions set up.
2. **CPU per active session**: N concurrent echo sessions streaming speech; after a warm-up, the
   server's CPU seconds per wall second over a window, divided by N (the relay's too, in cluster
   mode).
3. **Sessions one core holds**: N ramps up (5, 10, 20, 40 ... up to ``--sessions``; always
   through N=10) until a step fails above the largest pass, then bisects three times. A step passes
   with under 1% bad echoed frames (*late*: came more than 5 ms later after the previous one
   than their RTP timestamps are apart; *missing*: its timestamp never came) and an echo delay
   (arrival minus RTP timestamp) that moved less than 20 ms over the window. A step that fails
   narrowly gets another window (a third if other processes were busy in both), the best kept:
   the machine may be shared, and the CPU every other process used is shown. Also shown: the
   echo's jitter, the node's own late frames (its ``late_frames``: pacer ticks handled, or
   frames handed to the port, over 5 ms after their grid point; published to etcd), the
   clients' worst event-loop delay. And the steadier *CPU ceiling*: N / server CPU at the
   largest step under 90% server CPU whose echo kept up (under 1% missing, delay moved under
   20 ms).

``--profile DIR`` runs py-spy on the cluster's node at N=10, after that step's window (py-spy
stops the process to sample it) with its calls still up: once with ``--gil`` (the Python work)
and once without (libopus runs in ctypes calls that release the GIL: only this one shows it),
and prints their top self-time and inclusive entries.

Echoed packets are timestamped by the kernel as they reach the client's socket (``SIOCGSTAMP``);
once a session's first echo was decoded, clients stop decoding (``--client-decode`` decodes every
frame, as a real client would).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final, final

import attrs

from ops.bench.common import percentile, process_cpu, split_cores
from ops.bench.sessions_clients import Call, _speech_track, lateness, loop_start, speech_packets
from ops.bench.sessions_profile import codec_floor, configured_codec, profile_node
from ops.bench.sessions_report import (
    BenchResult,
    FloorFigures,
    Params,
    ProfileTop,
    ServerFigures,
    StepFigures,
    _why,
    render,
)
from ops.bench.sessions_servers import (
    NODE_SETTINGS,
    AiortcServer,
    ClusterServer,
    ParleyServer,
    Server,
    http,
    loopback_ice,
    serve_aiortc,
)
from relay.tunnel.quic import MAX_HOLD

__all__ = [
    "BenchResult",
    "ServerFigures",
    "StepFigures",
    "_speech_track",
    "http",
    "loopback_ice",
    "machine",
    "main",
    "measure",
    "render",
    "speech_packets",
]

CLOSE_TIMEOUT: Final = 15.0
#: sessions a ramp step sets up at the same time
SETUP_CONCURRENCY: Final = 4
#: the ramp goes on through this N whatever happens (CPU per session at N=5 and N=10)
MANDATORY_STEP: Final = 10
#: bisection steps after the first failure
REFINEMENTS: Final = 3
#: a failing step gets a third window if other processes used this much CPU in both others
BUSY_OTHERS: Final = 0.2


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def machine() -> dict[str, object]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import aiortc

    from sessions.audio.opus import OpusUnavailableError, libopus_version

    try:
        opus = libopus_version()
    except OpusUnavailableError:
        opus = "missing"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "aiortc": aiortc.__version__,
        "libopus": opus.removeprefix("libopus "),
    }


# --- the phases ----------------------------------------------------------------------------------


async def _setup_phase(
    server: Server, packets: list[bytes], params: Params
) -> tuple[list[tuple[float, float, float]], int, float]:
    times: list[tuple[float, float, float]] = []
    failed = 0
    cpu_start = process_cpu(server.pid)
    for _ in range(params.setups):
        call = Call(packets, decode_all=params.decode_all, token=server.token)
        try:
            times.append(await call.connect(server.url))
        except (RuntimeError, TimeoutError, OSError):
            failed += 1
        finally:
            await call.close(server.url)
    cpu = process_cpu(server.pid) - cpu_start
    return times, failed, cpu / max(1, len(times))


async def _add_calls(
    server: Server, packets: list[bytes], calls: list[Call], count: int, params: Params
) -> int:
    """Set ``count`` more calls up (a few at a time), each starting the speech loop at its own
    place (``loop_start``); returns how many failed."""
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)
    failed = 0
    first = len(calls)

    async def one(index: int) -> None:
        nonlocal failed
        async with gate:
            start = loop_start(index, packets)
            call = Call(packets, decode_all=params.decode_all, token=server.token, start=start)
            try:
                await call.connect(server.url)
            except (RuntimeError, TimeoutError, OSError):
                failed += 1
                await call.close(server.url)
            else:
                calls.append(call)

    await asyncio.gather(*(one(first + i) for i in range(count)))
    return failed


class LoopLag:
    """Watches this process's event loop: how late its wake-ups come (the clients' health)."""

    def __init__(self, period: float = 0.010) -> None:
        self.period = period
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.period)
            self.worst = max(self.worst, time.monotonic() - before - self.period)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.ensure_future(self._watch())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


def all_process_cpu() -> dict[int, float]:
    """utime + stime of every process on the machine (kernel threads too), by pid."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                out[int(name)] = process_cpu(int(name))
    return out


def others_cpu(before: dict[int, float], after: dict[int, float], ours: set[int]) -> float:
    """CPU seconds other processes used between two :func:`all_process_cpu` (a lower bound:
    processes that ended in between are not seen)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items() if pid not in ours)


@final
@attrs.frozen
class _Sample:
    """CPU counters at one instant."""

    at: float
    server: float
    client: float
    relay: float | None

    @classmethod
    def take(cls, server: Server) -> _Sample:
        relay = None if server.relay_pid is None else process_cpu(server.relay_pid)
        return cls(
            at=time.monotonic(), server=process_cpu(server.pid), client=own_cpu(), relay=relay
        )


async def _window(
    server: Server, calls: list[Call], failed: int, params: Params, attempts: int
) -> StepFigures:
    for call in calls:
        call.arrivals.clear()
    before = await server.late_stats()
    ours = {os.getpid(), *server.pids()}
    machine_before = all_process_cpu()
    with LoopLag() as lag:
        first = _Sample.take(server)
        await asyncio.sleep(params.window)
        last = _Sample.take(server)
    others = others_cpu(machine_before, all_process_cpu(), ours)
    after = await server.late_stats()
    frames = late = missing = 0
    delays: list[float] = []
    drifts: list[float] = []
    for call in calls:
        result = lateness(call.arrivals, first.at, last.at)
        frames += result.frames
        late += result.late
        missing += result.missing
        delays += result.delays
        if result.frames:
            drifts.append(result.drift)
    server_late = None
    if before is not None and after is not None:
        late_ticks = ticks = 0
        for session, (late_now, ticks_now) in after.items():
            late_then, ticks_then = before.get(session, (0, 0))
            late_ticks += late_now - late_then
            ticks += ticks_now - ticks_then
        server_late = late_ticks / ticks if ticks else math.nan
    elapsed = last.at - first.at
    server_cpu = (last.server - first.server) / elapsed
    client_cpu = (last.client - first.client) / elapsed
    relay = (last.relay or 0.0) - (first.relay or 0.0)
    client_cores = len(server.client_cpus) or len(os.sched_getaffinity(0))
    n = len(calls)
    return StepFigures(
        sessions=n,
        window=elapsed,
        server_cpu=server_cpu,
        client_cpu=client_cpu / client_cores,
        cpu_per_session=server_cpu / n if n else math.nan,
        frames=frames,
        late=late,
        missing=missing,
        jitter=percentile(delays, 99),
        drift=statistics.median(drifts) if drifts else math.nan,
        server_late=server_late,
        failed_setups=failed,
        attempts=attempts,
        others_cpu=others / elapsed,
        client_lag=lag.worst,
        relay_cpu=None if first.relay is None or last.relay is None else relay / elapsed,
    )


async def _measure_step(
    server: Server, calls: list[Call], failed: int, params: Params
) -> StepFigures:
    # The clients' garbage collector would stall every session at once: the objects of the
    # calls set up so far are frozen out of its way (gc.freeze) before the window.
    gc.collect()
    gc.freeze()
    try:
        await asyncio.sleep(params.warmup)
        windows = [await _window(server, calls, failed, params, 1)]
        # Another process on this shared machine may have got in the way: look once more,
        # and a third time if others were busy both times.
        while not (windows[-1].passed or windows[-1].clear_failure) and (
            len(windows) < 2
            or (len(windows) < 3 and min(w.others_cpu for w in windows) >= BUSY_OTHERS)
        ):
            windows.append(await _window(server, calls, failed, params, len(windows) + 1))
    finally:
        gc.unfreeze()
    best = min(windows, key=lambda w: (not w.passed, w.bad_fraction))
    return attrs.evolve(best, attempts=len(windows))


async def _close_all(server: Server, calls: list[Call]) -> None:
    """Close every call (bounded: a stuck peer connection does not hold the run up)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await asyncio.gather(*(call.close(server.url) for call in calls))


async def _ramp_phase(
    server: Server, packets: list[bytes], params: Params, profile: list[ProfileTop]
) -> tuple[list[StepFigures], int, str]:
    """Steps up the ramp (always through N=10, for the CPU figures) until a step fails beyond
    the largest pass, then bisects between the largest pass and the smallest failure above
    it, :data:`REFINEMENTS` times at most. Returns the steps, the largest N that passed and
    why the ramp stopped."""
    calls: list[Call] = []
    steps: list[StepFigures] = []
    deadline = time.monotonic() + params.time_budget
    ramp = params.steps()
    refinements = 0
    stopped_by = "reached --sessions"

    def best_pass() -> int:
        return max((s.sessions for s in steps if s.passed), default=0)

    def first_fail_above(n: int) -> StepFigures | None:
        above = [s for s in steps if not s.passed and s.sessions > n]
        return min(above, key=lambda s: s.sessions, default=None)

    try:
        while True:
            fail = first_fail_above(best_pass())
            if ramp and (fail is None or ramp[0] <= MANDATORY_STEP):
                target = ramp.pop(0)
            elif fail is not None and refinements < REFINEMENTS:
                target = (best_pass() + fail.sessions) // 2
                if target <= best_pass():
                    break
                refinements += 1
            else:
                break
            if time.monotonic() > deadline:
                stopped_by = f"time budget ({params.time_budget:.0f}s) used up before N={target}"
                break
            if len(calls) > target:
                # Down: fresh calls, so that no backlog of the last step is carried over.
                await _close_all(server, calls)
                calls.clear()
            failed = await _add_calls(server, packets, calls, target - len(calls), params)
            steps.append(await _measure_step(server, calls, failed, params))
            if (
                params.profile
                and server.name == "cluster"
                and not profile
                and target == min(MANDATORY_STEP, params.max_sessions)
            ):
                # after the step's window, with its calls still up: py-spy stops the node
                # for every sample, which would spoil the window's figures
                window = max(params.window, 5.0)
                profile += await profile_node(server.pid, Path(params.profile), window)
        fail = first_fail_above(best_pass())
        if fail is not None:
            stopped_by = _why(fail) + (f"; {stopped_by}" if "budget" in stopped_by else "")
    finally:
        await _close_all(server, calls)
    return steps, best_pass(), stopped_by


async def _measure_server(
    server: Server, packets: list[bytes], params: Params, profile: list[ProfileTop]
) -> ServerFigures:
    await server.ready()
    times, failed, setup_cpu = await _setup_phase(server, packets, params)
    steps, capacity, stopped_by = await _ramp_phase(server, packets, params, profile)
    return ServerFigures(
        name=server.name,
        setups=params.setups,
        failed_setups=failed,
        answer_times=[t[0] for t in times],
        rtp_times=[t[1] for t in times],
        frame_times=[t[2] for t in times],
        setup_cpu=setup_cpu,
        steps=steps,
        capacity=capacity,
        stopped_by=stopped_by,
    )


def _run_server(
    factory: Callable[[Path, set[int], set[int]], Server],
    workdir: Path,
    cores: tuple[set[int], set[int]],
    measure_it: Callable[[Server], Coroutine[Any, Any, ServerFigures]],
) -> ServerFigures:
    server = factory(workdir, *cores)
    terminated = False

    async def run() -> ServerFigures:
        # SIGTERM cancels the run like Ctrl-C does (asyncio.run's own SIGINT handling), so
        # that every call is closed on the way out; the server is stopped after.
        nonlocal terminated
        task = asyncio.current_task()
        assert task is not None

        def on_sigterm() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError):  # not the main thread: no handler
            loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        try:
            return await measure_it(server)
        finally:
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signal.SIGTERM)

    try:
        server.start()
        return asyncio.run(run())
    except asyncio.CancelledError:
        if terminated:
            raise KeyboardInterrupt from None
        raise
    finally:
        server.stop()


def measure(params: Params) -> BenchResult:
    """The codec floor, then each side in ``params.sides`` in turn, with the same clients."""
    loopback_ice()
    packets = speech_packets()
    about = machine()
    complexity, bitrate = configured_codec(params.complexity)
    workdir = Path(tempfile.mkdtemp(prefix="parley-bench-"))
    profile: list[ProfileTop] = []
    try:
        with split_cores() as cores:
            floor = _floor(packets, complexity, bitrate, cores)

            async def measure_it(server: Server) -> ServerFigures:
                return await _measure_server(server, packets, params, profile)

            sides = {
                side: _run_server(SERVERS[side], workdir, cores, measure_it)
                for side in params.sides
            }
            pinned = bool(cores[0])
            return BenchResult(
                machine={**about, "server_cores": sorted(cores[0]), "pinned": pinned},
                params=attrs.asdict(params),
                floor=floor,
                complexity=complexity,
                profile=profile,
                **sides,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _floor(
    packets: list[bytes], complexity: int, bitrate: int, cores: tuple[set[int], set[int]]
) -> list[FloorFigures]:
    """The codec floor at the node's complexity and at 10, on the server's core."""
    if cores[0]:
        os.sched_setaffinity(0, cores[0])
    try:
        return [codec_floor(packets, c, bitrate) for c in sorted({complexity, 10})]
    finally:
        if cores[1]:
            os.sched_setaffinity(0, cores[1])


#: the sides, by name, in the order they are measured and shown
SERVERS: Final[dict[str, Callable[[Path, set[int], set[int]], Server]]] = {
    "cluster": ClusterServer,
    "parley": ParleyServer,
    "aiortc": AiortcServer,
}


def main(argv: Sequence[str] | None = None) -> BenchResult:
    """Command line entry point; prints the table (or JSON) and returns the figures."""
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.sessions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sessions", type=int, help="most concurrent sessions (default 80; --quick 10)"
    )
    parser.add_argument("--setups", type=int, help="sequential setups timed (default 50)")
    parser.add_argument("--warmup", type=float, help="seconds before a window (default 3)")
    parser.add_argument("--window", type=float, help="seconds measured a step (default 6)")
    parser.add_argument("--quick", action="store_true", help="small run, about a minute and a half")
    parser.add_argument(
        "--client-decode", action="store_true", help="clients decode every echoed frame"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--sides",
        default="cluster,direct,aiortc",
        help="which to measure, comma-separated: cluster (through a relay and its tunnel),"
        " direct (clients' UDP straight to the node), aiortc (default: all three)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy the cluster's node at N=10 (after the step's window), profiles into DIR",
    )
    parser.add_argument(
        "--tick-ms",
        type=int,
        choices=range(21),
        help="node.media_tick_ms of the parley sides (default: the node's; 0: no shared tick)",
    )
    parser.add_argument(
        "--complexity", type=int, choices=range(11), help="node.opus_complexity (default: 5)"
    )
    parser.add_argument(
        "--relay-hold-ms",
        type=float,
        help="relay.tunnel_hold_ms of the cluster's relay (default: the relay's, 2)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    names = {"cluster": "cluster", "direct": "parley", "parley": "parley", "aiortc": "aiortc"}
    wanted = [w.strip() for w in args.sides.split(",") if w.strip()]
    if not wanted or any(w not in names for w in wanted):
        parser.error("--sides takes cluster, direct and aiortc, comma-separated")
    sides = tuple(s for s in SERVERS if s in {names[w] for w in wanted})
    if args.profile and "cluster" not in sides:
        parser.error("--profile profiles the cluster's node: --sides must take cluster")
    params = Params(
        setups=args.setups if args.setups is not None else (10 if quick else 50),
        max_sessions=args.sessions if args.sessions is not None else (10 if quick else 80),
        warmup=args.warmup if args.warmup is not None else (1.5 if quick else 3.0),
        window=args.window if args.window is not None else (3.0 if quick else 6.0),
        decode_all=args.client_decode,
        time_budget=20.0 if quick else 200.0,
        sides=sides,
        profile=str(Path(args.profile).resolve()) if args.profile else None,
        tick_ms=args.tick_ms,
        complexity=args.complexity,
    )
    NODE_SETTINGS.clear()
    for name, value in (("MEDIA_TICK_MS", args.tick_ms), ("OPUS_COMPLEXITY", args.complexity)):
        if value is not None:
            NODE_SETTINGS[f"PARLEY_NODE_{name}"] = str(value)
    if args.relay_hold_ms is not None:
        if not 0 <= args.relay_hold_ms <= MAX_HOLD * 1000:
            parser.error(f"--relay-hold-ms must be between 0 and {MAX_HOLD * 1000:g}")
        NODE_SETTINGS["PARLEY_RELAY_TUNNEL_HOLD_MS"] = str(args.relay_hold_ms)
    if params.setups < 1 or params.max_sessions < 1 or params.window <= 0 or params.warmup < 0:
        parser.error("--setups and --sessions must be positive, --window > 0, --warmup >= 0")
    result = measure(params)
    print(json.dumps(result.as_dict(), indent=2) if args.json else render(result))
    return result


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["serve-aiortc"]:
            serve_aiortc(sys.argv[2:])
        else:
            main()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the servers were stopped on the way out
        sys.exit(130)
