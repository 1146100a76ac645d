"""What the benchmarks share: percentiles, a process's CPU time, and giving the measured server a
core of its own."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import Final

__all__ = [
    "ADMISSION",
    "CLK_TCK",
    "percentile",
    "process_cpu",
    "split_cores",
    "whole_intervals",
]

#: clock ticks per second, the unit of /proc's CPU times
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def whole_intervals(seconds: float, interval: float) -> float:
    """``seconds`` rounded up to a whole number (at least one) of ``interval``."""
    return interval * max(1, math.ceil(seconds / interval))


def process_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@contextlib.contextmanager
def split_cores() -> Iterator[tuple[set[int], set[int]]]:
    """(one core for the measured server, the others): this process moves to the others for
    the block and back afterwards. Both sets are empty on a single-core machine."""
    original = os.sched_getaffinity(0)
    if len(original) < 2:
        yield set(), set()
        return
    server = {max(original)}
    others = original - server
    os.sched_setaffinity(0, others)
    try:
        yield server, others
    finally:
        os.sched_setaffinity(0, original)


#: a node's admission limits for a benchmark: all its clients are on one loopback address, and
#: it measures something else than admission (a node's defaults pace one source to 5 offers a
#: second and 8 half-open sessions; sessions/node/signaling/limits.py), up to the node's own
#: ceiling (no ``node.max_load``: sessions/node/load.py)
ADMISSION: Final = {
    "PARLEY_NODE_MAX_LOAD": "0",
    "PARLEY_NODE_OFFER_RATE": "200",
    "PARLEY_NODE_OFFER_BURST": "200",
    "PARLEY_NODE_HALF_OPEN": "200",
    "PARLEY_NODE_SOURCE_CONNECTIONS": "500",
}
