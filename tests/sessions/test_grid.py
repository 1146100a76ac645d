"""The node-wide media grid: one runner serves every session's step on time, in a fixed order."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.lowlevel
import trio.testing

from sessions.grid import Rest, grid_index, ride

TICK = 0.02


def test_grid_index_takes_a_point_a_rounding_before_the_timer() -> None:
    assert grid_index(0.0, TICK) == 0
    assert grid_index(0.001, TICK) == 1
    assert grid_index(0.02, TICK) == 1
    assert grid_index(0.02 + 1e-9, TICK) == 1  # a float's rounding after point 1: still it
    assert grid_index(0.02 + 1e-4, TICK) == 2
    assert grid_index(3 * 0.1 + 0.04, TICK) == 17  # 0.34000000000000002 is point 17


async def test_riders_are_served_at_each_point_in_the_order_they_joined(
    autojump_clock: trio.testing.MockClock,
) -> None:
    served: list[tuple[str, int]] = []  # (rider, grid point of the call)
    returned: list[str] = []

    async def rider(name: str, first: int, last: int) -> None:
        def step(now: float) -> int | None:
            point = round(now / TICK)
            assert abs(now - point * TICK) < 1e-9  # called at the point itself
            served.append((name, point))
            return None if point >= last else point + 1

        await ride(first, TICK, step)
        returned.append(name)

    async with trio.open_nursery() as nursery:
        for name in "abcdefgh":  # eight sessions joining on the same point
            nursery.start_soon(rider, name, 5, 104)
        await trio.sleep(0.01)
        nursery.start_soon(rider, "late", 7, 9)
    by_point: dict[int, list[str]] = {}
    for name, point in served:
        by_point.setdefault(point, []).append(name)
    # Trio would run eight woken tasks in a random order (it reverses half its batches); the
    # grid serves them in the same order on every one of the 100 ticks.
    orders = {tuple(n for n in names if n != "late") for names in by_point.values()}
    assert len(orders) == 1 and len(by_point) == 100
    assert [p for p, names in sorted(by_point.items()) if "late" in names] == [7, 8, 9]
    late_places = {names.index("late") for p, names in by_point.items() if "late" in names}
    assert len(late_places) == 1  # a rider that joins later keeps its place too
    assert sorted(returned) == sorted([*"abcdefgh", "late"])


async def test_an_earlier_point_wakes_the_runner_and_a_cancelled_rider_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    served: list[tuple[str, float]] = []

    def once(name: str) -> object:
        def step(now: float) -> int | None:
            served.append((name, now))
            return None

        return step

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ride, 50, TICK, once("far"))  # the runner sleeps for 1.0 s ...
        await trio.sleep(0.1)
        nursery.start_soon(ride, 8, TICK, once("near"))  # ... and is woken for 0.16 s
        with trio.move_on_after(0.05):
            await ride(9, TICK, once("gave up"))  # cancelled before its point: never served
    assert [name for name, _ in served] == ["near", "far"]
    assert served[0][1] == pytest.approx(0.16) and served[1][1] == pytest.approx(1.0)


async def test_a_failing_step_is_raised_in_its_own_task_and_the_others_go_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    served: list[int] = []

    def failing(now: float) -> int | None:
        raise ValueError("this session's own bug")

    def steady(now: float) -> int | None:
        served.append(round(now / TICK))
        return None if len(served) == 5 else round(now / TICK) + 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ride, 3, TICK, steady)
        with pytest.raises(ValueError, match="own bug"):
            await ride(3, TICK, failing)
    assert served == [3, 4, 5, 6, 7]


async def test_the_runner_ends_when_idle_and_starts_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def at_once(now: float) -> int | None:
        return None

    await ride(grid_index(trio.current_time() + 0.1, TICK), TICK, at_once)
    assert any(name.startswith("media grid") for name in _task_names())
    await trio.sleep(10)  # 500 ticks with no one riding
    assert not any(name.startswith("media grid") for name in _task_names())
    point = grid_index(trio.current_time() + 0.05, TICK)
    await ride(point, TICK, at_once)
    assert trio.current_time() == pytest.approx(point * TICK)


def _task_names() -> list[str]:
    root = trio.lowlevel.current_root_task()
    assert root is not None
    names: list[str] = []
    stack = [root]
    while stack:
        task = stack.pop()
        names.append(task.name)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return names


@pytest.mark.parametrize("then", ["stays", "leaves", "raises"])
async def test_a_step_that_wakes_its_own_task_hands_over_to_it(
    autojump_clock: trio.testing.MockClock, then: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A session's step can stall it, which cancels the scope its task waits in: Trio wakes the
    # task at once, so the grid must neither wake it again nor keep serving it.
    served: list[str] = []

    async def session(name: str) -> None:
        with trio.CancelScope() as scope:

            def step(now: float) -> int | None:
                served.append(name)
                if name == "stalls":
                    scope.cancel()
                    if then == "raises":
                        raise RuntimeError("broken while stalling")
                    return round(now / TICK) + 1 if then == "stays" else None
                return None if len(served) > 6 else round(now / TICK) + 1

            await ride(4, TICK, step)
        served.append(f"{name} back")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session, "stalls")
        nursery.start_soon(session, "steady")
    assert served.count("stalls") == 1 and "stalls back" in served
    assert served.count("steady") >= 4 and served[-1] == "steady back"
    assert ("broken while stalling" in caplog.text) == (then == "raises")


async def test_a_grid_that_fell_behind_lets_other_tasks_run_between_points(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Every step takes 50 ms of a 20 ms tick (an overloaded node): the grid is always behind,
    # and its lease's keepalives and the tunnels' reads must still get their turns.
    order: list[str] = []

    def slow(now: float) -> int | None:
        order.append("step")
        autojump_clock.jump(0.05)
        return None if order.count("step") == 10 else round(now / TICK) + 1

    async def other() -> None:
        while order.count("step") < 10:
            order.append("other")
            await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ride, 2, TICK, slow)
        nursery.start_soon(other)
    steps = [i for i, what in enumerate(order) if what == "step"]
    assert len(steps) == 10
    assert all("other" in order[a:b] for a, b in itertools.pairwise(steps))


async def test_rests_run_after_every_step_in_the_same_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A node's session steps up to its frames and leaves their encoding and sending for its
    # rest: the grid runs every rider's step, then the rests, in the riders' order.
    done: list[tuple[int, str, int]] = []  # (point, what, whose)

    async def rider(name: int) -> None:
        def step(now: float) -> int | Rest | None:
            point = round(now / TICK)
            done.append((point, "step", name))
            if name % 3 == 0:  # some riders leave no rest
                return point + 1 if point < 4 else None

            def rest() -> int | None:
                done.append((point, "rest", name))
                return point + 1 if point < 4 else None

            return rest

        await ride(2, TICK, step)

    async with trio.open_nursery() as nursery:
        for name in range(8):
            nursery.start_soon(rider, name)
    order = [who for p, what, who in done if p == 2 and what == "step"]  # as they joined
    for point in (2, 3, 4):
        assert [(what, who) for p, what, who in done if p == point] == [
            *(("step", who) for who in order),
            *(("rest", who) for who in order if who % 3),
        ]
    assert {p for p, _, _ in done} == {2, 3, 4}  # each rest's next point was followed, then None


async def test_a_rest_that_fails_is_raised_in_its_own_task_and_the_others_go_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    done: list[str] = []

    def failing(now: float) -> Rest:
        def rest() -> int | None:
            raise ValueError("this session's own bug")

        return rest

    def steady(now: float) -> Rest:
        def rest() -> int | None:
            done.append("steady")
            return None if done.count("steady") == 3 else round(now / TICK) + 1

        return rest

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ride, 3, TICK, steady)
        with pytest.raises(ValueError, match="own bug"):
            await ride(3, TICK, failing)
    assert done.count("steady") == 3
