"""``parley migrate`` and ``parley drain``: move live sessions between nodes.

Both only write etcd (no port of the nodes is involved): ``migrate`` requests one move
(storage/moves.py) and follows it to its end; ``drain`` asks a node to move every session it
owns to the other active nodes (the node chooses targets by load) and shows progress until the
node owns nothing. A node that gets SIGTERM drains itself the same way.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

import trio

from storage.etcd import Etcd, EtcdError, EtcdTLS, WatchChannel, open_etcd
from storage.keys import Keyspace
from storage.members import Members
from storage.moves import Move, MoveError, Moves
from storage.ownership import Owners

__all__ = ["drain", "migrate"]


def _print(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)


async def _follow(changes: WatchChannel[Move | str], session: str, move_id: str) -> Move | None:
    """The move's final state (done or failed), or None if its key vanished first (the
    target may have cleared a done move before this watch delivered it: the caller checks)."""
    async for change in changes:
        if change == session:
            return None
        if isinstance(change, Move) and change.id == move_id and change.state in ("done", "failed"):
            return change
    return None


async def migrate(
    endpoint: str,
    prefix: str,
    session: str,
    target: str,
    *,
    within: float,
    as_json: bool,
    out: TextIO = sys.stdout,
    tls: EtcdTLS | None = None,
) -> int:
    """Move ``session`` to ``target``; exit status 0 moved, 1 refused or failed, 2 no etcd.
    ``within`` bounds the whole command, from connecting to etcd to the move's outcome: an
    etcd that accepts a watch and never confirms it cannot hold an operator's script past it.
    ``tls``: the operator's client certificate, for an etcd that requires one."""
    keys = Keyspace(prefix)
    started = time.time()
    requested: Move | None = None
    try:
        with trio.move_on_after(within):
            async with open_etcd(endpoint, tls=tls) as etcd:
                members = Members(etcd, keys)
                node = await members.node(target)
                if node is None or node.info.state != "active":
                    why = "not registered" if node is None else f"{node.info.state}"
                    return _refused(out, as_json, session, target, f"node {target} is {why}")
                moves = Moves(etcd, keys)
                # Watch first: a move can be over (and its key gone) before a later watch
                # started.
                async with moves.watch() as changes:
                    try:
                        requested = move = await moves.request(session, target)
                    except MoveError as exc:
                        return _refused(out, as_json, session, target, str(exc))
                    if not as_json:
                        _print(
                            out,
                            f"moving {session}: {move.source} -> {target} (epoch {move.epoch})",
                        )
                    final = await _follow(changes, session, move.id)
                    if final is None:
                        owner = await Owners(etcd, keys).owner_of(session)
                        if owner is not None and owner.node == target:
                            final = move.advance("ready").advance("done", new_epoch=owner.epoch)
                    return _report(out, as_json, move, final, started)
    except EtcdError as exc:
        print(f"parley migrate: etcd at {endpoint} did not answer: {exc}", file=sys.stderr)
        return 2
    if requested is None:  # etcd's part before the request did not end: as if it were down
        print(
            f"parley migrate: etcd at {endpoint} did not let the move start within {within:g} s",
            file=sys.stderr,
        )
        return 2
    return _refused(
        out, as_json, session, target, f"no outcome within {within:g} s (still running)"
    )


def _refused(out: TextIO, as_json: bool, session: str, target: str, reason: str) -> int:
    if as_json:
        _print(
            out, json.dumps({"session": session, "to": target, "moved": False, "reason": reason})
        )
    else:
        _print(out, f"not moved: {reason}")
    return 1


def _report(out: TextIO, as_json: bool, move: Move, final: Move | None, started: float) -> int:
    took = time.time() - started
    if final is None:
        reason = "the move vanished (its source stopped or its owner changed)"
        return _refused(out, as_json, move.session, move.target, reason)
    if final.state == "failed":
        return _refused(out, as_json, move.session, move.target, final.reason or "failed")
    if as_json:
        _print(
            out,
            json.dumps(
                {
                    "session": move.session,
                    "from": move.source,
                    "to": move.target,
                    "moved": True,
                    "epoch": final.new_epoch,
                    "seconds": round(took, 3),
                }
            ),
        )
    else:
        _print(
            out,
            f"moved {move.session} to {move.target} (epoch {move.epoch} -> {final.new_epoch}) "
            f"in {took * 1000:.0f} ms",
        )
    return 0


async def _owned_by(etcd: Etcd, keys: Keyspace, node: str) -> set[str]:
    owned, _ = await Owners(etcd, keys).list()
    return {o.session for o in owned if o.node == node}


async def drain(
    endpoint: str,
    prefix: str,
    node_id: str,
    *,
    within: float,
    as_json: bool,
    out: TextIO = sys.stdout,
    tls: EtcdTLS | None = None,
) -> int:
    """Ask ``node_id`` to move all its sessions away; follow until it owns none.

    Exit status 0 drained, 1 not drained in time (or refused), 2 no etcd. ``tls``: the
    operator's client certificate, for an etcd that requires one.
    """
    keys = Keyspace(prefix)
    started = time.time()
    summary: dict[str, Any] = {"node": node_id, "moved": 0, "failed": [], "remaining": []}
    try:
        async with open_etcd(endpoint, tls=tls) as etcd:
            # ``within`` bounds all of it (a watch etcd never confirms included), but for the
            # last read of what is left, which has etcd's own deadline.
            with trio.move_on_after(within):
                member = await Members(etcd, keys).node(node_id)
                if member is None:
                    summary["error"] = f"node {node_id} is not registered"
                    return _drain_result(out, as_json, summary, started, 1)
                moves = Moves(etcd, keys)
                owned = await _owned_by(etcd, keys, node_id)
                total = len(owned)
                async with moves.watch() as changes:
                    if not await moves.request_drain(node_id, member.lease, by="parley drain"):
                        if not as_json:
                            _print(out, f"a drain of {node_id} was already requested; following it")
                    elif not as_json:
                        _print(out, f"draining {node_id}: {total} sessions to move")
                    await _watch_drain(etcd, keys, moves, changes, node_id, summary, out, as_json)
                    summary["remaining"] = []
                    # The watch may not have delivered every move's end before the node was
                    # empty: count what etcd says now went elsewhere.
                    owned_now, _ = await Owners(etcd, keys).list()
                    elsewhere = {o.session for o in owned_now if o.node != node_id}
                    summary["moved"] = max(summary["moved"], len(owned & elsewhere))
                    return _drain_result(out, as_json, summary, started, 0)
            summary["remaining"] = sorted(await _owned_by(etcd, keys, node_id))
            summary["error"] = f"not drained within {within:g} s"
            return _drain_result(out, as_json, summary, started, 1)
    except EtcdError as exc:
        print(f"parley drain: etcd at {endpoint} did not answer: {exc}", file=sys.stderr)
        return 2


async def _watch_drain(
    etcd: Etcd,
    keys: Keyspace,
    moves: Moves,
    changes: WatchChannel[Move | str],
    node_id: str,
    summary: dict[str, Any],
    out: TextIO,
    as_json: bool,
) -> None:
    """Report each finished move away from ``node_id`` until it owns nothing."""
    remaining = await _owned_by(etcd, keys, node_id)
    seen: set[str] = set()
    while remaining:
        with trio.move_on_after(0.5):  # also re-read ownership now and then: sessions end too
            change = await changes.receive()
            if isinstance(change, Move) and change.source == node_id and change.id not in seen:
                if change.state == "done":
                    seen.add(change.id)
                    summary["moved"] += 1
                elif change.state == "failed":
                    seen.add(change.id)
                    summary["failed"].append({"session": change.session, "reason": change.reason})
                else:
                    continue
                if not as_json:
                    what = (
                        f"moved {change.session} -> {change.target}"
                        if change.state == "done"
                        else f"failed {change.session}: {change.reason}"
                    )
                    left = len(await _owned_by(etcd, keys, node_id))
                    _print(
                        out,
                        f"  {what}  (moved {summary['moved']}, failed "
                        f"{len(summary['failed'])}, remaining {left})",
                    )
        remaining = await _owned_by(etcd, keys, node_id)


def _drain_result(
    out: TextIO, as_json: bool, summary: dict[str, Any], started: float, code: int
) -> int:
    summary["seconds"] = round(time.time() - started, 3)
    summary["drained"] = code == 0
    if as_json:
        _print(out, json.dumps(summary))
    elif code == 0:
        _print(
            out,
            f"{summary['node']} is drained: moved {summary['moved']}, failed "
            f"{len(summary['failed'])}, in {summary['seconds']:.2f} s",
        )
    else:
        remaining = ", ".join(summary["remaining"]) or "-"
        _print(out, f"{summary.get('error')}; remaining: {remaining}")
    return code
