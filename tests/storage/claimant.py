"""A claimant process for multi-process ownership tests (run as a script, prints JSON lines).

claimant.py race ENDPOINT PREFIX SESSION COUNT START_AT
    COUNT concurrent claimants, each with its own lease, all claiming SESSION at wall time
    START_AT; prints one line per claimant: {"claimant": ..., "won": bool, "epoch": ...}.
claimant.py own ENDPOINT PREFIX SESSION TTL
    claims SESSION under a kept lease, prints {"epoch": ...}, then one line per acknowledged
    keepalive: {"confirmed": <CLOCK_MONOTONIC time of that keepalive's send>} until killed.
"""

from __future__ import annotations

import json
import os
import sys
import time

import trio

from storage.etcd import open_etcd
from storage.keys import Keyspace
from storage.lease import LeaseKeeper
from storage.ownership import AlreadyOwned, Owners


def emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def race(endpoint: str, prefix: str, session: str, count: int, start_at: float) -> None:
    async with open_etcd(endpoint, rpc_timeout=10.0) as etcd:
        owners = Owners(etcd, Keyspace(prefix))
        leases = [(await etcd.lease_grant(30))[0] for _ in range(count)]
        gate = trio.Event()

        async def claimant(i: int) -> None:
            name = f"pid{os.getpid()}-{i}"
            await gate.wait()
            try:
                epoch = await owners.claim(session, name, leases[i])
            except AlreadyOwned as exc:
                emit({"claimant": name, "won": False, "owner": exc.current and exc.current.node})
            else:
                emit({"claimant": name, "won": True, "epoch": epoch})

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(claimant, i)
            await trio.sleep(max(0.0, start_at - time.time()))
            gate.set()


async def own(endpoint: str, prefix: str, session: str, ttl: int) -> None:
    async with open_etcd(endpoint) as etcd:
        owners = Owners(etcd, Keyspace(prefix))
        keeper = LeaseKeeper(etcd, ttl=ttl)
        async with trio.open_nursery() as nursery:
            lease = await nursery.start(keeper.run)
            epoch = await owners.claim(session, "owner", lease.id)
            emit({"epoch": epoch, "lease": lease.id})
            # Trio's clock has an arbitrary offset; report on CLOCK_MONOTONIC, which the parent
            # process shares.
            offset = time.monotonic() - trio.current_time()
            last = 0.0
            while True:
                if lease.confirmed_at != last:
                    last = lease.confirmed_at
                    emit({"confirmed": last + offset})
                await trio.sleep(0.01)


def main() -> None:
    mode, endpoint, prefix, session = sys.argv[1:5]
    if mode == "race":
        trio.run(race, endpoint, prefix, session, int(sys.argv[5]), float(sys.argv[6]))
    elif mode == "own":
        trio.run(own, endpoint, prefix, session, int(sys.argv[5]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
