"""Ownership claims, transfers, releases and watches against a real etcd."""

from __future__ import annotations

import pytest
import trio

from ops.etcdserver import EtcdServer
from storage.etcd import Compacted, Etcd
from storage.keys import Keyspace
from storage.ownership import AlreadyOwned, Owners, OwnershipChange, StaleEpoch


async def test_claim_gives_an_epoch_and_excludes_others(etcd: Etcd, keys: Keyspace) -> None:
    owners = Owners(etcd, keys)
    a, _ = await etcd.lease_grant(10)
    b, _ = await etcd.lease_grant(10)
    epoch = await owners.claim("s1", "node-a", a)
    with pytest.raises(AlreadyOwned) as refused:
        await owners.claim("s1", "node-b", b)
    assert refused.value.current is not None
    assert (refused.value.current.node, refused.value.current.epoch) == ("node-a", epoch)
    owner = await owners.owner_of("s1")
    assert owner is not None and (owner.node, owner.epoch, owner.lease) == ("node-a", epoch, a)


async def test_transfer_only_with_the_current_epoch(etcd: Etcd, keys: Keyspace) -> None:
    owners = Owners(etcd, keys)
    a, _ = await etcd.lease_grant(10)
    b, _ = await etcd.lease_grant(10)
    first = await owners.claim("s1", "node-a", a)
    second = await owners.transfer("s1", first, "node-b", b)
    assert second > first
    with pytest.raises(StaleEpoch) as stale:
        await owners.transfer("s1", first, "node-a", a)
    assert stale.value.current is not None and stale.value.current.node == "node-b"
    assert not await owners.release("s1", first)
    owner = await owners.owner_of("s1")
    assert owner is not None and (owner.node, owner.epoch, owner.lease) == ("node-b", second, b)
    # The key now lives on b's lease: revoking a's lease does not drop it ...
    await etcd.lease_revoke(a)
    assert await owners.owner_of("s1") is not None
    # ... and releasing with the current epoch does.
    assert await owners.release("s1", second)
    assert await owners.owner_of("s1") is None


async def test_epochs_only_grow_across_owner_loss(etcd: Etcd, keys: Keyspace) -> None:
    owners = Owners(etcd, keys)
    a, _ = await etcd.lease_grant(10)
    first = await owners.claim("s1", "node-a", a)
    await etcd.lease_revoke(a)
    assert await owners.owner_of("s1") is None
    b, _ = await etcd.lease_grant(10)
    assert await owners.claim("s1", "node-b", b) > first


async def test_watch_reports_claims_transfers_and_losses_in_order(
    etcd: Etcd, keys: Keyspace
) -> None:
    owners = Owners(etcd, keys)
    a, _ = await etcd.lease_grant(10)
    b, _ = await etcd.lease_grant(10)
    async with owners.watch() as changes:
        e1 = await owners.claim("s1", "node-a", a)
        e2 = await owners.transfer("s1", e1, "node-b", b)
        e3 = await owners.claim("s2", "node-a", a)
        await etcd.lease_revoke(a)  # s2 goes with a's lease
        await owners.release("s1", e2)
        got: list[OwnershipChange] = []
        with trio.fail_after(5):
            async for change in changes:
                got.append(change)
                if len(got) == 5:
                    break
    assert [(c.session, c.node, c.epoch) for c in got] == [
        ("s1", "node-a", e1),
        ("s1", "node-b", e2),
        ("s2", "node-a", e3),
        ("s2", None, 0),
        ("s1", None, 0),
    ]


async def test_malformed_values_are_counted_and_skipped(etcd: Etcd, keys: Keyspace) -> None:
    owners = Owners(etcd, keys)
    lease, _ = await etcd.lease_grant(10)
    async with owners.watch() as changes:
        await etcd.put(keys.owners_prefix + "junk", b"\xff not json")
        await etcd.put(keys.owners_prefix + "bad/name", b'{"node": "x"}')
        await etcd.put(keys.owners_prefix + "nonode", b'{"node": 7}')
        epoch = await owners.claim("good", "node-a", lease)
        with trio.fail_after(5):
            change = await changes.receive()
    assert (change.session, change.node, change.epoch) == ("good", "node-a", epoch)
    listed, _ = await owners.list()
    assert [o.session for o in listed] == ["good"]
    assert owners.bad_values >= 3
    assert await owners.owner_of("junk") is None


async def test_invalid_session_ids_are_refused_before_etcd(etcd: Etcd, keys: Keyspace) -> None:
    owners = Owners(etcd, keys)
    with pytest.raises(ValueError, match="invalid session id"):
        await owners.claim("../x", "node-a", 0)


async def test_watch_from_a_compacted_revision_raises_instead_of_ending_quietly(
    etcd: Etcd, etcd_server: EtcdServer, keys: Keyspace
) -> None:
    owners = Owners(etcd, keys)
    lease, _ = await etcd.lease_grant(10)
    first = await owners.claim("s1", "node-a", lease)
    latest = first
    for i in range(5):
        latest = await owners.transfer("s1", latest, f"node-{i}", lease)
    await trio.run_process(
        ["etcdctl", f"--endpoints=http://{etcd_server.endpoint}", "compaction", str(latest)],
        capture_stdout=True,
        env={"ETCDCTL_API": "3"},
    )
    # Losing events silently is the one thing a watch must never do.
    with pytest.raises(BaseExceptionGroup) as raised:
        async with owners.watch(start_revision=first) as changes:
            with trio.fail_after(5):
                async for _ in changes:
                    pass
    assert raised.group_contains(Compacted)
