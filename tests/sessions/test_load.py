"""The node's event-loop load (sessions/node/load.py): what admission's ``node.max_load`` reads."""

from __future__ import annotations

import math
import threading
import time

import pytest
import trio
import trio.testing

from sessions.node.load import LoopLoad


class Clocks:
    """A wall clock and a CPU clock moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.used = 0.0

    def spend(self, seconds: float, share: float) -> None:
        self.now += seconds
        self.used += seconds * share


def test_the_share_is_cpu_time_over_wall_time_smoothed_over_the_window() -> None:
    clocks = Clocks()
    load = LoopLoad(cpu=lambda: clocks.used, clock=lambda: clocks.now, interval=0.5, window=2.0)
    assert load.sample() == 0.0  # one reading: nothing to compare yet
    clocks.spend(0.5, 1.0)
    weight = 1 - math.exp(-0.5 / 2.0)
    assert load.sample() == pytest.approx(weight)
    # a lasting load shows within a few windows; a short burst does not shut the door
    for _ in range(20):
        clocks.spend(0.5, 0.9)
        load.sample()
    assert load.value == pytest.approx(0.9, abs=0.01)
    clocks.spend(0.5, 0.0)
    assert load.sample() == pytest.approx(0.9 * math.exp(-0.5 / 2.0), abs=0.01)


def test_a_share_is_clamped_and_a_clock_that_stands_still_is_ignored() -> None:
    clocks = Clocks()
    load = LoopLoad(cpu=lambda: clocks.used, clock=lambda: clocks.now, window=0.001)
    load.sample()
    clocks.spend(1.0, 3.0)  # more CPU than wall time (a coarse clock): one core at most
    assert load.sample() == pytest.approx(1.0)
    assert load.sample() == pytest.approx(1.0)  # no time passed: unchanged
    clocks.spend(1.0, 0.0)
    clocks.used -= 5.0  # a clock that went back: no negative share
    assert load.sample() == pytest.approx(0.0)


def test_interval_and_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        LoopLoad(interval=0.0)
    with pytest.raises(ValueError, match="positive"):
        LoopLoad(window=-1.0)


async def test_run_samples_every_interval(autojump_clock: trio.testing.MockClock) -> None:
    readings: list[float] = []

    def cpu() -> float:
        readings.append(trio.current_time())
        return 0.0

    load = LoopLoad(cpu=cpu, interval=0.5)
    with trio.move_on_after(2.2):
        await load.run()
    assert readings == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])


async def test_only_the_loop_s_own_thread_counts() -> None:
    """A thread spinning beside the loop (etcd's client, a profiler) is not the loop's load;
    the loop spinning itself is."""
    load = LoopLoad(window=0.001)  # no smoothing: each reading is the share since the last
    load.sample()
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    other = threading.Thread(target=spin, daemon=True)
    other.start()
    try:
        await trio.sleep(0.3)  # the loop idles while the other thread spins
    finally:
        stop.set()
        other.join()
    assert load.sample() < 0.3
    until = time.monotonic() + 0.3
    while time.monotonic() < until:  # the loop's own thread busy, no checkpoint
        pass
    assert load.sample() > 0.7
