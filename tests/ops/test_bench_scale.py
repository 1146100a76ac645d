"""The scale bench's parts: etcd's counters, a process's memory, the bare-task baseline, the
answer's candidates, setups that fail; and (slow) a small run end to end against a real cluster."""

from __future__ import annotations

import json
import os

import pytest
import trio

from ops.bench import scale
from ops.bench.lite_client import answer_candidates
from ops.bench.scale import RECEIVED_BYTES, WRITE_COUNTERS, etcd_counters, main, memory
from ops.bench.scale_clients import Fleet
from ops.etcdserver import free_port
from tests.ops.test_bench_sessions_smoke import _children

METRICS = """\
# HELP etcd_mvcc_put_total Total number of puts seen by this member.
# TYPE etcd_mvcc_put_total counter
etcd_mvcc_put_total 120
# HELP etcd_server_proposals_committed_total The total number of consensus proposals committed.
# TYPE etcd_server_proposals_committed_total gauge
etcd_server_proposals_committed_total 131
# HELP etcd_mvcc_txn_total Total number of txns seen by this member.
# TYPE etcd_mvcc_txn_total counter
etcd_mvcc_txn_total{kind="a"} 3
etcd_mvcc_txn_total{kind="b"} 4
# HELP etcd_mvcc_range_total Total number of ranges seen by this member.
# TYPE etcd_mvcc_range_total counter
etcd_mvcc_range_total 999
# HELP etcd_network_client_grpc_received_bytes_total Bytes received from grpc clients.
# TYPE etcd_network_client_grpc_received_bytes_total counter
etcd_network_client_grpc_received_bytes_total{type="unary"} 2048
"""


def test_etcd_counters_reads_the_write_counters_summed_over_labels() -> None:
    counters = etcd_counters(METRICS)
    assert set(counters) == {*WRITE_COUNTERS, RECEIVED_BYTES}
    assert counters["etcd_mvcc_put_total"] == 120
    assert counters["etcd_server_proposals_committed_total"] == 131
    assert counters["etcd_mvcc_txn_total"] == 7
    assert counters["etcd_mvcc_delete_total"] == 0  # absent: 0, and ranges are no writes
    assert counters[RECEIVED_BYTES] == 2048


def test_memory_sees_pages_this_process_touches() -> None:
    before = memory(os.getpid())
    assert 0 < before.pss <= before.rss
    block = bytearray(64 * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    after = memory(os.getpid())
    assert after.rss - before.rss >= 60 * 1024 * 1024
    assert after.pss - before.pss >= 60 * 1024 * 1024
    del block


def test_bare_tasks_cost_a_few_kib_each() -> None:
    rss, pss = scale.bare_tasks(200)
    assert 1024 < rss < 64 * 1024, rss
    assert pss < 64 * 1024, pss


def test_answer_candidates() -> None:
    answer = (
        "v=0\r\na=ice-ufrag:abcd\r\n"
        "a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\n"
        "a=candidate:2 1 UDP 2130706175 10.0.0.2 40001 typ host\r\n"
        "a=candidate:3 1 udp 1694498815 192.0.2.1 40002 typ srflx raddr 0.0.0.0 rport 0\r\n"
    )
    assert answer_candidates(answer) == [("127.0.0.1", 40000), ("10.0.0.2", 40001)]
    assert answer_candidates("v=0\r\n") == []


async def test_setups_that_fail_are_counted_and_bounded() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/session"  # nothing listens
    async with trio.open_nursery() as nursery:
        fleet = Fleet(url, None, nursery)
        await fleet.grow(5, batch=2)
        assert fleet.sessions == []
        # twice the shortfall, then it gives up
        assert sum(fleet.failures.values()) == 10
        assert set(fleet.failures) == {"POST: URLError"}
        nursery.cancel_scope.cancel()


def test_arguments_are_checked() -> None:
    with pytest.raises(SystemExit):
        main(["--counts", "0"])
    with pytest.raises(SystemExit):
        main(["--counts", "ten"])


@pytest.mark.slow
def test_bench_scale_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    before = _children()
    affinity = os.sched_getaffinity(0)
    result = main(["--quick", "--json"])
    assert result is not None
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result.as_dict()))

    assert (
        result.window == result.idle_window == 10 and result.failures == {} and result.largest == 20
    )
    assert result.setup_p50 is not None and 0 < result.setup_p50 < 5
    base = result.baseline
    proposals = WRITE_COUNTERS[3]
    # with no session the node and relay still write (their registrations, the node's stats)
    assert base.sessions == 0 and base.writes_per_minute[proposals] > 0
    idle = [s for s in result.steps if not s.talking]
    talking = [s for s in result.steps if s.talking]
    assert [s.sessions for s in idle] == [5, 20]
    assert [(s.sessions, s.talking) for s in talking] == [(2, 2), (5, 2), (20, 2)]
    for step in idle:
        # sessions cost memory; an idle one checkpoints once a minute (a talking one every
        # 10 s), so a 10 s window sees at most the sessions whose minute falls in it
        assert step.memory.rss > base.memory.rss
        per_session = (step.writes_per_minute[proposals] - base.writes_per_minute[proposals]) / (
            step.sessions
        )
        assert per_session < 3, per_session
        assert step.frames == 0 and step.jitter is None
    for step in talking:
        # two talkers for 10 s: about a thousand echoed frames, timed
        assert step.frames > 500 and step.missing < step.frames / 2
        assert step.send_lag is not None and step.send_lag >= 0
        assert step.jitter is not None and 0 <= step.jitter < 1
        assert step.node_cpu > 0
    assert talking[-1].node_cpu > idle[-1].node_cpu
    assert [c for c, _, _ in result.bare_tasks] == [5, 20]
    text = scale.render(result)
    assert "idle" in text and "talking" in text
    # the cluster is gone, and this process is back on all its cores
    assert _children() <= before
    assert os.sched_getaffinity(0) == affinity
