"""Where signaling meets the node: offers become owned, supervised session actors.

:class:`NodeSessions` is the signaling server's backend. For each offer it builds a transceiver
(which parses the offer and writes the answer), routes the session's ICE ufrag on the media port,
claims the session in etcd and starts its actor under the node's session supervisor. When the
session ends — the client closes its socket, a WHIP DELETE, consent expiry, a DTLS failure — it
stops the actor, releases ownership and unroutes the ufrag.

Snapshots the actors checkpoint are kept here, so a crashed session actor restarts from its last
snapshot instead of from zero.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable
from typing import Any, Literal, final

import trio

from actors import Actor
from sessions.agents import Agent
from sessions.node.agents import make_agent, session_vad, turn_config, voice_codec
from sessions.node.daemon import Node, NodeRefused
from sessions.node.ledger import LedgerWriter
from sessions.node.metrics import SessionTally
from sessions.node.moves import MoveRefused
from sessions.node.regions import first_hop
from sessions.node.relayed import RelayedMedia
from sessions.node.signaling import (
    REATTACH,
    Redirect,
    SessionHandle,
    SignalingRefused,
    SignalingServer,
)
from sessions.ports import PacketPath, SessionPort
from sessions.session import Arrival, Quiesced, SessionActor
from sessions.transceiver import SessionSnapshot, Transceiver
from sessions.transceiver.handover import MoveRefused as CoreMoveRefused
from sessions.webrtc.certs import Certificate, generate_certificate
from storage.checkpoints import (
    HEADER_SIZE,
    TAG_SIZE,
    CheckpointError,
    Checkpoints,
    Sealer,
    pack_record,
    unpack_record,
)
from storage.etcd import EtcdError
from storage.moves import Moves
from storage.ownership import AlreadyOwned, Ownership, StaleEpoch

log = logging.getLogger("parley.host")

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
EVENT_BUFFER = 64
#: WebSocket close code for a session the node ends because it is going away (RFC 6455 §7.4.1)
GOING_AWAY = 1001
#: how long a stopping node waits for signaling to deliver its sessions' last events
WIND_DOWN = 2.0
#: how long a DELETE that reached another node waits for the owner to end the session
REMOTE_END_WITHIN = 3.0
#: how long a session actor has to answer the mover
ASK_WITHIN = 2.0
#: how long a checkpoint write to etcd may take before the session asks again later
PERSIST_WITHIN = 2.0
#: how long a node that lost its lease follows its sessions to whoever adopts them (an expired
#: lease's sessions are adopted about a stagger after etcd answers again)
FOLLOW_LOST_WITHIN = 30.0
#: how often it looks (one read of every owner)
FOLLOW_POLL = 0.5


def control_hash(secret: str) -> str:
    """What the owner record keeps of a session's control secret (SHA-256, hex): enough for any
    node to check a client's secret, useless to whoever reads etcd."""
    return hashlib.sha256(secret.encode()).hexdigest()


def check_secret(secret: str, control: str) -> None:
    """Raise ``forbidden`` unless ``secret`` is the session's (constant-time comparison)."""
    if not control or not hmac.compare_digest(control_hash(secret), control):
        raise SignalingRefused("forbidden", "not this session's secret")


def _recovering() -> SignalingRefused:
    """An attach to a session whose node died and that is about to be resumed: try again."""
    return SignalingRefused(
        "session_recovering", "the session's node died; it is being resumed elsewhere"
    )


def new_session_id() -> str:
    """20 base32 characters: 100 random bits, and a valid etcd key segment."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(20))


@final
class NodeSessions:
    """The signaling backend of one node. Start ``run`` before serving signaling."""

    def __init__(
        self, node: Node, media: PacketPath, certificate: Certificate | None = None
    ) -> None:
        self.node = node
        self.media = media
        # One DTLS certificate per node process (RFC 8827 §6.5 allows reuse across sessions);
        # its fingerprint goes into every answer.
        self.certificate = certificate or generate_certificate()
        self.snapshots: dict[str, SessionSnapshot] = {}
        self._events: dict[str, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._ending_send, self._ending = trio.open_memory_channel[tuple[str, str]](1024)
        self.events_dropped = 0
        #: the signaling server serving these sessions (set by run_frontend)
        self.server: SignalingServer | None = None
        #: seals checkpoints kept in etcd (None: checkpoints stay in this process)
        self.sealer: Sealer | None = None
        #: publishes what each session's cores processed (node.ledger_dir; None: off)
        self.ledger: LedgerWriter | None = None
        #: checkpoints made durable in etcd, their sealed bytes, and those that were not
        self.counters: dict[str, int] = dict.fromkeys(
            ("checkpoints_stored", "checkpoint_bytes", "checkpoints_failed"), 0
        )
        #: what the sessions' cores and events counted, for the ops port
        self.tally = SessionTally(hop=media.hop, region=node.config.node.region)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """End sessions that end themselves (their actor calls back synchronously)."""
        task_status.started()
        async for session_id, reason in self._ending:
            await self.close_session(session_id, reason)

    async def open_session(
        self,
        offer_sdp: str,
        *,
        transport: Literal["websocket", "http"],
        region: str | None = None,
    ) -> SessionHandle:
        session_id = new_session_id()
        now = trio.current_time()
        # the client's region when known, else this node's (sessions/node/regions.py)
        candidates = self.media.candidates(session_id, region or self.node.config.node.region)
        if not candidates:
            raise SignalingRefused("no_relay", "no relay of the cluster is reachable; retry")
        agent = make_agent(self.node.config, session_id)
        # SdpError (with the signaling error code) propagates to the signaling layer.
        core, answer = Transceiver.accept(
            offer_sdp,
            session_id=session_id,
            certificate=self.certificate,
            candidates=candidates,
            now=now,
            agent=agent,
            turn_config=turn_config(self.node.config),
            vad=session_vad(self.node.config),
            codec=voice_codec(self.node.config),
            ufrag=self.media.mint_ufrag(session_id),
        )
        port = self.media.register(session_id, core.local_ufrag)
        send_events, events = trio.open_memory_channel[dict[str, Any]](EVENT_BUFFER)
        self._events[session_id] = send_events
        first_core: list[Transceiver] = [core]

        def factory() -> SessionActor:
            # The first incarnation runs the core that wrote the answer (and its agent); a
            # restart after a crash continues from the last checkpoint with a fresh agent.
            first = first_core.pop() if first_core else None
            return self._actor(
                session_id, port, core=first, agent=agent if first is not None else None
            )

        secret = secrets.token_urlsafe(32)
        try:
            await self.node.host_session(session_id, factory, control=control_hash(secret))
        except NodeRefused as exc:
            self._forget(session_id)
            raise SignalingRefused(exc.code, str(exc)) from None
        except AlreadyOwned:
            self._forget(session_id)
            raise SignalingRefused("internal", "session id collision; retry") from None
        except BaseException:
            self._forget(session_id)
            raise
        self.tally.offered(session_id, now)
        log.info("session opened", extra={"session": session_id, "transport": transport})
        return SessionHandle(session_id=session_id, answer_sdp=answer, events=events, secret=secret)

    # -- session control from any node (the client's secret) ---------------------------------

    async def attach_session(self, session_id: str, secret: str) -> SessionHandle | Redirect:
        """A new signaling socket for a live session: its events from now on if it runs here, a
        redirect to the node that runs it otherwise."""
        hosted = self.node.sessions.get(session_id)
        if hosted is not None:
            check_secret(secret, hosted.control)
            previous = self._events.pop(session_id, None)
            if previous is not None:  # one socket per session: the newest wins
                with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                    previous.send_nowait({"event": "session_attached_elsewhere"})
                previous.close()
            send_events, events = trio.open_memory_channel[dict[str, Any]](EVENT_BUFFER)
            self._events[session_id] = send_events
            log.info("session attached", extra={"session": session_id})
            return SessionHandle(session_id=session_id, answer_sdp="", events=events, secret=secret)
        owner = await self._recovering_or_owner(session_id, secret)
        check_secret(secret, owner.control)
        if owner.node == self.node.id:
            # an owner key of this node's previous process: it died, its lease has not run out
            # yet, and then another node (or this one) adopts the session
            raise _recovering()
        url = await self._signaling_url(owner.node)
        if url is None:
            raise SignalingRefused("internal", f"node {owner.node} publishes no signaling URL")
        return Redirect(node=owner.node, url=url)

    async def end_session_by_secret(self, session_id: str, secret: str) -> bool:
        """WHIP DELETE on any node: end the session wherever it runs (True once it is gone)."""
        hosted = self.node.sessions.get(session_id)
        if hosted is not None:
            check_secret(secret, hosted.control)
            return await self.close_session(session_id, "deleted")
        owner = await self._owner(session_id)
        check_secret(secret, owner.control)
        etcd = self.node.etcd
        if etcd is None:
            raise SignalingRefused("no_lease", f"node {self.node.id} is not connected to etcd")
        moves = Moves(etcd, self.node.keys)
        try:
            if await moves.request_end(session_id) is None:
                return False
            # The owner watches end requests; its release removes the owner key.
            for _ in range(int(REMOTE_END_WITHIN / 0.05)):
                if await self.node.owner_of(session_id) is None:
                    return True
                await trio.sleep(0.05)
        except EtcdError as exc:
            raise SignalingRefused("internal", f"etcd did not answer: {exc}") from None
        raise SignalingRefused("timeout", f"node {owner.node} did not end the session in time")

    # -- planned moves (sessions/node/moves.py MoveHost) ---------------------------------------

    async def _ask(self, session_id: str, message: object) -> object:
        try:
            actor = self.node.registry.lookup(session_id)
        except LookupError:
            raise MoveRefused("ended", f"session {session_id} has no running actor") from None
        return await actor.ask(message, timeout=ASK_WITHIN)

    async def quiesce(self, session_id: str) -> tuple[bytes, float]:
        reply = await self._ask(session_id, ("quiesce",))
        if isinstance(reply, CoreMoveRefused):
            raise MoveRefused(reply.code, reply.reason)
        if not isinstance(reply, Quiesced):
            raise MoveRefused("internal", f"unexpected reply to quiesce: {type(reply).__name__}")
        return reply.snapshot, reply.at

    async def forward(self, session_id: str, target: str, epoch: int) -> None:
        """The move's snapshot is ready: send what the session kept, and what comes, to
        ``target`` ahead of the switch, so that it arrives there in order."""
        if not isinstance(self.media, RelayedMedia):
            return
        kept = await self._ask(session_id, ("kept",))
        if isinstance(kept, list):
            self.media.tee(session_id, kept, target, epoch)

    async def resume(self, session_id: str) -> None:
        if isinstance(self.media, RelayedMedia):
            self.media.stop_tee(session_id)
        await self._ask(session_id, ("resume",))

    async def hand_over(self, session_id: str, target: str, epoch: int, url: str | None) -> None:
        """The session runs on ``target`` now: pass on what reached us, tell the client."""
        kept = await self._ask(session_id, ("hand_off",))
        if isinstance(kept, list) and isinstance(self.media, RelayedMedia):
            self.media.hand_on(session_id, kept, target, epoch)
        moved: dict[str, Any] = {"event": "session_moved", "node": target, "close_code": REATTACH}
        if url:
            moved["url"] = url
        self._emit(session_id, moved)
        channel = self._events.pop(session_id, None)
        if channel is not None:
            channel.close()
        if isinstance(self.media, RelayedMedia):
            self.media.moved(session_id, target, epoch)
        self._forget(session_id)

    async def restore(
        self, session_id: str, snapshot: bytes, quiesced_at: float
    ) -> Callable[[], Actor]:
        """Prepare a session moved here: its media route and the factory of its actor."""
        if not isinstance(self.media, RelayedMedia):
            raise MoveRefused("unsupported", "moves need relay mode (node.media = relay)")
        try:
            state = SessionSnapshot.from_bytes(snapshot)
        except ValueError as exc:
            raise MoveRefused("bad_snapshot", str(exc)) from None
        if state.session_id != session_id:
            raise MoveRefused("bad_snapshot", "the snapshot is another session's")
        port = self.media.register(session_id, state.ice.local_ufrag)
        arrival = Arrival(state, quiesced_at)

        def factory() -> SessionActor:
            # The first incarnation continues the exact snapshot (a crash after it restarts
            # from the newest checkpoint, like any session).
            return self._actor(session_id, port, arrival=arrival)

        return factory

    def discard(self, session_id: str) -> None:
        self._forget(session_id)

    # -- crash failover (sessions/node/failover.py AdoptionHost) ------------------------------

    def enable_checkpoints(self, sealer: Sealer) -> None:
        """Keep every session's checkpoints in etcd, sealed (the node can then adopt too)."""
        self.sealer = sealer

    async def _persist(self, session_id: str, snapshot: SessionSnapshot) -> bool:
        """Store ``snapshot`` sealed in etcd, fenced by the session's epoch; True once durable."""
        hosted, etcd = self.node.sessions.get(session_id), self.node.etcd
        if self.sealer is None or hosted is None or etcd is None:
            return False
        record = pack_record(hosted.control, snapshot.to_bytes())
        checkpoints = Checkpoints(etcd, self.node.keys, self.sealer)
        with trio.move_on_after(PERSIST_WITHIN):
            try:
                await checkpoints.store(session_id, hosted.epoch, record)
            except (StaleEpoch, EtcdError) as exc:
                log.warning("checkpoint not stored", extra={"session": session_id, "why": str(exc)})
                self.counters["checkpoints_failed"] += 1
                return False
            self.counters["checkpoints_stored"] += 1
            # what etcd keeps: the sealed record (a header and the GCM tag around it)
            self.counters["checkpoint_bytes"] += HEADER_SIZE + len(record) + TAG_SIZE
            return True
        self.counters["checkpoints_failed"] += 1
        return False

    async def restore_checkpoint(self, session_id: str, snapshot: bytes) -> Callable[[], Actor]:
        """Prepare a session adopted after its node died: restored above its reservation."""
        state = SessionSnapshot.from_bytes(snapshot)  # ValueError: the adopter counts it
        if state.session_id != session_id:
            raise ValueError("the checkpoint is another session's")
        self.snapshots[session_id] = state
        port = self.media.register(session_id, state.ice.local_ufrag)

        def factory() -> SessionActor:
            return self._actor(session_id, port)

        return factory

    def _actor(
        self,
        session_id: str,
        port: SessionPort,
        *,
        core: Transceiver | None = None,
        agent: Agent | None = None,
        arrival: Arrival | None = None,
    ) -> SessionActor:
        """A session's actor; with neither ``core`` nor ``arrival`` it continues from the newest
        checkpoint (a restart after a crash, here or on the node that died)."""
        return SessionActor(
            session_id,
            port=port,
            certificate=self.certificate,
            core=core,
            restore_from=lambda: self.snapshots.get(session_id),
            store=lambda snapshot: self._store(session_id, snapshot),
            events=lambda event: self._emit(session_id, event),
            on_end=self._ended,
            agent=agent,
            make_agent=lambda: make_agent(self.node.config, session_id),
            turn_config=turn_config(self.node.config),
            make_vad=lambda: session_vad(self.node.config),
            codec=voice_codec(self.node.config),
            arrival=arrival,
            persist=(
                (lambda snapshot: self._persist(session_id, snapshot))
                if self.sealer is not None
                else None
            ),
            on_core=lambda core: self._track(session_id, core),
            may_act=self.node.may_act,
            tick=self.node.config.node.media_tick_ms / 1000,
        )

    def _track(self, session_id: str, core: Transceiver) -> None:
        self.tally.track(session_id, core)
        hosted = self.node.sessions.get(session_id)
        if self.ledger is not None and hosted is not None:
            self.ledger.track(session_id, hosted.epoch, core.ledger)

    async def moved_in(self, session_id: str, source: str, epoch: int) -> None:
        """Tell a moved-in session's agent where it came from (the bridge tells its agent)."""
        with contextlib.suppress(Exception):  # best effort: the session runs either way
            await self._ask(session_id, ("moved", source, self.node.id, epoch))

    async def end_requested(self, session_id: str) -> None:
        """A client's DELETE reached another node: end the session here."""
        await self.close_session(session_id, "deleted")

    async def _owner(self, session_id: str) -> Ownership:
        try:
            owner = await self.node.owner_of(session_id)
        except EtcdError as exc:
            raise SignalingRefused("internal", f"etcd did not answer: {exc}") from None
        if owner is None:
            raise SignalingRefused("unknown_session", f"no live session {session_id}")
        return owner

    async def _recovering_or_owner(self, session_id: str, secret: str) -> Ownership:
        """The session's owner; if it has none but a checkpoint whose secret matches (its node
        died and the lease ran out: it is about to be adopted), ``session_recovering``, which
        tells a client to try again shortly. Else as :meth:`_owner`."""
        try:
            return await self._owner(session_id)
        except SignalingRefused as exc:
            if exc.code != "unknown_session" or self.sealer is None or self.node.etcd is None:
                raise
            try:
                loaded = await Checkpoints(self.node.etcd, self.node.keys, self.sealer).load(
                    session_id
                )
                control = None if loaded is None else unpack_record(loaded[0])[0]
            except (EtcdError, CheckpointError):
                control = None
            if control is None:
                raise
            check_secret(secret, control)
            raise _recovering() from None

    async def _signaling_url(self, node_id: str) -> str | None:
        members = self.node.members
        if members is None:
            return None
        try:
            member = await members.node(node_id)
        except EtcdError:
            return None
        return None if member is None else member.info.addresses.get("signaling")

    async def stop_session(self, session_id: str, code: str, reason: str) -> None:
        """The node ends this session (it is stopping): the client hears why first, and its
        socket closes with 1001 (going away) instead of 1000."""
        self._last_word(session_id, code, reason)
        await self.close_session(session_id, code)

    async def hold_sessions(self, sessions: list[str], reason: str) -> None:
        """The node's lease stalled: hold each session (state kept, nothing processed)."""
        for session_id in sessions:
            with contextlib.suppress(Exception):  # an actor gone meanwhile has nothing to hold
                await self._ask(session_id, ("stall",))
            self._emit(
                session_id, {"event": "session_paused", "code": "lease_stalled", "reason": reason}
            )

    async def release_sessions(self, sessions: list[str]) -> None:
        """The lease recovered: the held sessions go on at the same epoch."""
        for session_id in sessions:
            with contextlib.suppress(Exception):
                await self._ask(session_id, ("unstall",))
            self._emit(session_id, {"event": "session_resumed", "node": self.node.id})

    async def sessions_lost(self, sessions: list[str], code: str, reason: str) -> None:
        """The node lost its lease and the sessions' actors are gone. Each is adopted from its
        checkpoint by whichever node wins it (this one too, once it has a new lease): follow
        them, for up to :data:`FOLLOW_LOST_WITHIN` seconds, and tell each client where its session
        went (``session_moved``, re-attach) or that it goes on here (``session_resumed``); the
        rest hear ``session_ended`` with ``code``."""
        for session_id in sessions:
            # The event channel stays: if this node adopts the session, its events flow on.
            if self.ledger is not None:
                self.ledger.close(session_id)
            self.tally.forget(session_id)
            self.media.unregister(session_id)
            self.snapshots.pop(session_id, None)
            self._emit(session_id, {"event": "session_paused", "code": code, "reason": reason})
        pending = set(sessions)
        # Without checkpoints in etcd (no cluster key, or direct media) nothing can adopt them:
        # their clients hear it at once rather than after the follow
        with trio.move_on_after(FOLLOW_LOST_WITHIN if self.sealer is not None else 0):
            while pending:
                try:
                    owners = await self.node.owners()
                except EtcdError:
                    owners = []
                for owner in owners:
                    if owner.session not in pending:
                        continue
                    pending.discard(owner.session)
                    if owner.node == self.node.id:
                        self._emit(owner.session, {"event": "session_resumed", "node": owner.node})
                        continue
                    url = await self._signaling_url(owner.node)
                    moved: dict[str, Any] = {
                        "event": "session_moved",
                        "node": owner.node,
                        "close_code": REATTACH,
                    }
                    if url:
                        moved["url"] = url
                    self._emit(owner.session, moved)
                    channel = self._events.pop(owner.session, None)
                    if channel is not None:
                        channel.close()
                await trio.sleep(FOLLOW_POLL)
        for session_id in pending:
            if session_id not in self.node.sessions:
                self._last_word(session_id, code, reason)
                self._forget(session_id)

    async def wind_down(self) -> None:
        """A bounded moment for signaling to deliver the last events and close the sockets."""
        if self.server is not None:
            with trio.move_on_after(WIND_DOWN):
                await self.server.wind_down()

    def _last_word(self, session_id: str, code: str, reason: str) -> None:
        """Send ``session_ended`` and close the event stream, so that nothing the actor says
        while it stops (a ``closed`` of its own) follows it."""
        self._emit(
            session_id,
            {"event": "session_ended", "code": code, "reason": reason, "close_code": GOING_AWAY},
        )
        channel = self._events.pop(session_id, None)
        if channel is not None:
            channel.close()

    async def close_session(self, session_id: str, reason: str) -> bool:
        if session_id not in self.node.sessions:
            self._forget(session_id)
            return False
        with trio.move_on_after(1.0):
            try:
                actor = self.node.registry.lookup(session_id)
                await actor.ask("close", timeout=1.0)  # sends RTCP BYE and DTLS close_notify
            except Exception as exc:  # the actor may be gone or restarting; closing anyway
                log.debug("close of %s: %s", session_id, exc)
        await self.node.end_session(session_id)
        self._forget(session_id)
        log.info("session closed", extra={"session": session_id, "reason": reason})
        return True

    def _store(self, session_id: str, snapshot: SessionSnapshot) -> None:
        self.snapshots[session_id] = snapshot

    def _emit(self, session_id: str, event: dict[str, Any]) -> None:
        self.tally.event(session_id, event)
        channel = self._events.get(session_id)
        if channel is None:
            return
        try:
            channel.send_nowait(event)
        except trio.WouldBlock:
            self.events_dropped += 1  # a client that does not read its socket loses events
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _ended(self, session_id: str, reason: str) -> None:
        try:
            self._ending_send.send_nowait((session_id, reason))
        except trio.WouldBlock:
            log.error("session end queue full", extra={"session": session_id})

    def _forget(self, session_id: str) -> None:
        self.tally.forget(session_id)
        if self.ledger is not None:
            self.ledger.close(session_id)
        self.media.unregister(session_id)
        self.snapshots.pop(session_id, None)
        channel = self._events.pop(session_id, None)
        if channel is not None:
            channel.close()

    async def stats(self) -> dict[str, dict[str, Any]]:
        """Per-session stats from each live actor."""
        out: dict[str, dict[str, Any]] = {}
        for session_id in list(self.node.sessions):
            try:
                ref = self.node.registry.lookup(session_id)
                value = await ref.ask("stats", timeout=0.5)
            except Exception:  # stats are best effort; a busy or restarting actor is skipped
                continue
            if isinstance(value, dict):
                hosted = self.node.sessions.get(session_id)
                if hosted is not None and hosted.moves:
                    value["moves"] = hosted.moves
                    value["last_move_blackout_ms"] = hosted.last_blackout_ms
                value.update(first_hop(value, self.media.hop, self.node.config.node.region))
                out[session_id] = value
        return out
