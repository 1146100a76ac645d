"""What the benchmarks share: percentiles and giving the measured server a core of its own."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence

__all__ = ["percentile", "split_cores"]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


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
