"""The session actor's restart rules, under a real supervisor on Trio's MockClock, and the
agents it runs beside the media."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from actors import ChildSpec, Restart, Supervisor
from sessions.agents import EchoAgent, RunningAgent
from sessions.node.media import MediaPort
from sessions.session import SessionActor
from sessions.transceiver import Transceiver
from sessions.turns import TurnEvent
from sessions.webrtc.certs import generate_certificate
from tests.sessions.test_transceiver import browser_offer


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
