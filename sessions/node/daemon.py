"""The node daemon: registers itself, owns sessions under its lease, stops cleanly.

Life of a node::

    etcd client ── lease keeper (keepalive every TTL/3, local safety deadline)
         │
         └── for each lease generation, inside the lease's cancel scope:
                 registration (nodes/<id>, attached to the lease, with state and load)
                 session supervisor (one-for-one) ── one actor per session

If the lease's safety deadline passes, the node stops acting for its sessions before etcd could
expire the lease and let another node claim them: no datagram leaves for a session from that
instant (:meth:`Node.epoch_of`, checked per packet), and every session actor is *held* (quiesced,
its state kept, what arrives kept). Losing sight of etcd is not losing the lease: if a keepalive
is acknowledged again (etcd was frozen, slow, electing), the sessions go on here at the same epoch;
if etcd says the lease expired, or it stays silent for ``node.lease_hold`` seconds, the lease's
scope is cancelled, the actors go, and their sessions are adopted from their checkpoints like a
crashed node's (sessions/node/failover.py) — by any node, this one included once it has a new
lease. Their clients' signaling is told where each went, or why it ended.

On SIGTERM the node turns ``draining``, moves its sessions to other nodes (or stops and releases
them), deregisters and revokes its lease, so nothing waits for a TTL.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, final

import attrs
import trio

from actors import Actor, ChildSpec, Intensity, Registry, Restart, Strategy, Supervisor
from actors.histogram import Histogram
from sessions.node.load import LoopLoad
from sessions.node.metrics import ADOPTION_BUCKETS, BLACKOUT_BUCKETS
from sessions.node.settings import NodeSetup
from storage.etcd import Etcd, EtcdError, open_etcd
from storage.keys import Keyspace, check_name
from storage.lease import Lease, LeaseKeeper
from storage.members import Members, NodeInfo, NodeState
from storage.ownership import Owners, Ownership

log = logging.getLogger("parley.node")

STATS_INTERVAL = 2.0
#: what a node's stats publishing may write to etcd, bytes a second: beyond it (about 25
#: sessions' stats every 2 s) it publishes less often, so that etcd's log does not grow by
#: megabytes a minute on a busy node (``parley status`` then shows older figures)
STATS_BYTES_PER_SECOND = 16 * 1024


#: serves a node's clients (signaling, media); started once per node with ``nursery.start``,
#: it reports a :class:`SessionFrontend` (or None)
Frontend = Callable[..., Awaitable[None]]


class SessionFrontend(Protocol):
    """What the node asks of whoever serves its clients, when the node itself ends sessions."""

    async def stop_session(self, session: str, code: str, reason: str) -> None:
        """Tell the client why (``session_ended`` with ``code``), close the session's media,
        then :meth:`Node.end_session`."""

    async def hold_sessions(self, sessions: list[str], reason: str) -> None:
        """The lease stalled: pause the sessions' actors, keeping their state (``("stall",)``),
        and tell their clients."""

    async def release_sessions(self, sessions: list[str]) -> None:
        """The lease recovered: the held sessions go on (``("unstall",)``)."""

    async def sessions_lost(self, sessions: list[str], code: str, reason: str) -> None:
        """The sessions' actors are gone (the lease was lost): follow each to the node that
        adopts it and tell its client; ``session_ended`` (``code``) for those nobody adopts."""

    async def wind_down(self) -> None:
        """Give clients a bounded moment to receive their last events before the node exits."""


class NodeRefused(Exception):
    """The node will not take a session; ``code`` is machine-readable (signaling error code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@final
@attrs.define
class HostedSession:
    id: str
    epoch: int
    lease: int
    started_at: float
    #: the hash of the session's control secret (also in its owner record)
    control: str = ""
    #: times this session moved between nodes, and the last move's blackout
    moves: int = 0
    last_blackout_ms: float | None = None


class Mover(Protocol):
    """Moves sessions between nodes (sessions/node/moves.py); one per lease generation."""

    async def run(self, lease: Lease, *, task_status: trio.TaskStatus[None]) -> None:
        """Give and take moves for as long as ``lease`` lives."""

    async def drain(self, within: float) -> int:
        """Move every session elsewhere (bounded); returns how many did not move."""


#: makes the node's :class:`Mover` for a lease generation (None: this node does not move sessions)
MoverFactory = Callable[["Node", Lease], "Mover | None"]


class LeaseService(Protocol):
    """Runs for as long as one lease generation (started with ``nursery.start``)."""

    async def run(self, lease: Lease, *, task_status: trio.TaskStatus[None]) -> None: ...


#: makes the node's orphan adopter (sessions/node/failover.py) for a lease generation
AdopterFactory = Callable[["Node", Lease], "LeaseService | None"]
#: how long a stopping node tries to move its sessions to other nodes before ending the rest
DRAIN_WITHIN = 10.0


@final
class Node:
    """One transceiver node. Start ``run`` with ``nursery.start``; it reports the node itself."""

    def __init__(
        self, config: NodeSetup, *, node_id: str | None = None, frontend: Frontend | None = None
    ) -> None:
        self.config = config
        self.id = check_name("node", node_id or config.node.node_id())
        self.keys = Keyspace(config.cluster.prefix)
        #: what the node presents to an etcd that requires client certificates: its own
        #: member certificate (read now, so that a missing one stops the node at once)
        self.etcd_tls = config.cluster.etcd_tls("node", self.id)
        self.registry = Registry()
        self.state: NodeState = "active"
        self.sessions: dict[str, HostedSession] = {}
        #: named endpoints published in the registry (signaling URLs arrive with signaling)
        self.addresses: dict[str, str] = {}
        self.started_at = time.time()
        self.lease_generations = 0
        #: lease stalls ridden out or not (each held every session), for the ops port
        self.lease_stalls = 0
        #: blackouts of the sessions moved in, and delays of those adopted (seconds)
        self.move_blackouts = Histogram(BLACKOUT_BUCKETS)
        self.adoption_delays = Histogram(ADOPTION_BUCKETS)
        #: how busy the node's event loop is (``node.max_load``), sampled while it runs
        self.loop_load = LoopLoad()
        self._frontend = frontend
        self._clients: SessionFrontend | None = None
        #: set by the frontend when this node can move sessions (relay mode, a cluster key)
        self.make_mover: MoverFactory | None = None
        #: set by the frontend when this node adopts orphaned sessions (crash failover)
        self.make_adopter: AdopterFactory | None = None
        self._mover: Mover | None = None
        #: per-session stats, published for `parley status` (set by the frontend)
        self.stats_source: Callable[[], Awaitable[dict[str, dict[str, Any]]]] | None = None
        #: the media path's counters, published with the node's record
        self.counters_source: Callable[[], dict[str, int]] | None = None
        #: places on this node that offers being answered hold (set by the signaling server):
        #: a session moving in or adopted must leave them free
        self.places_reserved: Callable[[], int] = lambda: 0
        self._stop_requested = trio.Event()
        self._load_changed = trio.Event()
        #: woken whenever a session arrives or leaves (see :meth:`_changed`)
        self.sessions_changed = trio.lowlevel.ParkingLot()
        self._lease: Lease | None = None
        self._supervisor: Supervisor | None = None
        self._reported = False
        self._etcd: Etcd | None = None
        self._keeper: LeaseKeeper | None = None
        self._owners: Owners | None = None
        self._members: Members | None = None

    # -- public API -----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does)."""
        self._stop_requested.set()

    @property
    def lease(self) -> Lease | None:
        return self._lease

    @property
    def etcd(self) -> Etcd | None:
        """The node's etcd client, once connected."""
        return self._etcd

    @property
    def keeper(self) -> LeaseKeeper | None:
        """The node's lease keeper, once connected to etcd."""
        return self._keeper

    @property
    def members(self) -> Members | None:
        """The cluster registry, once the node is connected to etcd."""
        return self._members

    def epoch_of(self, session: str) -> int | None:
        """The ownership epoch of a session hosted here, if this node may act for it *now*:
        None for a session not hosted here, and for every session once the lease's safety
        deadline has passed (the media path asks per datagram, so nothing leaves after it)."""
        hosted, lease = self.sessions.get(session), self._lease
        if hosted is None or lease is None or not lease.usable():
            return None
        return hosted.epoch

    def may_act(self) -> bool:
        """Whether this node may act for its sessions now (its lease is usable): asked by every
        session actor before each step, so that none processes a datagram after the lease's
        safety deadline, even before the node has noticed the stall."""
        lease = self._lease
        return lease is not None and lease.usable()

    async def owners(self) -> list[Ownership]:
        """Every owned session of the cluster, as etcd says."""
        if self._owners is None:
            return []
        owned, _ = await self._owners.list()
        return owned

    def _changed(self) -> None:
        self._load_changed.set()
        self.sessions_changed.unpark_all()

    def begin_drain(self) -> None:
        """Take no new sessions (``parley drain``); the registration says ``draining``."""
        self.state = "draining"
        self._changed()

    async def owner_of(self, session: str) -> Ownership | None:
        """Who owns ``session`` now, as etcd says."""
        if self._owners is None:
            return None
        return await self._owners.owner_of(session)

    def active(self) -> bool:
        """Taking new sessions (not draining or stopping)."""
        return self.state == "active" and not self._stop_requested.is_set()

    def has_room(self) -> bool:
        """Room for one more session (a move, an adoption): under capacity, counting the
        places offers hold, and not :meth:`busy`."""
        return (
            len(self.sessions) + self.places_reserved() < self.config.node.capacity
            and not self.busy()
        )

    def busy(self) -> bool:
        """Whether the event loop is too busy for another session (``node.max_load``)."""
        limit = self.config.node.max_load
        return limit > 0 and self.loop_load.value >= limit

    async def adopt_session(
        self,
        session: str,
        epoch: int,
        factory: Callable[[], Actor],
        *,
        control: str = "",
        moves: int = 0,
        blackout_ms: float | None = None,
    ) -> None:
        """Start the actor of a session this node already owns at ``epoch`` (it moved here:
        ownership was taken by the move's compare-and-swap, not by a claim)."""
        lease, supervisor = self._lease, self._supervisor
        if lease is None or supervisor is None or not lease.usable():
            raise NodeRefused("no_lease", f"node {self.id} holds no live lease")
        # Known as ours before the actor runs: its first checkpoint is fenced by this epoch.
        self.sessions[session] = HostedSession(
            session, epoch, lease.id, time.time(), control, moves, blackout_ms
        )
        try:
            await supervisor.start_child(ChildSpec(session, factory, restart=Restart.TRANSIENT))
        except BaseException:
            self.sessions.pop(session, None)
            raise
        if blackout_ms is not None:
            self.move_blackouts.observe(blackout_ms / 1000)
        self._changed()

    async def give_up_session(self, session: str) -> None:
        """Stop a session's actor that now lives on another node: no release (not ours)."""
        hosted = self.sessions.pop(session, None)
        self._changed()
        supervisor = self._supervisor
        if hosted is not None and supervisor is not None and session in supervisor.child_names():
            await supervisor.stop_child(session)

    async def host_session(
        self, session: str, factory: Callable[[], Actor], *, control: str = ""
    ) -> int:
        """Claim ``session`` for this node and start its actor; returns the epoch.

        Raises :class:`NodeRefused` (``node_draining``, ``node_over_capacity``, ``no_lease``) or
        storage's ``AlreadyOwned`` if another node owns it.
        """
        check_name("session", session)
        if self.state != "active" or self._stop_requested.is_set():
            raise NodeRefused("node_draining", f"node {self.id} is draining")
        if len(self.sessions) >= self.config.node.capacity:
            raise NodeRefused("node_over_capacity", f"node {self.id} is at capacity")
        lease, supervisor, owners = self._lease, self._supervisor, self._owners
        if lease is None or supervisor is None or owners is None or not lease.usable():
            raise NodeRefused("no_lease", f"node {self.id} holds no live lease")
        epoch = await owners.claim(session, self.id, lease.id, control=control)
        self.sessions[session] = HostedSession(session, epoch, lease.id, time.time(), control)
        try:
            await supervisor.start_child(ChildSpec(session, factory, restart=Restart.TRANSIENT))
        except BaseException:
            self.sessions.pop(session, None)
            with trio.CancelScope(shield=True), trio.move_on_after(self._rpc_timeout()):
                await owners.release(session, epoch)
            raise
        self._changed()
        log.info("session hosted", extra={"session": session, "epoch": epoch})
        return epoch

    async def end_session(self, session: str) -> None:
        """Stop a session's actor and release its ownership."""
        hosted = self.sessions.pop(session, None)
        if hosted is None:
            return
        if self._supervisor is not None and session in self._supervisor.child_names():
            await self._supervisor.stop_child(session)
        if self._owners is not None:
            try:
                released = await self._owners.release(session, hosted.epoch)
            except EtcdError as exc:
                log.warning("release failed", extra={"session": session, "error": str(exc)})
            else:
                if not released:
                    log.warning("session was no longer ours", extra={"session": session})
        self._changed()
        log.info("session ended", extra={"session": session})

    def info(self) -> NodeInfo:
        return NodeInfo(
            id=self.id,
            state=self.state,
            addresses=dict(self.addresses),
            sessions=len(self.sessions),
            capacity=self.config.node.capacity,
            counters=self.counters_source() if self.counters_source is not None else {},
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=self.started_at,
            region=self.config.node.region,
        )

    # -- lifetime -------------------------------------------------------------------------------

    def _rpc_timeout(self) -> float:
        return self._etcd.timeout if self._etcd is not None else 2.0

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        node_cfg = self.config.node
        margin = node_cfg.lease_margin or None
        async with open_etcd(self.config.cluster.etcd, tls=self.etcd_tls) as etcd:
            self._etcd = etcd
            self._owners = Owners(etcd, self.keys)
            self._members = Members(etcd, self.keys)
            keeper = self._keeper = LeaseKeeper(
                etcd, ttl=node_cfg.lease_ttl, margin=margin, hold=node_cfg.lease_hold
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.loop_load.run)
                if self._frontend is not None:
                    # Signaling and media outlive lease generations: their addresses stay put.
                    self._clients = await nursery.start(self._frontend, self)
                await nursery.start(keeper.run)
                while True:
                    lease = await self._next_lease(keeper)
                    if lease is None:
                        break
                    self.lease_generations += 1
                    with lease.scope:
                        await self._serve(lease, None if self._reported else task_status)
                    if lease.lost.is_set() and not self._stop_requested.is_set():
                        log.error(
                            "lease lost: stopped every session before it could expire",
                            extra={"lease": hex(lease.id), "sessions": len(self.sessions)},
                        )
                        lost = list(self.sessions)
                        self.sessions.clear()
                        self._changed()
                        if self._clients is not None and lost:
                            nursery.start_soon(
                                self._clients.sessions_lost,
                                lost,
                                "lease_lost",
                                f"node {self.id} lost its etcd lease and stopped its sessions",
                            )
                if self._clients is not None:
                    await self._clients.wind_down()
                nursery.cancel_scope.cancel()
            await self._revoke()
        log.info("node stopped", extra={"node": self.id})

    async def _next_lease(self, keeper: LeaseKeeper) -> Lease | None:
        """The next live lease, or None once a stop is requested (etcd may be unreachable)."""
        if self._stop_requested.is_set():
            return None
        found: Lease | None = None
        async with trio.open_nursery() as nursery:

            async def take() -> None:
                nonlocal found
                found = await keeper.current()
                nursery.cancel_scope.cancel()

            async def stop() -> None:
                await self._stop_requested.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(take)
            nursery.start_soon(stop)
        return None if self._stop_requested.is_set() and found is None else found

    async def _serve(self, lease: Lease, task_status: trio.TaskStatus[Node] | None) -> None:
        assert self._members is not None
        self._lease = lease
        supervisor = Supervisor(
            f"{self.id}/sessions",
            strategy=Strategy.ONE_FOR_ONE,
            # Sessions are independent: one crashing repeatedly must not take the others down,
            # so this supervisor tolerates many restarts (each session limits its own).
            intensity=Intensity(max_restarts=1000, within=10.0),
            registry=self.registry,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            self._supervisor = supervisor
            await self._register(lease)
            log.info(
                "node registered",
                extra={"node": self.id, "lease": hex(lease.id), "generation": lease.generation},
            )
            self._reported = True
            if task_status is not None:
                task_status.started(self)
            nursery.start_soon(self._report_load, lease)
            nursery.start_soon(self._publish_stats, lease)
            nursery.start_soon(self._ride_stalls, lease)
            self._mover = self.make_mover(self, lease) if self.make_mover is not None else None
            if self._mover is not None:
                await nursery.start(self._mover.run, lease)
            adopter = self.make_adopter(self, lease) if self.make_adopter is not None else None
            if adopter is not None:
                await nursery.start(adopter.run, lease)
            await self._stop_requested.wait()
            await self._drain(lease)
            nursery.cancel_scope.cancel()
        self._supervisor = None
        self._mover = None

    async def _ride_stalls(self, lease: Lease) -> None:
        """Hold every session while the lease is stalled; let them go on if it recovers. (If it
        is lost instead, its scope ends this task and the sessions with it.)"""
        while True:
            recovered = lease.recovered  # before the stall: a quick recovery is not missed
            await lease.stalled.wait()
            self.lease_stalls += 1
            held = list(self.sessions)
            log.warning(
                "lease stalled: holding every session until etcd answers",
                extra={"lease": hex(lease.id), "sessions": len(held)},
            )
            if self._clients is not None:
                await self._clients.hold_sessions(
                    held, f"node {self.id} cannot reach etcd; the session is held"
                )
            await recovered.wait()
            log.warning(
                "lease recovered: sessions go on",
                extra={"lease": hex(lease.id), "sessions": len(self.sessions)},
            )
            if self._clients is not None:
                await self._clients.release_sessions(list(self.sessions))

    async def _register(self, lease: Lease) -> None:
        """Publish this node under ``lease``, retrying while etcd is unreachable.

        Runs inside the lease's scope, so it gives up when the lease does.
        """
        assert self._members is not None
        backoff = 0.1
        while True:
            try:
                await self._members.register_node(self.info(), lease.id)
                return
            except EtcdError as exc:
                log.warning("could not register; retrying", extra={"error": str(exc)})
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _report_load(self, lease: Lease) -> None:
        """Keep the registration current: on every change, and at least once per TTL."""
        assert self._members is not None
        while True:
            with trio.move_on_after(lease.ttl):
                await self._load_changed.wait()
            self._load_changed = trio.Event()
            try:
                await self._members.register_node(self.info(), lease.id)
            except EtcdError as exc:
                log.warning("could not update registration", extra={"error": str(exc)})

    async def _publish_stats(self, lease: Lease) -> None:
        """Every STATS_INTERVAL the node's registration (its counters), and as often as
        STATS_BYTES_PER_SECOND allows the live stats of every session, for `parley status`."""
        assert self._members is not None
        next_stats = 0.0
        failing = False
        while True:
            await trio.sleep(STATS_INTERVAL)
            if self.stats_source is None:
                continue
            try:
                if trio.current_time() >= next_stats:
                    stats = await self.stats_source()
                    size = await self._members.publish_stats(self.id, stats, lease.id)
                    next_stats = trio.current_time() + size / STATS_BYTES_PER_SECOND
                if self.counters_source is not None:
                    await self._members.register_node(self.info(), lease.id)
                failing = False
            except EtcdError as exc:
                # once per run of failures: a stall says so elsewhere, a refused value here
                (log.debug if failing else log.warning)("could not publish stats: %s", exc)
                failing = True

    async def _drain(self, lease: Lease) -> None:
        """Graceful stop: mark draining, release every session, deregister."""
        assert self._members is not None
        self.state = "draining"
        log.info("node draining", extra={"node": self.id, "sessions": len(self.sessions)})
        try:
            await self._members.register_node(self.info(), lease.id)
        except EtcdError as exc:
            log.warning("could not publish draining state", extra={"error": str(exc)})
        # Sessions move to other nodes when there are any (SIGTERM from an orchestrator, a
        # redeploy: calls go on); whatever could not move stops below.
        if self._mover is not None and self.sessions:
            left = await self._mover.drain(DRAIN_WITHIN)
            log.info("node drained", extra={"node": self.id, "not_moved": left})
        # Stop in reverse order of arrival, like a supervisor stops its children; each client
        # hears why before its session goes.
        for session in reversed(list(self.sessions)):
            if self._clients is not None:
                await self._clients.stop_session(
                    session, "node_stopping", f"node {self.id} is stopping"
                )
            else:
                await self.end_session(session)
        try:
            await self._members.deregister_node(self.id)
        except EtcdError as exc:
            log.warning("could not deregister", extra={"error": str(exc)})

    async def _revoke(self) -> None:
        lease, self._lease = self._lease, None
        if lease is None or self._etcd is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(self._etcd.timeout):
            try:
                await self._etcd.lease_revoke(lease.id)
            except EtcdError as exc:
                log.warning("could not revoke lease", extra={"error": str(exc)})
