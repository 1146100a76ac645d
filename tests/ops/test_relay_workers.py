"""`parley relay --workers N`, as an operator runs it: worker processes share one public port
(SO_REUSEPORT), the kernel spreads clients over them, a node tunnels to every worker, a killed
worker comes back, and SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ops.config import load_config, load_secrets
from ops.etcdserver import EtcdServer, free_port
from relay.tunnel.hint import mint_ufrag
from sessions.webrtc import stun
from tests.helpers import PARLEY, run_status
from tests.ops.test_processes import wait_for

pytestmark = pytest.mark.slow

CLIENTS = 16


def certs_for(tmp_path: Path) -> Path:
    certs = tmp_path / "certs"
    for args in (("init",), ("issue", "relay", "relay-1"), ("issue", "node", "node-1")):
        subprocess.run(
            [*PARLEY, "certs", args[0], "--dir", str(certs), *args[1:]],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return certs


def check(ufrag: str) -> bytes:
    request = stun.binding_request(
        os.urandom(12), username=f"{ufrag}:cli1", priority=1, controlling=True, tie_breaker=1
    )
    return stun.encode(request, integrity_key=b"pwd" * 8, fingerprint=True)


def workers_of(endpoint: str) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in run_status(endpoint)["relays"]}


def test_workers_share_the_public_port_and_come_back_when_killed(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    endpoint = etcd_server.endpoint
    certs = certs_for(tmp_path)
    port = free_port()
    common = ["--etcd", endpoint, "--certs", str(certs)]
    log = open(tmp_path / "relay.log", "wb")  # noqa: SIM115 - closed below
    listen = f"127.0.0.1:{port}"
    relay = subprocess.Popen(
        [*PARLEY, "relay", "--id", "relay-1", "--workers", "2", "--listen", listen, *common],
        stdout=log,
        stderr=log,
    )
    node = subprocess.Popen(
        [*PARLEY, "node", "--id", "node-1", "--media", "relay", *common],
        stdout=log,
        stderr=log,
    )
    try:

        def tunnels_ready() -> dict[str, dict[str, Any]] | None:
            found = workers_of(endpoint)
            ready = set(found) == {"relay-1.w0", "relay-1.w1"} and all(
                r["tunnels"] == ["node-1"] for r in found.values()
            )
            return found if ready else None

        workers = wait_for(tunnels_ready, 30, "both workers, each with a tunnel from node-1")
        # One public port for both; a tunnel endpoint each; one certificate name.
        assert {tuple(a) for r in workers.values() for a in r["public"]} == {("127.0.0.1", port)}
        assert len({tuple(r["tunnel"]) for r in workers.values()}) == 2
        assert {r["identity"] for r in workers.values()} == {"relay-1"}

        # Clients from many source ports: the kernel hashes each to one worker, and every
        # worker admits and forwards the ones it got (the hint routes them to node-1).
        secret = load_secrets(load_config(env={}, overrides={"cluster": {"certs": str(certs)}}))
        ufrag = mint_ufrag("sessionworkers", "node-1", secret[0])
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(CLIENTS)]
        try:
            for _ in range(3):
                for client in clients:
                    client.sendto(check(ufrag), ("127.0.0.1", port))
                time.sleep(0.2)
        finally:
            for client in clients:
                client.close()

        def admitted() -> dict[str, dict[str, Any]] | None:
            found = workers_of(endpoint)
            new = [r["counters"].get("new_clients", 0) for r in found.values()]
            return found if sum(new) == CLIENTS else None

        workers = wait_for(admitted, 15, f"the workers to admit {CLIENTS} clients between them")
        for worker in workers.values():
            assert worker["counters"]["new_clients"] > 0, worker  # both got some
            assert worker["counters"]["forwarded"] > 0, worker
            # The node named each tunnel by the worker it dialed (both workers carry the same
            # certificate name), so it kept both: one handshake each, no redialing.
            assert worker["counters"]["tunnel_handshakes"] == 1, worker
        # The node heard them through both workers' tunnels.
        (entry,) = run_status(endpoint)["nodes"]
        assert entry["counters"]["received"] >= CLIENTS, entry

        # A worker that dies is restarted by the relay process, and rejoins the port.
        victim = workers["relay-1.w0"]["pid"]
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            found = workers_of(endpoint)
            w0 = found.get("relay-1.w0")
            return w0 is not None and w0["pid"] != victim and w0["tunnels"] == ["node-1"]

        wait_for(replaced, 30, "relay-1.w0 to be restarted, with node-1's tunnel")
        pids = [r["pid"] for r in workers_of(endpoint).values()]
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(30) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        # Deregistered on the way out, not left to expire.
        assert workers_of(endpoint) == {}
    finally:
        for process in (relay, node):
            if process.poll() is None:
                process.kill()
                process.wait()
        log.close()
