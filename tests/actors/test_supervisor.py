"""Supervisors: restarts, strategies, restart policies, intensity, ordered bounded stops."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio
import trio.testing

from actors import (
    Actor,
    ActorDied,
    ActorRef,
    ChildSpec,
    Escalation,
    Intensity,
    Registry,
    Restart,
    Strategy,
    Supervisor,
)
from tests.actors.support import run_capturing

Journal = list[str]


class Worker(Actor):
    """Counts 'inc', answers 'get', crashes on 'boom', exits normally on 'exit'."""

    def __init__(
        self,
        journal: Journal,
        *,
        start_delay: float = 0.0,
        hang_on_stop: bool = False,
        ticker: bool = False,
    ) -> None:
        super().__init__()
        self.journal = journal
        self.start_delay = start_delay
        self.hang_on_stop = hang_on_stop
        self.ticker = ticker
        self.count = 0
        self.ticks = 0
        self.task: trio.lowlevel.Task | None = None
        self.ticker_cancelled = False

    async def on_start(self) -> None:
        self.journal.append(f"begin:{self.name}")
        await trio.sleep(self.start_delay)
        self.task = trio.lowlevel.current_task()
        if self.ticker:
            self.nursery.start_soon(self._tick)
        self.journal.append(f"start:{self.name}")

    async def _tick(self) -> None:
        try:
            while True:
                await trio.sleep(10)
                self.ticks += 1
        except trio.Cancelled:
            self.ticker_cancelled = True
            raise

    async def receive(self, message: object) -> object:
        if message == "inc":
            self.count += 1
        elif message == "get":
            return self.count
        elif message == "boom":
            raise ValueError(f"boom in {self.name}")
        elif message == "exit":
            self.stop()
        elif message == "hang":
            await trio.sleep_forever()
        return None

    async def on_stop(self) -> None:
        if self.hang_on_stop:
            self.journal.append(f"hanging:{self.name}")
            await trio.sleep_forever()
        self.journal.append(f"stop:{self.name}")


class Family:
    """Makes child specs of Workers and remembers every incarnation."""

    def __init__(self) -> None:
        self.journal: Journal = []
        self.made: dict[str, list[Worker]] = {}

    def spec(
        self,
        name: str,
        *,
        restart: Restart = Restart.PERMANENT,
        shutdown_timeout: float = 5.0,
        start_delay: float = 0.0,
        hang_on_stop: bool = False,
        ticker: bool = False,
    ) -> ChildSpec:
        def make() -> Worker:
            worker = Worker(
                self.journal, start_delay=start_delay, hang_on_stop=hang_on_stop, ticker=ticker
            )
            self.made.setdefault(name, []).append(worker)
            return worker

        return ChildSpec(name, make, restart=restart, shutdown_timeout=shutdown_timeout)

    def clear(self) -> None:
        self.journal.clear()


async def test_restart_after_crash(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    family = Family()
    sup = Supervisor("sup", [family.spec("a")])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        ref = sup.child_ref("a")
        await ref.tell("inc")
        await ref.tell("inc")
        assert await ref.ask("get", timeout=1) == 2
        await ref.tell("boom")
        await trio.sleep(0.01)  # crashed; the restart waits out its backoff
        assert len(family.made["a"]) == 1
        for _ in range(3):
            await ref.tell("inc")  # queued while no incarnation runs
        # Fresh state (not 5), and the messages sent while it was down are kept.
        assert await ref.ask("get", timeout=5) == 3
        assert len(family.made["a"]) == 2
        assert family.made["a"][1].ref == ref
        assert sup.child_ref("a") == ref
        assert sup.restarts == 1
        nursery.cancel_scope.cancel()
    crash = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(crash) == 1
    assert crash[0].name == "parley.actors"
    assert "'a' crashed" in crash[0].getMessage()
    assert isinstance(crash[0].exc_info and crash[0].exc_info[1], ValueError)


async def test_restart_backoff_grows(autojump_clock: trio.testing.MockClock) -> None:
    family = Family()
    intensity = Intensity(max_restarts=10, within=100, backoff_initial=1, backoff_max=4)
    sup = Supervisor("sup", [family.spec("a")], intensity=intensity)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        ref = sup.child_ref("a")
        waits = []
        for _ in range(4):
            with pytest.raises(ActorDied):
                await ref.ask("boom", timeout=100)
            crashed = trio.current_time()
            await ref.ask("get", timeout=100)  # answered by the next incarnation
            waits.append(trio.current_time() - crashed)
        assert waits == [1, 2, 4, 4]
        nursery.cancel_scope.cancel()


async def test_ask_on_crashing_child_fails_at_once(autojump_clock: trio.testing.MockClock) -> None:
    family = Family()
    sup = Supervisor("sup", [family.spec("a")])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        start = trio.current_time()
        with pytest.raises(ActorDied) as info:
            await sup.child_ref("a").ask("boom", timeout=100)
        assert trio.current_time() == start
        assert isinstance(info.value.__cause__, ValueError)
        nursery.cancel_scope.cancel()


async def test_one_for_one_leaves_siblings_alone(autojump_clock: trio.testing.MockClock) -> None:
    family = Family()
    sup = Supervisor(
        "sup",
        [family.spec("a", ticker=True), family.spec("b"), family.spec("c")],
        intensity=Intensity(max_restarts=10),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        a = family.made["a"][0]
        a_task = a.task
        for _ in range(5):
            await sup.child_ref("a").tell("inc")
        await trio.sleep(25)
        assert a.ticks == 2
        family.clear()
        for _ in range(3):
            with pytest.raises(ActorDied):
                await sup.child_ref("b").ask("boom", timeout=100)
        await trio.sleep(10)
        assert len(family.made["b"]) == 4
        assert family.journal == ["stop:b", "begin:b", "start:b"] * 3
        # a: same incarnation, same task, state and background task intact.
        assert family.made["a"] == [a]
        assert a.task is a_task
        assert not a.ticker_cancelled
        assert a.ticks >= 3
        assert await sup.child_ref("a").ask("get", timeout=1) == 5
        assert len(family.made["c"]) == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("strategy", "stops", "starts"),
    [
        (Strategy.ONE_FOR_ALL, ["c", "a"], ["a", "b", "c"]),
        (Strategy.REST_FOR_ONE, ["c"], ["b", "c"]),
    ],
)
async def test_group_strategies(
    autojump_clock: trio.testing.MockClock,
    strategy: Strategy,
    stops: list[str],
    starts: list[str],
) -> None:
    family = Family()
    sup = Supervisor("sup", [family.spec(n) for n in "abc"], strategy=strategy)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for name in "abc":
            await sup.child_ref(name).tell("inc")
        family.clear()
        await sup.child_ref("b").tell("boom")
        await trio.sleep(1)
        expected = ["stop:b"] + [f"stop:{n}" for n in stops]
        for name in starts:
            expected += [f"begin:{name}", f"start:{name}"]
        assert family.journal == expected
        for name in "abc":
            incarnations = 2 if name in starts else 1
            assert len(family.made[name]) == incarnations
            assert await sup.child_ref(name).ask("get", timeout=1) == 2 - incarnations
        assert sup.child_names() == ["a", "b", "c"]
        assert sup.restarts == 1
        nursery.cancel_scope.cancel()


async def test_group_restart_drops_temporary_siblings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    family = Family()
    children = [family.spec("a"), family.spec("t", restart=Restart.TEMPORARY), family.spec("c")]
    sup = Supervisor("sup", children, strategy=Strategy.ONE_FOR_ALL)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        t = sup.child_ref("t")
        await sup.child_ref("a").tell("boom")
        await trio.sleep(1)
        assert sup.child_names() == ["a", "c"]
        assert len(family.made["t"]) == 1
        with pytest.raises(ActorDied):
            await t.tell("inc")
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("restart", "message", "restarted"),
    [
        (Restart.PERMANENT, "boom", True),
        (Restart.PERMANENT, "exit", True),
        (Restart.TRANSIENT, "boom", True),
        (Restart.TRANSIENT, "exit", False),
        (Restart.TEMPORARY, "boom", False),
        (Restart.TEMPORARY, "exit", False),
    ],
)
@pytest.mark.parametrize("strategy", [Strategy.ONE_FOR_ONE, Strategy.ONE_FOR_ALL])
async def test_restart_policies(
    autojump_clock: trio.testing.MockClock,
    strategy: Strategy,
    restart: Restart,
    message: str,
    restarted: bool,
) -> None:
    family = Family()
    sup = Supervisor(
        "sup", [family.spec("x", restart=restart), family.spec("y")], strategy=strategy
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        x = sup.child_ref("x")
        await x.tell(message)
        await trio.sleep(1)
        if restarted:
            assert sup.child_names() == ["x", "y"]
            assert len(family.made["x"]) == 2
            assert await x.ask("get", timeout=1) == 0
        else:
            assert sup.child_names() == ["y"]
            assert len(family.made["x"]) == 1
            with pytest.raises(ActorDied):
                await x.tell("inc")
        # Not restarting x never touches y, whatever the strategy.
        assert len(family.made["y"]) == (2 if restarted and strategy is Strategy.ONE_FOR_ALL else 1)
        assert sup.restarts == int(restarted)
        nursery.cancel_scope.cancel()


def _nested(family: Family, registry: Registry, root_intensity: Intensity) -> Supervisor:
    def inner() -> Supervisor:
        return Supervisor(
            "inner",
            [family.spec("x"), family.spec("leaf")],
            intensity=Intensity(max_restarts=2, within=10),
            registry=registry,
        )

    return Supervisor("root", [ChildSpec("inner", inner)], intensity=root_intensity)


async def _crash_leaf_three_times(registry: Registry) -> ActorRef:
    leaf = registry.lookup("leaf")
    for _ in range(3):
        with pytest.raises(ActorDied):
            await leaf.ask("boom", timeout=100)
    return leaf


async def test_escalation_restarts_the_child_supervisor(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    family, registry = Family(), Registry()
    root = _nested(family, registry, Intensity())
    async with trio.open_nursery() as nursery:
        await nursery.start(root.run)
        old_leaf = await _crash_leaf_three_times(registry)
        await trio.sleep(1)
        # inner escalated: its children were stopped (x after the crashed leaf) and
        # root started a fresh inner, with fresh children.
        assert root.restarts == 1
        assert len(family.made["x"]) == 2
        assert len(family.made["leaf"]) == 4
        new_leaf = registry.lookup("leaf")
        assert new_leaf != old_leaf
        with pytest.raises(ActorDied):
            await old_leaf.tell("inc")
        assert await new_leaf.ask("get", timeout=1) == 0
        nursery.cancel_scope.cancel()
    escalated = [r for r in caplog.records if "'inner' crashed" in r.getMessage()]
    assert len(escalated) == 1
    error = escalated[0].exc_info and escalated[0].exc_info[1]
    assert isinstance(error, Escalation)
    assert isinstance(error.__cause__, ValueError)


async def test_escalation_reaches_the_top(autojump_clock: trio.testing.MockClock) -> None:
    family, registry = Family(), Registry()
    root = _nested(family, registry, Intensity(max_restarts=0))
    errors: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(run_capturing, root, errors)
        await _crash_leaf_three_times(registry)
    assert len(errors) == 1
    top = errors[0]
    assert isinstance(top, Escalation)
    assert "root" in str(top)
    assert isinstance(top.__cause__, Escalation)
    assert "inner" in str(top.__cause__)
    assert isinstance(top.__cause__.__cause__, ValueError)
    # The escalating supervisor stopped its remaining child before going down.
    assert family.journal[-2:] == ["stop:leaf", "stop:x"]
    assert registry.names() == []


async def test_start_in_order_and_stop_in_reverse(autojump_clock: trio.testing.MockClock) -> None:
    family = Family()
    sup = Supervisor("sup", [family.spec(n, start_delay=1) for n in "abc"])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        # Each child begins only after the previous one reported started.
        assert family.journal == ["begin:a", "start:a", "begin:b", "start:b", "begin:c", "start:c"]
        assert trio.current_time() == 3
        assert sup.child_names() == ["a", "b", "c"]
        family.clear()
        nursery.cancel_scope.cancel()
    assert family.journal == ["stop:c", "stop:b", "stop:a"]


async def test_hung_on_stop_is_abandoned(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    family = Family()
    sup = Supervisor(
        "sup",
        [
            family.spec("a"),
            family.spec("b", hang_on_stop=True, shutdown_timeout=2),
            family.spec("c"),
        ],
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        family.clear()
        start = trio.current_time()
        nursery.cancel_scope.cancel()
    assert family.journal == ["stop:c", "hanging:b", "stop:a"]
    assert trio.current_time() - start == 2
    assert any("on_stop abandoned" in r.getMessage() for r in caplog.records)


async def test_stopping_a_group_is_bounded_too(autojump_clock: trio.testing.MockClock) -> None:
    family = Family()
    children = [
        family.spec("a", hang_on_stop=True, shutdown_timeout=3),
        family.spec("b"),
    ]
    sup = Supervisor("sup", children, strategy=Strategy.ONE_FOR_ALL)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        family.clear()
        crashed = trio.current_time()
        with pytest.raises(ActorDied):
            await sup.child_ref("b").ask("boom", timeout=100)
        await sup.child_ref("b").ask("get", timeout=100)
        # a's on_stop was cut after 3s, then the backoff (0.05s) and the restarts.
        assert trio.current_time() - crashed == pytest.approx(3.05)
        assert family.journal == ["stop:b", "hanging:a", "begin:a", "start:a", "begin:b", "start:b"]
        nursery.cancel_scope.cancel()


async def test_dynamic_children(autojump_clock: trio.testing.MockClock) -> None:
    family = Family()
    sup = Supervisor("sessions")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        refs = [await sup.start_child(family.spec(f"s{i}")) for i in range(3)]
        assert sup.child_names() == ["s0", "s1", "s2"]
        assert refs[1] == sup.child_ref("s1")
        with pytest.raises(ValueError, match="already has a child"):
            await sup.start_child(family.spec("s1"))

        outcomes: list[str] = []

        async def ask(message: str) -> None:
            try:
                await refs[1].ask(message, timeout=100)
            except ActorDied as exc:
                outcomes.append(str(exc))

        async with trio.open_nursery() as askers:
            askers.start_soon(ask, "hang")
            await trio.sleep(1)
            askers.start_soon(ask, "get")  # queued behind the hanging one
            await trio.sleep(1)
            family.clear()
            await sup.stop_child("s1")
        assert family.journal == ["stop:s1"]
        assert len(outcomes) == 2  # the one being handled and the queued one
        assert sup.child_names() == ["s0", "s2"]
        with pytest.raises(ActorDied):
            await refs[1].tell("inc")
        with pytest.raises(KeyError):
            await sup.stop_child("s1")
        with pytest.raises(KeyError):
            sup.child_ref("s1")
        await trio.sleep(10)
        assert len(family.made["s1"]) == 1  # stopped for good, never restarted
        await sup.start_child(family.spec("s1"))  # the name is free again
        assert sup.child_names() == ["s0", "s2", "s1"]
        nursery.cancel_scope.cancel()


class FailsToStart(Actor):
    async def on_start(self) -> None:
        raise OSError("no port")


async def test_start_child_failure_is_raised(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sup = Supervisor("sup")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.raises(OSError, match="no port"):
            await sup.start_child(ChildSpec("bad", FailsToStart))
        assert sup.child_names() == []
        assert any("'bad' failed to start" in r.getMessage() for r in caplog.records)
        nursery.cancel_scope.cancel()


async def test_initial_child_failure_fails_the_supervisor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    family = Family()
    sup = Supervisor("sup", [family.spec("a"), ChildSpec("bad", FailsToStart)])
    with pytest.raises(OSError, match="no port"):
        await sup.run()
    assert family.journal == ["begin:a", "start:a", "stop:a"]


async def test_restart_that_fails_to_start_counts(autojump_clock: trio.testing.MockClock) -> None:
    attempts: list[int] = []

    def flaky() -> Actor:
        attempts.append(1)
        return Worker([]) if len(attempts) == 1 else FailsToStart()

    sup = Supervisor("sup", [ChildSpec("f", flaky)], intensity=Intensity(max_restarts=3))
    errors: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(run_capturing, sup, errors)
        await sup.child_ref("f").tell("boom")
    assert len(attempts) == 4  # first start, then 3 failed restarts before escalating
    assert isinstance(errors[0], Escalation)
    assert isinstance(errors[0].__cause__, OSError)


async def test_supervisor_ignores_stray_messages(autojump_clock: trio.testing.MockClock) -> None:
    sup = Supervisor("sup")
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        assert await ref.ask("what?", timeout=1) is None
        await sup.start_child(ChildSpec("w", lambda: Worker([])))
        nursery.cancel_scope.cancel()


def test_duplicate_child_names_rejected() -> None:
    make: Callable[[], Actor] = lambda: Worker([])  # noqa: E731
    with pytest.raises(ValueError, match="duplicate"):
        Supervisor("sup", [ChildSpec("a", make), ChildSpec("a", make)])
