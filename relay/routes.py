"""The relay's route table: which node owns each session, at which epoch, fed from etcd.

Ownership lives in etcd (storage/ownership.py): the key ``{prefix}/owners/{session}`` names the
owner, and the key's mod revision is the session's **epoch**, which grows on every claim and
transfer. :meth:`RouteTable.run` lists every owner, then watches from the revision after the
list's, so no change is missed or applied twice, and applies changes in revision order.

The table answers three questions for the relay's packet path:

* :meth:`~RouteTable.lookup` — where to send a client's packet;
* :meth:`~RouteTable.admit_from_node` — fencing: may this node, stamping this epoch, still speak
  for the session? A packet from a former owner (an older epoch) is dropped;
* :meth:`~RouteTable.hint_route` — for a session the table does not know yet: the answer, with
  its ufrag routing hint (relay/tunnel/hint.py), can reach the client before the watch event reaches
  the relay, so the hinted node gets a **provisional** route (epoch 0) until the watch delivers
  the real one. Provisional routes expire if the watch never confirms them.

**Watermark.** The table remembers the highest revision it has applied (from the list or the
watch). Every ownership write at or below it has been seen, so an epoch at or below it that is
not a session's current epoch is stale for sure; an epoch above it may be a claim or transfer
the watch has not delivered yet, and is accepted ahead (the watch confirms or overrides it).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final, final

import attrs
import trio

from relay.tunnel.hint import Hint
from storage.etcd import Compacted, EtcdUnavailable
from storage.ownership import Owners, Ownership, OwnershipChange

__all__ = ["PROVISIONAL_EPOCH", "Route", "RouteTable"]

log = logging.getLogger("parley.relay.routes")

#: The epoch of a provisional route; real epochs are etcd revisions, always > 0.
PROVISIONAL_EPOCH: Final = 0

_COUNTERS: Final = (
    "listed",  # ownerships loaded from owners.list() snapshots
    "changes",  # ownership changes received from the watch
    "stale",  # changes ignored: older than what the table already knew
    "removed",  # routes removed (the session lost its owner)
    "resyncs",  # the watch fell behind etcd's compaction: listed again
    "admitted",  # node packets allowed by admit_from_node
    "ahead",  # ... of which carried a newer epoch than the watch had delivered
    "fenced",  # node packets refused: stale epoch or wrong node
    "provisional",  # provisional routes created from hints
    "confirmed",  # provisional routes replaced by the real one
    "expired",  # provisional routes that were never confirmed in time
)


@final
@attrs.frozen
class Route:
    """Where a session's media goes: its owner node and that ownership's epoch."""

    node: str
    epoch: int

    @property
    def provisional(self) -> bool:
        """True for a route taken from a ufrag hint, not yet confirmed by etcd."""
        return self.epoch == PROVISIONAL_EPOCH


@final
class RouteTable:
    """session → :class:`Route`, kept current by :meth:`run`.

    All methods run in the Trio thread; none blocks. ``provisional_ttl`` bounds how long a
    route from a hint lives without the watch confirming it; ``clock`` is Trio's by default.
    """

    def __init__(
        self,
        *,
        provisional_ttl: float = 10.0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.provisional_ttl = provisional_ttl
        self._clock = clock
        self._routes: dict[str, Route] = {}
        # Deadlines of provisional routes, and the order they were made in (for the sweep).
        self._deadlines: dict[str, float] = {}
        self._made: deque[tuple[float, str]] = deque()
        self._watermark = 0
        self._running = False
        #: event counts, see ``_COUNTERS`` in the source for their meaning
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)

    def __len__(self) -> int:
        return len(self._routes)

    @property
    def watermark(self) -> int:
        """The highest etcd revision applied; every ownership write up to it has been seen."""
        return self._watermark

    # -- feeding the table from etcd -------------------------------------------------------------

    async def run(
        self, owners: Owners, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Load every owner, then apply every change, forever. Start it with ``nursery.start``.

        Reports started once the table is loaded and the watch is open. etcd restarts are
        survived by the watch itself (storage/etcd.py); if etcd is unreachable when listing, the
        list is retried; if etcd compacted the revisions the watch needs, the table lists again
        (a resync) rather than miss a change.
        """
        if self._running:
            raise RuntimeError("RouteTable.run is already running")
        self._running = True
        started = False
        backoff = 0.1
        try:
            while True:
                try:
                    listed, revision = await owners.list()
                except EtcdUnavailable as exc:
                    log.info("listing owners failed (%s); retrying in %.1fs", exc, backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                self.load(listed, revision)
                applied = self.counters["changes"]
                try:
                    # From the revision after the list's: no gap, and nothing applied twice.
                    async with owners.watch(start_revision=revision + 1) as changes:
                        if not started:
                            started = True
                            task_status.started()
                        async for change in changes:
                            self.apply(change)
                except* Compacted as group:
                    log.warning("owners watch compacted: %s", group.exceptions[0])
                # The watch only ends when etcd compacted revisions it needs. (The Compacted error
                # itself can be lost on the way out of the watch, so any end counts.) List again.
                self.counters["resyncs"] += 1
                log.warning("owners watch ended at revision %d; listing again", self._watermark)
                if self.counters["changes"] == applied:
                    # Nothing came through: do not spin on an etcd that keeps failing us.
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                else:
                    backoff = 0.1
        finally:
            self._running = False

    def load(self, owned: Iterable[Ownership], revision: int) -> None:
        """Apply a snapshot of every owner, read at ``revision`` (``Owners.list``).

        A known route that the snapshot lacks and whose epoch is at or below ``revision`` lost
        its owner since; routes accepted ahead (newer than the snapshot) and provisional routes
        stay.
        """
        listed: set[str] = set()
        for ownership in owned:
            listed.add(ownership.session)
            self.counters["listed"] += 1
            self._put(ownership.session, ownership.node, ownership.epoch)
        for session, route in list(self._routes.items()):
            if session not in listed and not route.provisional and route.epoch <= revision:
                del self._routes[session]
                self.counters["removed"] += 1
        self._watermark = max(self._watermark, revision)

    def apply(self, change: OwnershipChange) -> None:
        """Apply one watched change; the watch delivers them in revision order."""
        self.counters["changes"] += 1
        if change.node is None:
            # A delete carries no epoch: its own revision orders it against the known route.
            current = self._routes.get(change.session)
            if current is not None and current.epoch > change.revision:
                self.counters["stale"] += 1  # a newer claim was already accepted ahead
            elif current is not None:
                del self._routes[change.session]
                self._deadlines.pop(change.session, None)
                self.counters["removed"] += 1
        else:
            self._put(change.session, change.node, change.epoch)
        self._watermark = max(self._watermark, change.revision)

    def _put(self, session: str, node: str, epoch: int) -> None:
        current = self._routes.get(session)
        if epoch <= PROVISIONAL_EPOCH or (current is not None and epoch < current.epoch):
            self.counters["stale"] += 1  # real epochs are etcd revisions, always positive
            return
        if current is not None and current.provisional:
            self.counters["confirmed"] += 1
            self._deadlines.pop(session, None)
        self._routes[session] = Route(node, epoch)

    # -- the packet path -------------------------------------------------------------------------

    def _current(self, session: str) -> Route | None:
        route = self._routes.get(session)
        if route is not None and route.provisional and self._deadlines[session] <= self._clock():
            del self._routes[session]
            del self._deadlines[session]
            self.counters["expired"] += 1
            return None
        return route

    def lookup(self, session: str) -> Route | None:
        """The route of ``session`` (possibly provisional), or None if unknown."""
        route = self._routes.get(session)
        if route is not None and route.epoch == PROVISIONAL_EPOCH:
            return self._current(session)  # it may have expired
        return route

    def admit_from_node(self, session: str, node: str, epoch: int) -> bool:
        """May a packet that ``node`` stamped with ``epoch`` for ``session`` go to the client?

        Yes if it matches the current route, or if ``epoch`` is newer than both the route and
        the watermark: a claim or transfer the watch has not delivered yet, which becomes the
        route now (the watch confirms it). Anything older, or the wrong node at the current
        epoch, is fenced: the sender is no longer the owner.
        """
        route = self._routes.get(session)
        if route is not None and route.epoch == epoch and epoch != PROVISIONAL_EPOCH:
            if node == route.node:  # the owner, at its epoch: nearly every packet
                self.counters["admitted"] += 1
                return True
            self.counters["fenced"] += 1
            return False
        route = self._current(session)
        if route is not None and not route.provisional and epoch == route.epoch:
            if node == route.node:
                self.counters["admitted"] += 1
                return True
        elif epoch > self._watermark and (route is None or epoch > route.epoch):
            if route is not None and route.provisional:
                self.counters["confirmed"] += 1
                del self._deadlines[session]
            self._routes[session] = Route(node, epoch)
            self.counters["admitted"] += 1
            self.counters["ahead"] += 1
            return True
        self.counters["fenced"] += 1
        return False

    def hint_route(self, hint: Hint) -> Route:
        """The route for an authenticated ufrag hint (relay/tunnel/hint.py ``read_hint``).

        The known route if there is one; otherwise a provisional route to the hinted node, which
        the watch replaces with the real one, or which expires after ``provisional_ttl``.
        """
        self._sweep()
        route = self._current(hint.session)
        if route is not None:
            return route
        route = Route(hint.node, PROVISIONAL_EPOCH)
        deadline = self._clock() + self.provisional_ttl
        self._routes[hint.session] = route
        self._deadlines[hint.session] = deadline
        self._made.append((deadline, hint.session))
        self.counters["provisional"] += 1
        return route

    def _sweep(self) -> None:
        """Drop expired provisional routes nobody asked about again (amortised O(1))."""
        now = self._clock()
        while self._made and self._made[0][0] <= now:
            deadline, session = self._made.popleft()
            if self._deadlines.get(session) == deadline:
                del self._routes[session]
                del self._deadlines[session]
                self.counters["expired"] += 1
