"""How busy a node's event loop is, for admission (``node.max_load``).

Everything a node does for its sessions (ICE, DTLS, SRTP, Opus, the agents, the tunnels) runs on
the one thread of its Trio loop; etcd's client threads aside, that thread's CPU time is the
node's. Once it is busy nearly all the time, every session on the node pays: grid points come
late, frames go out in pairs, lease keepalives wait behind media. ``sessions/node/capacity``
counts sessions, but a session costs from near nothing (idle, a reactive agent) to several
milliseconds of CPU a second (talking, complexity 10); the loop's own CPU share measures what
they cost together. A node refuses new sessions (503 ``node_busy``), moves and adoptions while
the share is at or above ``node.max_load``, so that it keeps the sessions it has.

:class:`LoopLoad` reads the thread's CPU clock (``time.thread_time``, which only counts the
thread that reads it: it must run in the loop's own thread, as a task of it) every
``INTERVAL`` seconds and keeps an exponentially weighted mean with a time constant of
``WINDOW`` seconds: a burst of setups does not shut the door, a lasting load does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final, final

import trio

__all__ = ["INTERVAL", "WINDOW", "LoopLoad"]

#: seconds between two readings of the loop thread's CPU clock
INTERVAL: Final = 0.5
#: seconds: the time constant of the mean (a lasting change shows in about this long)
WINDOW: Final = 2.0


@final
class LoopLoad:
    """The share of one core the loop's thread used, smoothed (0.0 idle, 1.0 always busy).

    ``cpu`` and ``clock`` are the thread's CPU clock and the loop's clock (tests give their
    own); :meth:`run` samples them, :meth:`sample` takes one reading.
    """

    def __init__(
        self,
        *,
        cpu: Callable[[], float] = time.thread_time,
        clock: Callable[[], float] = trio.current_time,
        interval: float = INTERVAL,
        window: float = WINDOW,
    ) -> None:
        if interval <= 0 or window <= 0:
            raise ValueError("interval and window must be positive")
        self.cpu = cpu
        self.clock = clock
        self.interval = interval
        self.window = window
        #: the smoothed share; 0.0 until the first two readings
        self.value = 0.0
        self._last: tuple[float, float] | None = None

    def sample(self) -> float:
        """Read both clocks, fold the share since the last reading into :attr:`value`."""
        now, used = self.clock(), self.cpu()
        last, self._last = self._last, (now, used)
        if last is not None and now > last[0]:
            elapsed = now - last[0]
            share = min(1.0, max(0.0, (used - last[1]) / elapsed))
            weight = 1.0 - math.exp(-elapsed / self.window)
            self.value += (share - self.value) * weight
        return self.value

    async def run(self) -> None:
        """Sample every ``interval`` seconds until cancelled (in the loop's own thread)."""
        while True:
            self.sample()
            await trio.sleep(self.interval)
