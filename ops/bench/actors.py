"""What idle actors cost over plain Trio.

    python -m ops.bench.actors [--count 10000] [--json]

Spawns N idle actors, one `start_child` after the other, under one one-for-one
supervisor, then stops them all (the supervisor stops them one by one, in reverse
order).  The baseline, measured in the same process, is N bare Trio tasks each blocked
on its own memory channel: started with `start_soon`, timed until all of them block,
then cancelled together.  A second baseline starts the same bare tasks one at a time
with `nursery.start`, the handshake `start_child` also waits for, which separates the
cost of "returns once started" from the cost of the runtime itself.  Trio runs
everything on one thread, so rates are for one core.

Memory is what tracemalloc sees allocated by Python (after a gc.collect) while the N
are alive, divided by N: a separate pass from the timed one, since tracing slows
allocation down.  It does not count allocator slack that RSS would show.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from typing import final

import attrs
import trio
import trio.testing

from actors import Actor, ChildSpec, Supervisor

__all__ = ["BenchResult", "Figures", "main", "measure"]

MEMORY_METHOD = "tracemalloc"


@final
@attrs.frozen
class Figures:
    """One side of the comparison."""

    spawned_per_second: float
    bytes_per_idle: float
    stopped_per_second: float


@final
@attrs.frozen
class BenchResult:
    """Parley actors beside the bare-Trio baselines, for `count` of each."""

    count: int
    actors: Figures
    baseline: Figures  # bare tasks, start_soon
    baseline_started: Figures  # bare tasks, nursery.start one at a time
    memory_method: str = MEMORY_METHOD

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


@final
@attrs.define
class _Probe:
    """Marks the spawn and stop phases from inside the Trio run."""

    traced: bool
    spawn_seconds: float = 0.0
    stop_seconds: float = 0.0
    bytes_alive: int = 0
    _clock: float = 0.0
    _baseline_bytes: int = 0

    def before_spawn(self) -> None:
        if self.traced:
            gc.collect()
            self._baseline_bytes = tracemalloc.get_traced_memory()[0]
        self._clock = time.perf_counter()

    def spawned(self) -> None:
        self.spawn_seconds = time.perf_counter() - self._clock
        if self.traced:
            gc.collect()
            self.bytes_alive = tracemalloc.get_traced_memory()[0] - self._baseline_bytes
        self._clock = time.perf_counter()

    def stopped(self) -> None:
        self.stop_seconds = time.perf_counter() - self._clock


class _Idle(Actor):
    async def receive(self, message: object) -> object:
        return None


async def _spawn_actors(count: int, probe: _Probe) -> None:
    supervisor = Supervisor("bench")
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        probe.before_spawn()
        for i in range(count):
            await supervisor.start_child(ChildSpec(f"idle-{i}", _Idle))
        probe.spawned()
        nursery.cancel_scope.cancel()
    probe.stopped()


async def _idle_task(
    receive: trio.MemoryReceiveChannel[object],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    async for _ in receive:
        pass


async def _spawn_bare_tasks(count: int, probe: _Probe, *, handshake: bool) -> None:
    senders: list[trio.MemorySendChannel[object]] = []
    async with trio.open_nursery() as nursery:
        probe.before_spawn()
        for _ in range(count):
            send, receive = trio.open_memory_channel[object](Actor.mailbox_size)
            senders.append(send)  # what a ref keeps alive on the actor side
            if handshake:
                await nursery.start(_idle_task, receive)
            else:
                nursery.start_soon(_idle_task, receive)
        await trio.testing.wait_all_tasks_blocked()
        probe.spawned()
        nursery.cancel_scope.cancel()
    probe.stopped()


def _figures(spawn: Callable[[int, _Probe], Awaitable[None]], count: int) -> Figures:
    timed = _Probe(traced=False)
    trio.run(spawn, count, timed)
    traced = _Probe(traced=True)
    tracemalloc.start()
    try:
        trio.run(spawn, count, traced)
    finally:
        tracemalloc.stop()
    return Figures(
        spawned_per_second=count / max(timed.spawn_seconds, 1e-9),
        bytes_per_idle=traced.bytes_alive / count,
        stopped_per_second=count / max(timed.stop_seconds, 1e-9),
    )


def measure(count: int) -> BenchResult:
    """Run both sides with `count` each and return the figures."""
    if count < 1:
        raise ValueError("count must be at least 1")
    baseline = _figures(functools.partial(_spawn_bare_tasks, handshake=False), count)
    started = _figures(functools.partial(_spawn_bare_tasks, handshake=True), count)
    actors = _figures(_spawn_actors, count)
    return BenchResult(count=count, actors=actors, baseline=baseline, baseline_started=started)


def render(result: BenchResult) -> str:
    """A small plain-text table."""
    rows = [
        ("spawned per second", "spawned_per_second", "{:,.0f}"),
        (f"bytes per idle ({result.memory_method})", "bytes_per_idle", "{:,.0f}"),
        ("stopped per second", "stopped_per_second", "{:,.0f}"),
    ]
    lines = [
        f"{result.count:,} idle parley actors (one supervisor) vs {result.count:,} bare Trio"
        " tasks on memory channels; one core",
        f"{'':30}{'parley actors':>14}{'bare trio':>11}{'ratio':>7}"
        f"{'bare, started':>15}{'ratio':>7}",
    ]
    for label, field, fmt in rows:
        ours = getattr(result.actors, field)
        cells = [f"{label:30}{fmt.format(ours):>14}"]
        for baseline, width in ((result.baseline, 11), (result.baseline_started, 15)):
            theirs = getattr(baseline, field)
            ratio = ours / theirs if theirs else float("nan")
            cells.append(f"{fmt.format(theirs):>{width}}{f'{ratio:.2f}x':>7}")
        lines.append("".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> BenchResult:
    """Command line entry point; prints the table (or JSON) and returns the figures."""
    parser = argparse.ArgumentParser(prog="python -m ops.bench.actors", description=__doc__)
    parser.add_argument("--count", type=int, default=10_000, help="actors (and tasks) to spawn")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    result = measure(args.count)
    print(json.dumps(result.as_dict(), indent=2) if args.json else render(result))
    return result


if __name__ == "__main__":
    main()
