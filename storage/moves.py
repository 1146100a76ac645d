"""Planned moves of live sessions between nodes, coordinated through etcd alone.

A move is one key, ``{prefix}/moves/{session}``, attached to the *source* owner's lease (if the
source dies, the move dies with it and crash failover takes over). Every step is a
compare-and-swap transaction; the rules, in the order a move goes::

    state       written by   when                                      compares
    requested   operator     the session has an owner at epoch E       owner mod == E, no move
    ready       source       it quiesced the session at a frame        owner mod == E,
                             boundary and sealed its exact snapshot    move mod == requested
                             (checkpoint key, same transaction)
    done        target       it restored the snapshot, ready to run;   owner mod == E,
                             ownership moves to it in the same         move mod == ready
                             transaction (the new epoch)
    failed      source or    the target did not take it in time, or    move mod == the revision
                target       refused (the source resumes: it still     the writer last saw
                             owns epoch E)

``done`` and ``failed`` are final; whoever wrote them, or the source once it has seen them,
deletes the key. Because ``done`` and ``failed`` both compare the move key's revision, exactly
one of "the target takes over" and "the source resumes" can happen: never both, never neither.
Concurrent requests for one session resolve by the create-if-absent compare: the loser gets
:class:`MoveInProgress` naming the move that won.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final, Literal, final

import attrs

from storage.etcd import (
    Etcd,
    KeyValue,
    WatchChannel,
    WatchEvent,
    cmp_create_revision,
    cmp_mod_revision,
    op_delete,
    op_get,
    op_put,
)
from storage.keys import Keyspace, check_name
from storage.ownership import BadOwnershipValue, Ownership, decode_ownership, encode_ownership

log = logging.getLogger("parley.moves")

MoveState = Literal["requested", "ready", "done", "failed"]

#: the allowed transitions; anything else is a programming error (h11 style: rules first)
TRANSITIONS: Final[dict[MoveState, frozenset[MoveState]]] = {
    "requested": frozenset({"ready", "failed"}),
    "ready": frozenset({"done", "failed"}),
    "done": frozenset(),
    "failed": frozenset(),
}


class MoveError(Exception):
    """A move could not be requested or advanced; the message says why, for the operator."""


@final
class MoveInProgress(MoveError):
    def __init__(self, current: Move) -> None:
        super().__init__(
            f"session {current.session} is already moving to {current.target} "
            f"({current.state}, requested {time.time() - current.requested_at:.1f} s ago)"
        )
        self.current = current


@final
class NotOwned(MoveError):
    """The session has no owner (ended, or between owners)."""


@final
class StaleMove(MoveError):
    """The move or the ownership changed under the caller: someone else acted first."""


class BadMoveValue(ValueError):
    """A move key held a value we cannot read (counted and skipped)."""


@final
@attrs.frozen
class Move:
    """One planned move, as stored; ``revision`` is the key's mod revision (for the next CAS)."""

    session: str
    source: str
    target: str
    #: the source's ownership epoch when the move was requested (every step compares it)
    epoch: int
    state: MoveState
    id: str
    requested_at: float
    revision: int = 0
    lease: int = 0
    reason: str = ""
    #: the target's epoch once ``done``
    new_epoch: int = 0
    #: wall-clock time the source quiesced the session (``ready``): blackout starts there
    quiesced_at: float = 0.0
    #: the owner record's control hash, carried to the new owner record
    control: str = ""
    #: how many times the session has moved, this move included (written by the source)
    moves: int = 0
    #: ``ready``: the sealed final snapshot, also stored as the session's checkpoint. Carried in
    #: the move so that the target has it from its watch: a read of the checkpoint key was a
    #: round trip inside the blackout (about 0.15 s under a 50-session drain).
    snapshot: bytes = attrs.field(default=b"", repr=False)

    def advance(self, state: MoveState, **changes: Any) -> Move:
        """This move in ``state``; raises ValueError for a transition the table forbids."""
        if state not in TRANSITIONS[self.state]:
            raise ValueError(f"move of {self.session}: {self.state} -> {state} is not allowed")
        return attrs.evolve(self, state=state, **changes)

    def encode(self) -> bytes:
        fields = attrs.asdict(self)
        del fields["session"], fields["revision"], fields["lease"], fields["snapshot"]
        if self.snapshot:
            fields["snapshot"] = base64.b64encode(self.snapshot).decode()
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, session: str, kv: KeyValue) -> Move:
        try:
            value: Any = json.loads(kv.value)
            move = cls(
                session=session,
                source=check_name("node", value["source"]),
                target=check_name("node", value["target"]),
                epoch=int(value["epoch"]),
                state=value["state"],
                id=str(value["id"]),
                requested_at=float(value["requested_at"]),
                revision=kv.mod_revision,
                lease=kv.lease,
                reason=str(value.get("reason", "")),
                new_epoch=int(value.get("new_epoch", 0)),
                quiesced_at=float(value.get("quiesced_at", 0.0)),
                control=str(value.get("control", "")),
                moves=int(value.get("moves", 0)),
                snapshot=base64.b64decode(value.get("snapshot", ""), validate=True),
            )
        except (ValueError, TypeError, KeyError, binascii.Error) as exc:
            raise BadMoveValue(f"bad move value for {session!r}: {exc}") from None
        if move.state not in TRANSITIONS:
            raise BadMoveValue(f"bad move state for {session!r}: {move.state!r}")
        if move.state == "done" and not move.new_epoch:
            # written in the same transaction as the owner key: its revision is the new epoch
            move = attrs.evolve(move, new_epoch=kv.mod_revision)
        return move


@final
class Moves:
    """Move operations for one cluster keyspace."""

    def __init__(self, etcd: Etcd, keys: Keyspace) -> None:
        self.etcd = etcd
        self.keys = keys
        #: values under the moves prefix that could not be decoded (never crash on them)
        self.bad_values = 0

    # -- reading ------------------------------------------------------------------------------

    def _decode(self, kv: KeyValue) -> Move | None:
        session = self.keys.session_of_move_key(kv.key)
        if session is None:
            self.bad_values += 1
            return None
        try:
            return Move.decode(session, kv)
        except BadMoveValue as exc:
            self.bad_values += 1
            log.warning("%s", exc)
            return None

    async def get(self, session: str) -> Move | None:
        kv = await self.etcd.get(self.keys.move(session))
        return self._decode(kv) if kv else None

    async def list(self) -> tuple[list[Move], int]:
        kvs, revision = await self.etcd.get_prefix(self.keys.moves_prefix)
        return [m for m in (self._decode(kv) for kv in kvs) if m is not None], revision

    @asynccontextmanager
    async def watch(self, *, start_revision: int = 0) -> AsyncIterator[WatchChannel[Move | str]]:
        """Every change of a move, in order: the Move, or the session id when its key is gone."""
        async with self.etcd.watch_each(
            self.keys.moves_prefix,
            self._change_of,
            start_revision=start_revision,
            first=list[Move | str](),  # names the item type (mypy joins Move | str otherwise)
        ) as changes:
            yield changes

    def _change_of(self, event: WatchEvent) -> Move | str | None:
        if event.kind == "delete":
            return self.keys.session_of_move_key(event.kv.key)
        return self._decode(event.kv)

    # -- the steps ----------------------------------------------------------------------------

    async def request(self, session: str, target: str) -> Move:
        """Ask the session's owner to move it to ``target``. Raises NotOwned, MoveInProgress,
        or MoveError (already there)."""
        check_name("node", target)
        owner_key, move_key = self.keys.owner(session), self.keys.move(session)
        kv = await self.etcd.get(owner_key)
        if kv is None:
            raise NotOwned(f"session {session} has no owner (it ended, or is between owners)")
        try:
            owner: Ownership = decode_ownership(session, kv)
        except BadOwnershipValue as exc:
            raise NotOwned(str(exc)) from None
        if owner.node == target:
            raise MoveError(f"session {session} is already on {target}")
        move = Move(
            session=session,
            source=owner.node,
            target=target,
            epoch=owner.epoch,
            state="requested",
            id=uuid.uuid4().hex[:12],
            requested_at=time.time(),
            control=owner.control,
        )
        # On the source's lease: if the source dies the request goes with it (crash failover
        # then decides where the session goes).
        result = await self.etcd.txn(
            [cmp_mod_revision(owner_key, owner.epoch), cmp_create_revision(move_key, 0)],
            [op_put(move_key, move.encode(), lease=owner.lease)],
            [op_get(move_key)],
        )
        if result.succeeded:
            return attrs.evolve(move, revision=result.revision, lease=owner.lease)
        current = result.ranges[0][0] if result.ranges and result.ranges[0] else None
        found = self._decode(current) if current else None
        if found is not None:
            raise MoveInProgress(found)
        raise StaleMove(f"session {session} changed owner while the move was requested; retry")

    async def ready(
        self, move: Move, checkpoint: bytes, *, quiesced_at: float, moves: int = 0
    ) -> Move:
        """Source: the session is quiesced and ``checkpoint`` (sealed) is its exact state;
        ``moves``: how many times the session will have moved."""
        ready = move.advance("ready", quiesced_at=quiesced_at, moves=moves, snapshot=checkpoint)
        owner_key, move_key = self.keys.owner(move.session), self.keys.move(move.session)
        result = await self.etcd.txn(
            [cmp_mod_revision(owner_key, move.epoch), cmp_mod_revision(move_key, move.revision)],
            [
                op_put(self.keys.checkpoint(move.session), checkpoint),
                op_put(move_key, ready.encode(), lease=move.lease),
            ],
        )
        if not result.succeeded:
            raise StaleMove(f"move of {move.session} changed under its source")
        return attrs.evolve(ready, revision=result.revision)

    async def take(self, move: Move, lease: int) -> Move:
        """Target: take ownership (new epoch) and mark the move done, in one transaction."""
        owner_key, move_key = self.keys.owner(move.session), self.keys.move(move.session)
        pending = move.advance("done", snapshot=b"")  # the new owner has it: no copy to keep
        result = await self.etcd.txn(
            [cmp_mod_revision(owner_key, move.epoch), cmp_mod_revision(move_key, move.revision)],
            [
                op_put(owner_key, encode_ownership(move.target, lease, move.control), lease=lease),
                # The move key follows the target's lease now: the source may be gone soon.
                op_put(move_key, pending.encode(), lease=lease),
            ],
        )
        if not result.succeeded:
            raise StaleMove(f"move of {move.session} was abandoned or overtaken")
        # Puts in one transaction share its revision: the owner key's new mod revision.
        return attrs.evolve(pending, revision=result.revision, new_epoch=result.revision)

    async def fail(self, move: Move, reason: str) -> Move:
        """Abandon the move (source or target); raises StaleMove if it already went on."""
        failed = move.advance("failed", reason=reason[:200], snapshot=b"")
        move_key = self.keys.move(move.session)
        result = await self.etcd.txn(
            [cmp_mod_revision(move_key, move.revision)],
            [op_put(move_key, failed.encode(), lease=move.lease)],
        )
        if not result.succeeded:
            raise StaleMove(f"move of {move.session} already went on")
        return attrs.evolve(failed, revision=result.revision)

    async def clear(self, move: Move) -> bool:
        """Delete a finished move's key if it is still the one we saw."""
        result = await self.etcd.txn(
            [cmp_mod_revision(self.keys.move(move.session), move.revision)],
            [op_delete(self.keys.move(move.session))],
        )
        return result.succeeded

    # -- draining a node ------------------------------------------------------------------------

    async def request_drain(self, node: str, lease: int, *, by: str = "") -> bool:
        """Ask ``node`` (registered under ``lease``) to move all its sessions elsewhere. On the
        node's lease, so it vanishes with the node. False if already requested."""
        key = self.keys.drain(node)
        value = json.dumps({"requested_at": time.time(), "by": by}).encode()
        result = await self.etcd.txn(
            [cmp_create_revision(key, 0)], [op_put(key, value, lease=lease)]
        )
        return result.succeeded

    async def drain_requested(self, node: str) -> bool:
        return await self.etcd.get(self.keys.drain(node)) is not None

    async def wait_for_drain(self, node: str) -> None:
        """Return once a drain of ``node`` is requested (at once if it already was)."""
        key = self.keys.drain(node)
        kvs, revision = await self.etcd.get_prefix(key)
        if kvs:
            return

        def put(event: WatchEvent) -> bool | None:
            return True if event.kind == "put" else None

        async with self.etcd.watch_each(key, put, start_revision=revision + 1) as puts:
            await puts.receive()

    # -- ending a session from another node -------------------------------------------------------

    async def request_end(self, session: str) -> Ownership | None:
        """Ask the session's owner to end it (a client's DELETE reached another node). On the
        owner's lease; returns the owner asked, or None if the session has no owner."""
        owner_key, key = self.keys.owner(session), self.keys.end(session)
        kv = await self.etcd.get(owner_key)
        if kv is None:
            return None
        try:
            owner = decode_ownership(session, kv)
        except BadOwnershipValue:
            return None
        value = json.dumps({"requested_at": time.time()}).encode()
        result = await self.etcd.txn(
            [cmp_mod_revision(owner_key, owner.epoch)], [op_put(key, value, lease=owner.lease)]
        )
        return owner if result.succeeded else None

    async def clear_end(self, session: str) -> None:
        await self.etcd.delete(self.keys.end(session))

    @asynccontextmanager
    async def watch_ends(self) -> AsyncIterator[WatchChannel[str]]:
        """Sessions whose end was requested, from now on (and those already requested)."""
        kvs, revision = await self.etcd.get_prefix(self.keys.ends_prefix)
        pending = [s for kv in kvs if (s := self.keys.session_of_end_key(kv.key)) is not None]

        def requested(event: WatchEvent) -> str | None:
            return self.keys.session_of_end_key(event.kv.key) if event.kind == "put" else None

        async with self.etcd.watch_each(
            self.keys.ends_prefix, requested, start_revision=revision + 1, first=pending
        ) as ends:
            yield ends
