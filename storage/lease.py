"""Lease keeping with a local safety deadline.

etcd expires a lease ``TTL`` seconds after the last keepalive it *processed*. A keepalive we sent at
local time ``t`` cannot have been processed before ``t``, so once it is acknowledged we know the
lease lives at least until ``t + TTL`` (on any clock that runs at the rate of etcd's). We keep a
local deadline ``t_sent + TTL - margin`` on Trio's monotonic clock and attach it to a cancel scope:
everything a node owns runs inside that scope, so when keepalives stop being acknowledged the work
is cancelled *before* etcd can expire the lease and let another node claim what it held.

The margin absorbs clock-rate differences between hosts and the time Trio needs to deliver the
cancellation; keep it well above one scheduler tick (default: 20% of the TTL, at least 0.5 s).

**Stalls.** Losing sight of etcd is not the same as losing the lease: etcd may be frozen, electing
a leader, or slow, and the lease may still be alive when it answers. With ``hold > 0`` the keeper
does not cancel the scope at the safety deadline; the lease *stalls* instead (:attr:`Lease.stalled`
is set, :meth:`Lease.usable` turns false at the deadline on its own, with no task needed to notice),
and whoever holds work under it pauses that work without throwing its state away. The keeper goes
on sending keepalives: an acknowledged one proves the lease alive past a new deadline and the lease
*recovers* (same id, same epochs); etcd saying the lease is gone, or ``hold`` seconds past the
deadline without an answer, loses it (the scope is cancelled, as without ``hold``)::

    live --deadline passes--> stalled --keepalive acknowledged--> live
                                      --etcd: expired, or hold passed--> lost
    live --etcd: expired--> lost
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import final

import attrs
import trio

from storage.etcd import Etcd, EtcdError

log = logging.getLogger("parley.lease")


class LeaseLost(Exception):
    """The lease's safety deadline passed or etcd reported it gone."""


def default_margin(ttl: float) -> float:
    return max(0.5, 0.2 * ttl)


@final
@attrs.define(eq=False)
class Lease:
    """One granted lease and the scope that must not outlive its safety deadline."""

    id: int
    ttl: int
    generation: int
    scope: trio.CancelScope
    #: Trio time of the send of the last acknowledged keepalive (or grant)
    confirmed_at: float
    margin: float
    lost: trio.Event = attrs.field(factory=trio.Event)
    #: set while no keepalive has been acknowledged since the deadline passed (``hold > 0``)
    stalled: trio.Event = attrs.field(factory=trio.Event)
    #: set (and replaced) each time a stall ends with the lease alive
    recovered: trio.Event = attrs.field(factory=trio.Event)
    #: how many stalls this lease has come back from
    stalls: int = 0

    @property
    def deadline(self) -> float:
        """Trio time after which this node must assume the lease may be gone."""
        return self.confirmed_at + self.ttl - self.margin

    def time_left(self) -> float:
        return max(0.0, self.deadline - trio.current_time())

    def usable(self) -> bool:
        """Whether work under this lease may act now: it is not lost and its safety deadline is
        still ahead. Exact at every call (a media path checks it per packet), not only once the
        keeper has noticed the deadline."""
        return not self.lost.is_set() and trio.current_time() < self.deadline

    def confirm(self, sent_at: float, ttl: int, *, hold: float = 0.0) -> bool:
        """A keepalive sent at ``sent_at`` was acknowledged with ``ttl``; True if that ended a
        stall."""
        if not self.stalled.is_set() and trio.current_time() >= self.deadline:
            # The deadline passed before this acknowledgement was taken in: work under the
            # lease may already have held itself (Lease.usable turned false). A stall it was.
            self.stalled.set()
        self.confirmed_at = max(self.confirmed_at, sent_at)
        self.ttl = ttl
        self.scope.deadline = self.deadline + hold
        if self.stalled.is_set() and trio.current_time() < self.deadline:
            self.stalled = trio.Event()
            self.stalls += 1
            log.warning("lease %x recovered after a stall", self.id)
            recovered, self.recovered = self.recovered, trio.Event()
            recovered.set()
            return True
        return False

    def stall(self) -> None:
        if not self.stalled.is_set():
            log.warning("lease %x stalled: no keepalive acknowledged in time", self.id)
            self.stalled.set()

    def lose(self, reason: str) -> None:
        if not self.lost.is_set():
            log.warning("lease %x lost: %s", self.id, reason)
            self.lost.set()
        self.scope.cancel()


@final
class LeaseKeeper:
    """Grants a lease, keeps it alive at ``ttl / 3``, and grants a new one if it is lost.

    ``run`` is started with ``nursery.start``; :meth:`current` returns the live lease. Work that
    must stop with the lease runs inside ``with lease.scope:``.
    """

    def __init__(
        self, etcd: Etcd, *, ttl: int = 5, margin: float | None = None, hold: float = 0.0
    ) -> None:
        if ttl < 2:
            raise ValueError("lease TTL must be at least 2 seconds")
        if hold < 0:
            raise ValueError("lease hold must not be negative")
        self.etcd = etcd
        self.ttl = ttl
        self.margin = default_margin(ttl) if margin is None else margin
        #: how long past the safety deadline a stalled lease is held before it counts as lost
        self.hold = hold
        if self.margin >= ttl:
            raise ValueError("lease safety margin must be shorter than the TTL")
        self._lease: Lease | None = None
        self._changed = trio.Event()
        self._generation = 0
        self.keepalives_sent = 0
        self.keepalives_failed = 0

    @property
    def grants(self) -> int:
        """Leases granted so far (one more each time a lost lease is replaced)."""
        return self._generation

    @property
    def lease(self) -> Lease | None:
        """The current lease, if one is believed live."""
        lease = self._lease
        if lease is None or lease.lost.is_set():
            return None
        return lease

    async def current(self) -> Lease:
        """Wait for a live lease and return it."""
        while True:
            lease = self.lease
            if lease is not None and trio.current_time() < lease.deadline:
                return lease
            await self._changed.wait()

    async def run(self, *, task_status: trio.TaskStatus[Lease] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        backoff = 0.1
        while True:
            try:
                lease = await self._grant()
            except EtcdError as exc:
                log.warning("lease grant failed: %s", exc)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            if not started:
                task_status.started(lease)
                started = True
            await self._keep(lease)
            # Best effort: if etcd is back and still holds the old lease, free what it held now
            # rather than after its TTL; our work under it has already stopped.
            with trio.move_on_after(self.etcd.timeout):
                with suppress(EtcdError):
                    await self.etcd.lease_revoke(lease.id)

    async def _grant(self) -> Lease:
        sent_at = trio.current_time()
        lease_id, ttl = await self.etcd.lease_grant(self.ttl)
        self._generation += 1
        lease = Lease(
            id=lease_id,
            ttl=ttl,
            generation=self._generation,
            scope=trio.CancelScope(),
            confirmed_at=sent_at,
            margin=self.margin,
        )
        lease.scope.deadline = lease.deadline + self.hold
        self._lease = lease
        self._changed.set()
        self._changed = trio.Event()
        log.info("lease %x granted (ttl %ds, generation %d)", lease_id, ttl, lease.generation)
        return lease

    async def _keep(self, lease: Lease) -> None:
        """Keep ``lease`` alive until it is lost; returns once it is."""
        interval = lease.ttl / 3
        while True:
            now = trio.current_time()
            if now >= lease.deadline + self.hold:
                lease.lose(
                    "no keepalive acknowledged in time"
                    if not self.hold
                    else f"etcd did not answer within {self.hold:g} s of the safety deadline"
                )
                break
            if now >= lease.deadline:
                lease.stall()
            # Retry faster than the nominal interval once a keepalive has failed, and never let a
            # single call outlive the safety deadline (or, stalled, the hold).
            limit = lease.deadline if now < lease.deadline else lease.deadline + self.hold
            rpc_deadline = max(0.05, min(self.etcd.timeout, limit - now))
            sent_at = now
            self.keepalives_sent += 1
            try:
                with trio.move_on_after(rpc_deadline) as cs:
                    ttl = await self.etcd.lease_keepalive(lease.id, deadline=rpc_deadline)
                if cs.cancelled_caught:
                    raise EtcdError("keepalive timed out")
            except EtcdError as exc:
                self.keepalives_failed += 1
                log.info("keepalive for lease %x failed: %s", lease.id, exc)
                now = trio.current_time()
                if self.hold and now >= lease.deadline and not lease.stalled.is_set():
                    continue  # the deadline came during the call: stall at once
                wake = now + interval / 4
                if now < lease.deadline:
                    wake = min(wake, lease.deadline)  # stall on time
                await trio.sleep_until(min(wake, lease.deadline + self.hold))
                continue
            if ttl <= 0:
                lease.lose("etcd reports the lease expired")
                break
            if lease.confirm(sent_at, ttl, hold=self.hold):
                self._changed.set()  # current() waits for a usable lease
                self._changed = trio.Event()
            await trio.sleep_until(sent_at + interval)
        self._changed.set()
        self._changed = trio.Event()


@asynccontextmanager
async def keep_lease(
    etcd: Etcd, *, ttl: int = 5, margin: float | None = None
) -> AsyncIterator[LeaseKeeper]:
    """Run a :class:`LeaseKeeper` for the duration of the block; revokes the lease on exit."""
    keeper = LeaseKeeper(etcd, ttl=ttl, margin=margin)
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.run)
        try:
            yield keeper
        finally:
            nursery.cancel_scope.cancel()
            lease = keeper.lease
            if lease is not None:
                with trio.move_on_after(etcd.timeout) as cs:
                    cs.shield = True
                    try:
                        await etcd.lease_revoke(lease.id)
                    except EtcdError as exc:
                        log.warning("could not revoke lease %x on exit: %s", lease.id, exc)
