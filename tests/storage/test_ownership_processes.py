"""Ownership under real concurrency: several processes racing, and an owner killed with SIGKILL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import trio

from ops.etcdserver import EtcdServer
from storage.etcd import Etcd
from storage.keys import Keyspace
from storage.ownership import AlreadyOwned, Owners

CLAIMANT = Path(__file__).with_name("claimant.py")


def test_fifty_claimants_in_five_processes_one_winner(etcd_server: EtcdServer) -> None:
    start_at = time.time() + 4.0  # every process connected and holding its leases by then
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(CLAIMANT),
                "race",
                etcd_server.endpoint,
                "/parley-test",
                "s1",
                "10",
                str(start_at),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(5)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        results.extend(json.loads(line) for line in out.splitlines())
    assert len(results) == 50
    winners = [r for r in results if r["won"]]
    assert len(winners) == 1
    # Every loser saw the winner as the owner.
    assert {r["owner"] for r in results if not r["won"]} == {winners[0]["claimant"]}


async def test_sigkilled_owner_is_replaced_after_its_ttl_and_never_before(
    etcd: Etcd, etcd_server: EtcdServer, keys: Keyspace
) -> None:
    ttl = 3
    owner = await trio.lowlevel.open_process(
        [sys.executable, str(CLAIMANT), "own", etcd_server.endpoint, keys.prefix, "s1", str(ttl)],
        stdout=subprocess.PIPE,
    )
    assert owner.stdout is not None
    lines: list[dict[str, float]] = []
    claimed = trio.Event()
    buffer = b""

    async def read_lines() -> None:
        nonlocal buffer
        assert owner.stdout is not None
        async for chunk in owner.stdout:
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                lines.append(json.loads(line))
                if "epoch" in lines[-1]:
                    claimed.set()

    owners = Owners(etcd, keys)
    lease, _ = await etcd.lease_grant(30)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_lines)
        with trio.fail_after(15):
            await claimed.wait()
        # While the owner lives (several keepalive rounds), nobody else gets the session.
        for _ in range(20):
            try:
                await owners.claim("s1", "intruder", lease)
                raise AssertionError("claimed a session whose owner is alive")
            except AlreadyOwned:
                await trio.sleep(0.1)
        owner.kill()
        killed_at = time.monotonic()
        await owner.wait()
        nursery.cancel_scope.cancel()

    confirmed = [line["confirmed"] for line in lines if "confirmed" in line]
    assert confirmed, "the owner reported no keepalive"
    # The lease lives at least TTL after the send of the last acknowledged keepalive.
    earliest_expiry = max(confirmed) + ttl
    claimed_at = None
    with trio.fail_after(ttl + 10):
        while claimed_at is None:
            attempt_started = time.monotonic()
            try:
                await owners.claim("s1", "successor", lease)
            except AlreadyOwned:
                await trio.sleep(0.05)
            else:
                claimed_at = time.monotonic()
    assert attempt_started >= earliest_expiry - 0.05, (
        f"claimed {earliest_expiry - attempt_started:.3f}s before the lease could have expired"
    )
    assert claimed_at - killed_at < ttl + 3  # and etcd did expire it promptly
