"""What an operator types, as real processes: `parley node`, `parley status`, `parley up`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ops.etcdserver import EtcdServer, free_port
from tests.helpers import PARLEY, run_status, token_keys
from tests.metrics_support import families


def wait_for(predicate: Any, within: float, what: str, *, show: Any = None) -> Any:
    """``predicate()`` once it is truthy; after ``within`` s, fails saying what ``show()``
    (if given) finds then."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    seen = "" if show is None else f"; found {show()!r}"
    raise AssertionError(f"timed out waiting for {what}{seen}")


def start_node(endpoint: str, node_id: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    log = open(tmp_path / f"{node_id}.log", "wb")  # noqa: SIM115 - closed with the process
    argv = [*PARLEY, "node", "--id", node_id, "--etcd", endpoint, "--lease-ttl", "2", "--log-json"]
    # a node checks access tokens: it needs the cluster's token keys to start
    argv += ["--certs", str(token_keys(tmp_path / "certs"))]
    return subprocess.Popen(argv, stdout=log, stderr=log)


def _gc_figures(url: str) -> dict[str, float]:
    """The ``parley_gc_*`` samples of a process' /metrics, by name and labels."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    figures = {}
    for name, family in families(text).items():
        if name.startswith("parley_gc_"):
            for sample in family.samples:
                labels = ",".join(f'{key}="{value}"' for key, value in sample.labels.items())
                figures[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return figures


def node_ids(endpoint: str) -> set[str]:
    return {n["id"] for n in run_status(endpoint)["nodes"]}


def test_node_registers_and_deregisters_at_once_on_sigterm(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    node = start_node(etcd_server.endpoint, "n1", tmp_path)
    try:
        wait_for(lambda: "n1" in node_ids(etcd_server.endpoint), 20, "n1 to register")
        status = run_status(etcd_server.endpoint)
        (entry,) = status["nodes"]
        assert entry["state"] == "active" and entry["pid"] == node.pid
        assert 0 < entry["lease_ttl_left"] <= 2
        assert status["sessions"] == [] and status["relays"] == []
        node.send_signal(signal.SIGTERM)
        assert node.wait(10) == 0
        # Deregistered by the node itself, not by a lease running out.
        assert "n1" not in node_ids(etcd_server.endpoint)
    finally:
        node.kill()
    lines = [json.loads(line) for line in (tmp_path / "n1.log").read_text().splitlines()]
    messages = [line["msg"] for line in lines]
    assert "node registered" in messages and "node stopped" in messages
    assert all({"ts", "level", "component", "msg"} <= set(line) for line in lines)


PARENT = """
import os, subprocess, sys, time
log = open(sys.argv[1], "wb")
argv = [sys.executable, "-m", "ops.cli", "node", "--id", "n1", "--etcd", sys.argv[2],
        "--lease-ttl", "5", "--parent-pid", str(os.getpid()), "--certs", sys.argv[3]]
node = subprocess.Popen(argv, stdout=log, stderr=log)
print(node.pid, flush=True)
time.sleep(120)
"""


def test_node_started_by_parley_up_stops_when_its_parent_dies(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PARENT,
            str(tmp_path / "n1.log"),
            etcd_server.endpoint,
            str(token_keys(tmp_path / "certs")),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    node_pid = int(parent.stdout.readline())
    try:
        wait_for(lambda: "n1" in node_ids(etcd_server.endpoint), 20, "n1 to register")
        parent.kill()  # like SIGKILL of `parley up`: no chance to stop its children
        parent.wait()
        # The orphan notices, drains and deregisters well before its 5 s lease could lapse.
        wait_for(lambda: "n1" not in node_ids(etcd_server.endpoint), 4, "n1 to deregister")
        wait_for(lambda: not Path(f"/proc/{node_pid}").exists(), 10, "the orphan to exit")
    finally:
        if Path(f"/proc/{node_pid}").exists():
            os.kill(node_pid, signal.SIGKILL)
    assert "parent process is gone" in (tmp_path / "n1.log").read_text()


def test_sigkilled_node_disappears_when_its_lease_expires(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    node = start_node(etcd_server.endpoint, "n1", tmp_path)
    try:
        wait_for(lambda: "n1" in node_ids(etcd_server.endpoint), 20, "n1 to register")
        node.kill()
        node.wait()
        killed = time.monotonic()
        assert "n1" in node_ids(etcd_server.endpoint)  # its lease still runs
        wait_for(lambda: "n1" not in node_ids(etcd_server.endpoint), 10, "n1's lease to expire")
        assert time.monotonic() - killed < 2 + 3
    finally:
        node.kill()


def test_status_reports_an_unreachable_etcd_clearly() -> None:
    out = subprocess.run(
        [*PARLEY, "status", "--etcd", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "did not answer" in out.stderr


def test_parley_up_runs_etcd_relays_and_nodes_restarts_a_killed_node_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = dict(
        os.environ,
        PARLEY_UP_ETCD_PEER_PORT=str(free_port()),
        PARLEY_UP_RELAY_PORT=str(free_port()),
        PARLEY_UP_NODES="2",
        PARLEY_UP_SIGNALING_PORT="0",
    )
    up = subprocess.Popen(
        [*PARLEY, "up", "--data-dir", str(data), "--etcd-port", str(port), "--lease-ttl", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    endpoint = f"https://127.0.0.1:{port}"  # its etcd takes TLS clients with a certificate
    certs = data / "certs"
    started = time.monotonic()
    output: list[str] = []
    try:
        assert up.stdout is not None
        for line in up.stdout:
            output.append(line)
            if "parley is up" in line:
                break
        text = "".join(output)
        assert f"etcd     {endpoint}" in text and "node-1" in text and "node-2" in text
        assert "relay-1" in text and "relay-2" in text
        status = run_status(endpoint, certs=certs)
        assert sorted(n["id"] for n in status["nodes"]) == ["node-1", "node-2"]
        # Cluster mode: the nodes open no client UDP port, and every relay has a tunnel from
        # every node (parley up waits for the relays; the tunnels follow within a second).
        assert all(n["addresses"]["media"] == "relays" for n in status["nodes"])

        def tunnels() -> list[Any]:
            return [
                (r.get("id"), r.get("tunnels")) for r in run_status(endpoint, certs=certs)["relays"]
            ]

        wait_for(
            lambda: [t for _, t in tunnels()] == [["node-1", "node-2"]] * 2,
            10,
            "tunnels from both nodes to both relays",
            show=tunnels,
        )
        assert (data / "certs" / "ca.pem").is_file() and (data / "certs" / "hint.secret").is_file()
        # Chaos: kill a node; `parley up` brings it back.
        victim = next(n for n in status["nodes"] if n["id"] == "node-1")
        os.kill(victim["pid"], signal.SIGKILL)

        def replaced() -> bool:
            nodes = run_status(endpoint, certs=certs)["nodes"]
            return any(n["id"] == "node-1" and n["pid"] != victim["pid"] for n in nodes)

        wait_for(replaced, 20, "node-1 to be restarted")
        # Past Trio's idle-thread timeout (10 s): nodes must not die with the thread that
        # spawned them, and the other node keeps running untouched.
        time.sleep(max(0.0, started + 13 - time.monotonic()))
        nodes = run_status(endpoint, certs=certs)["nodes"]
        # Both kinds of process publish what their packet path counted, including what the
        # kernel dropped for them and how late their loop ran.
        for node in nodes:
            assert {"tunnel_datagrams_in", "tunnel_kernel_drops", "loop_stalls"} <= set(
                node["counters"]
            ), node
        for relay in run_status(endpoint, certs=certs)["relays"]:
            assert relay["counters"]["kernel_drops"] == 0, relay
            assert {"tunnel_kernel_drops", "loop_lag_ms"} <= set(relay["counters"]), relay
        # Each froze what its startup left alive out of the garbage collector's walks
        # (actors/pauses.py) once up, and times its collections: the freeze's own was one.
        for member in nodes + run_status(endpoint, certs=certs)["relays"]:
            gc = _gc_figures(member["metrics"])
            assert gc["parley_gc_frozen_objects"] > 20_000, (member["id"], gc)
            assert gc['parley_gc_pause_seconds_count{generation="2"}'] >= 1, (member["id"], gc)
        survivor = next(n for n in status["nodes"] if n["id"] == "node-2")
        assert [n["pid"] for n in nodes if n["id"] == "node-2"] == [survivor["pid"]]
        pids = [n["pid"] for n in nodes] + [
            r["pid"] for r in run_status(endpoint, certs=certs)["relays"]
        ]
        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=30)
        assert up.returncode == 0, rest
        assert "parley stopped." in rest
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert rest.count("exited with") == 1, rest  # only the node we killed
        assert (data / "etcd").is_dir() and (data / "logs" / "node-1.log").is_file()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
