"""Planned moves through etcd: each step a compare-and-swap, against a real etcd."""

from __future__ import annotations

import pytest
import trio

from storage.etcd import Etcd
from storage.keys import Keyspace
from storage.moves import (
    TRANSITIONS,
    Move,
    MoveError,
    MoveInProgress,
    Moves,
    NotOwned,
    StaleMove,
)
from storage.ownership import Owners


async def owned(etcd: Etcd, keys: Keyspace, session: str = "s1") -> tuple[int, int, int]:
    """``session`` owned by node a; returns (epoch, a's lease, b's lease)."""
    lease_a, _ = await etcd.lease_grant(30)
    lease_b, _ = await etcd.lease_grant(30)
    epoch = await Owners(etcd, keys).claim(session, "a", lease_a, control="c0ffee")
    return epoch, lease_a, lease_b


async def test_a_move_goes_requested_ready_done_and_ownership_follows(
    etcd: Etcd, keys: Keyspace
) -> None:
    epoch, lease_a, lease_b = await owned(etcd, keys)
    moves, owners = Moves(etcd, keys), Owners(etcd, keys)
    move = await moves.request("s1", "b")
    assert (move.source, move.target, move.epoch, move.state) == ("a", "b", epoch, "requested")
    assert move.lease == lease_a  # dies with its source
    ready = await moves.ready(move, b"sealed snapshot", quiesced_at=123.5)
    assert (await etcd.get(keys.checkpoint("s1"))).value == b"sealed snapshot"  # type: ignore[union-attr]
    seen = await moves.get("s1")
    assert seen is not None and seen.state == "ready" and seen.quiesced_at == 123.5
    # The target gets the snapshot with the move (from its watch): no read inside the blackout.
    assert seen.snapshot == b"sealed snapshot"
    done = await moves.take(ready, lease_b)
    owner = await owners.owner_of("s1")
    assert owner is not None and owner.node == "b" and owner.lease == lease_b
    assert owner.control == "c0ffee"  # the session's control secret still opens it
    assert done.new_epoch == owner.epoch > epoch
    # A reader (the source, watching) learns the new epoch from the stored move too.
    stored = await moves.get("s1")
    assert stored is not None and stored.state == "done" and stored.new_epoch == owner.epoch
    assert stored.snapshot == b""  # the copy in the move is dropped once the target has it
    assert await moves.clear(stored)
    assert await moves.get("s1") is None


async def test_a_second_request_loses_and_is_told_which_move_won(
    etcd: Etcd, keys: Keyspace
) -> None:
    await owned(etcd, keys)
    moves = Moves(etcd, keys)
    results: list[Move | MoveError] = []

    async def ask(target: str) -> None:
        try:
            results.append(await moves.request("s1", target))
        except MoveError as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        for target in ("b", "c", "d", "e"):
            nursery.start_soon(ask, target)
    won = [r for r in results if isinstance(r, Move)]
    lost = [r for r in results if isinstance(r, MoveInProgress)]
    assert len(won) == 1 and len(lost) == 3
    assert all(exc.current.target == won[0].target for exc in lost)
    assert f"already moving to {won[0].target}" in str(lost[0])


async def test_requests_for_sessions_without_owner_or_to_their_owner_are_refused(
    etcd: Etcd, keys: Keyspace
) -> None:
    await owned(etcd, keys)
    moves = Moves(etcd, keys)
    with pytest.raises(NotOwned):
        await moves.request("nobody-owns-this", "b")
    with pytest.raises(MoveError, match="already on a"):
        await moves.request("s1", "a")


async def race(moves: Moves, ready: Move, lease: int) -> list[str]:
    """The target's take and the source's abandon, at once; what each got."""
    outcomes: list[str] = []

    async def take() -> None:
        try:
            await moves.take(ready, lease)
            outcomes.append("taken")
        except StaleMove:
            outcomes.append("take refused")

    async def abandon() -> None:
        try:
            await moves.fail(ready, "target too slow")
            outcomes.append("abandoned")
        except StaleMove:
            outcomes.append("abandon refused")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take)
        nursery.start_soon(abandon)
    return sorted(outcomes)


async def test_take_and_abandon_race_exactly_one_wins(etcd: Etcd, keys: Keyspace) -> None:
    moves = Moves(etcd, keys)
    for round_ in range(10):
        session = f"s{round_}"
        _, _, lease_b = await owned(etcd, keys, session)
        ready = await moves.ready(await moves.request(session, "b"), b"x", quiesced_at=1.0)
        outcomes = await race(moves, ready, lease_b)
        assert outcomes in (["abandon refused", "taken"], ["abandoned", "take refused"])
        owner = await Owners(etcd, keys).owner_of(session)
        assert owner is not None
        assert (owner.node == "b") == ("taken" in outcomes)


async def test_a_move_of_a_session_that_moved_meanwhile_cannot_go_on(
    etcd: Etcd, keys: Keyspace
) -> None:
    epoch, _, lease_b = await owned(etcd, keys)
    moves, owners = Moves(etcd, keys), Owners(etcd, keys)
    move = await moves.request("s1", "b")
    await owners.transfer("s1", epoch, "c", lease_b)  # something else moved it
    with pytest.raises(StaleMove):
        await moves.ready(move, b"x", quiesced_at=1.0)


async def test_the_request_dies_with_its_source_lease(etcd: Etcd, keys: Keyspace) -> None:
    _, lease_a, _ = await owned(etcd, keys)
    moves = Moves(etcd, keys)
    await moves.request("s1", "b")
    async with moves.watch() as changes:
        await etcd.lease_revoke(lease_a)
        with trio.fail_after(5):
            assert await changes.receive() == "s1"
    assert await moves.get("s1") is None


def test_the_transition_table_refuses_what_it_does_not_list() -> None:
    move = Move("s1", "a", "b", 5, "requested", "id", 0.0)
    assert move.advance("ready").state == "ready"
    with pytest.raises(ValueError, match="requested -> done"):
        move.advance("done")
    done = move.advance("ready").advance("done")
    for state in TRANSITIONS:
        with pytest.raises(ValueError):
            done.advance(state)


async def test_the_watch_delivers_the_snapshot_with_ready_and_drops_it_on_failure(
    etcd: Etcd, keys: Keyspace
) -> None:
    await owned(etcd, keys)
    moves = Moves(etcd, keys)
    seen: list[Move] = []
    async with moves.watch() as changes:
        ready = await moves.ready(await moves.request("s1", "b"), b"\x00sealed", quiesced_at=1.0)
        await moves.fail(ready, "target refused")
        with trio.fail_after(5):
            while len(seen) < 3:
                change = await changes.receive()
                assert isinstance(change, Move)
                seen.append(change)
    assert [m.state for m in seen] == ["requested", "ready", "failed"]
    assert [m.snapshot for m in seen] == [b"", b"\x00sealed", b""]
    assert "sealed" not in repr(seen[1])  # not in logs
