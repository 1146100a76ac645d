"""The name registry, alone and kept up to date by supervisors."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from actors import (
    Actor,
    ActorRef,
    ChildSpec,
    Mailbox,
    NotRegistered,
    Registry,
    Restart,
    Supervisor,
)


def _ref(name: str) -> ActorRef:
    return ActorRef(name, Mailbox(1))


def test_register_lookup_unregister() -> None:
    registry = Registry()
    a, b = _ref("a"), _ref("b")
    registry.register("b", b)
    registry.register("a", a)
    registry.register("a", a)  # the same ref again is fine
    assert registry.lookup("a") == a
    assert registry.names() == ["a", "b"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", _ref("a"))
    registry.unregister("a")
    registry.unregister("a")  # idempotent
    with pytest.raises(NotRegistered):
        registry.lookup("a")
    with pytest.raises(KeyError):  # NotRegistered is a KeyError
        registry.lookup("nobody")
    assert registry.names() == ["b"]


async def test_wait_for(autojump_clock: trio.testing.MockClock) -> None:
    registry = Registry()
    found: list[ActorRef] = []

    async def waiter() -> None:
        found.append(await registry.wait_for("late"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        nursery.start_soon(waiter)
        await trio.sleep(5)
        assert found == []
        late = _ref("late")
        registry.register("late", late)
    assert found == [late, late]
    assert await registry.wait_for("late") == late  # already there: no wait


async def test_abandoned_wait_leaves_nothing_behind(autojump_clock: trio.testing.MockClock) -> None:
    registry = Registry()
    with trio.move_on_after(1):
        await registry.wait_for("never")
    assert registry._arrivals == {}


class Idle(Actor):
    async def receive(self, message: object) -> object:
        if message == "boom":
            raise ValueError("boom")
        if message == "exit":
            self.stop()
        return None


async def test_supervisor_keeps_registry(autojump_clock: trio.testing.MockClock) -> None:
    registry = Registry()
    children = [ChildSpec("a", Idle), ChildSpec("t", Idle, restart=Restart.TEMPORARY)]
    sup = Supervisor("sup", children, registry=registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert registry.names() == ["a", "t"]
        a = registry.lookup("a")
        assert a == sup.child_ref("a")

        # Restarted: still registered, under the same ref.
        await a.tell("boom")
        await trio.sleep(1)
        assert sup.restarts == 1
        assert registry.lookup("a") == a

        # Ended for good (temporary): unregistered.
        await registry.lookup("t").tell("exit")
        await trio.sleep(1)
        assert registry.names() == ["a"]

        # Dynamic children: registered when started, unregistered when stopped.
        async def start_later() -> None:
            await trio.sleep(3)
            await sup.start_child(ChildSpec("d", Idle))

        nursery.start_soon(start_later)
        d = await registry.wait_for("d")
        assert d == sup.child_ref("d")
        await sup.stop_child("d")
        assert registry.names() == ["a"]

        # A name another ref holds cannot be started.
        registry.register("taken", _ref("taken"))
        with pytest.raises(ValueError, match="already registered"):
            await sup.start_child(ChildSpec("taken", Idle))
        assert "taken" not in sup.child_names()
        nursery.cancel_scope.cancel()
    assert registry.names() == ["taken"]


class SlowStarter(Actor):
    async def on_start(self) -> None:
        await trio.sleep(5)


async def test_children_are_registered_once_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = Registry()
    sup = Supervisor("sup", registry=registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        nursery.start_soon(sup.start_child, ChildSpec("slow", SlowStarter))
        await trio.sleep(1)
        assert sup.child_names() == ["slow"]  # the name is taken in the supervisor...
        assert registry.names() == []  # ...but not published before it is up
        ref = await registry.wait_for("slow")
        assert trio.current_time() == 5
        assert ref == sup.child_ref("slow")
        nursery.cancel_scope.cancel()
