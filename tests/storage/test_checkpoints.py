"""Sealed, owner-fenced session checkpoints: the sealer alone, and against a real etcd."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.checkpoints import (
    HEADER_SIZE,
    VERSION,
    CheckpointError,
    Checkpoints,
    ClusterKey,
    ClusterKeyError,
    Sealer,
)
from storage.etcd import Etcd
from storage.keys import Keyspace
from storage.ownership import Owners, StaleEpoch

# Recognisable, so we can prove it never reaches etcd in clear.
SECRET = b"SRTP-MASTER-KEY:" + bytes(range(30)) + b":END-OF-SECRET"


def _flip(blob: bytes, i: int) -> bytes:
    return blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1 :]


# -- ClusterKey ---------------------------------------------------------------------------------


def test_cluster_key_file_round_trip_is_0600(tmp_path: Path) -> None:
    key = ClusterKey.generate()
    path = tmp_path / "cluster.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 32
    assert ClusterKey.load(path) == key
    assert ClusterKey.load(path).key_id == key.key_id
    # No stray temp files, and no silent replacement of a key.
    assert os.listdir(tmp_path) == ["cluster.key"]
    with pytest.raises(ClusterKeyError, match="already exists"):
        ClusterKey.generate().save(path)
    other = ClusterKey.generate()
    other.save(path, overwrite=True)
    assert ClusterKey.load(path) == other


def test_cluster_key_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ClusterKeyError, match="does not exist"):
        ClusterKey.load(tmp_path / "missing.key")
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 31)
    with pytest.raises(ClusterKeyError, match="holds 31 bytes; expected exactly 32"):
        ClusterKey.load(short)
    long = tmp_path / "long.key"
    long.write_bytes(b"x" * 64)
    with pytest.raises(ClusterKeyError, match="more than 32"):
        ClusterKey.load(long)
    with pytest.raises(ClusterKeyError, match="unreadable"):
        ClusterKey.load(tmp_path)  # a directory


def test_cluster_key_repr_hides_the_key() -> None:
    key = ClusterKey(bytes(range(32)))
    assert len(key.key_id) == 8
    for text in (repr(key), str(key), repr(Sealer([key]))):
        assert key.key_id in text
        assert bytes(range(32)).hex() not in text
        assert "\\x" not in text


# -- Sealer -------------------------------------------------------------------------------------


def test_seal_open_round_trip_and_bindings() -> None:
    sealer = Sealer([ClusterKey.generate()])
    blob = sealer.seal(SECRET, session="s1", epoch=7)
    assert blob[0] == VERSION and SECRET not in blob
    assert sealer.open(blob, session="s1", epoch=7) == SECRET
    # Fresh nonce each time.
    assert sealer.seal(SECRET, session="s1", epoch=7) != blob
    with pytest.raises(CheckpointError):
        sealer.open(blob, session="s2", epoch=7)
    with pytest.raises(CheckpointError):
        sealer.open(blob, session="s1", epoch=8)
    with pytest.raises(CheckpointError):
        Sealer([ClusterKey.generate()]).open(blob, session="s1", epoch=7)
    for cut in (0, 1, HEADER_SIZE, len(blob) - 1):
        with pytest.raises(CheckpointError):
            sealer.open(blob[:cut], session="s1", epoch=7)


def test_rewriting_the_clear_epoch_is_detected() -> None:
    sealer = Sealer([ClusterKey.generate()])
    blob = sealer.seal(SECRET, session="s1", epoch=7)
    moved = blob[:1] + (8).to_bytes(8, "big") + blob[9:]
    with pytest.raises(CheckpointError):
        sealer.open(moved, session="s1", epoch=8)


def test_rotation_opens_old_blobs_and_seals_with_the_new_key() -> None:
    old, new = ClusterKey.generate(), ClusterKey.generate()
    blob = Sealer([old]).seal(SECRET, session="s1", epoch=3)
    rotated = Sealer([new, old])
    assert rotated.open(blob, session="s1", epoch=3) == SECRET
    fresh = rotated.seal(SECRET, session="s1", epoch=3)
    assert Sealer([new]).open(fresh, session="s1", epoch=3) == SECRET
    with pytest.raises(CheckpointError, match="unknown cluster key id"):
        Sealer([old]).open(fresh, session="s1", epoch=3)


def test_seal_refuses_bad_arguments() -> None:
    sealer = Sealer([ClusterKey.generate()])
    with pytest.raises(ValueError):
        sealer.seal(SECRET, session="s1", epoch=0)
    with pytest.raises(ValueError):
        sealer.seal(SECRET, session="no/slash", epoch=1)
    with pytest.raises(ValueError):
        Sealer([])


_SEALER = Sealer([ClusterKey(b"k" * 32)])
_VALID = _SEALER.seal(SECRET, session="s1", epoch=5)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        # Plausible headers, so the fuzzing reaches the AEAD and not only the length check.
        st.binary(max_size=120).map(lambda tail: _VALID[:HEADER_SIZE] + tail),
        st.tuples(st.integers(0, len(_VALID) - 1), st.integers(1, 255)).map(
            lambda p: _VALID[: p[0]] + bytes([_VALID[p[0]] ^ p[1]]) + _VALID[p[0] + 1 :]
        ),
    )
)
def test_open_of_arbitrary_bytes_raises_only_checkpoint_error(blob: bytes) -> None:
    with pytest.raises(CheckpointError):
        _SEALER.open(blob, session="s1", epoch=5)


# -- Checkpoints against etcd -------------------------------------------------------------------


async def _owned(etcd: Etcd, keys: Keyspace, session: str = "s1") -> tuple[Owners, int]:
    owners = Owners(etcd, keys)
    lease, _ = await etcd.lease_grant(10)
    return owners, await owners.claim(session, "node-a", lease)


async def test_store_load_round_trip_sealed_at_rest(etcd: Etcd, keys: Keyspace) -> None:
    _, epoch = await _owned(etcd, keys)
    checkpoints = Checkpoints(etcd, keys, Sealer([ClusterKey.generate()]))
    assert await checkpoints.load("s1") is None
    revision = await checkpoints.store("s1", epoch, SECRET)
    assert revision > epoch
    assert await checkpoints.load("s1") == (SECRET, epoch)
    raw = await etcd.get(keys.checkpoint("s1"))
    assert raw is not None and raw.mod_revision == revision and raw.lease == 0
    assert SECRET not in raw.value and b"SRTP-MASTER-KEY" not in raw.value
    await checkpoints.delete("s1")
    assert await checkpoints.load("s1") is None


async def test_stale_epoch_cannot_write_after_a_transfer(etcd: Etcd, keys: Keyspace) -> None:
    owners, first = await _owned(etcd, keys)
    b, _ = await etcd.lease_grant(10)
    checkpoints = Checkpoints(etcd, keys, Sealer([ClusterKey.generate()]))
    await checkpoints.store("s1", first, b"from a")
    second = await owners.transfer("s1", first, "node-b", b)
    with pytest.raises(StaleEpoch) as stale:
        await checkpoints.store("s1", first, b"late write from a")
    assert stale.value.current is not None and stale.value.current.node == "node-b"
    assert await checkpoints.load("s1") == (b"from a", first)
    with pytest.raises(StaleEpoch):
        await checkpoints.delete("s1", epoch=first)
    await checkpoints.store("s1", second, b"from b")
    assert await checkpoints.load("s1") == (b"from b", second)
    # An unowned session takes no checkpoint, whatever epoch is claimed.
    with pytest.raises(StaleEpoch):
        await checkpoints.store("nobody", second, b"x")
    with pytest.raises(ValueError):
        await checkpoints.store("nobody", 0, b"x")
    await checkpoints.delete("s1", epoch=second)
    assert await checkpoints.load("s1") is None


async def test_tampering_any_stored_byte_is_detected(etcd: Etcd, keys: Keyspace) -> None:
    _, epoch = await _owned(etcd, keys)
    checkpoints = Checkpoints(etcd, keys, Sealer([ClusterKey.generate()]))
    await checkpoints.store("s1", epoch, SECRET)
    raw = await etcd.get(keys.checkpoint("s1"))
    assert raw is not None
    for i in range(len(raw.value)):
        await etcd.put(keys.checkpoint("s1"), _flip(raw.value, i))
        with pytest.raises(CheckpointError):
            await checkpoints.load("s1")
    for junk in (b"", b"not a checkpoint", raw.value[:-1], raw.value + b"\x00"):
        await etcd.put(keys.checkpoint("s1"), junk)
        with pytest.raises(CheckpointError):
            await checkpoints.load("s1")


async def test_wrong_key_and_rotation_through_etcd(etcd: Etcd, keys: Keyspace) -> None:
    _, epoch = await _owned(etcd, keys)
    old, new = ClusterKey.generate(), ClusterKey.generate()
    await Checkpoints(etcd, keys, Sealer([old])).store("s1", epoch, SECRET)
    with pytest.raises(CheckpointError):
        await Checkpoints(etcd, keys, Sealer([new])).load("s1")
    assert await Checkpoints(etcd, keys, Sealer([new, old])).load("s1") == (SECRET, epoch)


async def test_blob_moved_to_another_session_is_refused(etcd: Etcd, keys: Keyspace) -> None:
    _, epoch = await _owned(etcd, keys, "alice")
    checkpoints = Checkpoints(etcd, keys, Sealer([ClusterKey.generate()]))
    await checkpoints.store("alice", epoch, SECRET)
    raw = await etcd.get(keys.checkpoint("alice"))
    assert raw is not None
    await etcd.put(keys.checkpoint("bob"), raw.value)
    with pytest.raises(CheckpointError):
        await checkpoints.load("bob")
