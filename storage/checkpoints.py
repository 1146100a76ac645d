"""Sealed session checkpoints in etcd, written only by the session's current owner.

A checkpoint holds SRTP master keys, so it never touches etcd in clear: it is sealed with
AES-256-GCM under a cluster key. The value stored under ``{prefix}/checkpoints/{session}`` is::

    version (1) | epoch (8, big-endian) | key id (4) | nonce (12) | ciphertext + tag (>= 16)

The header travels in clear (a reader needs the epoch and the key id before it can open the
blob) but is authenticated: the associated data binds a domain label, the whole header and the
session id, so a blob cannot be replayed for another session, moved to another epoch or relabelled
with another key id without :meth:`Sealer.open` failing.

Writes are fenced: :meth:`Checkpoints.store` is one etcd transaction that compares the owner key's
mod revision with the caller's epoch (see :mod:`storage.ownership`) and only then puts the blob,
so a node that lost the session can no longer overwrite its checkpoint.

Nothing here logs, formats or reprs key material or plaintext.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from storage.etcd import Etcd, TxnResult, cmp_mod_revision, op_delete, op_get, op_put
from storage.keys import Keyspace, check_name
from storage.ownership import BadOwnershipValue, Ownership, StaleEpoch, decode_ownership

log = logging.getLogger("parley.checkpoints")

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
VERSION = 1
_HEADER = struct.Struct(">BQ4s12s")  # version, epoch, key id, nonce
HEADER_SIZE = _HEADER.size
_DOMAIN = b"parley/checkpoint\x00"
_MAX_EPOCH = 2**63 - 1  # etcd revisions are int64


class CheckpointError(ValueError):
    """A sealed checkpoint could not be opened: tampered, truncated, wrong key/session/epoch."""


class ClusterKeyError(ValueError):
    """A cluster key file is missing, unreadable or malformed."""


@final
class ClusterKey:
    """A 32-byte AES-256-GCM key shared by the cluster; identified by a short, public key id."""

    __slots__ = ("_id", "_secret")

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) != KEY_SIZE:
            raise ClusterKeyError(f"a cluster key is exactly {KEY_SIZE} bytes")
        self._secret = secret
        self._id = hashlib.sha256(secret).digest()[:4]

    @classmethod
    def generate(cls) -> ClusterKey:
        return cls(secrets.token_bytes(KEY_SIZE))

    @property
    def key_id(self) -> str:
        """First 8 hex digits of SHA-256 of the key: safe to log, stored with each blob."""
        return self._id.hex()

    @property
    def raw_id(self) -> bytes:
        return self._id

    def aead(self) -> AESGCM:
        return AESGCM(self._secret)

    def __repr__(self) -> str:
        return f"ClusterKey(id={self.key_id})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClusterKey):
            return NotImplemented
        return hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self._id)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClusterKey:
        """Read a key file holding exactly 32 raw bytes; ClusterKeyError says what is wrong."""
        p = Path(path)
        try:
            with p.open("rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                data = f.read(KEY_SIZE + 1)
        except FileNotFoundError:
            raise ClusterKeyError(f"cluster key file {p} does not exist") from None
        except OSError as exc:
            raise ClusterKeyError(f"cluster key file {p} is unreadable: {exc.strerror}") from None
        if len(data) != KEY_SIZE:
            size = f"more than {KEY_SIZE}" if len(data) > KEY_SIZE else str(len(data))
            raise ClusterKeyError(
                f"cluster key file {p} holds {size} bytes; expected exactly {KEY_SIZE} raw bytes"
            )
        if stat.S_IMODE(mode) & 0o077:
            log.warning("cluster key file %s is accessible by group or others; chmod 600", p)
        return cls(data)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the key atomically with mode 0600; refuses to replace a key unless asked."""
        p = Path(path)
        tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, self._secret)
                os.fsync(fd)
            finally:
                os.close(fd)
            if overwrite:
                os.replace(tmp, p)
            else:
                try:
                    os.link(tmp, p)
                except FileExistsError:
                    raise ClusterKeyError(f"cluster key file {p} already exists") from None
        finally:
            tmp.unlink(missing_ok=True)


def _check_epoch(epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 < epoch <= _MAX_EPOCH:
        raise ValueError(f"epoch must be a positive etcd revision, got {epoch!r}")
    return epoch


def _associated_data(header: bytes, session: str) -> bytes:
    name = session.encode()
    return _DOMAIN + header + struct.pack(">H", len(name)) + name


def epoch_of(blob: bytes) -> int:
    """The epoch a blob says it was sealed under (not yet authenticated: open() checks it)."""
    if len(blob) < HEADER_SIZE + TAG_SIZE:
        raise CheckpointError(f"sealed checkpoint truncated ({len(blob)} bytes)")
    version, epoch, _, _ = _HEADER.unpack_from(blob)
    if version != VERSION:
        raise CheckpointError(f"unknown sealed checkpoint version {version}")
    if not 0 < epoch <= _MAX_EPOCH:
        raise CheckpointError("sealed checkpoint has an invalid epoch")
    return int(epoch)


_RECORD_VERSION = 1


def pack_record(control: str, snapshot: bytes) -> bytes:
    """What a checkpoint key holds once opened: the session's control hash (so that whoever
    continues the session keeps the client's secret valid) and the snapshot's bytes."""
    raw = control.encode("ascii")
    if len(raw) > 255:
        raise ValueError("control hash too long")
    return bytes((_RECORD_VERSION, len(raw))) + raw + snapshot


def unpack_record(data: bytes) -> tuple[str, bytes]:
    """(control hash, snapshot bytes); CheckpointError if it is not a record we wrote."""
    if len(data) < 2 or data[0] != _RECORD_VERSION or len(data) < 2 + data[1]:
        raise CheckpointError("not a checkpoint record of this version")
    try:
        control = data[2 : 2 + data[1]].decode("ascii")
    except UnicodeDecodeError:
        raise CheckpointError("checkpoint record's control hash is not ASCII") from None
    return control, bytes(data[2 + data[1] :])


@final
class Sealer:
    """Seals with the first key; opens with any key whose id matches (key rotation)."""

    def __init__(self, keys: Sequence[ClusterKey]) -> None:
        if not keys:
            raise ValueError("a Sealer needs at least one cluster key")
        self._keys = tuple(keys)
        self._aeads = tuple((k.raw_id, k.aead()) for k in self._keys)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(k.key_id for k in self._keys)

    def __repr__(self) -> str:
        return f"Sealer(keys={list(self.key_ids)})"

    def seal(self, plaintext: bytes, *, session: str, epoch: int) -> bytes:
        check_name("session", session)
        _check_epoch(epoch)
        key_id, aead = self._aeads[0]
        nonce = secrets.token_bytes(NONCE_SIZE)
        header = _HEADER.pack(VERSION, epoch, key_id, nonce)
        return header + aead.encrypt(nonce, plaintext, _associated_data(header, session))

    def open(self, blob: bytes, *, session: str, epoch: int) -> bytes:
        """The plaintext, or CheckpointError if anything about the blob does not check out."""
        check_name("session", session)
        if epoch_of(blob) != epoch:
            raise CheckpointError(f"checkpoint for {session!r} was not sealed at epoch {epoch}")
        header = bytes(blob[:HEADER_SIZE])
        _, _, key_id, nonce = _HEADER.unpack(header)
        ad = _associated_data(header, session)
        candidates = [aead for kid, aead in self._aeads if kid == key_id]
        if not candidates:
            raise CheckpointError(f"checkpoint sealed with unknown cluster key id {key_id.hex()}")
        for aead in candidates:
            try:
                return aead.decrypt(nonce, bytes(blob[HEADER_SIZE:]), ad)
            except InvalidTag:
                continue
        raise CheckpointError(
            f"checkpoint for {session!r} failed authentication (tampered or wrong session)"
        )


@final
class Checkpoints:
    """Sealed, owner-fenced session checkpoints under ``{prefix}/checkpoints/``."""

    def __init__(self, etcd: Etcd, keys: Keyspace, sealer: Sealer) -> None:
        self.etcd = etcd
        self.keys = keys
        self.sealer = sealer

    async def store(self, session: str, epoch: int, snapshot: bytes) -> int:
        """Seal and write ``snapshot`` if ``epoch`` is the session's current epoch.

        Returns the revision of the write; raises StaleEpoch if the session moved (or has no
        owner). The checkpoint is not on any lease: it outlives its writer, for failover.
        """
        _check_epoch(epoch)  # epoch 0 would match an absent owner key
        owner_key = self.keys.owner(session)
        blob = self.sealer.seal(snapshot, session=session, epoch=epoch)
        result = await self.etcd.txn(
            [cmp_mod_revision(owner_key, epoch)],
            [op_put(self.keys.checkpoint(session), blob)],
            [op_get(owner_key)],
        )
        if result.succeeded:
            return result.revision
        raise _stale(session, epoch, result)

    async def load(self, session: str) -> tuple[bytes, int] | None:
        """(plaintext, epoch it was written under), None if absent; CheckpointError if bad."""
        kv = await self.etcd.get(self.keys.checkpoint(session))
        if kv is None:
            return None
        epoch = epoch_of(kv.value)
        return self.sealer.open(kv.value, session=session, epoch=epoch), epoch

    async def delete(self, session: str, *, epoch: int | None = None) -> None:
        """Remove the checkpoint (absent is fine); with ``epoch``, only as the current owner.

        A fenced delete with a stale epoch raises StaleEpoch and leaves the checkpoint alone.
        """
        key = self.keys.checkpoint(session)
        if epoch is None:
            await self.etcd.delete(key)
            return
        _check_epoch(epoch)
        owner_key = self.keys.owner(session)
        result = await self.etcd.txn(
            [cmp_mod_revision(owner_key, epoch)], [op_delete(key)], [op_get(owner_key)]
        )
        if not result.succeeded:
            raise _stale(session, epoch, result)


def _stale(session: str, epoch: int, result: TxnResult) -> StaleEpoch:
    current: Ownership | None = None
    if result.ranges and result.ranges[0]:
        try:
            current = decode_ownership(session, result.ranges[0][0])
        except BadOwnershipValue:
            current = None
    return StaleEpoch(epoch, current)
