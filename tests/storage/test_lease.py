"""Lease keeping and the local safety deadline, against a real etcd that we freeze and kill."""

from __future__ import annotations

import time

import trio

from ops.etcdserver import EtcdServer
from storage.etcd import Etcd, open_etcd
from storage.keys import Keyspace
from storage.lease import LeaseKeeper, keep_lease
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
