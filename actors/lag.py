"""How late a Trio loop runs: a task that asks to wake every ``interval`` and records by how much
it wakes late.

A packet-forwarding process that stops running for a while loses packets in the kernel (its
socket's receive buffer fills) without any counter of its own noticing. Its loop's lateness is
the measure that shows such a stall: the process was busy with one long step, or the machine did
not give it a core. Relays and nodes publish it beside their packet counters.
"""

from __future__ import annotations

from typing import Final, final

import trio

from actors.histogram import Histogram

__all__ = ["LAG_BUCKETS", "LoopLag"]

#: how often the monitor asks to run; lateness below this is not worth a wakeup to see
INTERVAL: Final = 0.02
#: a wakeup this late counts as a stall
STALL: Final = 0.1
#: upper bounds (seconds) of the lateness histogram an ops port exposes
LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@final
class LoopLag:
    """Start ``run`` in a nursery; read ``counters()`` whenever a report is due."""

    def __init__(self, *, interval: float = INTERVAL, stall: float = STALL) -> None:
        self.interval = interval
        self.stall = stall
        #: wakeups later than ``stall``, since start
        self.stalls = 0
        #: the latest wakeup, in seconds, since start and since the last ``counters()``
        self.worst = 0.0
        #: every wakeup's lateness, in seconds (one observation per ``interval``, not per packet)
        self.lateness = Histogram(LAG_BUCKETS)
        self._recent = 0.0

    async def run(self) -> None:
        while True:
            due = trio.current_time() + self.interval
            await trio.sleep_until(due)
            late = trio.current_time() - due
            self.lateness.observe(late)
            if late > self._recent:
                self._recent = late
                self.worst = max(self.worst, late)
            if late >= self.stall:
                self.stalls += 1

    def counters(self) -> dict[str, int]:
        """``loop_lag_ms`` (the worst since the previous call), ``loop_lag_worst_ms`` (since
        start) and ``loop_stalls``."""
        recent, self._recent = self._recent, 0.0
        return {
            "loop_lag_ms": round(recent * 1000),
            "loop_lag_worst_ms": round(self.worst * 1000),
            "loop_stalls": self.stalls,
        }
