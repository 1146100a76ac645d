"""Lease keeping and the local safety deadline, against a real etcd that we freeze and kill."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from ops.etcdserver import EtcdServer
from storage.etcd import Etcd, EtcdError, open_etcd
from storage.keys import Keyspace
from storage.lease import Lease, LeaseKeeper, keep_lease
from storage.ownership import AlreadyOwned, Owners


def monotonic_of(trio_time: float) -> float:
    """Trio's clock has an arbitrary offset; map its times onto CLOCK_MONOTONIC."""
    return trio_time + (time.monotonic() - trio.current_time())


async def test_keeper_keeps_the_lease_past_its_ttl(etcd: Etcd) -> None:
    async with keep_lease(etcd, ttl=2) as keeper:
        lease = await keeper.current()
        await trio.sleep(5)  # 2.5 TTLs
        assert keeper.lease is lease
        assert await etcd.lease_time_to_live(lease.id) > 0
        assert lease.time_left() > 0
    # Leaving the block revokes the lease at once.
    assert await etcd.lease_time_to_live(lease.id) == -1


async def test_lease_revoked_behind_our_back_is_noticed_and_replaced(etcd: Etcd) -> None:
    async with keep_lease(etcd, ttl=3) as keeper:
        first = await keeper.current()
        stopped = trio.Event()

        async def work() -> None:
            with first.scope:
                await trio.sleep_forever()
            stopped.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(work)
            await etcd.lease_revoke(first.id)
            with trio.fail_after(3):
                await stopped.wait()
        assert first.lost.is_set()
        with trio.fail_after(3):
            second = await keeper.current()
        assert second.id != first.id and second.generation == first.generation + 1


async def test_frozen_etcd_owner_stops_before_its_lease_can_expire(
    etcd_server: EtcdServer, keys: Keyspace
) -> None:
    ttl = 3
    async with open_etcd(etcd_server.endpoint, rpc_timeout=1.0) as etcd_a, trio.open_nursery() as n:
        keeper = LeaseKeeper(etcd_a, ttl=ttl)
        lease = await n.start(keeper.run)
        owners_a = Owners(etcd_a, keys)
        await owners_a.claim("s1", "node-a", lease.id)
        session_stopped_at: list[float] = []

        async def session() -> None:
            with lease.scope:
                await trio.sleep_forever()
            session_stopped_at.append(time.monotonic())

        n.start_soon(session)
        await trio.sleep(1.5)  # a few keepalives go through
        etcd_server.freeze()
        frozen_at = time.monotonic()
        with trio.fail_after(ttl + 2):
            await lease.lost.wait()
        assert session_stopped_at, "the session still runs without a confirmed lease"
        last_confirmed = monotonic_of(lease.confirmed_at)
        # Stopped before the earliest moment etcd could have expired the lease.
        assert session_stopped_at[0] < last_confirmed + ttl
        assert session_stopped_at[0] <= last_confirmed + ttl - keeper.margin + 0.1
        await trio.sleep(max(0.0, frozen_at + ttl + 0.5 - time.monotonic()))
        etcd_server.thaw()

        # Another node races for the session from the moment etcd answers again.
        async with open_etcd(etcd_server.endpoint) as etcd_b:
            owners_b = Owners(etcd_b, keys)
            lease_b, _ = await etcd_b.lease_grant(10)
            with trio.fail_after(ttl + 5):
                while True:
                    try:
                        await owners_b.claim("s1", "node-b", lease_b)
                        break
                    except AlreadyOwned:
                        await trio.sleep(0.02)
            claimed_at = time.monotonic()
        assert session_stopped_at[0] < claimed_at
        # The keeper recovers with a fresh lease once etcd is back.
        with trio.fail_after(5):
            new_lease = await keeper.current()
        assert new_lease.generation == lease.generation + 1
        n.cancel_scope.cancel()


# --- stalls: losing sight of etcd is not losing the lease ----------------------------------------


class ScriptedEtcd:
    """The three lease calls of :class:`Etcd`, scripted, for the keeper's timing under MockClock
    (the real-etcd tests above and below check the same rules against etcd itself)."""

    timeout = 1.0

    def __init__(self) -> None:
        self.answering = True
        self.expired = False
        self.revoked: list[int] = []
        self.granted = 0

    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        await trio.sleep(0.001)  # a round trip
        self.granted += 1
        return 0x100 + self.granted, ttl

    async def lease_keepalive(self, lease_id: int, *, deadline: float | None = None) -> int:
        if not self.answering:
            await trio.sleep(deadline or self.timeout)  # a frozen etcd: the deadline runs out
            raise EtcdError("deadline exceeded")
        await trio.sleep(0.001)
        return 0 if self.expired else 3

    async def lease_revoke(self, lease_id: int) -> None:
        await trio.sleep(0.001)
        self.revoked.append(lease_id)


async def test_a_stalled_lease_stops_being_usable_at_its_deadline_and_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    etcd = ScriptedEtcd()
    keeper = LeaseKeeper(etcd, ttl=3, margin=1.0, hold=20.0)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        lease: Lease = await nursery.start(keeper.run)
        await trio.sleep(2.5)
        assert lease.usable() and not lease.stalled.is_set()
        etcd.answering = False
        stalled_from = lease.deadline  # no later keepalive can be acknowledged now
        await lease.stalled.wait()
        assert trio.current_time() == pytest.approx(stalled_from, abs=0.01)
        assert not lease.usable() and not lease.lost.is_set()
        await trio.sleep(8)  # far past the TTL: only etcd can say whether the lease lives
        assert not lease.usable() and not lease.lost.is_set() and not lease.scope.cancel_called
        recovered = lease.recovered
        etcd.answering = True
        with trio.fail_after(2):
            await recovered.wait()
        assert lease.usable() and not lease.stalled.is_set() and lease.stalls == 1
        assert await keeper.current() is lease  # the same lease, the same epochs
        nursery.cancel_scope.cancel()


async def test_a_stalled_lease_is_lost_when_etcd_says_it_expired_or_after_the_hold(
    autojump_clock: trio.testing.MockClock,
) -> None:
    etcd = ScriptedEtcd()
    keeper = LeaseKeeper(etcd, ttl=3, margin=1.0, hold=20.0)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        first: Lease = await nursery.start(keeper.run)
        etcd.answering = False
        await first.stalled.wait()
        etcd.answering, etcd.expired = True, True
        with trio.fail_after(2):
            await first.lost.wait()
        assert first.scope.cancel_called
        etcd.expired = False
        second = await keeper.current()
        assert second.generation == 2

        etcd.answering = False
        await second.stalled.wait()
        stalled_at = trio.current_time()
        await second.lost.wait()  # etcd never answers: lost once the hold has passed
        assert trio.current_time() - stalled_at == pytest.approx(20.0, abs=0.5)
        nursery.cancel_scope.cancel()


async def test_without_a_hold_the_deadline_loses_the_lease_as_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    etcd = ScriptedEtcd()
    keeper = LeaseKeeper(etcd, ttl=3, margin=1.0)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        lease: Lease = await nursery.start(keeper.run)
        etcd.answering = False
        deadline = lease.deadline
        await lease.lost.wait()
        assert trio.current_time() == pytest.approx(deadline, abs=0.01)
        assert not lease.stalled.is_set()
        nursery.cancel_scope.cancel()


async def test_etcd_frozen_between_the_deadline_and_the_expiry_leaves_the_lease_alive(
    etcd_server: EtcdServer,
) -> None:
    """Against etcd itself: a freeze long enough to pass our safety deadline but shorter than
    the TTL. The lease stalls (nothing may act under it) and then recovers: same id."""
    ttl, margin = 3, 1.5
    async with open_etcd(etcd_server.endpoint, rpc_timeout=0.5) as etcd, trio.open_nursery() as n:
        keeper = LeaseKeeper(etcd, ttl=ttl, margin=margin, hold=10.0)
        lease: Lease = await n.start(keeper.run)
        await trio.sleep(1.2)
        sent = keeper.keepalives_sent
        while True:  # just after an acknowledged keepalive
            if keeper.keepalives_sent > sent and lease.confirmed_at > trio.current_time() - 0.2:
                break
            await trio.sleep(0.01)
        recovered = lease.recovered
        etcd_server.freeze()
        try:
            with trio.fail_after(ttl):
                await lease.stalled.wait()
            assert not lease.usable()
            await trio.sleep(max(0.0, lease.confirmed_at + ttl - 0.6 - trio.current_time()))
        finally:
            etcd_server.thaw()
        with trio.fail_after(3):
            await recovered.wait()
        assert not lease.lost.is_set() and lease.usable() and keeper.lease is lease
        assert await etcd.lease_time_to_live(lease.id) > 0
        n.cancel_scope.cancel()


async def test_etcd_frozen_past_the_ttl_expires_the_lease_and_the_keeper_takes_a_new_one(
    etcd_server: EtcdServer,
) -> None:
    ttl = 2
    async with open_etcd(etcd_server.endpoint, rpc_timeout=0.5) as etcd, trio.open_nursery() as n:
        keeper = LeaseKeeper(etcd, ttl=ttl, hold=30.0)
        lease: Lease = await n.start(keeper.run)
        await trio.sleep(1.0)
        etcd_server.freeze()
        try:
            with trio.fail_after(ttl + 1):
                await lease.stalled.wait()
            await trio.sleep(ttl + 1.5)  # etcd's clock runs on: the lease expires in there
        finally:
            etcd_server.thaw()
        with trio.fail_after(5):
            await lease.lost.wait()  # etcd answered: expired (long before the 30 s hold)
        with trio.fail_after(5):
            fresh = await keeper.current()
        assert fresh.id != lease.id and fresh.generation == lease.generation + 1
        n.cancel_scope.cancel()
