"""Session ownership: single owner per session, proved by a fencing epoch.

A session's owner is one key, ``{prefix}/owners/{session}``, attached to the owner's lease: it
vanishes when that lease expires. Every change is a compare-and-swap transaction:

* **claim**    — create-if-absent (create revision == 0); the write's revision is the **epoch**;
* **transfer** — only if the key's mod revision still equals the caller's epoch; attaches the key
  to the new owner's lease and yields a new, larger epoch;
* **release**  — delete only if the epoch still matches.

Epochs are etcd revisions, so they only grow: any two claims of one session, even across lease
expiries, compare in the order they happened. Relays and nodes drop media stamped with an epoch
older than the one they know (fencing).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, final

import attrs

from storage.etcd import (
    Etcd,
    KeyValue,
    WatchChannel,
    cmp_create_revision,
    cmp_mod_revision,
    op_delete,
    op_get,
    op_put,
)
from storage.keys import Keyspace

log = logging.getLogger("parley.ownership")


class OwnershipError(Exception):
    """A claim, transfer or release was refused."""


@final
class AlreadyOwned(OwnershipError):
    """The session already has an owner."""

    def __init__(self, current: Ownership | None) -> None:
        super().__init__(f"session already owned: {current}")
        self.current = current


@final
class StaleEpoch(OwnershipError):
    """The caller's epoch is not the session's current epoch (someone else moved it)."""

    def __init__(self, expected: int, current: Ownership | None) -> None:
        super().__init__(f"epoch {expected} is stale; current owner: {current}")
        self.expected = expected
        self.current = current


class BadOwnershipValue(ValueError):
    """An ownership key held a value we cannot read (counted and skipped)."""


@final
@attrs.frozen
class Ownership:
    """Who owns a session, and since which epoch."""

    session: str
    node: str
    epoch: int
    lease: int
    #: SHA-256 (hex) of the session's control secret: who knows the secret may attach to the
    #: session or end it from any node. Only the hash is stored; the secret is the client's.
    control: str = ""


@final
@attrs.frozen
class OwnershipChange:
    """One change seen by :meth:`Owners.watch`; ``node`` is None when the session lost its owner."""

    session: str
    node: str | None
    epoch: int
    revision: int


def encode_ownership(node: str, lease: int, control: str = "") -> bytes:
    """An owner key's value (every writer of owner keys uses this one encoding)."""
    value: dict[str, Any] = {"node": node, "lease": lease}
    if control:
        value["control"] = control
    return json.dumps(value, separators=(",", ":")).encode()


def decode_ownership(session: str, kv: KeyValue) -> Ownership:
    try:
        value: Any = json.loads(kv.value)
        node = value["node"]
        control = value.get("control", "")
        if not isinstance(node, str) or not node:
            raise TypeError("node must be a non-empty string")
        if not isinstance(control, str):
            raise TypeError("control must be a string")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BadOwnershipValue(f"bad ownership value for {session!r}: {exc}") from None
    return Ownership(
        session=session, node=node, epoch=kv.mod_revision, lease=kv.lease, control=control
    )


@final
class Owners:
    """Ownership operations for one cluster keyspace."""

    def __init__(self, etcd: Etcd, keys: Keyspace) -> None:
        self.etcd = etcd
        self.keys = keys
        #: values under the owners prefix that could not be decoded (never crash on them)
        self.bad_values = 0

    def _decode(self, kv: KeyValue) -> Ownership | None:
        session = self.keys.session_of_owner_key(kv.key)
        if session is None:
            self.bad_values += 1
            return None
        try:
            return decode_ownership(session, kv)
        except BadOwnershipValue as exc:
            self.bad_values += 1
            log.warning("%s", exc)
            return None

    async def claim(self, session: str, node: str, lease: int, *, control: str = "") -> int:
        """Become the owner of an unowned session; returns the epoch. Raises AlreadyOwned.

        ``control``: the hash of the session's control secret, kept with the owner record."""
        key = self.keys.owner(session)
        result = await self.etcd.txn(
            [cmp_create_revision(key, 0)],
            [op_put(key, encode_ownership(node, lease, control), lease=lease)],
            [op_get(key)],
        )
        if result.succeeded:
            # A put inside a transaction is written at the transaction's revision.
            return result.revision
        current = result.ranges[0][0] if result.ranges and result.ranges[0] else None
        raise AlreadyOwned(self._decode(current) if current else None)

    async def transfer(
        self, session: str, epoch: int, to_node: str, to_lease: int, *, control: str = ""
    ) -> int:
        """Move ownership to ``to_node`` if ``epoch`` is still current; returns the new epoch."""
        key = self.keys.owner(session)
        result = await self.etcd.txn(
            [cmp_mod_revision(key, epoch)],
            [op_put(key, encode_ownership(to_node, to_lease, control), lease=to_lease)],
            [op_get(key)],
        )
        if result.succeeded:
            return result.revision
        current = result.ranges[0][0] if result.ranges and result.ranges[0] else None
        raise StaleEpoch(epoch, self._decode(current) if current else None)

    async def release(self, session: str, epoch: int) -> bool:
        """Give up ownership if ``epoch`` is still current; False if it was not ours any more.

        The session's checkpoint goes in the same transaction: a session that ended is never
        adopted (crash failover only restores sessions whose owner vanished without a word)."""
        key = self.keys.owner(session)
        result = await self.etcd.txn(
            [cmp_mod_revision(key, epoch)],
            [op_delete(key), op_delete(self.keys.checkpoint(session))],
        )
        return result.succeeded

    async def owner_of(self, session: str) -> Ownership | None:
        kv = await self.etcd.get(self.keys.owner(session))
        return self._decode(kv) if kv else None

    async def list(self) -> tuple[list[Ownership], int]:
        """Every owned session and the revision the list was read at."""
        kvs, revision = await self.etcd.get_prefix(self.keys.owners_prefix)
        owned = [o for o in (self._decode(kv) for kv in kvs) if o is not None]
        return owned, revision

    @asynccontextmanager
    async def watch(
        self, *, start_revision: int = 0
    ) -> AsyncIterator[WatchChannel[OwnershipChange]]:
        """Every ownership change, in order, from ``start_revision`` (0: from now).

        Survives etcd restarts without losing or repeating a change. Undecodable values are
        counted in ``bad_values`` and skipped.
        """
        async with self.etcd.watch_each(
            self.keys.owners_prefix,
            lambda event: self._change_of(event.kind, event.kv),
            start_revision=start_revision,
        ) as changes:
            yield changes

    def _change_of(self, kind: str, kv: KeyValue) -> OwnershipChange | None:
        if kind == "delete":
            session = self.keys.session_of_owner_key(kv.key)
            if session is None:
                self.bad_values += 1
                return None
            return OwnershipChange(session, None, 0, kv.mod_revision)
        owned = self._decode(kv)
        if owned is None:
            return None
        return OwnershipChange(owned.session, owned.node, owned.epoch, kv.mod_revision)
