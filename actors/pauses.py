"""The garbage collector's pauses in a media process: the long ones made short, and each one seen.

CPython's cyclic collector stops the whole process while it runs, and a full (generation 2)
collection walks every container object the process holds. In a relay or node most of those
come into being at startup and stay for good: the modules of aioquic, etcd3 and its gRPC and
protobuf descriptors, the tunnel's and the daemon's own objects, some 80,000 in a node. Walking
them took 27-43 ms per full collection in a node holding 40 sessions here, 24-69 ms in a relay,
during which no packet was forwarded and no session's frame left; a node collects fully
whenever the objects that survived since the last full collection pass a quarter of those it
has (new sessions' state does that), so with sessions coming and going every node stalled that
long now and then, all its sessions at once. Frozen, the same node's full collection took 3-6
ms (the 4,000-15,000 objects of its sessions), the relay's under 0.5 ms.

:func:`freeze_startup` moves whatever is alive once a daemon is up into the collector's
permanent generation (``gc.freeze``), which no collection walks again: a full collection then
walks only what came later, the sessions' own state. Frozen objects that later become garbage
in a cycle stay (their memory is the cost); at startup nearly nothing is in that case. What
comes later is collected as before.

:class:`Pauses` times every collection (``gc.callbacks``) into a histogram per generation, which
relays and nodes publish on their ops ports (``parley_gc_pause_seconds``): one observation per
collection, none per packet.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Final, final

from actors.histogram import Histogram

__all__ = ["PAUSES", "PAUSE_BUCKETS", "Pauses", "freeze_startup"]

#: upper bounds (seconds) of the pause histograms an ops port exposes
PAUSE_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


def freeze_startup() -> int:
    """Collect what startup left as garbage, then exempt everything alive now from every later
    collection (see the module docstring). Returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@final
class Pauses:
    """Every collection's duration by generation, while installed (:meth:`install`)."""

    def __init__(self) -> None:
        #: pauses (seconds) of each generation's collections, by "0", "1", "2"
        self.by_generation = {str(g): Histogram(PAUSE_BUCKETS) for g in range(3)}
        self._started: float | None = None

    def install(self) -> None:
        """Time the process' collections from now on (once; installing again does nothing)."""
        if self._observe not in gc.callbacks:
            gc.callbacks.append(self._observe)

    def remove(self) -> None:
        """Stop timing them."""
        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)

    def _observe(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            pause = time.perf_counter() - self._started
            self._started = None
            series = self.by_generation.get(str(info.get("generation")))
            if series is not None:
                series.observe(pause)


#: the process' own: the collector is one per process, and so is what times it
PAUSES: Final = Pauses()
