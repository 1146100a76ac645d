"""The relay's route table: the table logic alone, then fed by a real etcd."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import pytest
import trio

from ops.etcdserver import EtcdServer
from relay.routes import Route, RouteTable
from relay.tunnel.hint import Hint, mint_ufrag, read_hint
from storage.etcd import Etcd, EtcdUnavailable
from storage.keys import Keyspace
from storage.ownership import Owners, Ownership, OwnershipChange

T = TypeVar("T")
SECRET = b"cluster secret, 32 bytes long..."


def put(session: str, node: str, epoch: int) -> OwnershipChange:
    return OwnershipChange(session, node, epoch, epoch)


def delete(session: str, revision: int) -> OwnershipChange:
    return OwnershipChange(session, None, 0, revision)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the table alone ----------------------------------------------------------------------------


def test_fencing_admits_the_current_owner_and_newer_epochs_only() -> None:
    table = RouteTable()
    table.load([Ownership("s1", "node-a", 10, lease=1)], revision=20)
    assert table.watermark == 20
    assert table.admit_from_node("s1", "node-a", 10)
    assert not table.admit_from_node("s1", "node-b", 10)  # right epoch, wrong node
    assert not table.admit_from_node("s1", "node-a", 9)  # older
    # Newer than the route but not than the watermark: etcd never wrote it for s1.
    assert not table.admit_from_node("s1", "node-b", 15)
    # Newer than anything applied: a transfer the watch has not delivered yet.
    assert table.admit_from_node("s1", "node-b", 25)
    assert table.lookup("s1") == Route("node-b", 25)
    assert not table.admit_from_node("s1", "node-a", 10)  # the former owner is fenced now
    assert table.counters["fenced"] == 4
    assert (table.counters["admitted"], table.counters["ahead"]) == (2, 1)

    # The watch then delivers an intermediate transfer (older: ignored) and the one we took.
    table.apply(put("s1", "node-c", 22))
    assert table.lookup("s1") == Route("node-b", 25)
    table.apply(put("s1", "node-b", 25))
    assert table.lookup("s1") == Route("node-b", 25)
    assert table.counters["stale"] == 1
    assert table.watermark == 25


def test_deletes_are_ordered_by_revision_and_fence_the_former_owner() -> None:
    table = RouteTable()
    table.load([], revision=25)
    assert not table.admit_from_node("s2", "node-a", 15)  # unknown, at or below the watermark
    assert table.admit_from_node("s2", "node-a", 30)  # a claim the watch has yet to deliver
    table.apply(delete("s2", 28))  # a release before that claim: stale
    assert table.lookup("s2") == Route("node-a", 30)
    table.apply(put("s2", "node-a", 30))
    table.apply(delete("s2", 31))
    assert table.lookup("s2") is None
    # The session is gone and the watermark covers its epoch: its old owner is fenced.
    assert not table.admit_from_node("s2", "node-a", 30)
    assert (table.counters["stale"], table.counters["removed"]) == (1, 1)


def test_a_snapshot_reconciles_without_dropping_newer_knowledge() -> None:
    clock = FakeClock()
    table = RouteTable(clock=clock)
    table.apply(put("gone", "node-a", 10))
    assert table.admit_from_node("ahead", "node-a", 50)
    table.hint_route(Hint("hinted", "node-h"))
    table.load(
        [Ownership("kept", "node-k", 30, lease=1), Ownership("ahead", "node-z", 35, lease=1)],
        revision=40,
    )
    assert table.lookup("gone") is None  # not in a snapshot that covers its epoch
    assert table.lookup("kept") == Route("node-k", 30)
    assert table.lookup("ahead") == Route("node-a", 50)  # newer than the snapshot
    assert table.lookup("hinted") == Route("node-h", 0)  # provisional: the watch decides
    assert table.watermark == 40
    assert table.counters["listed"] == 2


def test_provisional_routes_are_confirmed_or_expire() -> None:
    clock = FakeClock()
    table = RouteTable(provisional_ttl=5.0, clock=clock)
    first = table.hint_route(Hint("s1", "node-a"))
    assert first == Route("node-a", 0) and first.provisional
    assert table.hint_route(Hint("s1", "node-other")) == first  # known: the hint is ignored
    table.apply(put("s1", "node-b", 7))  # the real owner differs from the hint
    assert table.lookup("s1") == Route("node-b", 7)
    assert table.hint_route(Hint("s1", "node-a")) == Route("node-b", 7)

    table.hint_route(Hint("s2", "node-a"))
    assert not table.admit_from_node("s2", "node-a", 0)  # epoch 0 is never an owner's
    assert table.admit_from_node("s2", "node-a", 9)  # the owner answers before the watch
    assert table.lookup("s2") == Route("node-a", 9)
    assert table.counters["confirmed"] == 2

    table.hint_route(Hint("s3", "node-a"))
    clock.now += 4.9
    assert table.lookup("s3") == Route("node-a", 0)
    clock.now += 0.2
    assert table.lookup("s3") is None
    assert table.counters["expired"] == 1

    # Unconfirmed routes nobody asks about again are swept.
    for i in range(10):
        table.hint_route(Hint(f"idle{i}", "node-a"))
    assert len(table) == 12
    clock.now += 6
    table.hint_route(Hint("s4", "node-a"))
    assert len(table) == 3  # s1, s2, s4
    assert table.counters["expired"] == 11
    assert table.counters["provisional"] == 14


def test_a_delete_removes_a_provisional_route() -> None:
    table = RouteTable(clock=FakeClock())
    table.hint_route(Hint("s1", "node-a"))
    table.apply(delete("s1", 12))
    assert table.lookup("s1") is None


# -- fed by a real etcd -------------------------------------------------------------------------


async def until(condition: Callable[[], bool], *, within: float = 10.0) -> None:
    """Wait for the watch to bring the table to ``condition``."""
    with trio.fail_after(within):
        while True:
            if condition():
                return
            await trio.sleep(0.01)  # the table has no event to wait on: poll


async def retrying(call: Callable[[], Awaitable[T]]) -> T:
    """Repeat ``call`` while etcd is restarting."""
    while True:
        try:
            return await call()
        except EtcdUnavailable:
            await trio.sleep(0.1)


async def matches_etcd(table: RouteTable, owners: Owners, sessions: list[str]) -> bool:
    listed, _ = await owners.list()
    truth = {o.session: Route(o.node, o.epoch) for o in listed}
    return all(table.lookup(s) == truth.get(s) for s in sessions)


async def test_claims_transfers_and_releases_are_reflected_in_order(
    etcd: Etcd, keys: Keyspace
) -> None:
    owners = Owners(etcd, keys)
    table = RouteTable()
    a, _ = await etcd.lease_grant(30)
    b, _ = await etcd.lease_grant(30)
    async with trio.open_nursery() as nursery:
        await nursery.start(table.run, owners)
        e1 = await owners.claim("s1", "node-a", a)
        await until(lambda: table.lookup("s1") == Route("node-a", e1))
        e2 = await owners.transfer("s1", e1, "node-b", b)
        await until(lambda: table.lookup("s1") == Route("node-b", e2))
        e3 = await owners.claim("s2", "node-a", a)
        await until(lambda: table.lookup("s2") == Route("node-a", e3))
        await etcd.lease_revoke(a)  # s2 goes with node-a's lease
        await until(lambda: table.lookup("s2") is None)
        assert await owners.release("s1", e2)
        await until(lambda: table.lookup("s1") is None)

        # A burst without waiting: every change applied, in order, none ignored as stale.
        c, _ = await etcd.lease_grant(30)
        epoch = await owners.claim("s3", "node-a", c)
        for i in range(20):
            epoch = await owners.transfer("s3", epoch, f"node-{i % 3}", c)
        await until(lambda: table.lookup("s3") == Route("node-1", epoch))
        assert table.counters["changes"] == 5 + 21
        assert table.counters["stale"] == 0
        assert len(table) == 1
        nursery.cancel_scope.cancel()


async def test_a_table_built_after_claims_has_no_gap_and_no_duplicate(
    etcd: Etcd, keys: Keyspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    owners = Owners(etcd, keys)
    lease, _ = await etcd.lease_grant(30)
    before = [await owners.claim(f"s{i}", "node-a", lease) for i in range(3)]
    real_list = owners.list
    during: list[int] = []

    async def racing_list() -> tuple[list[Ownership], int]:
        listed = await real_list()
        # These land after the snapshot and before the watch starts: the gap a naive
        # "list, then watch from now" would lose.
        during.append(await owners.transfer("s0", before[0], "node-b", lease))
        during.append(await owners.claim("s9", "node-c", lease))
        assert await owners.release("s2", before[2])
        return listed

    monkeypatch.setattr(owners, "list", racing_list)
    table = RouteTable()
    async with trio.open_nursery() as nursery:
        await nursery.start(table.run, owners)
        await until(lambda: table.lookup("s9") is not None and table.lookup("s2") is None)
        assert table.lookup("s0") == Route("node-b", during[0])
        assert table.lookup("s1") == Route("node-a", before[1])
        assert table.lookup("s9") == Route("node-c", during[1])
        assert table.counters["listed"] == 3
        assert table.counters["changes"] == 3  # each change exactly once
        assert table.counters["stale"] == 0
        nursery.cancel_scope.cancel()


async def test_no_change_is_lost_across_an_etcd_restart(
    etcd: Etcd, etcd_server: EtcdServer, keys: Keyspace
) -> None:
    owners = Owners(etcd, keys)
    table = RouteTable()
    sessions = [f"s{i}" for i in range(6)]
    lease, _ = await etcd.lease_grant(60)
    epochs: dict[str, int] = {}
    writes = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(table.run, owners)
        for s in sessions[:5]:
            epochs[s] = await owners.claim(s, "node-a", lease)
            writes += 1
        # Restart while those events may still be in flight.
        await trio.to_thread.run_sync(etcd_server.restart)
        for s in sessions[:4]:
            epochs[s] = await retrying(partial(owners.transfer, s, epochs[s], "node-b", lease))
            writes += 1
        assert await retrying(partial(owners.release, "s4", epochs["s4"]))
        epochs["s5"] = await retrying(partial(owners.claim, "s5", "node-c", lease))
        writes += 2

        await until(lambda: table.counters["changes"] >= writes, within=20)
        assert await matches_etcd(table, owners, sessions)
        assert [table.lookup(s) for s in sessions] == [
            *(Route("node-b", epochs[s]) for s in sessions[:4]),
            None,
            Route("node-c", epochs["s5"]),
        ]
        assert table.counters["changes"] == writes  # nothing lost, nothing repeated
        assert table.counters["stale"] == 0
        nursery.cancel_scope.cancel()


async def test_stale_epoch_packets_are_fenced_after_a_transfer(etcd: Etcd, keys: Keyspace) -> None:
    owners = Owners(etcd, keys)
    table = RouteTable()
    a, _ = await etcd.lease_grant(30)
    b, _ = await etcd.lease_grant(30)
    async with trio.open_nursery() as nursery:
        await nursery.start(table.run, owners)
        e1 = await owners.claim("s1", "node-a", a)
        await until(lambda: table.lookup("s1") == Route("node-a", e1))
        assert table.admit_from_node("s1", "node-a", e1)

        e2 = await owners.transfer("s1", e1, "node-b", b)
        # The new owner may speak before the watch delivers the transfer: accepted either way,
        # and from then on the former owner is fenced.
        assert table.admit_from_node("s1", "node-b", e2)
        assert not table.admit_from_node("s1", "node-a", e1)
        await until(lambda: table.watermark >= e2)
        assert table.lookup("s1") == Route("node-b", e2)
        assert not table.admit_from_node("s1", "node-a", e1)
        assert table.admit_from_node("s1", "node-b", e2)

        # Once released, nobody speaks for the session with that epoch any more.
        assert await owners.release("s1", e2)
        await until(lambda: table.lookup("s1") is None)
        assert not table.admit_from_node("s1", "node-b", e2)
        assert table.counters["fenced"] == 3
        assert table.counters["stale"] == 0
        nursery.cancel_scope.cancel()


async def test_provisional_hint_routes_are_replaced_by_the_watch(
    etcd: Etcd, keys: Keyspace
) -> None:
    owners = Owners(etcd, keys)
    table = RouteTable()
    lease, _ = await etcd.lease_grant(30)
    async with trio.open_nursery() as nursery:
        await nursery.start(table.run, owners)
        # The client's first check arrives before the claim reaches the relay.
        hints = [read_hint(mint_ufrag(s, "node-a", SECRET), SECRET) for s in ("s1", "s2")]
        assert hints[0] is not None and hints[1] is not None
        assert table.hint_route(hints[0]) == Route("node-a", 0)
        assert table.hint_route(hints[1]) == Route("node-a", 0)
        assert table.lookup("s1") == Route("node-a", 0)

        e1 = await owners.claim("s1", "node-a", lease)
        e2 = await owners.claim("s2", "node-b", lease)  # moved before the watch caught up
        await until(lambda: table.lookup("s2") == Route("node-b", e2))
        assert table.lookup("s1") == Route("node-a", e1)
        assert table.hint_route(hints[0]) == Route("node-a", e1)
        assert table.counters["provisional"] == 2
        assert table.counters["confirmed"] == 2
        nursery.cancel_scope.cancel()


async def test_a_compacted_watch_lists_again(
    etcd: Etcd, etcd_server: EtcdServer, keys: Keyspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    owners = Owners(etcd, keys)
    lease, _ = await etcd.lease_grant(30)
    first = await owners.claim("s1", "node-a", lease)
    real_list = owners.list
    calls: list[int] = []
    latest: list[int] = []

    async def list_then_compact() -> tuple[list[Ownership], int]:
        listed = await real_list()
        calls.append(listed[1])
        if len(calls) == 1:
            # History the watch needs is compacted away before it starts.
            latest.append(await owners.transfer("s1", first, "node-b", lease))
            latest.append(await owners.claim("s2", "node-c", lease))
            await trio.run_process(
                [
                    "etcdctl",
                    f"--endpoints=http://{etcd_server.endpoint}",
                    "compaction",
                    str(latest[-1]),
                ],
                capture_stdout=True,
            )
        return listed

    monkeypatch.setattr(owners, "list", list_then_compact)
    table = RouteTable()
    async with trio.open_nursery() as nursery:
        await nursery.start(table.run, owners)
        await until(lambda: table.lookup("s2") is not None)
        assert table.lookup("s1") == Route("node-b", latest[0])
        assert table.lookup("s2") == Route("node-c", latest[1])
        assert table.counters["resyncs"] == 1
        assert len(calls) == 2
        nursery.cancel_scope.cancel()
