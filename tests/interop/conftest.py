"""Fixtures for interop tests: a node as users run it, in a Trio thread beside asyncio peers."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio

from ops.config import ClusterConfig, Config, NodeConfig
from ops.etcdserver import EtcdServer
from sessions.host import run_frontend
from sessions.node import Node


@attrs.define
class RunningNode:
    node: Node
    token: trio.lowlevel.TrioToken
    thread: threading.Thread

    def call(self, fn: Any, *args: Any) -> Any:
        """Run an async function on the node's Trio loop (from the test's thread)."""
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    @property
    def whip(self) -> str:
        return self.node.addresses["whip"]


@pytest.fixture
def node_config(etcd_server: EtcdServer) -> Config:
    return Config(
        cluster=ClusterConfig(etcd=etcd_server.endpoint, prefix="/parley-test"),
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
            await nursery.start(node.run)
            ready.set()

    thread = threading.Thread(target=lambda: trio.run(main), daemon=True)
    thread.start()
    assert ready.wait(30), "node did not start"
    running = RunningNode(node, box["token"], thread)
    try:
        yield running
    finally:
        trio.from_thread.run_sync(node.request_stop, trio_token=running.token)
        thread.join(20)
        assert not thread.is_alive()


def whip_post(url: str, offer: str) -> tuple[int, str, str]:
    request = urllib.request.Request(
        url, data=offer.encode(), method="POST", headers={"Content-Type": "application/sdp"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.headers["Location"], response.read().decode()


def whip_delete(base: str, location: str) -> int:
    url = base.split("/v1/")[0] + location
    with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=10) as r:
        return int(r.status)
