"""A single actor on its own: mailbox, tell/ask, hooks, back-pressure, crashes."""

from __future__ import annotations

import trio
import trio.testing
from pytest import raises

from actors import Actor, ActorDied, ActorRef, AskTimeout, Mailbox, MailboxFull
from tests.actors.support import run_capturing


class Recorder(Actor):
    """Records what it handles; 'hold' blocks until `gate` opens, 'boom' crashes."""

    mailbox_size = 2

    def __init__(self, name: str = "recorder") -> None:
        super().__init__(name)
        self.seen: list[object] = []
        self.events: list[str] = []
        self.gate = trio.Event()

    async def on_start(self) -> None:
        self.events.append("on_start")

    async def receive(self, message: object) -> object:
        self.seen.append(message)
        if message == "hold":
            await self.gate.wait()
        elif message == "hang":
            await trio.sleep_forever()
        elif message == "boom":
            raise ValueError("boom")
        elif message == "bye":
            self.stop()
        elif isinstance(message, int):
            return message * 2
        return None

    async def on_stop(self) -> None:
        self.events.append("on_stop")


async def test_tell_ask_and_hooks(autojump_clock: trio.testing.MockClock) -> None:
    actor = Recorder("echo")
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        assert ref == actor.ref
        assert ref.name == "echo"
        await ref.tell("hello")
        assert await ref.ask(21, timeout=1) == 42
        assert actor.seen == ["hello", 21]
        nursery.cancel_scope.cancel()
    assert actor.events == ["on_start", "on_stop"]
    with raises(ActorDied):
        await ref.tell("anyone?")


async def test_default_name_and_nursery_lifetime(autojump_clock: trio.testing.MockClock) -> None:
    cancelled: list[bool] = []

    class Ticker(Actor):
        ticks = 0

        async def on_start(self) -> None:
            self.nursery.start_soon(self._tick)

        async def _tick(self) -> None:
            try:
                while True:
                    await trio.sleep(1)
                    self.ticks += 1
            except trio.Cancelled:
                cancelled.append(True)
                raise

    actor = Ticker()
    assert actor.name == "Ticker"
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await trio.sleep(3.5)
        assert actor.ticks == 3
        actor.stop()
    assert cancelled == [True]
    with raises(RuntimeError):
        _ = actor.nursery


async def test_stop_returns_normally_and_runs_on_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    actor = Recorder()
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        assert await ref.ask("bye", timeout=1) is None
    assert actor.events == ["on_start", "on_stop"]


async def test_an_actor_runs_once(autojump_clock: trio.testing.MockClock) -> None:
    actor = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        actor.stop()
    with raises(RuntimeError, match="runs once"):
        await actor.run()


async def test_default_receive_crashes(autojump_clock: trio.testing.MockClock) -> None:
    errors: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(run_capturing, Actor("plain"), errors)
        with raises(ActorDied):
            await ref.ask("anything", timeout=1)
    assert [type(e) for e in errors] == [NotImplementedError]


async def test_ask_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(Recorder().run)
        start = trio.current_time()
        with raises(AskTimeout) as info:
            await ref.ask("hang", timeout=3)
        assert trio.current_time() - start == 3
        assert isinstance(info.value, TimeoutError)
        nursery.cancel_scope.cancel()


async def test_ask_on_crash_fails_at_once(autojump_clock: trio.testing.MockClock) -> None:
    errors: list[BaseException] = []
    actor = Recorder()
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(run_capturing, actor, errors)
        start = trio.current_time()
        with raises(ActorDied) as info:
            await ref.ask("boom", timeout=100)
        assert trio.current_time() == start
        assert isinstance(info.value.__cause__, ValueError)
    # The crash itself comes out of run() unwrapped, after on_stop.
    assert [type(e) for e in errors] == [ValueError]
    assert actor.events == ["on_start", "on_stop"]


async def test_queued_ask_fails_when_actor_stops(autojump_clock: trio.testing.MockClock) -> None:
    actor = Recorder()
    outcomes: list[str] = []

    async def ask(message: object) -> None:
        try:
            await ref.ask(message, timeout=100)
        except ActorDied as exc:
            outcomes.append(str(exc))

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        async with trio.open_nursery() as askers:
            askers.start_soon(ask, "hang")
            await trio.sleep(1)
            askers.start_soon(ask, "queued")
            await trio.sleep(1)
            actor.stop()
    assert len(outcomes) == 2
    assert any("stopped while handling" in o for o in outcomes)
    assert any("before handling" in o for o in outcomes)
    assert actor.seen == ["hang"]


async def test_back_pressure(autojump_clock: trio.testing.MockClock) -> None:
    actor = Recorder()
    sent: list[int] = []

    async def blocked_tell() -> None:
        await ref.tell(3)
        sent.append(3)

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        await ref.tell("hold")
        await trio.sleep(1)  # the actor took "hold" and waits on the gate
        await ref.tell(1)
        await ref.tell(2)  # mailbox_size == 2: now full
        with raises(MailboxFull):
            ref.tell_nowait(99)
        with raises(AskTimeout):
            await ref.ask(98, timeout=1)  # the timeout covers waiting for room too
        nursery.start_soon(blocked_tell)
        await trio.sleep(10)
        assert sent == []
        actor.gate.set()
        await trio.sleep(1)
        assert sent == [3]
        assert actor.seen == ["hold", 1, 2, 3]
        ref.tell_nowait(4)  # room again
        nursery.cancel_scope.cancel()


async def test_closed_mailbox_wakes_blocked_senders(autojump_clock: trio.testing.MockClock) -> None:
    mailbox = Mailbox(0)
    ref = ActorRef("nobody", mailbox)
    errors: list[BaseException] = []

    async def tell() -> None:
        try:
            await ref.tell("x")
        except ActorDied as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tell)
        await trio.sleep(1)
        mailbox.close()
    assert len(errors) == 1
    assert mailbox.closed
    with raises(ActorDied):
        ref.tell_nowait("y")
    with raises(ActorDied):
        await ref.ask("z", timeout=1)


async def test_on_stop_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    class Stubborn(Actor):
        stop_timeout = 2.0

        async def on_stop(self) -> None:
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(Stubborn().run)
        start = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - start == 2.0


async def test_refs_compare_by_mailbox() -> None:
    box = Mailbox(1)
    assert ActorRef("a", box) == ActorRef("a", box)
    assert ActorRef("a", box) != ActorRef("a", Mailbox(1))
    assert len({ActorRef("a", box), ActorRef("a", box)}) == 1
