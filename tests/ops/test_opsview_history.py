"""The ops page's numbers, without etcd or HTTP: rates from relay counters (a relay that
publishes less often than we sample, one that restarts, one that goes quiet), the bounded
history, the spread of loss/jitter/RTT, and the reasons given for ownership changes.

Time is Trio's MockClock (pytest-trio's ``autojump_clock``): the samples are stamped with its
virtual time, nothing sleeps for real.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from ops.opsview import OpsView
from ops.opsview_history import STALE_AFTER, History, OwnershipEvent, OwnershipLog, percentile
from storage.etcd import Etcd, EtcdUnavailable
from storage.keys import Keyspace


def relay(
    relay_id: str, received: int, sent: int, *, pid: int = 1, started: float = 0.0
) -> dict[str, Any]:
    counters = {"client_in": received, "client_out": sent}
    return {"id": relay_id, "pid": pid, "started_at": started, "counters": counters}


def status(
    relays: list[dict[str, Any]] = (),  # type: ignore[assignment]
    nodes: dict[str, int] | None = None,
    sessions: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    return {
        "nodes": [{"id": n, "sessions": c} for n, c in (nodes or {}).items()],
        "relays": list(relays),
        "sessions": list(sessions),
    }


async def test_rates_follow_counters_published_less_often_than_sampled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # the relay publishes every 2 s (50 datagrams/s in, 40 out); we sample every second
    history = History()
    rates = []
    for second in range(12):
        published = second - second % 2
        now = trio.current_time()
        point = history.add(status([relay("r1", 50 * published, 40 * published)]), now)
        rates.append(point["relays"].get("r1"))
        autojump_clock.jump(1.0)
    assert rates[0] is None  # one reading is no rate yet
    # a counter read twice unchanged is not a rate of zero: the last rate holds until it changes
    assert all(r == {"in": 50.0, "out": 40.0} for r in rates[2:]), rates
    assert history.counter_resets == 0


async def test_a_restarted_relay_starts_a_new_baseline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    history = History()
    seen = []
    for step in range(10):
        now = trio.current_time()
        if step < 5:
            sample = relay("r1", 1000 + 100 * step, 1000 + 100 * step, pid=7)
        else:  # restarted: a new pid, counters from zero again
            sample = relay("r1", 100 * (step - 5), 100 * (step - 5), pid=8, started=123.0)
        seen.append(history.add(status([sample]), now)["relays"].get("r1"))
        autojump_clock.jump(1.0)
    assert history.counter_resets == 1
    assert seen[5] is None  # the restart itself: no rate from the old counters
    for rate in seen[1:5] + seen[6:]:
        assert rate == {"in": 100.0, "out": 100.0}  # never negative, never a spike


async def test_a_counter_that_goes_back_is_a_restart_even_with_the_same_pid(
    autojump_clock: trio.testing.MockClock,
) -> None:
    history = History()
    history.add(status([relay("r1", 500, 500)]), trio.current_time())
    autojump_clock.jump(1.0)
    point = history.add(status([relay("r1", 10, 10)]), trio.current_time())
    assert "r1" not in point["relays"] and history.counter_resets == 1
    autojump_clock.jump(1.0)
    point = history.add(status([relay("r1", 30, 20)]), trio.current_time())
    assert point["relays"]["r1"] == {"in": 20.0, "out": 10.0}


async def test_a_quiet_relay_drops_to_zero(autojump_clock: trio.testing.MockClock) -> None:
    history = History()
    for count in (0, 100):
        history.add(status([relay("r1", count, count)]), trio.current_time())
        autojump_clock.jump(1.0)
    rate = None
    for _ in range(int(STALE_AFTER) + 1):  # traffic stopped: the counters stay at 100
        rate = history.add(status([relay("r1", 100, 100)]), trio.current_time())["relays"]["r1"]
        autojump_clock.jump(1.0)
    assert rate == {"in": 0.0, "out": 0.0}


async def test_history_is_bounded_in_time_and_points(
    autojump_clock: trio.testing.MockClock,
) -> None:
    history = History(span=300.0, max_points=200)
    for step in range(1000):
        history.add(status(nodes={"n1": step % 7}), trio.current_time())
        autojump_clock.jump(1.0)
    times = [p["t"] for p in history.points]
    assert len(times) == 200  # max_points binds first here
    shorter = History(span=30.0, max_points=1000)
    for _ in range(100):
        shorter.add(status(nodes={"n1": 1}), trio.current_time())
        autojump_clock.jump(1.0)
    kept = [p["t"] for p in shorter.points]
    assert kept[-1] - kept[0] <= 30.0 and len(kept) == 31
    assert times == sorted(times)


def test_sessions_per_node_and_quality_spread() -> None:
    history = History()
    sessions = [
        {
            "id": f"s{i}",
            "owner": "n1",
            "stats": {"loss_fraction": i / 100, "jitter_ms": 2.0 * i, "rtt_ms": 10 + i},
        }
        for i in range(1, 6)
    ]
    sessions.append({"id": "s-new", "owner": "n2", "stats": None})  # no stats yet
    sessions.append({"id": "s-odd", "owner": "n2", "stats": {"rtt_ms": True, "jitter_ms": "x"}})
    point = history.add(status(nodes={"n1": 5, "n2": 2}, sessions=sessions), 100.0)
    assert point["nodes"] == {"n1": 5, "n2": 2}
    assert point["sessions"] == 7
    assert point["loss_pct"] == {"p50": 3.0, "p90": pytest.approx(4.6), "max": 5.0, "n": 5}
    assert point["jitter_ms"]["max"] == 10.0 and point["jitter_ms"]["n"] == 5
    assert point["rtt_ms"]["p50"] == 13.0
    figures = {s["id"]: s for s in history.view()["sessions"]}
    assert figures["s2"]["loss_pct"] == 2.0 and figures["s-odd"]["rtt_ms"] is None
    empty = history.add(status(nodes={"n1": 0}), 101.0)
    assert empty["rtt_ms"] is None and empty["sessions"] == 0


def test_percentile() -> None:
    assert percentile([1.0], 0.9) == 1.0
    assert percentile([0.0, 10.0], 0.5) == 5.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_garbage_in_a_status_is_skipped() -> None:
    history = History()
    junk: dict[str, Any] = {
        "nodes": ["x", {"id": "n1", "sessions": 1}],
        "relays": [None, {"id": "r", "counters": "no"}, {"id": "r2", "counters": {"client_in": 1}}],
        "sessions": [7, {"id": "s", "stats": [1]}],
    }
    point = history.add(junk, 1.0)
    assert point["nodes"] == {"n1": 1} and point["relays"] == {} and point["sessions"] == 1


def owner(rev: int, session: str, node: str | None) -> OwnershipEvent:
    return OwnershipEvent("owner", rev, session, node=node)


def test_ownership_changes_and_their_reasons() -> None:
    log = OwnershipLog({"old": "n1"})
    batches: list[list[OwnershipEvent]] = [
        [owner(10, "s1", "n1")],
        # a planned move: the move goes done in the transaction that moves the owner key
        [OwnershipEvent("move", 11, "s1", node="n2", source="n1", state="requested")],
        [owner(13, "s1", "n2"),
         OwnershipEvent("move", 13, "s1", node="n2", source="n1", state="done")],
        # a drain of n2, then a move out of it
        [OwnershipEvent("drain", 14, node="n2", state="requested")],
        [owner(15, "s1", "n3"),
         OwnershipEvent("move", 15, "s1", node="n3", source="n2", state="done")],
        # a refused move: nothing changes hands, but the reason is worth seeing
        [OwnershipEvent("move", 16, "old", node="n2", source="n1", state="failed",
                        reason="target did not restore in time")],
        # released: owner and checkpoint go in one transaction
        [OwnershipEvent("end_requested", 17, "s1")],
        [owner(18, "s1", None), OwnershipEvent("checkpoint_deleted", 18, "s1")],
        # lost: the owner key went with n1's lease, the checkpoint stays; then adopted
        [owner(19, "old", None)],
        [owner(21, "old", "n3")],
    ]  # fmt: skip
    for at, batch in enumerate(batches):
        log.apply(batch, float(at))
    got = [(c["session"], c["what"], c["reason"]) for c in reversed(log.view())]
    assert got == [
        ("s1", "claimed", "new session"),
        ("s1", "moved", "planned move (migrate) from n1"),
        ("", "drain", "n2 is being drained"),
        ("s1", "moved", "planned move (drain) from n2"),
        ("old", "move failed", "target did not restore in time"),
        ("s1", "ended", "ended on request via another node"),
        ("old", "lost", "owner n1 lost its lease"),
        ("old", "adopted", "failover: n1 lost its lease"),
    ]
    assert log.owners == {"old": "n3"}


def test_ownership_log_is_bounded() -> None:
    log = OwnershipLog(keep=5)
    for rev in range(20):
        log.apply([owner(rev, f"s{rev}", "n1")], float(rev))
    assert [c["session"] for c in log.view()] == ["s19", "s18", "s17", "s16", "s15"]


async def test_the_sampler_keeps_sampling_through_etcd_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def read(etcd: Etcd, keys: Keyspace) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if 5 <= calls < 8:
            raise EtcdUnavailable("etcd is away")
        return status([relay("r1", 10 * calls, 10 * calls)], nodes={"n1": calls})

    view = OpsView(
        None,  # type: ignore[arg-type]  # never reached: `read` stands in for etcd
        Keyspace(),
        interval=1.0,
        span=60.0,
        read=read,
        clock=trio.current_time,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(view._sample)
        await trio.sleep(6.5)  # virtual: the MockClock jumps
        assert view.error.startswith("etcd did not answer")
        await trio.sleep(120.0)
        nursery.cancel_scope.cancel()
    assert view.error == ""
    points = view.view()["points"]
    assert len(points) <= 62 and points[-1]["t"] - points[0]["t"] <= 60.0
    assert points[-1]["nodes"]["n1"] == calls
    assert points[-1]["relays"]["r1"] == {"in": 10.0, "out": 10.0}
