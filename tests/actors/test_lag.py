"""The loop-lateness monitor that relays and nodes publish beside their packet counters."""

from __future__ import annotations

import trio
import trio.testing

from actors.lag import LoopLag


async def test_a_stall_shows_once_in_the_recent_figure_and_stays_in_the_worst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lag = LoopLag(interval=0.02, stall=0.1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lag.run)
        await trio.sleep(1.0)
        assert lag.counters() == {"loop_lag_ms": 0, "loop_lag_worst_ms": 0, "loop_stalls": 0}
        # One step that holds the loop for 0.35 s (no checkpoint while the clock moves on).
        autojump_clock.jump(0.35)
        await trio.sleep(1.0)
        first = lag.counters()
        assert 330 <= first["loop_lag_ms"] <= 350 and first["loop_stalls"] == 1
        await trio.sleep(1.0)
        # The recent figure covers the time since the previous report; the worst stays.
        assert lag.counters() == {
            "loop_lag_ms": 0,
            "loop_lag_worst_ms": first["loop_lag_ms"],
            "loop_stalls": 1,
        }
        # Late, but not a stall.
        autojump_clock.jump(0.05)
        await trio.sleep(1.0)
        assert lag.counters()["loop_stalls"] == 1
        nursery.cancel_scope.cancel()
