"""`parley chaos`: its short form against a real `parley up` (three etcd members, three nodes, two
relays, echo agent, relay audit, media ledgers), its refusal of a cluster without the echo agent,
the limits on what it may signal, and the verdicts it draws from what it saw."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.chaos_faults import check_target, etcd_members
from ops.chaos_verdicts import Fault, Observed, Plan, excused, judge, silences
from ops.etcdserver import EtcdServer, free_port
from sessions.node.ledger import Segment
from tests.helpers import PARLEY
from tests.ops.test_processes import wait_for

#: its first five faults are one of each kind (the kinds' generator is the seed's own)
SEED = 160


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """`parley up --etcd-members 3` with 3 nodes (lease TTL 5 s), 2 relays, the echo agent, the
    relays' index audit and the nodes' media ledgers under DIR/ledger."""
    data = tmp_path / "data"
    env = dict(
        os.environ,
        PARLEY_CONFIG="/dev/null",
        PARLEY_NODE_AGENT="echo",
        PARLEY_RELAY_AUDIT="1",
        PARLEY_NODE_LEDGER_DIR=str(data / "ledger"),
        PARLEY_UP_ETCD_PEER_PORT="0",
        PARLEY_UP_RELAY_PORT=str(free_port()),
        PARLEY_UP_SIGNALING_PORT="0",
    )
    argv = [*PARLEY, "up", "--data-dir", str(data), "--etcd-port", "0", "--etcd-members", "3"]
    # The nodes' default lease (5 s). A lease whose TTL less one keepalive interval is shorter
    # than the 3 s freeze of the etcd leader (2 s, 4 s) lets Debian's etcd 3.4.23 revoke it when
    # the old leader thaws, though the new leader kept it alive (etcd-io/etcd#15247): a node
    # told its lease is alive goes on processing for a moment after another has adopted its
    # sessions. `parley chaos --faults freeze-etcd` against `--lease-ttl 2` shows it.
    argv += ["--nodes", "3", "--relays", "2"]
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 - closed below
    up = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_up(tmp_path / "up.log", up)
        yield data, up
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        log.close()


def _wait_up(log: Path, up: subprocess.Popen[str], within: float = 90) -> None:
    def ready() -> bool | None:
        if up.poll() is not None:
            raise AssertionError(f"parley up exited:\n{log.read_text()}")
        return "parley is up" in log.read_text() or None

    wait_for(ready, within, f"parley up in {log}")


@pytest.mark.slow
def test_chaos_short_form_passes_against_parley_up(
    cluster: tuple[Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    data, up = cluster
    out = tmp_path / "chaos.json"
    argv = [*PARLEY, "chaos", "--data-dir", str(data), "--duration", "55", "--sessions", "4"]
    argv += ["--seed", str(SEED), "--json", str(out)]
    env = dict(os.environ, PARLEY_CONFIG="/dev/null")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=150, env=env, check=False)
    report = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, report
    result = json.loads(out.read_text())
    verdicts = {v["invariant"]: v for v in result["verdicts"]}
    assert all(v["verdict"] == "PASS" for v in verdicts.values()), report
    assert "invariant" in done.stdout and "PASS" in done.stdout  # the table

    faults = result["faults"]
    kinds = {f["kind"] for f in faults}
    assert len(faults) >= 3 and len(kinds) >= 3, report
    # Only the cluster's own processes were signalled, each one restarted by parley up.
    ours = {"node-1", "node-2", "node-3", "relay-1", "relay-2", "etcd-1", "etcd-2", "etcd-3"}
    assert {f["target"] for f in faults} <= ours, faults
    assert all(f["back"] is not None for f in faults), faults
    assert up.poll() is None

    lost = verdicts["no session lost"]["figures"]
    assert lost["gap_ms"]["n"] == 4 * len(faults) and not lost["not_heard"], lost
    failover = verdicts["every failover within its bound"]["figures"]
    if kinds & {"kill-node", "term-node"}:  # their sessions were owned again, within the bound
        assert failover["owned_again_ms"]["n"] >= 1, failover
        assert failover["owned_again_ms"]["max"] < result["plan"]["bound"] * 1000, failover
    audit = verdicts["no SRTP/SRTCP index twice on the wire"]["figures"]
    assert audit["srtp_audited"] > 4 * 40 * 50 and audit["srtp_index_reused"] == 0, audit
    owners = verdicts["never two owners at once"]["figures"]
    assert owners["segments"] >= 4 and owners["violations"] == [], owners
    history = verdicts["etcd history consistent with claims"]["figures"]
    assert history["writes"] >= 4 and history["backwards"] == [], history


@pytest.mark.slow
def test_chaos_refuses_a_cluster_without_the_echo_agent(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = dict(os.environ, PARLEY_CONFIG="/dev/null", PARLEY_UP_SIGNALING_PORT="0")
    env.pop("PARLEY_NODE_AGENT", None)  # the default: turn-echo, which answers after a turn
    argv = [*PARLEY, "up", "--data-dir", str(data), "--etcd-port", str(free_port())]
    argv += ["--nodes", "1", "--relays", "0"]
    with open(tmp_path / "up.log", "w") as log:
        up = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_up(tmp_path / "up.log", up)
        argv = [*PARLEY, "chaos", "--data-dir", str(data), "--duration", "5", "--sessions", "1"]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, env=env, check=False
        )
        assert done.returncode == 2, done
        # turn-echo answered, but only after a whole turn: the probe, not a failed setup
        assert "the first session's echo came" in done.stderr, done.stderr
        assert "needs `parley up` with the echo agent" in done.stderr, done.stderr
        assert "PARLEY_NODE_AGENT=echo" in done.stderr
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)


def test_chaos_needs_a_running_parley_up(tmp_path: Path) -> None:
    argv = [*PARLEY, "chaos", "--data-dir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "no `parley up` found with data directory" in done.stderr, done.stderr


def test_only_processes_of_that_parley_up_are_targets(tmp_path: Path) -> None:
    """An etcd counts only under the data directory and below the `parley up` given; a process
    is a target only as the role and id it runs as."""
    with EtcdServer(tmp_path / "etcd") as server:
        stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            (member,) = etcd_members(tmp_path, os.getpid())
            assert (member.name, member.pid) == ("etcd", server.pid)
            assert member.endpoint == server.endpoint
            assert etcd_members(tmp_path / "elsewhere", os.getpid()) == []
            assert etcd_members(tmp_path, stranger.pid) == []  # not below that process
            assert check_target(server.pid, os.getpid(), "--data-dir")
            assert not check_target(server.pid, stranger.pid, "--data-dir")
            assert not check_target(server.pid, os.getpid(), "node")
            assert not check_target(os.getpid(), os.getpid(), "--data-dir")  # not a descendant
        finally:
            stranger.kill()
            stranger.wait()


# --- verdicts from what a run saw ----------------------------------------------------------------


def _plan(bound: float = 5.0) -> Plan:
    return Plan(
        data_dir="/d", up=1, endpoint="e", prefix="/parley", sessions=2, duration=60.0,
        every=8.0, seed=1, bound=bound, ttl=2, margin=0.5, nodes=("node-1", "node-2"),
        relays=("relay-1",), members=1, revision=1, whip={},
    )  # fmt: skip


def _echo(begin: float, end: float, *holes: tuple[float, float]) -> list[float]:
    """Echo arrivals every 20 ms from ``begin`` to ``end``, none inside each hole."""
    times = [begin + 0.02 * i for i in range(int((end - begin) / 0.02))]
    return [t for t in times if not any(a < t < b for a, b in holes)]


def _seen(*faults: Fault, relays: dict[str, int] | None = None) -> Observed:
    seen = Observed(faults=list(faults), began=0.0, ended=60.0)
    seen.history = [
        (0.5, "s1", "node-1", 10),
        (0.6, "s2", "node-2", 11),
        (12.0, "s1", "node-2", 40),
    ]
    seen.counters[("relays", "relay-1", 7)] = relays or {"srtp_audited": 9000, "fenced": 3}
    return seen


def _kill(at: float = 10.0, bound: float = 5.0) -> Fault:
    return Fault(1, "kill-node", "node-1", 99, at, at, 0.0, bound, {"s1": 10}, back=2.0)


def _segments(*extra: Segment) -> list[Segment]:
    def seg(node: str, session: str, epoch: int, first: float, last: float, rtp: int) -> Segment:
        return Segment(node, session, epoch, first, last, ((rtp, rtp + 99),), (), ())

    return [seg("node-1", "s1", 10, 0, 10, 0), seg("node-2", "s1", 40, 12, 60, 500),
            seg("node-2", "s2", 11, 0, 60, 0), *extra]  # fmt: skip


def _verdicts(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {r["invariant"]: r["verdict"] for r in rows}


def test_a_failover_silence_within_the_bound_passes_every_invariant() -> None:
    arrivals = {"s1": _echo(0, 60, (10.0, 12.1)), "s2": _echo(0, 60)}
    rows = judge(_plan(), _seen(_kill()), arrivals, _segments())
    assert set(_verdicts(rows).values()) == {"PASS"}, rows
    lost = rows[0]["figures"]
    assert lost["gap_ms"]["max"] == pytest.approx(2100, abs=30) and lost["gap_ms"]["n"] == 2


def test_a_silence_past_the_bound_or_outside_any_fault_loses_the_session() -> None:
    late = {"s1": _echo(0, 60, (10.0, 16.0)), "s2": _echo(0, 60)}  # 6 s > the 5 s bound
    rows = judge(_plan(), _seen(_kill()), late, _segments())
    assert _verdicts(rows)["no session lost"] == "FAIL"
    assert rows[0]["figures"]["not_heard"] == ["s1 after fault 1 (kill-node)"]
    stray = {"s1": _echo(0, 60, (10.0, 12.0)), "s2": _echo(0, 60, (30.0, 36.0))}
    rows = judge(_plan(), _seen(_kill()), stray, _segments())
    assert rows[0]["verdict"] == "FAIL" and list(rows[0]["figures"]["over_the_bound"]) == ["s2"]
    gone = {"s1": _echo(0, 50), "s2": _echo(0, 60)}  # silent from 50 s to the end
    assert judge(_plan(), _seen(), gone, _segments())[0]["verdict"] == "FAIL"


def test_a_relay_kill_excuses_the_longer_silence_of_its_window_only() -> None:
    relay = Fault(1, "kill-relay", "relay-1", 9, 10.0, 10.0, 0.0, 9.0, back=2.0)
    assert excused((10.1, 17.0), [relay], 5.0)
    assert not excused((10.1, 19.5), [relay], 5.0)  # past its bound
    assert not excused((30.0, 37.0), [relay], 5.0)
    found = silences(_echo(0, 20, (10.0, 17.0)), 0.0, 20.0)
    assert len(found) == 1 and found[0][1] - found[0][0] == pytest.approx(7.0, abs=0.05)


def test_two_owners_or_a_reused_index_fail_and_a_missing_audit_is_unchecked() -> None:
    arrivals = {"s1": _echo(0, 60, (10.0, 12.1)), "s2": _echo(0, 60)}
    overlap = Segment("node-1", "s2", 11, 0, 60, ((0, 99),), (), ())  # one epoch, two nodes
    rows = _verdicts(judge(_plan(), _seen(_kill()), arrivals, _segments(overlap)))
    assert rows["never two owners at once"] == "FAIL"
    assert rows["etcd history consistent with claims"] == "FAIL"  # etcd never gave node-1 that
    reused = _seen(_kill(), relays={"srtp_audited": 9000, "srtp_index_reused": 1})
    rows = _verdicts(judge(_plan(), reused, arrivals, _segments()))
    assert rows["no SRTP/SRTCP index twice on the wire"] == "FAIL"
    off = _verdicts(judge(_plan(), _seen(_kill(), relays={"fenced": 0}), arrivals, None))
    assert off["no SRTP/SRTCP index twice on the wire"] == "UNCHECKED"
    assert off["never two owners at once"] == "UNCHECKED"


def test_a_session_its_node_lost_and_nobody_took_fails_the_failover() -> None:
    arrivals = {"s1": _echo(0, 60, (10.0, 12.1)), "s2": _echo(0, 60)}
    seen = _seen(_kill())
    seen.history = seen.history[:2]  # s1 never owned again
    rows = judge(_plan(), seen, arrivals, _segments()[::2])
    assert _verdicts(rows)["every failover within its bound"] == "FAIL"
    assert rows[4]["figures"]["late"] == ["s1 after fault 1 (kill-node)"]
