"""The 20 ms pacer on simulated time: exact deadlines, no drift, late ticks, gaps and flush."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from sessions.audio.pacer import FRAME_TIMESTAMP, PacedFrame, Pacer

TICK = 0.020


def frame(n: int) -> bytes:
    return n.to_bytes(4, "big")


def drive(
    pacer: Pacer,
    until: float,
    wake: Callable[[float], float] = lambda deadline: deadline,
) -> list[PacedFrame]:
    """Wake when the pacer's timer says (plus whatever ``wake`` adds); pop all that is due."""
    sent: list[PacedFrame] = []
    while (timer := pacer.get_timer()) is not None and timer <= until:
        now = wake(timer)
        while (due := pacer.get_timer()) is not None and due <= now:
            out = pacer.pop(now)
            if out is not None:
                sent.append(out)
    return sent


def test_exact_deadlines_and_no_drift_over_10000_ticks() -> None:
    pacer = Pacer(initial_timestamp=2**32 - 960 * 100)
    start = 1000.0
    for n in range(10_000):
        pacer.push(frame(n), start)
    pacer.end_talkspurt()
    sent = drive(pacer, start + 1000)
    assert len(sent) == 10_000
    assert [int.from_bytes(f.payload, "big") for f in sent] == list(range(10_000))
    for n, f in enumerate(sent):
        assert f.deadline == start + n * TICK  # computed from n, never accumulated
        assert f.timestamp == (2**32 - 960 * 100 + 960 * n) % 2**32  # wraps at 2**32
        assert f.marker is (n == 0)
    # The 10 000th tick is where it should be, to the rounding of one multiplication.
    assert abs(sent[-1].deadline - (start + 9999 * 0.02)) < 1e-9
    s = pacer.stats()
    assert (s.sent, s.late, s.underruns, s.played_ms, s.queued_ms) == (10_000, 0, 0, 200_000, 0)


def test_late_wakeups_do_not_shift_the_schedule() -> None:
    rnd = random.Random(5)
    late_by = {}

    def wake(deadline: float) -> float:
        delay = rnd.choice([0.0, 0.001, 0.004, 0.006, 0.012])
        late_by[round(deadline, 6)] = delay
        return deadline + delay

    pacer = Pacer(late_threshold=0.005)
    for n in range(2000):
        pacer.push(frame(n), 0.0)
    sent = drive(pacer, 100.0, wake)
    assert [f.deadline for f in sent] == [n * TICK for n in range(2000)]
    # Late ticks: those handled more than 5 ms after their deadline (a wake-up 12 ms late
    # handles one tick; ticks are never merged since wake-ups are less than 20 ms late).
    expected_late = sum(1 for d in late_by.values() if d > 0.005)
    assert pacer.stats().late == expected_late
    assert pacer.stats().skipped == 0


def test_a_short_stall_catches_up_in_a_burst() -> None:
    pacer = Pacer()
    for n in range(20):
        pacer.push(frame(n), 0.0)
    first = drive(pacer, 0.1)  # ticks 0-5 on time
    assert len(first) == 6
    burst = [pacer.pop(0.2 + 0.001) for _ in range(6)]  # woke 81 ms late: ticks 6-10 due
    sent = [f for f in burst if f is not None]
    assert [f.deadline for f in sent] == [n * TICK for n in range(6, 11)]
    assert [f.timestamp for f in sent] == [n * FRAME_TIMESTAMP for n in range(6, 11)]
    assert pacer.stats().late == 4  # tick 10 was only 1 ms late
    assert not any(f.marker for f in sent)


def test_a_long_stall_skips_ticks_and_marks_the_gap() -> None:
    pacer = Pacer(max_catchup=5)
    for n in range(50):
        pacer.push(frame(n), 0.0)
    drive(pacer, 0.0)  # tick 0
    now = 0.5 + 0.003  # a 500 ms stall: ticks 1-25 are due
    out = pacer.pop(now)
    assert out is not None
    assert out.deadline == pytest.approx(25 * TICK)
    assert out.timestamp == 25 * FRAME_TIMESTAMP  # the timestamp shows the 480 ms gap
    assert out.marker  # first packet after a silence
    assert out.payload == frame(1)  # the audio was delayed, not dropped
    s = pacer.stats()
    assert (s.skipped, s.late, s.sent) == (24, 0, 2)


def test_underrun_sends_nothing_and_timestamps_continue() -> None:
    pacer = Pacer(hangover=5)
    for n in range(3):
        pacer.push(frame(n), 0.0)
    sent = drive(pacer, 0.05)
    assert len(sent) == 3
    # The agent is slow: nothing for ticks 3 and 4, then more audio.
    assert pacer.pop(0.060) is None
    assert pacer.pop(0.080) is None
    pacer.push(frame(3), 0.090)
    out = pacer.pop(0.100)
    assert out is not None
    assert (out.payload, out.timestamp, out.marker) == (frame(3), 5 * 960, True)
    # Then the agent stops without saying so: hangover underruns, then idle.
    for k in range(6, 11):
        assert pacer.get_timer() == pytest.approx(k * TICK)
        assert pacer.pop(k * TICK) is None
    assert pacer.get_timer() is None
    s = pacer.stats()
    assert (s.sent, s.underruns, s.talkspurts, s.played_ms) == (4, 7, 1, 80)


def test_end_talkspurt_goes_idle_without_underruns() -> None:
    pacer = Pacer()
    for n in range(5):
        pacer.push(frame(n), 0.0)
    pacer.end_talkspurt()
    assert len(drive(pacer, 1.0)) == 5
    assert pacer.get_timer() is None
    assert pacer.stats().underruns == 0
    assert pacer.next_timestamp == 5 * 960


def test_next_talkspurt_continues_the_timeline() -> None:
    pacer = Pacer(initial_timestamp=1000)
    pacer.push(frame(0), 0.0)
    pacer.end_talkspurt()
    drive(pacer, 1.0)
    # 1.005 s later: the next talkspurt starts at once; the timestamp jumps by the whole
    # ticks that passed since the tick after the last frame.
    pacer.push(frame(1), 1.005)
    assert pacer.get_timer() == 1.005
    out = pacer.pop(1.005)
    assert out is not None
    assert out.marker
    assert out.timestamp == 1000 + 960 * round(1.005 / TICK)
    assert pacer.stats().talkspurts == 2
    # A talkspurt that starts right after the last one waits for the unused tick, so
    # packets are never less than 20 ms apart.
    pacer.end_talkspurt()
    pacer.push(frame(2), 1.010)
    assert pacer.get_timer() == pytest.approx(1.025)
    out = pacer.pop(1.025)
    assert out is not None
    assert out.timestamp == 1000 + 960 * (round(1.005 / TICK) + 1)


def test_flush_drops_the_queue_and_reports_what_was_played() -> None:
    pacer = Pacer()
    for n in range(50):
        pacer.push(frame(n), 0.0)
    sent = drive(pacer, 0.19)  # ticks 0-9
    assert len(sent) == 10
    assert pacer.stats().queued_ms == 800
    assert pacer.flush() == 800  # barge-in
    assert pacer.get_timer() is None
    s = pacer.stats()
    assert (s.played_ms, s.talkspurt_ms, s.flushed_ms, s.queued_ms, s.underruns) == (
        200,
        200,
        800,
        0,
        0,
    )
    assert pacer.flush() == 0
    # The answer to the interruption is a new talkspurt, on the old timeline.
    pacer.push(frame(99), 0.5)
    out = pacer.pop(0.5)
    assert out is not None
    assert (out.payload, out.marker, out.timestamp) == (frame(99), True, 25 * 960)
    assert pacer.stats().talkspurt_ms == 20
    assert pacer.stats().played_ms == 220


def test_not_due_and_idle() -> None:
    pacer = Pacer()
    assert pacer.get_timer() is None
    assert pacer.pop(5.0) is None
    pacer.push(b"x", 5.0)
    assert pacer.pop(4.999) is None
    assert pacer.pop(5.0) is not None
    assert pacer.pop(5.001) is None  # the next tick is at 5.02
    with pytest.raises(ValueError):
        Pacer(initial_timestamp=2**32)
    with pytest.raises(AttributeError):
        pacer.hangover = 1


def _frames_per_wake(grid: float) -> list[int]:
    """A caller that handles timers only on a 20 ms grid, waking 1-6 ms after each grid point
    (its latency varies), feeding one frame per wake-up; how many frames each wake sent."""
    rnd = random.Random(7)
    pacer = Pacer(grid=grid)
    sent: list[int] = []
    point = 100.0  # a grid point
    pacer.push(b"f", point + 0.003)  # the first frame came 3 ms after a grid point
    for _ in range(200):
        now = point + rnd.uniform(0.001, 0.006)
        pacer.push(b"f", now)
        count = 0
        while (t := pacer.get_timer()) is not None and t <= now:
            count += pacer.pop(now) is not None
        sent.append(count)
        point += 0.02
    return sent


def test_on_a_grid_talkspurts_start_on_it_and_a_late_wake_sends_one_frame() -> None:
    on_grid = _frames_per_wake(0.02)
    assert on_grid[1:] == [1] * 199  # the first wake may carry the talkspurt's first frame too
    # Off the grid, the ticks fall 3 ms after each grid point: a wake later than that finds
    # the next tick due as well, and one earlier finds none.
    off_grid = _frames_per_wake(0.0)
    assert 0 in off_grid and 2 in off_grid


def test_a_grid_talkspurt_starts_on_the_nearest_point_and_keeps_its_timeline() -> None:
    pacer = Pacer(grid=0.02)
    pacer.push(b"a", 10.004)  # nearer 10.00 than 10.02
    assert pacer.get_timer() == pytest.approx(10.0)
    pacer.push(b"b", 10.004)
    assert pacer.pop(10.004) is not None and pacer.get_timer() == pytest.approx(10.02)
    later = Pacer(grid=0.02)
    later.push(b"a", 10.013)  # nearer 10.02: never more than half a tick early or late
    assert later.get_timer() == pytest.approx(10.02)


def test_due_counts_the_ticks_pop_hands_out_at_a_time() -> None:
    pacer = Pacer(max_catchup=5)
    assert pacer.due(1.0) == 0  # idle: nothing queued, no tick
    for n in range(50):
        pacer.push(frame(n), 0.0)
    assert pacer.due(0.0) == 1 and drive(pacer, 0.0)  # tick 0
    assert pacer.due(0.01) == 0  # tick 1 is due at 20 ms
    assert pacer.due(4 * TICK) == 4  # ticks 1-4: a catch-up burst
    assert len([f for f in (pacer.pop(4 * TICK) for _ in range(6)) if f is not None]) == 4
    assert pacer.due(0.5 + 0.003) == 1  # a long stall: ticks 5-24 are skipped, 25 is due
