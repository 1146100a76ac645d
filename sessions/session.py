"""The session actor: Trio glue around one sans-I/O :class:`Transceiver`.

It owns the session's crypto and audio state. Datagrams arrive in its inbox (from the node's media
port today, from relay tunnels later), timers come from the core, and what the core wants sent
goes out through the packet path in one batch per wake-up.

The node's tick (``tick``, ``node.media_tick_ms``): once media flows (SRTP keyed, a pair
nominated), the media loop no longer wakes for each datagram nor at its own timers, but at the
first point of a grid shared by every session of the node (multiples of ``tick`` on Trio's
clock) at or after the core's timer; it takes what arrived since, each datagram timed from its
arrival (stamped by the packet path), then plays out, runs the agent and sends. Every session
of the node then wakes on the same scheduler turn (one sleeper wakes them all, sessions/grid.py)
and sends together, so a tunnel packs their frames into few QUIC packets, and a session costs
one wake-up per frame instead of three (inbound packet, playout, pacer); its talkspurts are paced
on the grid too, one frame a tick. Measured: about a fifth less node and relay CPU per echoed
packet (README, Benchmarks). The price: playout and replies up to one tick later than their own
times. Setup (ICE, DTLS) is never held back: every datagram is answered as it comes.

Checkpoints: when the core asks (``CheckpointDue``), the actor takes a snapshot, hands it to the
node's checkpoint store, and only then confirms it to the core (SRTP refuses to send past an
unconfirmed reservation, so an index is never used twice). If the actor crashes, its supervisor
restarts it from the last stored snapshot, not from zero: the client notices nothing but a gap.

Planned moves, as the node daemon drives them (messages, each answered):

* ``("quiesce",)``: the core stops at a frame boundary (:meth:`Transceiver.quiesce`); the reply
  is :class:`Quiesced` (the exact snapshot's bytes and the wall-clock time of the quiesce), or
  a :class:`~sessions.transceiver.MoveRefused` (returned, not raised). From then on the media
  loop neither touches the core nor sends anything: it keeps what arrives, raw and in order, up
  to ``max_buffered`` datagrams (more are counted in :attr:`SessionActor.buffer_overflow` and
  lost). No checkpoint is taken. Asking again returns the same reply.
* ``("resume",)``: the move was abandoned; what was kept is fed to the core in order and the
  session goes on (:meth:`Transceiver.resume`). Replies ``True``.
* ``("hand_off",)``: the move succeeded; the reply is the kept datagrams (a list of
  ``(bytes, PeerAddress)``, oldest first, including what is still in the inbox) for the new
  owner, and the actor finishes *without* ``session_ended`` and without ``on_end``: the session
  lives on elsewhere, and the node tells the client.
* ``("kept",)``: a copy of what a quiesced session kept so far (nothing changes).
* ``("moved", from_node, to_node, epoch)``: on the new node, once the move is final; passed to a
  :class:`~sessions.agents.MoveAwareAgent` (the bridge tells the external agent).

Stalls of the node's etcd lease (storage/lease.py), as the node drives them:

* ``("stall",)``: the node may no longer act for the session (its lease's safety deadline
  passed) but the lease may well be alive. The core is frozen at once, without handling what
  fell due (:meth:`Transceiver.hold`; a session not connected yet is just held), what arrives
  is kept, nothing is processed or sent, and the state stays. Replies ``True``. A move cannot
  start while stalled (``stalled``). An actor given ``may_act`` does this by itself the moment
  it finds it false, before it touches another datagram or timer.
* ``("unstall",)``: the lease turned out alive; the session goes on exactly as after an
  abandoned move (same epoch, the kept datagrams fed in order). A move's own quiesce, if one
  is pending, still holds it. Replies ``True``.

The new node builds its actor with ``arrival=Arrival(snapshot, quiesced_at)``: it continues the
exact snapshot (:meth:`Transceiver.restore`) when it starts, with the wall time elapsed since
the quiesce as the blackout.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, final

import attrs
import trio

from actors import Actor
from sessions.agents import Agent, EchoAgent, MoveAwareAgent, RunningAgent
from sessions.audio.opus import VoiceCodec
from sessions.grid import Rest, Step, grid_index, ride
from sessions.ports import INBOX_SIZE, Datagram, Inbound, PeerAddress, SessionPort
from sessions.snapshot import SessionSnapshot
from sessions.transceiver import (
    CODE_NOT_QUIESCED,
    CODE_STALLED,
    CheckpointDue,
    ClientEvent,
    DtlsConnected,
    IceConnected,
    MediaStarted,
    MoveRefused,
    SessionClosed,
    SessionFailed,
    Transceiver,
)
from sessions.turns import SpeechClassifier, TurnConfig
from sessions.webrtc.certs import Certificate

__all__ = [
    "MAX_BUFFERED",
    "Arrival",
    "EventSink",
    "Quiesced",
    "SessionActor",
    "handle_due_timers",
]

log = logging.getLogger("parley.session")

#: events are plain JSON-ready dicts; the signaling layer forwards them to the client
EventSink = Callable[[dict[str, Any]], None]

#: datagrams a quiesced session keeps for its next owner (10 s of one client's audio)
MAX_BUFFERED: Final = 512


@final
@attrs.frozen
class Quiesced:
    """The reply to ``("quiesce",)``: the exact snapshot and when it was taken."""

    #: :meth:`SessionSnapshot.to_bytes` of the exact snapshot: key material, store it sealed
    snapshot: bytes = attrs.field(repr=False)
    #: wall-clock time (``time.time()``) of the quiesce: the next owner's blackout starts here
    at: float


@final
@attrs.frozen
class Arrival:
    """A session arriving from another node in a planned move: its exact snapshot and the
    wall-clock time of the quiesce there (:attr:`Quiesced.at`)."""

    snapshot: SessionSnapshot = attrs.field(repr=False)
    quiesced_at: float


#: times a grid step handles the core's timers that are due at its point (a played-out frame
#: may start a talkspurt due at once; never more than a few)
_PASSES: Final = 4


def handle_due_timers(core: Transceiver, now: float, tick: float, *, send: bool = True) -> None:
    """A grid step's timers: what is due at the grid point ``now`` (a multiple of ``tick``),
    then what that made due at once too, at most _PASSES times. With ``send`` false the frames
    are left for ``core.send_due`` (see ``Transceiver.handle_timer``)."""
    for _ in range(_PASSES):
        timer = core.get_timer()
        if timer is None or now < grid_index(timer, tick) * tick:
            break
        # at most GRID_SLACK ahead of the clock: a timer a rounding after its point
        core.handle_timer(max(now, timer), send=send)


def _near(point: int, tick: float) -> bool:
    """Whether grid point ``point`` is the next or the one after: a session whose timer is
    that near stays on the grid; one with nothing due for longer waits for its datagrams."""
    return point <= grid_index(trio.current_time(), tick) + 1


def _is_rtp(data: bytes) -> bool:
    """SRTP media, as opposed to SRTCP (RFC 7983 first byte, RFC 5761 payload type range)."""
    return len(data) > 1 and 128 <= data[0] <= 191 and not 192 <= data[1] <= 223


@final
class SessionActor(Actor):
    """One voice session. Built by a factory the node gives its session supervisor."""

    mailbox_size = 16

    def __init__(
        self,
        session_id: str,
        *,
        port: SessionPort,
        certificate: Certificate,
        core: Transceiver | None,
        restore_from: Callable[[], SessionSnapshot | None],
        store: Callable[[SessionSnapshot], None],
        events: EventSink,
        on_end: Callable[[str, str], None],
        agent: Agent | None = None,
        make_agent: Callable[[], Agent] = EchoAgent,
        turn_config: TurnConfig | None = None,
        make_vad: Callable[[], SpeechClassifier] | None = None,
        codec: VoiceCodec | None = None,
        arrival: Arrival | None = None,
        max_buffered: int = MAX_BUFFERED,
        persist: Callable[[SessionSnapshot], Awaitable[bool]] | None = None,
        on_core: Callable[[Transceiver], None] | None = None,
        may_act: Callable[[], bool] | None = None,
        tick: float = 0.0,
    ) -> None:
        super().__init__(session_id)
        if tick < 0:
            raise ValueError(f"tick must be >= 0 seconds, not {tick}")
        #: the node's media tick, seconds (0: none; see the module docstring)
        self._tick = tick
        #: asked before every step of the media loop: False once the node may no longer act
        #: for the session (its lease's safety deadline passed); the actor then holds itself
        #: at once, as ``("stall",)`` would, without waiting for the node to say so
        self._may_act = may_act
        #: told each core this actor runs (the node publishes its media ledger)
        self._on_core = on_core
        self.session_id = session_id
        self.port = port
        self.certificate = certificate
        self._core = core
        self._restore_from = restore_from
        self._store = store
        #: makes a checkpoint durable beyond this process (etcd, sealed); True once it is. With
        #: it, a checkpoint is confirmed to the core only when durable (crash failover)
        self._persist = persist
        self._persisting = False
        self.checkpoints_persisted = 0
        self.checkpoints_failed = 0
        self._events = events
        self._on_end = on_end
        self._agent = agent
        self._make_agent = make_agent
        self._turn_config = turn_config
        #: a fresh voice activity detector for each core (None: the turn detector's default)
        self._make_vad = make_vad
        #: how each core encodes what the agent says (None: the encoder's defaults)
        self._codec = codec
        self._arrival = arrival
        self.restored = False
        #: seconds from the quiesce on the old node to this actor's restore (a moved session)
        self.blackout: float | None = None
        # A planned move: paused (quiesced), with what arrived meanwhile.
        self._max_buffered = max_buffered
        self._quiesced: Quiesced | None = None
        #: paused because the node's lease stalled (see the module docstring)
        self._stalled = False
        #: the core is quiesced and nothing but a stall or a move's quiesce holds it
        self._held = False
        self._buffer: list[Datagram] = []
        #: datagrams lost while quiesced because ``max_buffered`` were already kept
        self.buffer_overflow = 0
        self._wake: trio.CancelScope | None = None
        self._over = False
        self._looping = False  # the media loop runs
        self._handing_off: trio.Event | None = None  # set by the loop once it let go

    @property
    def core(self) -> Transceiver:
        assert self._core is not None
        return self._core

    @property
    def paused(self) -> bool:
        """Quiesced for a planned move, or held through a lease stall: the core is untouched,
        datagrams are kept."""
        return self._quiesced is not None or self._stalled

    @property
    def buffered(self) -> int:
        """Datagrams kept since the quiesce."""
        return len(self._buffer)

    async def on_start(self) -> None:
        now = trio.current_time()
        if self._core is None and self._arrival is not None:
            arrival, self._arrival = self._arrival, None
            self._agent = self._agent if self._agent is not None else self._make_agent()
            # The wall clocks of two nodes agree closely enough (NTP) for a blackout of
            # milliseconds; a clock behind ours makes it 0, never negative.
            self.blackout = max(0.0, time.time() - arrival.quiesced_at)
            self._core = Transceiver.restore(
                arrival.snapshot,
                certificate=self.certificate,
                now=now,
                agent=self._agent,
                turn_config=self._turn_config,
                vad=None if self._make_vad is None else self._make_vad(),
                codec=self._codec,
                elapsed=self.blackout,
            )
            self.restored = True
            log.debug(
                "session continued from its exact snapshot",
                extra={"session": self.session_id, "blackout_ms": round(self.blackout * 1000, 1)},
            )
        elif self._core is None:
            snapshot = self._restore_from()
            if snapshot is None:
                # It crashed before its first checkpoint (before DTLS completed): there is no
                # state to continue, so the session ends instead of restarting forever.
                self._end("crashed before its first checkpoint", "internal")
                self.stop()
                return
            self._agent = self._make_agent()
            self._core = Transceiver.restore(
                # A crash restore must start above the reservation, whatever was stored.
                snapshot.as_checkpoint() if snapshot.exact else snapshot,
                certificate=self.certificate,
                now=now,
                agent=self._agent,
                turn_config=self._turn_config,
                vad=None if self._make_vad is None else self._make_vad(),
                codec=self._codec,
                elapsed=max(0.0, time.time() - snapshot.taken_at) if snapshot.taken_at else None,
            )
            self.restored = True
            stale = self._shed_backlog()
            log.info(
                "session restored from snapshot",
                extra={"session": self.session_id, "stale_rtp_dropped": stale},
            )
        if self._on_core is not None:
            self._on_core(self.core)
        self.nursery.start_soon(self._media_loop)
        # Agents with a connection of their own (the WebSocket bridge) run it beside the media.
        if isinstance(self._agent, RunningAgent):
            await self.nursery.start(self._agent.run)

    def _shed_backlog(self, keep: int = 3) -> int:
        """Drop the client audio that queued up while the actor was down, but its newest.

        A fresh jitter buffer fed a burst of stale RTP raises its delay to the maximum and then
        takes seconds to shed it one packet at a time; playing the gap as a gap is better.
        STUN and RTCP are kept. Returns how many RTP datagrams were dropped.
        """
        backlog: list[Inbound] = []
        while True:
            try:
                backlog.append(self.port.inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        media = [i for i, (data, _, _) in enumerate(backlog) if _is_rtp(data)]
        drop = set(media[:-keep]) if len(media) > keep else set()
        for i, item in enumerate(backlog):
            if i not in drop:
                self.port.inbox_send.send_nowait(item)
        return len(drop)

    async def receive(self, message: object) -> object:
        if message == "stats":
            return self.core.stats()
        if message == "close":
            self.core.close(trio.current_time())  # silent if quiesced: nothing is sent
            self._quiesced = None
            self._stalled = self._held = False
            self._buffer.clear()
            self._flush()
            self._wake_loop()  # the loop reports the end
            return True
        if message == ("quiesce",):
            return self._quiesce()
        if message == ("resume",):
            return self._resume()
        if message == ("stall",):
            return self._stall()
        if message == ("unstall",):
            return self._unstall()
        if message == ("hand_off",):
            return await self._hand_off()
        if message == ("kept",):
            # A copy of what a quiesced session kept so far (the node forwards it to the next
            # owner ahead of the switch; resume would still feed it here).
            if self._quiesced is None:
                return MoveRefused(CODE_NOT_QUIESCED, "the session is not quiesced")
            self._drain_inbox()
            return list(self._buffer)
        if isinstance(message, tuple) and len(message) == 4 and message[0] == "moved":
            _, from_node, to_node, epoch = message
            if isinstance(self._agent, MoveAwareAgent):
                self._agent.moved_in(from_node=from_node, to_node=to_node, epoch=epoch)
            return True
        raise ValueError(f"unknown message {message!r}")

    # --- a planned move -----------------------------------------------------------------------

    def _quiesce(self) -> Quiesced | MoveRefused:
        if self._quiesced is not None:
            return self._quiesced  # asked again (a retry): the same answer
        if self._stalled:
            return MoveRefused(CODE_STALLED, "the node's lease is stalled")
        try:
            snapshot = self.core.quiesce(trio.current_time())
        except MoveRefused as refused:
            # What was due went out; an ending it brought is the loop's to report.
            self._flush()
            self._wake_loop()
            return refused
        at = time.time()
        self._quiesced = Quiesced(attrs.evolve(snapshot, taken_at=at).to_bytes(), at)
        # The last frame, and the client's last events from here (no checkpoint: quiesced).
        self._flush()
        self._handle_events()
        self._wake_loop()
        log.info("session quiesced", extra={"session": self.session_id})
        return self._quiesced

    def _resume(self) -> bool | MoveRefused:
        if self._quiesced is None:
            return MoveRefused(CODE_NOT_QUIESCED, "the session is not quiesced")
        self._quiesced = None
        self._held = True
        if not self._stalled:  # a stall still holds it otherwise; its end resumes it
            self._release()
        return True

    def _stall(self) -> bool:
        if self._stalled:
            return True
        self._stalled = True
        if self._quiesced is None:
            try:
                # At once: what fell due after the deadline is not for this node to handle.
                self.core.hold(trio.current_time())
                self._held = True
            except MoveRefused:
                pass  # not connected yet (or ending): only held, nothing to freeze
            self._handle_events()
        self._wake_loop()
        log.warning("session held: the node's lease stalled", extra={"session": self.session_id})
        return True

    def _unstall(self) -> bool:
        if not self._stalled:
            return True
        self._stalled = False
        if self._quiesced is None:
            self._release()
        return True

    def _release(self) -> None:
        """Go on after a pause: resume the core if the pause froze it, feed what was kept."""
        now = trio.current_time()
        core = self.core
        if self._held:
            core.resume(now)
            self._held = False
        kept, self._buffer = self._buffer, []
        for data, addr in kept:
            core.receive(data, addr, now)
        self._flush()
        self._handle_events()
        self._wake_loop()
        log.info(
            "session resumed",
            extra={"session": self.session_id, "fed": len(kept), "lost": self.buffer_overflow},
        )

    async def _hand_off(self) -> list[Datagram] | MoveRefused:
        if self._quiesced is None:
            return MoveRefused(CODE_NOT_QUIESCED, "the session is not quiesced")
        if self._looping:
            # The media loop lets go itself: a datagram the inbox already handed to it (Trio
            # passes a value straight to a waiting receiver) is kept before anything is taken.
            released = self._handing_off = trio.Event()
            self._wake_loop()
            await released.wait()
        self._drain_inbox()
        kept, self._buffer = self._buffer, []
        if isinstance(self._agent, MoveAwareAgent):
            self._agent.moved_out()
        lost = self.buffer_overflow
        log.info(
            "session handed off",
            extra={"session": self.session_id, "handed_on": len(kept), "lost": lost},
        )
        # The session lives on elsewhere: no session_ended, no on_end; the actor just ends.
        self._over = True
        self.stop()
        return kept

    def _drain_inbox(self) -> None:
        while True:
            try:
                data, addr, _ = self.port.inbox.receive_nowait()
                self._keep(data, addr)
            except (trio.WouldBlock, trio.EndOfChannel):
                return

    def _keep(self, data: bytes, addr: PeerAddress) -> None:
        if len(self._buffer) >= self._max_buffered:
            self.buffer_overflow += 1
            return
        self._buffer.append((data, addr))

    def _wake_loop(self) -> None:
        """Have the media loop look again: at the core's timer, the pause, the end."""
        if self._wake is not None:
            self._wake.cancel()

    # --- media --------------------------------------------------------------------------------

    async def _media_loop(self) -> None:
        self._looping = True
        try:
            await self._serve_media()
        finally:
            self._looping = False
            if self._handing_off is not None:
                self._handing_off.set()

    async def _serve_media(self) -> None:
        inbox = self.port.inbox
        closed = False  # the inbox ended while quiesced: wait for a resume or a hand-off
        tick = self._tick
        gridded: Transceiver | None = None  # the core told it runs on the grid
        while not self._over and self._handing_off is None:
            core = self.core
            timer = None if self.paused else core.get_timer()
            # On the node's tick once media flows: the grid's runner does this session's work
            # at each grid point while this task sleeps (sessions/grid.py), taking what arrived
            # meanwhile then (see the module docstring); until then (ICE, DTLS) every datagram
            # is answered as it comes.
            on_grid = tick > 0 and timer is not None and core.media_ready and not closed
            wake_at = timer
            if on_grid:
                assert timer is not None
                if gridded is not core:
                    core.on_grid(tick)  # its frames leave on the grid, one a tick
                    gridded = core
                point = grid_index(timer, tick)
                if _near(point, tick):
                    with trio.CancelScope() as wake:
                        self._wake = wake
                        await ride(point, tick, self._grid_step(core, inbox))
                    self._wake = None
                    continue
                # Nothing due for a while (a silent client, a reactive agent): a datagram
                # wakes it, or the grid point of its timer; then it rides again.
                wake_at = point * tick
            with trio.CancelScope(deadline=math.inf if wake_at is None else wake_at) as wake:
                self._wake = wake
                if closed and self.paused:
                    await trio.sleep_forever()
                try:
                    data, addr, at = await inbox.receive()
                except trio.EndOfChannel:
                    if not self.paused:
                        self._end("media path closed", "closed")
                        return
                    closed = True
                    continue
                self._guard()
                self._take(data, addr, at)
            self._wake = None
            # Take whatever else is already queued before sending: one flush per batch.
            if not closed and not self._take_queued(inbox):
                return
            self._guard()
            if self.paused or self._over or self._handing_off is not None:
                continue
            now = trio.current_time()
            timer = core.get_timer()
            if timer is not None and now >= (grid_index(timer, tick) * tick if on_grid else timer):
                core.handle_timer(max(now, timer))  # ahead by GRID_SLACK at most
            self._flush()
            self._handle_events()

    def _grid_step(self, core: Transceiver, inbox: trio.MemoryReceiveChannel[Inbound]) -> Step:
        """The session's work at a point of the node's grid, run by the grid (see ``ride``):
        what arrived since the last point and the core's timers; then, once every session of
        the point has done as much (see sessions/grid.py), the encoding and sending of its
        frames, and its events. The next grid point it wants, or None when this task must
        take over again."""
        tick = self._tick

        def step(now: float) -> Rest | None:
            if not self._take_queued(inbox):
                return None  # it ended: the inbox closed
            self._guard()
            if not self._riding(core):
                return None
            handle_due_timers(core, now, tick, send=False)
            return finish

        def finish() -> int | None:
            core.send_due(trio.current_time())  # when they leave: after the others' steps
            self._flush()
            self._handle_events()
            if not self._riding(core) or not core.media_ready:
                return None
            timer = core.get_timer()
            if timer is None:
                return None
            point = grid_index(timer, tick)
            return point if _near(point, tick) else None  # far: its task waits for datagrams

        return step

    def _riding(self, core: Transceiver) -> bool:
        """Whether the grid may go on serving ``core`` for this actor, without its task."""
        return not (
            self.paused or self._over or self._handing_off is not None or self._core is not core
        )

    def _take_queued(self, inbox: trio.MemoryReceiveChannel[Inbound]) -> bool:
        """Take what the inbox holds now; False if the session ended because it closed."""
        for _ in range(INBOX_SIZE):
            try:
                data, addr, at = inbox.receive_nowait()
            except trio.WouldBlock:
                break
            except trio.EndOfChannel:
                if not self.paused and not self._over:
                    self._end("media path closed", "closed")
                    return False
                break
            self._guard()
            self._take(data, addr, at)
        return True

    def _guard(self) -> None:
        """Hold the session at once if the node may no longer act for it."""
        if not self._stalled and self._may_act is not None and not self._may_act():
            self._stall()

    def _take(self, data: bytes, addr: PeerAddress, at: float) -> None:
        if self.paused:
            self._keep(data, addr)
        else:
            self.core.receive(data, addr, at)

    def _flush(self) -> None:
        send = self.port.send
        out = self.core.datagrams_to_send()
        for data, addr in out:
            send(data, addr)
        if out:
            self.port.flush()

    async def _confirm_when_durable(self, core: Transceiver, snapshot: SessionSnapshot) -> None:
        assert self._persist is not None
        try:
            durable = await self._persist(snapshot)
        finally:
            self._persisting = False
        # Not if the session was quiesced, handed off or restarted meanwhile: the core that
        # asked must be the one that runs.
        if durable and self._core is core and not core.quiesced and not self._over:
            core.confirm(snapshot)
            self.checkpoints_persisted += 1
        elif not durable:
            self.checkpoints_failed += 1

    def _handle_events(self) -> None:
        """Act on the core's events; the session is over once one says so."""
        core = self.core
        while not self._over and (event := core.next_event()) is not None:
            match event:
                case CheckpointDue():
                    if core.quiesced:
                        continue  # the exact snapshot is this node's last word
                    # Stamped with the wall clock (the core has none): a crash restore from it
                    # keeps the stream's timestamp in pace with real time.
                    snapshot = attrs.evolve(
                        core.snapshot(trio.current_time()), taken_at=time.time()
                    )
                    self._store(snapshot)
                    if self._persist is None:
                        core.confirm(snapshot)
                    elif not self._persisting:
                        # Confirmed once it is durable elsewhere (the reservation it makes is
                        # what a node that adopts the session after a crash starts above);
                        # the media loop goes on meanwhile, within the confirmed reservation.
                        self._persisting = True
                        self.nursery.start_soon(self._confirm_when_durable, core, snapshot)
                case IceConnected(addr=addr):
                    via = {"relay": addr.relay} if addr.relay else {}
                    self._emit("ice_connected", address=f"{addr.host}:{addr.port}", **via)
                case DtlsConnected(profile=profile):
                    self._emit("dtls_connected", profile=str(profile))
                case MediaStarted():
                    self._emit("media_started")
                case ClientEvent(name=name, at=at, fields=fields):
                    # The core's clock is Trio's; the client wants wall-clock time.
                    wall = time.time() - (trio.current_time() - at)
                    self._emit(name, at=round(wall, 3), **fields)
                case SessionFailed(reason=reason, code=code):
                    self._end(reason, code)
                case SessionClosed(reason=reason):
                    self._end(reason, "closed")

    def _emit(self, name: str, **fields: Any) -> None:
        self._events({"type": "event", "event": name, "ts": time.time(), **fields})

    def _end(self, reason: str, code: str) -> None:
        self._over = True
        log.info("session over", extra={"session": self.session_id, "reason": reason, "code": code})
        self._emit("session_ended", reason=reason, code=code)
        self._on_end(self.session_id, reason)
