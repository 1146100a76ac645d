"""`parley up` as an operator meets it: one per data directory, children that die with it, etcd
supervised like the rest, nodes that keep their URLs, and clients told why their session ends."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aioice.ice
import aiortc
import pytest
import trio
import trio_websocket

from ops.etcdserver import free_port
from tests.helpers import PARLEY, make_token, run_status, token_keys
from tests.ops.test_etcd_tls import assert_strangers_read_nothing
from tests.ops.test_processes import wait_for


def aiortc_offer() -> str:
    """A real client's offer (aiortc), with its candidates on loopback only."""

    async def make() -> str:
        pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        assert pc.localDescription is not None
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    original = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    try:
        return asyncio.run(make())
    finally:
        aioice.ice.get_host_addresses = original


def whip_post(page: str, offer: str, token: str) -> int:
    request = urllib.request.Request(
        page + "v1/session",
        data=offer.encode(),
        method="POST",
        headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited; only its parent has not collected it yet
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


class Up:
    """A `parley up` child whose console we read line by line from a thread."""

    def __init__(
        self, data: Path, *, port: int, nodes: int = 2, relays: int = 1, lease_ttl: int = 2
    ) -> None:
        #: its etcd takes only clients with a certificate of the cluster CA (up.etcd_tls)
        self.endpoint = f"https://127.0.0.1:{port}"
        self.data = data
        self.certs = data / "certs"
        env = dict(
            os.environ,
            PARLEY_UP_ETCD_PEER_PORT=str(free_port()),
            PARLEY_UP_RELAY_PORT=str(free_port()),
            PARLEY_UP_SIGNALING_PORT="0",
        )
        argv = [*PARLEY, "up", "--data-dir", str(data), "--etcd-port", str(port)]
        argv += ["--nodes", str(nodes), "--relays", str(relays), "--lease-ttl", str(lease_ttl)]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: str, within: float = 60) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.process.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"parley up exited early:\n{self.text}")
            return re.search(pattern, self.text)

        match: re.Match[str] = wait_for(found, within, f"{pattern!r} in:\n{self.text}")
        return match

    def pages(self) -> dict[str, str]:
        """The demo URLs it printed, by node."""
        return dict(re.findall(r"^  (node-\d+)\s+(http://\S+)$", self.text, re.MULTILINE))

    def status(self) -> dict[str, Any]:
        return run_status(self.endpoint, certs=self.certs)

    def token(self) -> str:
        """An access token from the key `parley up` made, as `parley token create` prints."""
        return make_token(self.data / "certs", subject="test-up")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    cluster = Up(tmp_path / "data", port=free_port())
    try:
        yield cluster
    finally:
        cluster.close()


def test_parley_up_holds_its_data_dir_supervises_etcd_and_dies_with_everything(
    up: Up, tmp_path: Path
) -> None:
    up.wait_for_line("parley is up")
    etcd_pid = int(up.wait_for_line(r"etcd\s+\S+\s+pid (\d+)").group(1))
    # Its etcd takes only clients with a certificate of the cluster CA: the operator's commands
    # present theirs (`parley status`, below), strangers read nothing (issue #15).
    assert re.search(rf"^etcd\s+{re.escape(up.endpoint)}\s+pid", up.text, re.MULTILINE), up.text
    assert f"--certs {up.certs}" in up.text  # the `parley status` it tells the operator to run
    assert_strangers_read_nothing(up.endpoint, up.certs)
    pages = up.pages()
    assert sorted(pages) == ["node-1", "node-2"], up.text
    # every node admits only access tokens, and the status table says so (issue #15)
    for node in ("node-1", "node-2"):
        assert re.search(rf"^{node}\s+-\s+active\s+\S+\s+\d+\s+token\s", up.text, re.MULTILINE), (
            up.text
        )

    # A second `parley up` on the same data directory refuses at once, naming the first.
    second = subprocess.run(
        [*PARLEY, "up", "--data-dir", str(tmp_path / "data"), "--etcd-port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode != 0
    assert f"another `parley up` (pid {up.process.pid})" in second.stderr, second.stderr
    before = up.status()
    assert sorted(n["id"] for n in before["nodes"]) == ["node-1", "node-2"]
    # up means ready for calls: every node already has its tunnel to the relay
    assert [set(r["tunnels"]) for r in before["relays"]] == [{"node-1", "node-2"}], before
    assert alive(etcd_pid) and up.process.poll() is None

    # etcd dies: `parley up` says so, restarts it on the same data, and sessions work again.
    os.kill(etcd_pid, signal.SIGKILL)
    up.wait_for_line(r"etcd exited with -9; restarting it on the same data")
    new_etcd = int(up.wait_for_line(r"etcd\s+\S+\s+pid (\d+)\s+restarted").group(1))
    assert new_etcd != etcd_pid
    wait_for(
        lambda: sorted(n["id"] for n in up.status()["nodes"]) == ["node-1", "node-2"],
        30,
        "both nodes registered again after the etcd restart",
    )
    offer = aiortc_offer()
    token = make_token(tmp_path / "data" / "certs", subject="test-up")  # as `parley token create`
    wait_for(lambda: whip_post(pages["node-1"], offer, token) == 201, 30, "a new session on node-1")

    # A restarted node serves the page `parley up` printed for it.
    node1 = next(n for n in up.status()["nodes"] if n["id"] == "node-1")
    os.kill(node1["pid"], signal.SIGKILL)
    up.wait_for_line(rf"node-1 restarted; its demo page is still {re.escape(pages['node-1'])}")

    def back() -> bool:
        nodes = {n["id"]: n for n in up.status()["nodes"]}
        return "node-1" in nodes and nodes["node-1"]["pid"] != node1["pid"]

    wait_for(back, 30, "node-1 back")
    with urllib.request.urlopen(pages["node-1"], timeout=10) as page:
        assert page.status == 200
    assert whip_post(pages["node-1"], offer, token) == 201

    # SIGKILL of `parley up`: every child goes with it (the kernel's parent-death signal).
    status = up.status()
    pids = [new_etcd] + [n["pid"] for n in status["nodes"]] + [r["pid"] for r in status["relays"]]
    assert len(pids) == 4 and all(alive(pid) for pid in pids)
    up.process.kill()
    up.process.wait()
    wait_for(lambda: not any(alive(pid) for pid in pids), 20, f"{pids} to exit")


def test_parley_up_stops_nodes_then_relays_then_etcd_and_says_so(up: Up) -> None:
    up.wait_for_line("parley is up")
    up.process.send_signal(signal.SIGINT)
    assert up.process.wait(60) == 0
    up._reader.join(10)
    text = up.text
    order = [
        text.index("stopping nodes: node-1, node-2"),
        text.index("stopping relays: relay-1"),
        text.index("stopping etcd"),
        text.index("parley stopped."),
    ]
    assert order == sorted(order), text


def test_a_node_that_stops_mid_session_tells_the_client_why(
    etcd_server: Any, tmp_path: Path
) -> None:
    port = free_port()
    log = open(tmp_path / "node.log", "wb")  # noqa: SIM115 - closed with the process
    certs = token_keys(tmp_path / "certs")
    argv = [*PARLEY, "node", "--id", "n1", "--etcd", etcd_server.endpoint, "--lease-ttl", "2"]
    argv += ["--certs", str(certs)]
    node = subprocess.Popen(
        [*argv, "--signaling-port", str(port), "--log-json"],
        stdout=log,
        stderr=log,
    )
    offer = aiortc_offer()
    received: list[dict[str, Any]] = []
    closed: list[int | None] = []

    async def client() -> None:
        url = f"ws://127.0.0.1:{port}/v1/session"
        with trio.fail_after(30):
            await talk(url)

    async def talk(url: str) -> None:
        async with trio_websocket.open_websocket_url(url) as ws:
            token = make_token(certs, subject="test-up")
            await ws.send_message(json.dumps({"type": "offer", "sdp": offer, "token": token}))
            answer = json.loads(await ws.get_message())
            assert answer["type"] == "answer", answer
            node.send_signal(signal.SIGTERM)
            try:
                while True:
                    received.append(json.loads(await ws.get_message()))
            except trio_websocket.ConnectionClosed as exc:
                closed.append(exc.reason.code if exc.reason else None)

    try:
        wait_for(
            lambda: "n1" in {n["id"] for n in run_status(etcd_server.endpoint)["nodes"]},
            20,
            "n1 to register",
        )
        trio.run(client)
        assert node.wait(20) == 0
    finally:
        node.kill()
        log.close()
    ended = [m for m in received if m.get("event") == "session_ended"]
    assert len(ended) == 1, received
    assert ended[0]["code"] == "node_stopping" and "stopping" in ended[0]["reason"]
    assert "close_code" not in ended[0]
    assert closed == [1001]  # going away
