"""A fixed-bucket histogram as a plain value: what an ops port turns into a Prometheus histogram.

Relays and nodes observe a few things per *event* (a wakeup of the loop-lag monitor, a session's
setup, a move's blackout), never per packet; this keeps those observations in a few integers
with no dependency, so the packages at the bottom of the tree can count them too.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from typing import final

__all__ = ["Histogram"]


@final
class Histogram:
    """Counts of observations at or below each bound (Prometheus' ``le``), their sum and number.

    ``bounds`` are the finite upper bounds, strictly increasing; +Inf is implied.
    """

    __slots__ = ("_counts", "bounds", "count", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        ordered = tuple(float(b) for b in bounds)
        if not ordered or any(not math.isfinite(b) for b in ordered):
            raise ValueError("a histogram needs finite bounds")
        if any(a >= b for a, b in itertools.pairwise(ordered)):
            raise ValueError("histogram bounds must increase strictly")
        self.bounds = ordered
        #: observations per bucket (not cumulative); the last one is above every bound
        self._counts = [0] * (len(ordered) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le)
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at or below it)`` for every bound, then ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self._counts, strict=True):
            running += n
            out.append((bound, running))
        return out
