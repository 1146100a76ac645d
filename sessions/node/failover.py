"""Crash failover: adopting the sessions of a node that died, from their sealed checkpoints.

Every owner keeps its sessions' checkpoints in etcd (sealed with the cluster key, fenced by the
owner's epoch; storage/checkpoints.py): once DTLS completes, then whenever the session's SRTP
reservation runs low, every 10 s while what a restore uses changes and once a minute while it
does not (sessions/transceiver/checkpoints.py). A checkpoint is confirmed to the session only
once it is durable there, so the session never sends an SRTP or SRTCP index beyond what its
newest durable checkpoint reserved. When a session ends normally its checkpoint goes with its
owner key, in one transaction.

When an owner's lease expires, etcd deletes its owner keys. Every surviving active node watches
them; for each session whose owner vanished and whose checkpoint is still there, the nodes rank
themselves by rendezvous hashing (highest hash of node id and session id first) and the one
ranked *r* tries after *r* times :data:`STAGGER` seconds: usually the first one wins at once, and
if it is full, draining or dead itself the next one follows. The claim's compare-and-swap is the
only arbiter. The winner restores the session above its reservation (RTP sequence numbers jump
past all the dead owner may have sent, below the 2^15 that would break the client's rollover
estimate; the timestamp moves on by the wall time since the checkpoint), its
first datagram's epoch moves the relays' route, and the client renegotiates nothing: its ICE
5-tuple is with the relay, consent checks are answered with the same credentials, SRTP goes on
with the same keys.

The client hears a gap of about the lease TTL (etcd's expiry) plus :data:`STAGGER` and a restore.
A checkpoint that cannot be opened (another cluster key, tampered, a snapshot of another version)
is counted, logged and deleted: that session cannot continue, and nothing retries it forever.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Final, Protocol, final

import trio

from actors import Actor
from sessions.node.daemon import Node
from storage.checkpoints import CheckpointError, Checkpoints, Sealer, unpack_record
from storage.etcd import Etcd, EtcdError
from storage.keys import Keyspace
from storage.lease import Lease
from storage.members import Members
from storage.ownership import AlreadyOwned, Owners, OwnershipChange

__all__ = ["STAGGER", "Adopter", "AdoptionHost", "rank"]

log = logging.getLogger("parley.failover")

#: seconds between one node's turn to adopt an orphan and the next one's
STAGGER: Final = 0.25


class AdoptionHost(Protocol):
    """What adoption needs from whoever runs the node's sessions (sessions/node/host.py)."""

    async def restore_checkpoint(self, session: str, snapshot: bytes) -> Callable[[], Actor]:
        """Prepare to run a session from a crash checkpoint (media route, actor factory)."""

    def discard(self, session: str) -> None:
        """Undo :meth:`restore_checkpoint`."""


def rank(session: str, nodes: list[str]) -> list[str]:
    """Rendezvous (highest random weight) order of ``nodes`` for ``session``: every node
    computes the same order, and orphans of one dead node spread evenly over the others."""

    def weight(node: str) -> bytes:
        return hashlib.sha256(f"{session}\x00{node}".encode()).digest()

    return sorted(nodes, key=weight, reverse=True)


@final
class Adopter:
    """Adopts orphaned sessions for one node during one lease generation."""

    def __init__(
        self,
        node: Node,
        host: AdoptionHost,
        etcd: Etcd,
        keys: Keyspace,
        sealer: Sealer,
        *,
        stagger: float = STAGGER,
    ) -> None:
        self.node = node
        self.host = host
        self.etcd = etcd
        self.keys = keys
        self.owners = Owners(etcd, keys)
        self.members = Members(etcd, keys)
        self.checkpoints = Checkpoints(etcd, keys, sealer)
        self.stagger = stagger
        self._lease: Lease | None = None
        self._trying: set[str] = set()
        #: what adoption did, for the node's counters
        self.counters: dict[str, int] = dict.fromkeys(
            ("adopted", "adoption_lost", "unrestorable"), 0
        )

    async def run(self, lease: Lease, *, task_status: trio.TaskStatus[None]) -> None:
        self._lease = lease
        async with self.owners.watch() as changes, trio.open_nursery() as nursery:
            task_status.started()
            # Orphans from before this generation (the node restarted, or etcd was away).
            nursery.start_soon(self._sweep, nursery)
            async for change in changes:
                self._consider(change, nursery)

    def _consider(self, change: OwnershipChange, nursery: trio.Nursery) -> None:
        if change.node is None and change.session not in self._trying:
            self._trying.add(change.session)
            nursery.start_soon(self._adopt, change.session, trio.current_time())

    async def _sweep(self, nursery: trio.Nursery) -> None:
        try:
            kvs, _ = await self.etcd.get_prefix(self.keys.checkpoints_prefix)
            owned, _ = await self.owners.list()
        except EtcdError as exc:
            log.warning("cannot look for orphaned sessions", extra={"error": str(exc)})
            return
        have_owner = {o.session for o in owned}
        prefix = self.keys.checkpoints_prefix.encode()
        for kv in kvs:
            session = kv.key[len(prefix) :].decode(errors="replace")
            if session not in have_owner and session not in self._trying:
                self._trying.add(session)
                nursery.start_soon(self._adopt, session)

    async def _adopt(self, session: str, orphaned_at: float | None = None) -> None:
        """Try to adopt ``session``; ``orphaned_at``: when its owner key was seen to go."""
        try:
            await self._adopt_one(session, orphaned_at)
        except EtcdError as exc:
            log.warning("adoption stopped: etcd", extra={"session": session, "error": str(exc)})
        finally:
            self._trying.discard(session)

    async def _adopt_one(self, session: str, orphaned_at: float | None) -> None:
        lease = self._lease
        if lease is None or session in self.node.sessions:
            return
        active = [m.info.id for m in await self.members.nodes() if m.info.state == "active"]
        if self.node.id not in active:
            return
        turn = rank(session, active).index(self.node.id)
        await trio.sleep(turn * self.stagger)
        if not self.node.active() or not self.node.has_room():
            return
        if await self.owners.owner_of(session) is not None:
            return  # adopted by a node ranked before us, or it moved
        try:
            loaded = await self.checkpoints.load(session)
        except CheckpointError as exc:
            self._unrestorable(session, str(exc))
            await self.checkpoints.delete(session)
            return
        if loaded is None:
            return  # it ended normally: its checkpoint went with its owner key
        plaintext, sealed_at = loaded
        try:
            control, snapshot = unpack_record(plaintext)
            factory = await self.host.restore_checkpoint(session, snapshot)
        except (CheckpointError, ValueError) as exc:
            self._unrestorable(session, str(exc))
            await self.checkpoints.delete(session)
            return
        try:
            epoch = await self.owners.claim(session, self.node.id, lease.id, control=control)
        except AlreadyOwned:
            self.counters["adoption_lost"] += 1
            self.host.discard(session)
            return
        except BaseException:
            self.host.discard(session)
            raise
        await self.node.adopt_session(session, epoch, factory, control=control)
        self.counters["adopted"] += 1
        if orphaned_at is not None:
            self.node.adoption_delays.observe(trio.current_time() - orphaned_at)
        log.info(
            "session adopted",
            extra={
                "session": session,
                "epoch": epoch,
                "checkpoint_epoch": sealed_at,
                "rank": turn,
                "at": round(time.time(), 3),
            },
        )

    def _unrestorable(self, session: str, why: str) -> None:
        self.counters["unrestorable"] += 1
        log.error("orphaned session cannot be restored", extra={"session": session, "why": why})
