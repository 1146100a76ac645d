"""`parley up --etcd-members 3` as an operator meets it: three etcd members, every child given all
of them, and a member frozen or SIGKILLed costs no node its registration or its lease."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ops.cli import build_parser, config_from
from ops.config import ConfigError, load_config
from ops.etcdserver import free_port
from tests.helpers import PARLEY, run_status
from tests.ops.test_processes import wait_for


def test_member_settings_are_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARLEY_UP_ETCD_MEMBERS", raising=False)
    config = load_config(env={"PARLEY_CLUSTER_ETCD": "10.0.0.1:2379, 10.0.0.2:2379,[::1]:2379"})
    assert config.cluster.etcd == "10.0.0.1:2379, 10.0.0.2:2379,[::1]:2379"
    assert config.up.etcd_members == 1
    assert load_config(env={"PARLEY_UP_ETCD_MEMBERS": "3"}).up.etcd_members == 3
    assert (
        config_from(build_parser().parse_args(["up", "--etcd-members", "5"])).up.etcd_members == 5
    )
    with pytest.raises(ConfigError, match=r"up\.etcd_members must be one of 1, 3, 5, not 2"):
        load_config(env={"PARLEY_UP_ETCD_MEMBERS": "2"})
    for bad in ("a:1,,b:2", "a:1,b", "a:1,a:1"):
        with pytest.raises(ConfigError, match=r"cluster\.etcd must be host:port or a comma"):
            load_config(env={"PARLEY_CLUSTER_ETCD": bad})


def test_three_etcd_members_ride_out_a_member_frozen_then_killed(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        PARLEY_UP_ETCD_PEER_PORT="0",  # free ports for the peers too
        PARLEY_UP_RELAY_PORT=str(free_port()),
    )
    argv = [*PARLEY, "up", "--data-dir", str(tmp_path / "data"), "--etcd-members", "3"]
    argv += ["--etcd-port", "0", "--nodes", "1", "--relays", "1", "--signaling-port", "0"]
    up = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[str] = []

    def read() -> None:
        assert up.stdout is not None
        lines.extend(up.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def printed(pattern: str, within: float = 30) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            text = "".join(lines)
            if up.poll() is not None and not reader.is_alive():
                raise AssertionError(f"parley up exited early:\n{text}")
            return re.search(pattern, text, re.MULTILINE)

        match: re.Match[str] = wait_for(found, within, f"{pattern!r} in:\n{''.join(lines)}")
        return match

    certs = tmp_path / "data" / "certs"
    try:
        printed("parley is up")
        members = re.findall(r"^(etcd-\d)\s+(\S+)\s+pid (\d+)\s+data (\S+)$", "".join(lines), re.M)
        assert [m[0] for m in members] == ["etcd-1", "etcd-2", "etcd-3"], "".join(lines)
        assert [Path(m[3]).name for m in members] == ["etcd-1", "etcd-2", "etcd-3"]
        endpoints = [m[1] for m in members]
        pids = {m[1]: int(m[2]) for m in members}
        cluster = ",".join(endpoints)

        # `parley status` takes the member list; each member answers for the whole cluster.
        before = run_status(cluster, certs=certs)
        assert [n["id"] for n in before["nodes"]] == ["node-1"]
        assert [r["id"] for r in before["relays"]] == ["relay-1"]
        node = before["nodes"][0]
        for endpoint in endpoints:
            assert [n["lease"] for n in run_status(endpoint, certs=certs)["nodes"]] == [
                node["lease"]
            ]

        # etcd-1 is the member every client starts on. Frozen for longer than the node's lease
        # TTL (5 s), it answers nothing: the node and the relay keep their registrations and
        # leases through the other two members.
        label, first = "etcd-1", endpoints[0]
        os.kill(pids[first], signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            while time.monotonic() < frozen_at + 6:
                during = run_status(cluster, certs=certs)
                assert [(n["id"], n["lease"], n["pid"]) for n in during["nodes"]] == [
                    ("node-1", node["lease"], node["pid"])
                ], during
                assert [r["id"] for r in during["relays"]] == ["relay-1"]
                time.sleep(0.5)
            # SIGKILL (frozen or not): `parley up` restarts it on its data and port.
            os.kill(pids[first], signal.SIGKILL)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[first], signal.SIGCONT)
        printed(rf"^{label} exited with -9; restarting it on the same data")
        restarted = printed(rf"^{label}\s+{re.escape(first)}\s+pid (\d+)\s+restarted")
        assert int(restarted.group(1)) != pids[first]
        after = run_status(first, certs=certs)  # the restarted member serves the same cluster again
        assert [(n["id"], n["lease"]) for n in after["nodes"]] == [("node-1", node["lease"])]
        assert "node-1 exited" not in "".join(lines) and "relay-1 exited" not in "".join(lines)

        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
        reader.join(10)
        assert re.search(r"stopping etcd \(pids \d+, \d+, \d+\)", "".join(lines))
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
