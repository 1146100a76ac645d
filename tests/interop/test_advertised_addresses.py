"""A relay and a node behind addresses they do not bind, as on a cloud machine whose public IPv4 is
a 1:1 NAT, or behind a load balancer: ``relay.advertise`` and ``node.public_url``.

The relay binds 127.0.0.2 and advertises 127.0.0.3, where a small NAT (a thread, one mapped
socket per client address, as a NAT keeps one mapping per flow) forwards to it. An aiortc client
calls through the node's published WHIP URL (``localhost``, not the bound 127.0.0.1), is offered
only the advertised candidate, and hears its echo through the NAT. Without the settings the
answer would offer 127.0.0.2 and the NAT would see nothing.
"""

from __future__ import annotations

import asyncio
import functools
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from ops.certs import init_cluster
from ops.config import ClusterConfig, Config, NodeConfig
from ops.etcdserver import EtcdServer, free_port
from relay.daemon import Relay
from relay.tunnel.certs import issue_files
from sessions.audio import speech
from sessions.node.daemon import Node
from sessions.node.frontend import run_frontend
from tests.helpers import eventually, make_token
from tests.interop.conftest import whip_post
from tests.peers import AiortcCall, loopback_ice  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("loopback_ice")

PREFIX = "/parley-advertise"
BOUND, PUBLIC = "127.0.0.2", "127.0.0.3"


class Nat:
    """A 1:1 NAT in user space: datagrams to ``public`` go to ``inside`` from a socket mapped to
    their sender, and what ``inside`` answers on that socket goes back from ``public``."""

    def __init__(self, host: str) -> None:
        self.public = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.public.bind((host, 0))
        self.address: tuple[str, int] = self.public.getsockname()
        self.inside: tuple[str, int] | None = None
        self.mapped: dict[tuple[str, int], socket.socket] = {}
        self.counts = {"in": 0, "out": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Nat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in [self.public, *self.mapped.values()]:
            sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            sockets = [self.public, *self.mapped.values()]
            ready, _, _ = select.select(sockets, [], [], 0.1)
            for sock in ready:
                data, sender = sock.recvfrom(65535)
                if sock is self.public:
                    if self.inside is None or len(self.mapped) >= 16:
                        continue
                    inner = self.mapped.get(sender)
                    if inner is None:
                        inner = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        inner.bind(("127.0.0.4", 0))
                        self.mapped[sender] = inner
                    inner.sendto(data, self.inside)
                    self.counts["in"] += 1
                else:
                    client = next(c for c, s in self.mapped.items() if s is sock)
                    self.public.sendto(data, client)
                    self.counts["out"] += 1


@pytest.fixture
def cluster(etcd_server: EtcdServer, tmp_path: Path) -> Iterator[tuple[Node, Nat, Path]]:
    certs = tmp_path / "certs"
    init_cluster(certs)
    issue_files(certs, "relay", "r1")
    issue_files(certs, "node", "n1")
    settings = ClusterConfig(etcd=etcd_server.endpoint, prefix=PREFIX, certs=str(certs))
    port = free_port()
    node_settings = NodeConfig(
        id="n1",
        lease_ttl=3,
        agent="echo",
        media="relay",
        signaling_port=port,
        public_url=f"ws://localhost:{port}/v1/session",
    )
    node = Node(Config(cluster=settings, node=node_settings), frontend=run_frontend)
    with Nat(PUBLIC) as nat:
        relay = Relay(
            "r1",
            etcd_endpoint=settings.etcd,
            prefix=PREFIX,
            credentials=settings.credentials("relay", "r1"),
            secrets=settings.hint_secrets(),
            listen=[(BOUND, 0)],
            advertise=[nat.address],
        )
        ready = threading.Event()
        box: dict[str, Any] = {}

        async def main() -> None:
            box["token"] = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(relay.run)
                nat.inside = relay.edge.addresses[0]
                async with trio.open_nursery() as serving:
                    await serving.start(node.run)

                    async def tunnels() -> dict[str, object]:
                        return dict(relay.edge.tunnels)

                    await eventually(tunnels, lambda found: "n1" in found, within=15)
                    ready.set()
                nursery.cancel_scope.cancel()

        thread = threading.Thread(target=lambda: trio.run(main), daemon=True)
        thread.start()
        assert ready.wait(30), "relay and node did not start"
        try:
            yield node, nat, certs
        finally:
            trio.from_thread.run_sync(node.request_stop, trio_token=box["token"])
            thread.join(30)
            assert not thread.is_alive()


@functools.cache
def utterance() -> bytes:
    return speech.speak("one two three four", rate=190)


def test_a_client_reaches_the_advertised_relay_and_the_public_signaling_url(
    cluster: tuple[Node, Nat, Path],
) -> None:
    node, nat, certs = cluster
    port = node.config.node.signaling_port
    assert node.addresses["signaling"] == f"ws://localhost:{port}/v1/session"
    assert node.addresses["whip"] == f"http://localhost:{port}/v1/session"
    token = make_token(certs, subject="advertise")

    async def call() -> tuple[str, int]:
        peer = AiortcCall(utterance())
        try:
            offer = await peer.offer()
            status, _, answer = await asyncio.to_thread(
                whip_post, node.addresses["whip"], offer, token
            )
            assert status == 201
            await peer.answer(answer)
            await asyncio.sleep(3.0)
            return answer, len(peer.received)
        finally:
            await peer.close()

    answer, frames = asyncio.run(call())
    candidates = [line for line in answer.splitlines() if line.startswith("a=candidate")]
    assert candidates and all(f" {PUBLIC} {nat.address[1]} " in line for line in candidates), (
        candidates
    )
    assert BOUND not in answer
    # the media went through the NAT both ways, and the client heard its echo
    assert nat.counts["in"] > 50 and nat.counts["out"] > 50, nat.counts
    assert frames > 50


def test_a_relay_on_every_address_needs_an_advertised_one(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_cluster(certs)
    issue_files(certs, "relay", "r1")
    settings = ClusterConfig(etcd="127.0.0.1:1", certs=str(certs))
    common: dict[str, Any] = {
        "etcd_endpoint": settings.etcd,
        "prefix": PREFIX,
        "credentials": settings.credentials("relay", "r1"),
        "secrets": settings.hint_secrets(),
    }
    with pytest.raises(ValueError, match=r"relay\.advertise"):
        Relay("r1", listen=[("0.0.0.0", 3478)], **common)
    relay = Relay("r1", listen=[("0.0.0.0", 3478)], advertise=[("198.51.100.7", 3478)], **common)
    assert relay.advertise == (("198.51.100.7", 3478),)
