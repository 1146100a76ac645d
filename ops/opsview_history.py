"""What the ops page plots, as values: a bounded history of cluster samples, and the recent
ownership changes with their reasons. No I/O here: ``ops/opsview.py`` reads etcd and feeds it.

A sample is what :func:`ops.status.gather_status` read at one moment. From successive samples
:class:`History` keeps, per point: sessions per node, packet rates per relay (from the relays'
``client_in``/``client_out`` counters), and the spread of loss, jitter and RTT over the live
sessions (percentiles, and each session's own value at the newest point).

Rates come from counters, not from what a relay says its rate is, and three things about
counters are handled here:

* a relay publishes its record every couple of seconds, not at each sample: a counter read twice
  unchanged is not a rate of zero, so a rate is taken between the samples where the counter
  *changed*, over the time between them (and is zero only once nothing changed for
  :data:`STALE_AFTER` seconds);
* a counter that went down, or a relay with another pid or start time, is a restarted relay: the
  new counter starts a new baseline (no point for that relay at that sample, never a negative
  or huge rate);
* the history is a ring: points older than its ``span`` go, and there are never more than
  ``max_points``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, Final, final

import attrs

#: seconds of history the page shows
SPAN: Final = 300.0
#: a relay counter unchanged for this long means no traffic (its record comes every ~2 s)
STALE_AFTER: Final = 6.0
#: the ownership changes kept
MAX_CHANGES: Final = 100
#: the per-session figures plotted as distributions: (key in a session's stats, series name,
#: scale to the unit the page shows)
QUALITY: Final = (
    ("loss_fraction", "loss_pct", 100.0),
    ("jitter_ms", "jitter_ms", 1.0),
    ("rtt_ms", "rtt_ms", 1.0),
)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by linear interpolation; ``values`` sorted."""
    if not values:
        raise ValueError("no values")
    rank = q * (len(values) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@final
@attrs.define
class _Counter:
    """What we last saw of one relay's counters."""

    incarnation: tuple[Any, Any]
    values: tuple[int, int]
    #: when the values last changed (the start of the next rate's interval)
    changed_at: float
    rate: tuple[float, float] | None = None


@final
class History:
    """The cluster over the last ``span`` seconds, one point per :meth:`add`."""

    def __init__(self, span: float = SPAN, max_points: int = 1000) -> None:
        self.span = span
        self.points: deque[dict[str, Any]] = deque(maxlen=max_points)
        self._counters: dict[str, _Counter] = {}
        #: relays seen restarting (a counter went back, or a new pid/start time)
        self.counter_resets = 0
        #: each live session's figures at the newest point, for the distributions
        self.latest_sessions: list[dict[str, Any]] = []

    def add(self, status: Mapping[str, Any], now: float) -> dict[str, Any]:
        """One sample: ``status`` as :func:`ops.status.gather_status` returns it, read at ``now``
        (seconds, any clock that only goes forward); returns the point it made."""
        point: dict[str, Any] = {
            "t": now,
            "nodes": {
                str(n.get("id")): int(n.get("sessions") or 0)
                for n in status.get("nodes", [])
                if isinstance(n, Mapping)
            },
            "relays": self._relay_rates(status.get("relays", []), now),
        }
        sessions = [s for s in status.get("sessions", []) if isinstance(s, Mapping)]
        self.latest_sessions = []
        spreads: dict[str, list[float]] = {name: [] for _, name, _ in QUALITY}
        for session in sessions:
            stats = session.get("stats")
            stats = stats if isinstance(stats, Mapping) else {}
            figures: dict[str, Any] = {"id": session.get("id"), "owner": session.get("owner")}
            for key, name, scale in QUALITY:
                value = _number(stats.get(key))
                figures[name] = None if value is None else value * scale
                if value is not None:
                    spreads[name].append(value * scale)
            self.latest_sessions.append(figures)
        point["sessions"] = len(sessions)
        for name, values in spreads.items():
            values.sort()
            point[name] = (
                {
                    "p50": percentile(values, 0.5),
                    "p90": percentile(values, 0.9),
                    "max": values[-1],
                    "n": len(values),
                }
                if values
                else None
            )
        self.points.append(point)
        while self.points and self.points[0]["t"] < now - self.span:
            self.points.popleft()
        return point

    def _relay_rates(self, relays: Iterable[Any], now: float) -> dict[str, dict[str, float]]:
        rates: dict[str, dict[str, float]] = {}
        seen: set[str] = set()
        for relay in relays:
            if not isinstance(relay, Mapping):
                continue
            counters = relay.get("counters")
            counters = counters if isinstance(counters, Mapping) else {}
            received, sent = counters.get("client_in"), counters.get("client_out")
            if not isinstance(received, int) or not isinstance(sent, int):
                continue
            relay_id = str(relay.get("id"))
            seen.add(relay_id)
            rate = self._rate(
                relay_id, (relay.get("pid"), relay.get("started_at")), (received, sent), now
            )
            if rate is not None:
                rates[relay_id] = {"in": rate[0], "out": rate[1]}
        for gone in set(self._counters) - seen:
            del self._counters[gone]
        return rates

    def _rate(
        self, relay_id: str, incarnation: tuple[Any, Any], values: tuple[int, int], now: float
    ) -> tuple[float, float] | None:
        last = self._counters.get(relay_id)
        if last is None:
            self._counters[relay_id] = _Counter(incarnation, values, now)
            return None
        went_back = values[0] < last.values[0] or values[1] < last.values[1]
        if went_back or incarnation != last.incarnation:
            # a restarted relay counts from zero again: a new baseline, no rate from the old one
            self.counter_resets += 1
            self._counters[relay_id] = _Counter(incarnation, values, now)
            return None
        if values == last.values:
            if now - last.changed_at >= STALE_AFTER:
                last.rate = (0.0, 0.0)
            return last.rate
        elapsed = max(now - last.changed_at, 1e-6)
        last.rate = (
            (values[0] - last.values[0]) / elapsed,
            (values[1] - last.values[1]) / elapsed,
        )
        last.values, last.changed_at = values, now
        return last.rate

    def view(self) -> dict[str, Any]:
        """The JSON the page fetches: every point, and each live session's figures now."""
        return {
            "span": self.span,
            "points": list(self.points),
            "sessions": self.latest_sessions,
            "counter_resets": self.counter_resets,
        }


@final
@attrs.frozen
class OwnershipEvent:
    """One fact read from etcd about ownership, in revision order.

    ``kind``: ``owner`` (``node`` the new owner, None: the key is gone), ``move`` (``state`` of a
    planned move, ``node`` its target, ``source`` its source; ``state`` None: the key is gone),
    ``checkpoint_deleted`` (a release deletes it with the owner key, a lost lease does not),
    ``end_requested`` (a client ended the session through another node), ``drain``
    (``node`` is being drained)."""

    kind: str
    revision: int
    session: str = ""
    node: str | None = None
    source: str = ""
    state: str | None = None
    reason: str = ""


@final
class OwnershipLog:
    """Turns :class:`OwnershipEvent` s into the recent ownership changes and why they happened.

    The reasons come from what else happened at the same etcd revision or before: a move that
    went ``done`` in the same transaction as the new owner (a planned move; a drain if its
    source was being drained), a checkpoint deleted with the owner key (the session ended), an
    owner key gone without that (its node's lease was lost), and a new owner for a session whose
    owner was lost (adopted by failover)."""

    def __init__(self, owners: Mapping[str, str] | None = None, keep: int = MAX_CHANGES) -> None:
        #: session -> its owner as we know it
        self.owners: dict[str, str] = dict(owners or {})
        self.changes: deque[dict[str, Any]] = deque(maxlen=keep)
        self._orphans: dict[str, str] = {}  # session -> the node that lost it
        self._ending: set[str] = set()
        self._draining: set[str] = set()

    def apply(self, events: Iterable[OwnershipEvent], at: float) -> list[dict[str, Any]]:
        """One batch of events (a watch response: whole revisions), seen at wall time ``at``;
        returns the changes it added."""
        batch = list(events)
        moved = {(e.session, e.revision): e for e in batch if e.kind == "move" and e.state}
        released = {(e.session, e.revision) for e in batch if e.kind == "checkpoint_deleted"}
        added: list[dict[str, Any]] = []

        def note(event: OwnershipEvent, what: str, reason: str, **more: Any) -> None:
            change = {
                "at": at,
                "revision": event.revision,
                "session": event.session,
                "what": what,
                "reason": reason,
                **more,
            }
            self.changes.append(change)
            added.append(change)

        for event in batch:
            if event.kind == "drain" and event.node:
                if event.state is None:  # the drain's key went with the node's lease
                    self._draining.discard(event.node)
                    continue
                self._draining.add(event.node)
                note(event, "drain", f"{event.node} is being drained", node=event.node)
            elif event.kind == "end_requested":
                self._ending.add(event.session)
            elif event.kind == "move" and event.state == "failed":
                note(
                    event,
                    "move failed",
                    event.reason or "no reason given",
                    node=event.source,
                    to=event.node,
                )
            elif event.kind == "owner":
                self._owner(event, moved, released, note)
        return added

    def _owner(
        self,
        event: OwnershipEvent,
        moved: Mapping[tuple[str, int], OwnershipEvent],
        released: set[tuple[str, int]],
        note: Any,
    ) -> None:
        session, before = event.session, self.owners.get(event.session)
        if event.node is None:
            self.owners.pop(session, None)
            if (session, event.revision) in released:
                why = "ended on request via another node" if session in self._ending else "ended"
                note(event, "ended", why, node=before)
            else:
                self._orphans[session] = before or "?"
                note(event, "lost", f"owner {before or '?'} lost its lease", node=before)
            self._ending.discard(session)
            return
        self.owners[session] = event.node
        move = moved.get((session, event.revision))
        if move is not None and move.state == "done":
            source = move.source or before or "?"
            kind = "drain" if source in self._draining else "migrate"
            note(
                event,
                "moved",
                f"planned move ({kind}) from {source}",
                node=event.node,
                source=source,
            )
        elif session in self._orphans:
            lost = self._orphans.pop(session)
            note(event, "adopted", f"failover: {lost} lost its lease", node=event.node, source=lost)
        elif before is None:
            note(event, "claimed", "new session", node=event.node)
        elif before != event.node:
            note(event, "moved", f"taken over from {before}", node=event.node, source=before)

    def view(self) -> list[dict[str, Any]]:
        """The changes kept, newest first."""
        return list(reversed(self.changes))
