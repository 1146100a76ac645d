"""This node's side of planned moves (storage/moves.py): giving sessions away, taking them in.

Make-before-break, with etcd as the only channel between the two nodes::

    source (owner at epoch E)                     target
    sees "requested" for a session it hosts
    quiesces it at a frame boundary: the actor
      stops processing and buffers what arrives
    seals the exact snapshot -> "ready" ------->  sees "ready" addressed to it
                                                  opens and parses the snapshot, registers the
                                                    session's media, builds its actor
                                                  takes ownership: new epoch E' ("done")
                                                  starts the actor: the client's stream goes on
    sees "done": hands what it buffered on  <---  (relays follow at the next packet: the new
      to the target through the relays,             epoch in the target's first datagram, or
      tells its signaling client where the          the etcd watch, whichever comes first)
      session went, stops its actor

If the target has not taken the session within :data:`TAKE_WITHIN`, the source abandons the move
(compare-and-swap against the target's take: exactly one wins) and resumes the session itself, as
if nothing had happened. A move of a session that is not connected yet (DTLS unfinished) waits
for it up to :data:`CONNECT_WITHIN`, then fails with that reason.

Draining (SIGTERM, or ``parley drain``) requests a move for every session, to the other active
nodes by free capacity, and waits for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final, Protocol, final

import trio

from actors import Actor
from sessions.node.daemon import Node
from storage.checkpoints import CheckpointError, Sealer, pack_record, unpack_record
from storage.etcd import Etcd, EtcdError
from storage.keys import Keyspace
from storage.lease import Lease
from storage.members import Members
from storage.moves import Move, MoveError, Moves, StaleMove

__all__ = ["CONNECT_WITHIN", "TAKE_WITHIN", "MoveHost", "MoveRefused", "NodeMover"]

log = logging.getLogger("parley.moves")

#: how long a source waits for its target to take a quiesced session before resuming it
TAKE_WITHIN: Final = 3.0
#: how long a move waits for its session to finish connecting (DTLS) before it fails
CONNECT_WITHIN: Final = 10.0
#: moves a draining node has under way at once: all of a full node's (a 50-session drain took
#: 3.0 s with 16 at a time, 1.6 s with all 50, 1.4 s once the snapshot came with the move; the
#: blackout each session hears grew from 0.22 to 0.30 s p50), bounded so that a node with
#: thousands does not flood etcd
DRAIN_PARALLEL: Final = 64


class MoveRefused(Exception):
    """The session cannot move now; ``code`` says why (``not_connected``, ``ended``...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class MoveHost(Protocol):
    """What the mover needs from whoever runs the node's sessions (sessions/node/host.py)."""

    async def quiesce(self, session: str) -> tuple[bytes, float]:
        """Stop the session at a frame boundary: its exact snapshot, and the wall-clock time.
        Raises :class:`MoveRefused`."""

    async def forward(self, session: str, target: str, epoch: int) -> None:
        """The snapshot is ready: forward what the session kept and what comes to ``target``
        (ahead of the switch, keeping the order), while still keeping it here."""

    async def resume(self, session: str) -> None:
        """The move was abandoned: go on as if nothing happened."""

    async def hand_over(self, session: str, target: str, epoch: int, url: str | None) -> None:
        """The session now runs on ``target`` at ``epoch``: hand on what the actor buffered, tell
        the signaling client where the session went (``url``), forget the session's media."""

    async def restore(
        self, session: str, snapshot: bytes, quiesced_at: float
    ) -> Callable[[], Actor]:
        """Prepare to run a session moved here: parse ``snapshot``, register the session's
        media; the factory builds its actor. Raises :class:`MoveRefused`."""

    def discard(self, session: str) -> None:
        """Undo :meth:`restore` (the move did not happen)."""

    async def end_requested(self, session: str) -> None:
        """A client asked another node to end this session (WHIP DELETE with its secret)."""

    async def moved_in(self, session: str, source: str, epoch: int) -> None:
        """The session now runs here, taken from ``source`` at ``epoch`` (tell its agent)."""


@final
class NodeMover:
    """Moves sessions for one node during one lease generation."""

    def __init__(
        self,
        node: Node,
        host: MoveHost,
        etcd: Etcd,
        keys: Keyspace,
        sealer: Sealer,
        *,
        take_within: float = TAKE_WITHIN,
        connect_within: float = CONNECT_WITHIN,
    ) -> None:
        self.node = node
        self.host = host
        self.etcd = etcd
        self.keys = keys
        self.moves = Moves(etcd, keys)
        self.members = Members(etcd, keys)
        self.sealer = sealer
        self.take_within = take_within
        self.connect_within = connect_within
        self._lease: Lease | None = None
        self._nursery: trio.Nursery | None = None
        self._busy: set[str] = set()  # move ids this node is working on
        #: who waits for the outcome of a session's move
        self._outcomes: dict[str, list[tuple[trio.Event, list[Move | None]]]] = {}
        #: moves given and taken, and what went wrong, for the node's counters
        self.counters: dict[str, int] = dict.fromkeys(
            ("moved_out", "moved_in", "move_failed", "move_abandoned", "resumed"), 0
        )

    # -- watching ------------------------------------------------------------------------------

    async def run(self, lease: Lease, *, task_status: trio.TaskStatus[None]) -> None:
        self._lease = lease
        pending, revision = await self.moves.list()
        async with (
            self.moves.watch(start_revision=revision + 1) as changes,
            trio.open_nursery() as nursery,
        ):
            self._nursery = nursery
            for move in pending:
                self._dispatch(move)
            nursery.start_soon(self._drain_on_request)
            nursery.start_soon(self._end_on_request)
            task_status.started()
            async for change in changes:
                self._dispatch(change)

    def _dispatch(self, change: Move | str) -> None:
        if isinstance(change, str):  # the session's move key is gone
            self._settle(change, None)
            return
        move = change
        if move.state in ("done", "failed"):
            self._settle(move.session, move)
        assert self._nursery is not None
        me = self.node.id
        if move.source == me and move.state == "requested" and move.id not in self._busy:
            self._busy.add(move.id)
            self._nursery.start_soon(self._give, move)
        elif move.target == me and move.state == "ready" and move.id not in self._busy:
            self._busy.add(move.id)
            self._nursery.start_soon(self._take, move)

    def _settle(self, session: str, outcome: Move | None) -> None:
        for event, box in self._outcomes.pop(session, []):
            box.append(outcome)
            event.set()

    def _expect(self, session: str) -> tuple[trio.Event, list[Move | None]]:
        """Register for the outcome of the session's move *before* acting on it: under load the
        whole move can be over before the action that started it returns."""
        waiter: tuple[trio.Event, list[Move | None]] = (trio.Event(), [])
        self._outcomes.setdefault(session, []).append(waiter)
        return waiter

    async def _outcome(
        self, session: str, waiter: tuple[trio.Event, list[Move | None]], within: float
    ) -> Move | None:
        """The final state (done or failed) of the session's move as the watch delivers it;
        None if its key vanished without one, or nothing came in time."""
        event, box = waiter
        with trio.move_on_after(within):
            await event.wait()
        self._unexpect(session, waiter)
        return box[0] if box else None

    def _unexpect(self, session: str, waiter: tuple[trio.Event, list[Move | None]]) -> None:
        waiting = self._outcomes.get(session, [])
        if waiter in waiting:
            waiting.remove(waiter)

    # -- giving --------------------------------------------------------------------------------

    async def _give(self, move: Move) -> None:
        try:
            await self._give_one(move)
        except EtcdError as exc:
            log.warning("move stopped: etcd", extra={"session": move.session, "error": str(exc)})
        finally:
            self._busy.discard(move.id)

    async def _give_one(self, move: Move) -> None:
        session = move.session
        hosted = self.node.sessions.get(session)
        if hosted is None or hosted.epoch != move.epoch:
            await self._fail(move, f"{self.node.id} does not host {session} at epoch {move.epoch}")
            return
        snapshot = await self._quiesce(move)
        if snapshot is None:
            return
        state, quiesced_at = snapshot
        blob = self.sealer.seal(
            pack_record(hosted.control, state), session=session, epoch=move.epoch
        )
        waiter = self._expect(session)  # the outcome may come before ready() returns
        try:
            ready = await self.moves.ready(
                move, blob, quiesced_at=quiesced_at, moves=hosted.moves + 1
            )
        except (StaleMove, EtcdError) as exc:
            self._unexpect(session, waiter)
            log.warning("move abandoned before it was ready", extra={"session": session})
            await self._resume(session, str(exc))
            return
        # From here what reaches us for the session also goes to the target at once, so that
        # it runs it in order; if the move is abandoned we still have our copy.
        await self.host.forward(session, move.target, move.epoch)
        outcome = await self._outcome(session, waiter, self.take_within + 1.0)
        if outcome is None or outcome.state != "done":
            outcome = await self._abandon(ready, outcome)
        if outcome is None or outcome.state != "done":
            await self._resume(session, outcome.reason if outcome else "no outcome")
            return
        member = await self.members.node(move.target)
        url = member.info.addresses.get("signaling") if member is not None else None
        await self.host.hand_over(session, move.target, outcome.new_epoch, url)
        # The actor has already let go (hand_off); its supervisor's bookkeeping is serialized
        # across sessions and need not hold up the next move.
        assert self._nursery is not None
        self._nursery.start_soon(self.node.give_up_session, session)
        self.counters["moved_out"] += 1
        log.info(
            "session moved out",
            extra={
                "session": session,
                "to": move.target,
                "epoch": outcome.new_epoch,
                "ms": round((time.time() - quiesced_at) * 1000, 1),
            },
        )

    async def _quiesce(self, move: Move) -> tuple[bytes, float] | None:
        """The session's exact snapshot, waiting for it to connect; None if the move failed."""
        deadline = trio.current_time() + self.connect_within
        while True:
            try:
                return await self.host.quiesce(move.session)
            except MoveRefused as exc:
                if exc.code != "not_connected" or trio.current_time() >= deadline:
                    await self._fail(move, f"{exc.code}: {exc}")
                    return None
            await trio.sleep(0.1)

    async def _abandon(self, ready: Move, outcome: Move | None) -> Move | None:
        """The target did not take it in time (or refused): abandon the move unless the target
        won the race, in which case that is the outcome."""
        if outcome is not None:
            return outcome  # failed by the target
        try:
            failed = await self.moves.fail(
                ready, f"{ready.target} did not take the session within {self.take_within:g} s"
            )
        except StaleMove:
            current = await self.moves.get(ready.session)
            if current is not None and current.id == ready.id:
                return current
            # The key is gone: the target took it and cleared the move, or the session is
            # no longer ours at all. The owner record says which.
            owner = await self.node.owner_of(ready.session)
            if owner is not None and owner.node == ready.target:
                return ready.advance("done", new_epoch=owner.epoch)
            return None
        self.counters["move_abandoned"] += 1
        await self.moves.clear(failed)
        return failed

    async def _resume(self, session: str, why: str) -> None:
        self.counters["resumed"] += 1
        log.warning("move failed; the session goes on here", extra={"session": session, "why": why})
        await self.host.resume(session)

    async def _fail(self, move: Move, reason: str) -> None:
        self.counters["move_failed"] += 1
        log.warning("move refused", extra={"session": move.session, "reason": reason})
        try:
            failed = await self.moves.fail(move, reason)
        except StaleMove:
            return
        await self.moves.clear(failed)

    # -- taking --------------------------------------------------------------------------------

    async def _take(self, move: Move) -> None:
        try:
            await self._take_one(move)
        except EtcdError as exc:
            log.warning("move in stopped: etcd", extra={"session": move.session, "error": str(exc)})
        finally:
            self._busy.discard(move.id)

    async def _take_one(self, move: Move) -> None:
        session, lease = move.session, self._lease
        if lease is None or lease.lost.is_set():
            await self._fail(move, f"{self.node.id} holds no live lease")
            return
        if not self.node.active():
            await self._fail(move, f"{self.node.id} is draining")
            return
        if not self.node.has_room():
            why = "too busy" if self.node.busy() else "at capacity"
            await self._fail(move, f"{self.node.id} is {why}")
            return
        blob = move.snapshot
        if not blob:  # written by a source that did not carry it in the move
            kv = await self.etcd.get(self.keys.checkpoint(session))
            blob = kv.value if kv is not None else b""
        try:
            if not blob:
                raise CheckpointError("no snapshot was stored")
            _, state = unpack_record(self.sealer.open(blob, session=session, epoch=move.epoch))
            factory = await self.host.restore(session, state, move.quiesced_at)
        except (CheckpointError, MoveRefused) as exc:
            await self._fail(move, f"{self.node.id} cannot restore it: {exc}")
            return
        try:
            done = await self.moves.take(move, lease.id)
        except StaleMove:
            self.host.discard(session)
            return
        except BaseException:
            self.host.discard(session)
            raise
        blackout_ms = round((time.time() - move.quiesced_at) * 1000, 1)
        await self.node.adopt_session(
            session,
            done.new_epoch,
            factory,
            control=move.control,
            moves=move.moves,
            blackout_ms=blackout_ms,
        )
        self.counters["moved_in"] += 1
        await self.host.moved_in(session, move.source, done.new_epoch)
        log.info(
            "session moved in",
            extra={
                "session": session,
                "from": move.source,
                "epoch": done.new_epoch,
                "blackout_ms": blackout_ms,
                "moves": move.moves,
            },
        )
        await self.moves.clear(done)

    async def _end_on_request(self) -> None:
        """End the sessions here whose end a client asked another node for."""
        async with self.moves.watch_ends() as ends:
            async for session in ends:
                if session in self.node.sessions:
                    await self.host.end_requested(session)
                    await self.moves.clear_end(session)

    # -- draining ------------------------------------------------------------------------------

    async def _drain_on_request(self) -> None:
        """``parley drain``: stop taking sessions, move them all away, stay up."""
        await self.moves.wait_for_drain(self.node.id)
        log.info("drain requested", extra={"node": self.node.id})
        self.node.begin_drain()
        while self.node.sessions:
            left = await self.drain(CONNECT_WITHIN + self.take_within)
            if left:
                await trio.sleep(1.0)

    async def targets(self) -> dict[str, int]:
        """Other active nodes and the sessions each can still take."""
        room: dict[str, int] = {}
        for member in await self.members.nodes():
            info = member.info
            if info.id != self.node.id and info.state == "active":
                room[info.id] = max(0, info.capacity - info.sessions)
        return room

    async def drain(self, within: float) -> int:
        """Move every session elsewhere, by free capacity; returns how many are still here."""
        try:
            room = await self.targets()
        except EtcdError as exc:
            log.warning("cannot list nodes to drain to", extra={"error": str(exc)})
            return len(self.node.sessions)
        sessions = list(self.node.sessions)
        if not room or not sessions:
            return len(sessions)
        plan: list[tuple[str, str]] = []
        for session in sessions:
            target = max(room, key=lambda n: room[n])
            if room[target] <= 0:
                break
            room[target] -= 1
            plan.append((session, target))
        log.info("draining", extra={"node": self.node.id, "sessions": len(plan)})
        limiter = trio.CapacityLimiter(DRAIN_PARALLEL)
        with trio.move_on_after(within):
            async with trio.open_nursery() as nursery:
                for session, target in plan:
                    nursery.start_soon(self._request, session, target, limiter)
            while any(s in self.node.sessions for s, _ in plan):
                await self.node.sessions_changed.park()
        return len(self.node.sessions)

    async def _request(self, session: str, target: str, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            waiter = self._expect(session)
            try:
                await self.moves.request(session, target)
            except (MoveError, EtcdError) as exc:
                self._unexpect(session, waiter)
                log.warning("could not request a move", extra={"session": session, "why": str(exc)})
                return
            # Hold a place in the limiter until this move is over, so that few are in flight.
            await self._outcome(session, waiter, self.connect_within + self.take_within + 2.0)
