"""Fixtures for interop tests: a node as users run it, in a Trio thread beside asyncio peers."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_websocket

from ops.config import ClusterConfig, Config, NodeConfig
from ops.etcdserver import EtcdServer
from sessions.node.daemon import Node
from sessions.node.frontend import run_frontend
from tests.helpers import make_token, token_keys


@attrs.define
class RunningNode:
    node: Node
    token: trio.lowlevel.TrioToken
    thread: threading.Thread
    nursery: trio.Nursery

    def call(self, fn: Any, *args: Any) -> Any:
        """Run an async function on the node's Trio loop (from the test's thread)."""
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    @property
    def whip(self) -> str:
        return self.node.addresses["whip"]

    @property
    def access_token(self) -> str:
        """A token for this node, as a user gets one (`parley token create`)."""
        return make_token(Path(self.node.config.cluster.certs), subject="interop")


@pytest.fixture
def node_config(etcd_server: EtcdServer, tmp_path: Path) -> Config:
    certs = token_keys(tmp_path / "certs")  # nodes take sessions with access tokens only
    return Config(
        cluster=ClusterConfig(etcd=etcd_server.endpoint, prefix="/parley-test", certs=str(certs)),
        node=NodeConfig(id="n1", lease_ttl=3, agent="echo"),
    )


@pytest.fixture
def running_node(node_config: Config) -> Iterator[RunningNode]:
    config = node_config
    node = Node(config, frontend=run_frontend)
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            box["nursery"] = nursery
            await nursery.start(node.run)
            ready.set()

    thread = threading.Thread(target=lambda: trio.run(main), daemon=True)
    thread.start()
    assert ready.wait(30), "node did not start"
    running = RunningNode(node, box["token"], thread, box["nursery"])
    try:
        yield running
    finally:
        trio.from_thread.run_sync(node.request_stop, trio_token=running.token)
        thread.join(20)
        assert not thread.is_alive()


def whip_post(url: str, offer: str, token: str) -> tuple[int, str, str]:
    headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, data=offer.encode(), method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.headers["Location"], response.read().decode()


def whip_delete(base: str, location: str, token: str) -> int:
    url = base.split("/v1/")[0] + location
    request = urllib.request.Request(
        url, method="DELETE", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return int(r.status)


@attrs.define
class WebSocketClient:
    """A signaling client as a browser page is one: offer in, answer and events out.

    It runs on the node's Trio loop (the test's own thread runs asyncio for aiortc)."""

    url: str
    token: str
    answer: str = ""
    session: str = ""
    events: list[dict[str, Any]] = attrs.field(factory=list)
    answered: threading.Event = attrs.field(factory=threading.Event)

    async def run(self, offer: str) -> None:
        async with trio_websocket.open_websocket_url(self.url) as ws:
            await ws.send_message(json.dumps({"type": "offer", "sdp": offer, "token": self.token}))
            while True:
                try:
                    message = json.loads(await ws.get_message())
                except trio_websocket.ConnectionClosed:
                    return  # the session ended (the node stops with the test)
                if message["type"] == "answer":
                    self.answer, self.session = message["sdp"], message["session"]
                    self.answered.set()
                elif message["type"] == "event":
                    message["_received"] = time.monotonic()  # the test's clock, not the node's
                    self.events.append(message)
                else:
                    raise AssertionError(f"unexpected signaling message {message}")


def open_websocket_session(node: RunningNode, offer: str) -> WebSocketClient:
    """Start a signaling client on the node's loop and wait for its answer."""
    client = WebSocketClient(node.node.addresses["signaling"], node.access_token)
    trio.from_thread.run_sync(node.nursery.start_soon, client.run, offer, trio_token=node.token)
    assert client.answered.wait(10), "no answer"
    return client
