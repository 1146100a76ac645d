"""The session actor's restart rules, under a real supervisor on Trio's MockClock."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from actors import ChildSpec, Restart, Supervisor
from sessions.node.media import MediaPort
from sessions.session import SessionActor
from sessions.webrtc.certs import generate_certificate


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
