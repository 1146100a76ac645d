"""The Trio etcd client against a real etcd server."""

from __future__ import annotations

import time
import urllib.request

import pytest
import trio

from ops.etcdserver import QUOTA_BYTES, EtcdServer
from storage.etcd import (
    Compacted,
    Etcd,
    EtcdUnavailable,
    WatchEvent,
    cmp_create_revision,
    op_get,
    op_put,
    prefix_range_end,
)


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"/a/") == b"/a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff\xff") == b"\x00"


async def test_kv_and_txn_report_revisions(etcd: Etcd) -> None:
    rev = await etcd.put("/k/a", b"1")
    kv = await etcd.get("/k/a")
    assert kv is not None and kv.value == b"1" and kv.mod_revision == rev
    first = await etcd.txn(
        [cmp_create_revision("/k/b", 0)], [op_put("/k/b", b"x")], [op_get("/k/b")]
    )
    assert first.succeeded and first.revision > rev
    again = await etcd.txn(
        [cmp_create_revision("/k/b", 0)], [op_put("/k/b", b"y")], [op_get("/k/b")]
    )
    assert not again.succeeded
    assert again.ranges[0][0].value == b"x" and again.ranges[0][0].mod_revision == first.revision
    kvs, _ = await etcd.get_prefix("/k/")
    assert [kv.key for kv in kvs] == [b"/k/a", b"/k/b"]
    assert await etcd.delete("/k/a") and not await etcd.delete("/k/a")


async def test_lease_lifecycle(etcd: Etcd) -> None:
    lease, ttl = await etcd.lease_grant(5)
    assert ttl == 5
    assert await etcd.lease_keepalive(lease) == 5
    await etcd.put("/l/x", b"v", lease=lease)
    assert 0 < await etcd.lease_time_to_live(lease) <= 5
    await etcd.lease_revoke(lease)
    assert await etcd.get("/l/x") is None
    assert await etcd.lease_keepalive(lease) == 0
    await etcd.lease_revoke(lease)  # revoking twice is harmless


async def test_calls_never_block_trio_while_etcd_is_frozen(
    etcd: Etcd, etcd_server: EtcdServer
) -> None:
    await etcd.put("/f/x", b"1")
    etcd_server.freeze()
    try:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await trio.sleep(0.01)
                ticks += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            started = time.monotonic()
            with pytest.raises(EtcdUnavailable):
                await etcd.get("/f/x")
            elapsed = time.monotonic() - started
            nursery.cancel_scope.cancel()
        assert 1.5 < elapsed < 4.0  # bounded by the rpc timeout (2 s)
        assert ticks > 50  # the loop kept running meanwhile
        # And a cancelled caller is released at once, not when etcd answers.
        with trio.move_on_after(0.2):
            await etcd.get("/f/x")
    finally:
        etcd_server.thaw()
    kv = await etcd.get("/f/x")
    assert kv is not None


async def test_watch_delivers_every_change_in_order_across_an_etcd_restart(
    etcd: Etcd, etcd_server: EtcdServer
) -> None:
    seen: list[WatchEvent] = []
    written: list[tuple[str, bytes]] = []

    async def put_retrying(key: str, value: bytes) -> None:
        while True:
            try:
                await etcd.put(key, value)
            except EtcdUnavailable:
                await trio.sleep(0.1)
                continue
            written.append((key, value))
            return

    async with etcd.watch_prefix("/w/") as batches:
        for i in range(20):
            await put_retrying(f"/w/{i % 3}", str(i).encode())
        # Restart while events may still be in flight in the watch stream.
        await trio.to_thread.run_sync(etcd_server.restart)
        for i in range(20, 40):
            await put_retrying(f"/w/{i % 3}", str(i).encode())
        await etcd.delete("/w/0")
        with trio.fail_after(20):
            async for batch in batches:
                seen.extend(batch)
                if len(seen) >= 41:
                    break
    puts = [(ev.kv.key.decode(), ev.kv.value) for ev in seen if ev.kind == "put"]
    assert puts == written
    assert seen[-1].kind == "delete" and seen[-1].kv.key == b"/w/0"
    revisions = [ev.revision for ev in seen]
    assert revisions == sorted(set(revisions)), "no event repeated or reordered"


async def test_watch_from_a_revision_replays_history(etcd: Etcd) -> None:
    first = await etcd.put("/h/a", b"1")
    await etcd.put("/h/b", b"2")
    async with etcd.watch_prefix("/h/", start_revision=first) as batches:
        got: list[bytes] = []
        with trio.fail_after(5):
            async for batch in batches:
                got.extend(ev.kv.key for ev in batch)
                if len(got) == 2:
                    break
    assert got == [b"/h/a", b"/h/b"]


async def test_watch_from_a_compacted_revision_raises_compacted(
    etcd: Etcd, etcd_server: EtcdServer
) -> None:
    first = await etcd.put("/c/a", b"1")
    for i in range(5):
        await etcd.put("/c/a", str(i).encode())
    latest = await etcd.put("/c/a", b"last")
    # Compact away the history the watch will ask for (etcdctl, as an operator would).
    await trio.run_process(
        ["etcdctl", f"--endpoints=http://{etcd_server.endpoint}", "compaction", str(latest)],
        capture_stdout=True,
        env={"ETCDCTL_API": "3"},
    )
    with pytest.raises(BaseExceptionGroup) as raised:
        async with etcd.watch_prefix("/c/", start_revision=first) as batches:
            with trio.fail_after(5):
                async for _ in batches:
                    pass
    assert raised.group_contains(Compacted)


def test_the_etcd_we_run_compacts_its_history_and_has_a_space_quota(
    etcd_server: EtcdServer,
) -> None:
    """ops/etcdserver.py: etcd itself reports the quota it runs with, and its flags ask for
    periodic compaction (without it, session churn grows etcd without bound)."""
    with urllib.request.urlopen(f"http://{etcd_server.endpoint}/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    quota = next(
        line for line in metrics.splitlines() if line.startswith("etcd_server_quota_backend_bytes")
    )
    assert float(quota.split()[-1]) == QUOTA_BYTES
    command = etcd_server.command()
    assert command[command.index("--auto-compaction-mode") + 1] == "periodic"


async def test_watch_each_hands_out_a_response_without_a_scheduler_round_per_value(
    etcd: Etcd,
) -> None:
    """On a loaded node every scheduler round takes tens of milliseconds; a watch that spent
    one round per value fell seconds behind in a 50-session drain."""
    rounds = 0

    async def count_rounds() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            await trio.lowlevel.checkpoint()

    async with (
        etcd.watch_each("/b/", lambda event: event.kv.key) as keys,
        trio.open_nursery() as nursery,
    ):
        await etcd.txn([], [op_put(f"/b/{i:03}", b"v") for i in range(100)])
        with trio.fail_after(10):
            first = await keys.receive()
            nursery.start_soon(count_rounds)
            rest = [await keys.receive() for _ in range(99)]
        nursery.cancel_scope.cancel()
    assert [first, *rest] == [f"/b/{i:03}".encode() for i in range(100)]
    assert rounds <= 2
