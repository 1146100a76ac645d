"""The session actor's restart rules, under a real supervisor on Trio's MockClock, the
agents it runs beside the media, and its part in a planned move (quiesce, resume, hand-off,
arrival) against an in-process client."""

from __future__ import annotations

import itertools
import time
from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from actors import ActorRef, ChildSpec, Restart, Supervisor
from sessions.agents import EchoAgent, RunningAgent
from sessions.audio import speech
from sessions.audio.vad import Vad
from sessions.node.media import MediaPort
from sessions.ports import INBOX_SIZE, Inbound, PeerAddress, SessionPort
from sessions.session import Arrival, Quiesced, SessionActor
from sessions.snapshot import SessionSnapshot
from sessions.transceiver import MoveRefused, Transceiver
from sessions.turns import TurnEvent
from sessions.webrtc import rtp
from sessions.webrtc.certs import generate_certificate
from tests.sessions.test_transceiver import CLIENT_ADDR, Client, browser_offer, utterance


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_session_with_no_checkpoint_ends_instead_of_restarting_forever(
    autojump_clock: trio.testing.MockClock,
) -> None:
    port = MediaPort().register("s1", "ufrag1")
    ended: list[tuple[str, str]] = []
    events: list[dict[str, Any]] = []
    starts = 0

    def factory() -> SessionActor:
        nonlocal starts
        starts += 1
        return SessionActor(
            "s1",
            port=port,
            certificate=generate_certificate(),
            core=None,  # a restart: it must continue from a checkpoint, and there is none
            restore_from=lambda: None,
            store=lambda snapshot: None,
            events=events.append,
            on_end=lambda session, reason: ended.append((session, reason)),
        )

    supervisor = Supervisor("sessions")
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await supervisor.start_child(ChildSpec("s1", factory, restart=Restart.TRANSIENT))
        await trio.sleep(30)
        assert starts == 1
        assert supervisor.child_names() == []
        nursery.cancel_scope.cancel()
    assert ended == [("s1", "crashed before its first checkpoint")]
    assert [e["event"] for e in events] == ["session_ended"]
    assert events[0]["code"] == "internal"


class RunningEcho:
    """An echo with a task of its own beside the media, as the WebSocket bridge has."""

    interruptible = False

    def __init__(self) -> None:
        self.echo = EchoAgent()
        self.running = False
        self.cancelled = False

    def on_audio(self, pcm: bytes, now: float) -> None:
        self.echo.on_audio(pcm, now)

    def pull(self, now: float) -> bytes | None:
        return self.echo.pull(now)

    def on_turn(self, event: TurnEvent, now: float) -> None:
        self.echo.on_turn(event, now)

    def on_interrupted(self, played_ms: int, now: float) -> None:
        self.echo.on_interrupted(played_ms, now)

    def poll_events(self) -> list[dict[str, Any]]:
        return self.echo.poll_events()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.running = True
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled = True


async def test_an_agent_with_a_task_of_its_own_runs_as_long_as_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = RunningEcho()
    assert isinstance(agent, RunningAgent)
    assert not isinstance(EchoAgent(), RunningAgent)  # no task: nothing to start
    certificate = generate_certificate()
    core, _ = Transceiver.accept(
        browser_offer(),
        session_id="s1",
        certificate=certificate,
        candidates=[("127.0.0.1", 9)],
        now=trio.current_time(),
        agent=agent,
    )
    actor = SessionActor(
        "s1",
        port=MediaPort().register("s1", core.local_ufrag),
        certificate=certificate,
        core=core,
        restore_from=lambda: None,
        store=lambda snapshot: None,
        events=lambda event: None,
        on_end=lambda session, reason: None,
        agent=agent,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        assert agent.running  # started (Trio's task_status) before the actor reported started
        await trio.sleep(1)
        assert not agent.cancelled
        actor.stop()
    assert agent.cancelled


# --- planned moves: quiesce, then resume or hand off --------------------------------------------


class Wire:
    """The client's end of a session port, in process: what the actor sends reaches the
    in-process client at once, and the client's DTLS answers go straight into the inbox."""

    def __init__(self, client: Client, ufrag: str) -> None:
        self.client = client
        self.inbox_send, inbox = trio.open_memory_channel[Inbound](INBOX_SIZE)
        self.port = SessionPort("s1", ufrag, self.inbox_send, inbox, self.deliver)
        self.sent: list[bytes] = []
        self.keyed = trio.Event()  # the client's DTLS handshake is done

    def deliver(self, data: bytes, addr: PeerAddress) -> None:
        assert addr == CLIENT_ADDR
        self.sent.append(data)
        self.client.receive(data, trio.current_time())
        for datagram in self.client.dtls_datagrams():
            self.send(datagram)
        if self.client.tx is not None:
            self.keyed.set()

    def send(self, data: bytes) -> None:
        self.inbox_send.send_nowait((data, CLIENT_ADDR, trio.current_time()))

    def rtp_sent(self) -> int:
        return sum(1 for d in self.sent if 128 <= d[0] <= 191 and not 192 <= d[1] <= 223)


class MovingEcho:
    """An echo that records what it is told about moves."""

    interruptible = False

    def __init__(self) -> None:
        self.echo = EchoAgent()
        self.moves: list[object] = []

    def on_audio(self, pcm: bytes, now: float) -> None:
        self.echo.on_audio(pcm, now)

    def pull(self, now: float) -> bytes | None:
        return self.echo.pull(now)

    def on_turn(self, event: TurnEvent, now: float) -> None:
        self.echo.on_turn(event, now)

    def on_interrupted(self, played_ms: int, now: float) -> None:
        self.echo.on_interrupted(played_ms, now)

    def poll_events(self) -> list[dict[str, Any]]:
        return self.echo.poll_events()

    def moved_in(self, *, from_node: str, to_node: str, epoch: int) -> None:
        self.moves.append(("in", from_node, to_node, epoch))

    def moved_out(self) -> None:
        self.moves.append("out")


@attrs.define
class Call:
    """A session actor and its in-process client, and what the actor told its node."""

    actor: SessionActor
    wire: Wire
    events: list[dict[str, Any]] = attrs.field(factory=list)
    ended: list[tuple[str, str]] = attrs.field(factory=list)
    stored: list[SessionSnapshot] = attrs.field(factory=list)
    finished: trio.Event = attrs.field(factory=trio.Event)

    async def talk(self, count: int) -> None:
        """The client sends ``count`` frames of speech, one per 20 ms."""
        for pcm in speech.frames(utterance())[:count]:
            self.wire.send(self.wire.client.media(pcm))
            await trio.sleep(0.02)

    def names(self) -> list[str]:
        return [str(e["event"]) for e in self.events]


CERTIFICATE = generate_certificate()


async def _start(nursery: trio.Nursery, call: Call) -> None:
    async def run(*, task_status: trio.TaskStatus[ActorRef] = trio.TASK_STATUS_IGNORED) -> None:
        await call.actor.run(task_status=task_status)
        call.finished.set()

    await nursery.start(run)


async def connected_call(nursery: trio.Nursery, **kw: Any) -> Call:
    core, answer = Transceiver.accept(
        browser_offer(),
        session_id="s1",
        certificate=CERTIFICATE,
        candidates=[("127.0.0.1", 9)],
        now=trio.current_time(),
        agent=kw.get("agent"),
    )
    wire = Wire(Client(answer), core.local_ufrag)
    call = Call(actor=None, wire=wire)  # type: ignore[arg-type]
    call.actor = SessionActor(
        "s1",
        port=wire.port,
        certificate=CERTIFICATE,
        core=core,
        restore_from=lambda: None,
        store=call.stored.append,
        events=call.events.append,
        on_end=lambda session, reason: call.ended.append((session, reason)),
        **kw,
    )
    await _start(nursery, call)
    wire.send(wire.client.check())
    with trio.fail_after(5):
        await wire.keyed.wait()
    await call.talk(20)
    return call


async def test_quiesce_buffers_then_resume_feeds_it_in_and_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        call = await connected_call(nursery)
        actor, wire = call.actor, call.wire
        reply = await actor.ref.ask(("quiesce",), timeout=1)
        assert isinstance(reply, Quiesced)
        snapshot = SessionSnapshot.from_bytes(reply.snapshot)
        assert snapshot.exact and abs(reply.at - time.time()) < 60
        assert actor.paused and actor.core.quiesced
        assert await actor.ref.ask(("quiesce",), timeout=1) == reply  # a retry: same answer
        sent, stored = len(wire.sent), len(call.stored)
        await call.talk(15)
        await trio.sleep(12)  # longer than a checkpoint interval
        assert len(wire.sent) == sent  # nothing goes out while quiesced
        assert len(call.stored) == stored  # and no checkpoint is taken
        assert actor.buffered == 15

        assert await actor.ref.ask(("resume",), timeout=1) is True
        assert not actor.paused and actor.buffered == 0
        await call.talk(20)
        await trio.sleep(1)
        client = wire.client
        assert client.srtp_errors == 0
        seqs = [p.sequence_number for p in client.received]
        assert snapshot.next_seq in seqs
        assert all(rtp.seq_distance(a, b) == 1 for a, b in itertools.pairwise(seqs))
        stats = await actor.ref.ask("stats", timeout=1)
        assert isinstance(stats, dict)
        assert stats["packets_in"] == 55 and stats["dropped"] == {}
        assert len(call.stored) > stored  # checkpoints again
        assert isinstance(await actor.ref.ask(("resume",), timeout=1), MoveRefused)
        nursery.cancel_scope.cancel()
    assert call.ended == []


class CountingVad:
    """The energy detector, counting the frames each instance classifies."""

    heard: list[int] = []

    def __init__(self) -> None:
        self._vad = Vad()
        self._index = len(self.heard)
        self.heard.append(0)

    def is_speech(self, frame: bytes) -> bool:
        self.heard[self._index] += 1
        return self._vad.is_speech(frame)


async def test_hand_off_returns_what_arrived_and_the_session_goes_on_elsewhere(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        old_agent = MovingEcho()
        call = await connected_call(nursery, agent=old_agent)
        actor, client = call.actor, call.wire.client
        refused = await actor.ref.ask(("hand_off",), timeout=1)
        assert isinstance(refused, MoveRefused) and refused.code == "not_quiesced"
        reply = await actor.ref.ask(("quiesce",), timeout=1)
        assert isinstance(reply, Quiesced)
        await call.talk(5)
        # two more still in the inbox when the hand-off comes
        late = [client.media(pcm) for pcm in speech.frames(utterance())[5:7]]
        for datagram in late:
            call.wire.send(datagram)
        handed = await actor.ref.ask(("hand_off",), timeout=1)
        assert isinstance(handed, list) and len(handed) == 7
        assert [d for d, _ in handed[-2:]] == late
        assert all(addr == CLIENT_ADDR for _, addr in handed)
        with trio.fail_after(1):
            await call.finished.wait()  # the actor finished ...
        assert call.ended == [] and "session_ended" not in call.names()  # ... silently
        assert old_agent.moves == ["out"]

        # the next node: a new port to the same client, what was handed on first
        new_agent = MovingEcho()
        wire = Wire(client, "ufrag2")
        for datagram, _ in handed:
            wire.send(datagram)
        moved = Call(actor=None, wire=wire)  # type: ignore[arg-type]
        moved.actor = SessionActor(
            "s1",
            port=wire.port,
            certificate=CERTIFICATE,
            core=None,
            restore_from=lambda: None,
            store=moved.stored.append,
            events=moved.events.append,
            on_end=lambda session, reason: moved.ended.append((session, reason)),
            agent=new_agent,
            make_vad=CountingVad,  # the node's turns.vad, built for the restored core
            arrival=Arrival(SessionSnapshot.from_bytes(reply.snapshot), reply.at),
        )
        await _start(nursery, moved)
        assert moved.actor.restored and moved.actor.blackout is not None
        assert await moved.actor.ref.ask(("moved", "node-a", "node-b", 7), timeout=1) is True
        assert new_agent.moves == [("in", "node-a", "node-b", 7)]
        await moved.talk(20)
        await trio.sleep(1)
        assert client.srtp_errors == 0
        snapshot = SessionSnapshot.from_bytes(reply.snapshot)
        seqs = [p.sequence_number for p in client.received]
        assert snapshot.next_seq in seqs
        assert all(rtp.seq_distance(a, b) == 1 for a, b in itertools.pairwise(seqs))
        stats = await moved.actor.ref.ask("stats", timeout=1)
        assert isinstance(stats, dict) and stats["packets_in"] == 27
        assert moved.stored  # its own checkpoint, at once
        assert len(CountingVad.heard) == 1 and CountingVad.heard[0] >= 20
        # no ICE, DTLS or media start again (the turn open at the move ends here, though)
        assert not {"ice_connected", "dtls_connected", "media_started"} & set(moved.names())
        nursery.cancel_scope.cancel()


async def test_a_quiesced_session_keeps_a_bounded_buffer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        call = await connected_call(nursery, max_buffered=4)
        assert isinstance(await call.actor.ref.ask(("quiesce",), timeout=1), Quiesced)
        await call.talk(10)
        assert call.actor.buffered == 4 and call.actor.buffer_overflow == 6
        handed = await call.actor.ref.ask(("hand_off",), timeout=1)
        assert isinstance(handed, list) and len(handed) == 4
        nursery.cancel_scope.cancel()


async def test_quiesce_before_dtls_is_refused_and_the_session_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    core, answer = Transceiver.accept(
        browser_offer(),
        session_id="s1",
        certificate=CERTIFICATE,
        candidates=[("127.0.0.1", 9)],
        now=trio.current_time(),
    )
    wire = Wire(Client(answer), core.local_ufrag)
    actor = SessionActor(
        "s1",
        port=wire.port,
        certificate=CERTIFICATE,
        core=core,
        restore_from=lambda: None,
        store=lambda snapshot: None,
        events=lambda event: None,
        on_end=lambda session, reason: None,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        refused = await actor.ref.ask(("quiesce",), timeout=1)
        assert isinstance(refused, MoveRefused) and refused.code == "not_connected"
        assert not actor.paused
        wire.send(wire.client.check())  # it still connects
        with trio.fail_after(5):
            await wire.keyed.wait()
        actor.stop()


async def test_closing_a_quiesced_session_sends_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        call = await connected_call(nursery)
        assert isinstance(await call.actor.ref.ask(("quiesce",), timeout=1), Quiesced)
        sent = len(call.wire.sent)
        assert await call.actor.ref.ask("close", timeout=1) is True
        await trio.sleep(0.1)
        assert len(call.wire.sent) == sent  # no BYE, no close_notify
        assert call.ended == [("s1", "closed while quiesced")]
        assert call.names()[-1] == "session_ended"
        nursery.cancel_scope.cancel()


# --- lease stalls: hold the session, keep its state, go on if the lease lives --------------------


async def test_a_stall_holds_the_session_and_unstall_goes_on_at_the_next_packet(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        call = await connected_call(nursery)
        actor, wire = call.actor, call.wire
        assert await actor.ref.ask(("stall",), timeout=1) is True
        assert actor.paused and actor.core.quiesced
        assert await actor.ref.ask(("stall",), timeout=1) is True  # asked twice: no change
        sent, stored = len(wire.sent), len(call.stored)
        last_seq = wire.client.received[-1].sequence_number
        await call.talk(15)
        await trio.sleep(12)  # a long stall, longer than a checkpoint interval
        assert len(wire.sent) == sent  # nothing processed, nothing sent
        assert len(call.stored) == stored
        assert actor.buffered == 15

        assert await actor.ref.ask(("unstall",), timeout=1) is True
        assert not actor.paused and actor.buffered == 0
        await call.talk(20)
        await trio.sleep(1)
        client = wire.client
        assert client.srtp_errors == 0
        after = [p for p in client.received if rtp.seq_distance(last_seq, p.sequence_number) > 0]
        assert after and after[0].sequence_number == (last_seq + 1) % 65536  # no gap, no jump
        stats = await actor.ref.ask("stats", timeout=1)
        assert isinstance(stats, dict) and stats["packets_in"] == 55
        nursery.cancel_scope.cancel()
    assert call.ended == []


async def test_no_move_starts_while_stalled_and_an_abandoned_move_stays_held_until_unstall(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        call = await connected_call(nursery)
        actor, wire = call.actor, call.wire
        assert await actor.ref.ask(("stall",), timeout=1) is True
        refused = await actor.ref.ask(("quiesce",), timeout=1)
        assert isinstance(refused, MoveRefused) and refused.code == "stalled"
        assert await actor.ref.ask(("unstall",), timeout=1) is True

        # A move quiesced it, then the lease stalled, then the move was abandoned: the stall
        # still holds the session; only its end lets it go on.
        assert isinstance(await actor.ref.ask(("quiesce",), timeout=1), Quiesced)
        assert await actor.ref.ask(("stall",), timeout=1) is True
        assert await actor.ref.ask(("resume",), timeout=1) is True
        sent = len(wire.sent)
        await call.talk(5)
        assert actor.paused and len(wire.sent) == sent and actor.buffered == 5
        assert await actor.ref.ask(("unstall",), timeout=1) is True
        await call.talk(5)
        await trio.sleep(0.5)
        assert not actor.paused and len(wire.sent) > sent
        assert wire.client.srtp_errors == 0
        nursery.cancel_scope.cancel()
    assert call.ended == []


async def test_a_stall_before_dtls_holds_the_handshake_and_it_finishes_afterwards(
    autojump_clock: trio.testing.MockClock,
) -> None:
    core, answer = Transceiver.accept(
        browser_offer(),
        session_id="s1",
        certificate=CERTIFICATE,
        candidates=[("127.0.0.1", 9)],
        now=trio.current_time(),
    )
    wire = Wire(Client(answer), core.local_ufrag)
    actor = SessionActor(
        "s1",
        port=wire.port,
        certificate=CERTIFICATE,
        core=core,
        restore_from=lambda: None,
        store=lambda snapshot: None,
        events=lambda event: None,
        on_end=lambda session, reason: None,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        assert await actor.ref.ask(("stall",), timeout=1) is True
        wire.send(wire.client.check())
        await trio.sleep(1)
        assert wire.sent == [] and actor.buffered == 1  # the check is kept, not answered
        assert await actor.ref.ask(("unstall",), timeout=1) is True
        with trio.fail_after(5):
            await wire.keyed.wait()
        actor.stop()


# --- checkpoints kept elsewhere (crash failover) -------------------------------------------------


async def test_a_checkpoint_is_confirmed_only_once_it_is_durable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With ``persist`` (etcd, sealed), a checkpoint is confirmed to the core only once it is
    durable; one that could not be stored is not, and the session asks again later."""
    calls = 0

    async def refused(snapshot: SessionSnapshot) -> bool:
        nonlocal calls
        calls += 1
        return False

    async with trio.open_nursery() as nursery:
        call = await connected_call(nursery, persist=refused)
        await trio.sleep(30)
        assert calls >= 2  # asked again after a failure
        assert call.actor.checkpoints_failed == calls and call.actor.checkpoints_persisted == 0
        assert len(call.stored) >= calls  # each kept in memory too (a restart on this node)
        nursery.cancel_scope.cancel()


async def test_a_durable_checkpoint_lets_media_flow_and_the_media_loop_never_waits_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    started = trio.Event()

    async def slow(snapshot: SessionSnapshot) -> bool:
        started.set()
        await trio.sleep(0.5)  # an etcd write that takes its time
        return True

    async with trio.open_nursery() as nursery:
        call = await connected_call(nursery, persist=slow)
        assert started.is_set()
        await call.talk(20)
        await trio.sleep(1)
        assert call.actor.checkpoints_persisted >= 1
        assert call.wire.client.received  # the echo flows once the checkpoint is durable
        assert call.wire.client.srtp_errors == 0
        nursery.cancel_scope.cancel()


def _on_grid(at: float, tick: float) -> bool:
    return abs(at / tick - round(at / tick)) < 1e-6


@pytest.mark.parametrize("tick", [0.0, 0.02])
async def test_on_the_node_tick_media_goes_out_on_the_grid_and_arrivals_keep_their_time(
    autojump_clock: trio.testing.MockClock, tick: float
) -> None:
    async with trio.open_nursery() as nursery:
        await trio.sleep(0.007)  # the client's frames fall between two ticks
        call = await connected_call(nursery, tick=tick)
        wire, core = call.wire, call.actor.core
        taken: list[tuple[float, float]] = []  # (arrival given to the core, when taken)
        receive = core.receive

        def spy(data: bytes, addr: PeerAddress, now: float) -> None:
            taken.append((now, trio.current_time()))
            receive(data, addr, now)

        core.receive = spy  # type: ignore[method-assign]
        sent_at: list[float] = []
        deliver = wire.port.send

        def stamp(data: bytes, addr: PeerAddress) -> None:
            if 128 <= data[0] <= 191 and not 192 <= data[1] <= 223:
                sent_at.append(trio.current_time())
            deliver(data, addr)

        wire.port.send = stamp
        arrivals = []
        for pcm in speech.frames(utterance())[:40]:
            arrivals.append(trio.current_time())
            wire.send(wire.client.media(pcm))
            await trio.sleep(0.02)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert len(sent_at) >= 40 and len(taken) >= 40
    # the core timed each packet from its arrival, never from the tick that took it
    assert [at for at, _ in taken[: len(arrivals)]] == arrivals
    if tick:
        assert all(_on_grid(at, tick) for at in sent_at)  # every frame out on the grid
        gaps = [round((b - a) / tick) for a, b in itertools.pairwise(sent_at)]
        assert set(gaps[1:]) == {1}, str(gaps)  # one frame a tick: never two, never one skipped
        assert all(_on_grid(when, tick) for _, when in taken)  # taken at a tick
        assert all(0 < when - at < tick + 1e-9 for at, when in taken)
    else:  # each on its own time: at once, and the echo off the grid
        assert all(when == at for at, when in taken)
        assert not all(_on_grid(at, 0.02) for at in sent_at)
