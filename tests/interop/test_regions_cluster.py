"""Regions end to end (issue #19): two regions, each with a relay and a node, on one Trio loop
beside a real etcd; aiortc clients whose access tokens name their region.

A client of ``us`` that offers to the ``eu`` node is sent to the ``us`` node (WHIP 307), whose
answer offers the ``us`` relay first and the ``eu`` relay after it, and the client talks through
its own region's relay. With ``node.steering`` off the same offer stays where it was sent and
its answer lists both relays, rotated per session.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from ops.certs import init_cluster
from ops.config import ClusterConfig, Config, NodeConfig
from ops.etcdserver import EtcdServer
from ops.status import format_status
from relay.daemon import Relay
from relay.tunnel.certs import issue_files
from sessions.audio import speech
from sessions.node.daemon import Node
from sessions.node.frontend import run_frontend
from tests.helpers import eventually, make_token, run_status
from tests.peers import AiortcCall, loopback_ice  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("loopback_ice")

PREFIX = "/parley-regions"
#: each region's relay binds an address of its own on loopback
RELAY_HOSTS = {"eu": "127.0.0.21", "us": "127.0.0.22"}


@attrs.define
class Cluster:
    nodes: dict[str, Node]
    relays: dict[str, Relay]
    certs: Path
    endpoint: str

    def relay_port(self, region: str) -> int:
        return self.relays[region].edge.addresses[0][1]


def start_cluster(etcd: EtcdServer, tmp_path: Path, *, steering: bool) -> Iterator[Cluster]:
    certs = tmp_path / "certs"
    init_cluster(certs)
    settings = ClusterConfig(etcd=etcd.endpoint, prefix=PREFIX, certs=str(certs))
    relays, nodes = {}, {}
    for region, host in RELAY_HOSTS.items():
        issue_files(certs, "relay", f"r-{region}")
        issue_files(certs, "node", f"n-{region}")
        relays[region] = Relay(
            f"r-{region}",
            etcd_endpoint=settings.etcd,
            prefix=PREFIX,
            credentials=settings.credentials("relay", f"r-{region}"),
            secrets=settings.hint_secrets(),
            listen=[(host, 0)],
            region=region,
        )
        node_settings = NodeConfig(
            id=f"n-{region}",
            lease_ttl=3,
            agent="echo",
            media="relay",
            region=region,
            steering=steering,
        )
        nodes[region] = Node(Config(cluster=settings, node=node_settings), frontend=run_frontend)
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            for relay in relays.values():
                await nursery.start(relay.run)
            async with trio.open_nursery() as serving:
                for node in nodes.values():
                    await serving.start(node.run)

                async def tunnels() -> list[set[str]]:
                    return [set(relay.edge.tunnels) for relay in relays.values()]

                want = {f"n-{region}" for region in RELAY_HOSTS}
                await eventually(tunnels, lambda found: all(t == want for t in found), within=20)
                ready.set()
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=lambda: trio.run(main), daemon=True)
    thread.start()
    assert ready.wait(40), "relays and nodes did not start"
    try:
        yield Cluster(nodes, relays, certs, etcd.endpoint)
    finally:
        for node in nodes.values():
            trio.from_thread.run_sync(node.request_stop, trio_token=box["token"])
        thread.join(30)
        assert not thread.is_alive()


@pytest.fixture
def steered(etcd_server: EtcdServer, tmp_path: Path) -> Iterator[Cluster]:
    yield from start_cluster(etcd_server, tmp_path, steering=True)


@pytest.fixture
def unsteered(etcd_server: EtcdServer, tmp_path: Path) -> Iterator[Cluster]:
    yield from start_cluster(etcd_server, tmp_path, steering=False)


def post_offer(url: str, offer: str, token: str) -> tuple[list[str], str]:
    """POST ``offer`` as a WHIP client that follows 307s (RFC 9725 §4.5): the URLs it was sent
    to, and the answer."""
    visited = [url]
    headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {token}"}
    for _ in range(3):
        request = urllib.request.Request(url, data=offer.encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 201
                return visited, response.read().decode()
        except urllib.error.HTTPError as exc:
            if exc.code != 307:
                raise
            url = exc.headers["Location"]
            visited.append(url)
    raise AssertionError(f"redirected in circles: {visited}")


def candidate_ports(answer: str) -> list[tuple[str, int]]:
    out = []
    for line in answer.splitlines():
        if line.startswith("a=candidate"):
            fields = line.split()
            out.append((fields[4], int(fields[5])))
    return out


@functools.cache
def utterance() -> bytes:
    return speech.speak("one two three four", rate=190)


def call(
    cluster: Cluster, start: str, region: str, during: Callable[[], Any] | None = None
) -> tuple[list[str], str, Any, int]:
    """An aiortc client of ``region`` offering at node ``start``'s WHIP URL: the URLs it went
    to, the answer, the selected pair's remote address, and the frames it heard. ``during``
    runs (in a thread) while the call is still on."""
    token = make_token(cluster.certs, subject=f"client-{region}", region=region)

    async def run() -> tuple[list[str], str, Any, int]:
        peer = AiortcCall(utterance())
        try:
            offer = await peer.offer()
            visited, answer = await asyncio.to_thread(
                post_offer, cluster.nodes[start].addresses["whip"], offer, token
            )
            await peer.answer(answer)
            await asyncio.sleep(3.0)
            if during is not None:
                await asyncio.to_thread(during)
            transceiver = peer.pc.getTransceivers()[0]
            ice = transceiver.sender.transport.transport
            pair = ice._connection._nominated.get(1)
            remote = (pair.remote_candidate.host, pair.remote_candidate.port) if pair else None
            return visited, answer, remote, len(peer.received)
        finally:
            await peer.close()

    return asyncio.run(run())


def test_a_client_is_placed_in_its_region_and_talks_through_its_relay(steered: Cluster) -> None:
    visited, answer, remote, frames = call(steered, "eu", "us")
    us_whip = steered.nodes["us"].addresses["whip"]
    assert visited == [steered.nodes["eu"].addresses["whip"], us_whip]
    us_relay = (RELAY_HOSTS["us"], steered.relay_port("us"))
    eu_relay = (RELAY_HOSTS["eu"], steered.relay_port("eu"))
    # its own region's relay first, the other kept as a fallback
    assert candidate_ports(answer) == [us_relay, eu_relay]
    assert remote == us_relay
    assert frames > 50


def test_a_client_of_the_nodes_own_region_stays(steered: Cluster) -> None:
    visited, answer, remote, frames = call(steered, "eu", "eu")
    eu_relay = (RELAY_HOSTS["eu"], steered.relay_port("eu"))
    assert len(visited) == 1
    assert candidate_ports(answer)[0] == eu_relay
    assert remote == eu_relay and frames > 50


def test_unsteered_the_offer_stays_and_every_relay_is_listed(unsteered: Cluster) -> None:
    visited, answer, _, frames = call(unsteered, "eu", "us")
    assert len(visited) == 1  # not placed: the eu node answers a client of us
    assert sorted(candidate_ports(answer)) == sorted(
        (RELAY_HOSTS[r], unsteered.relay_port(r)) for r in RELAY_HOSTS
    )
    assert frames > 50


def test_status_shows_each_members_region(steered: Cluster) -> None:
    status = run_status(steered.endpoint, PREFIX)
    assert {n["id"]: n["region"] for n in status["nodes"]} == {"n-eu": "eu", "n-us": "us"}
    assert {r["id"]: r["region"] for r in status["relays"]} == {"r-eu": "eu", "r-us": "us"}
    lines = format_status(status).splitlines()
    assert lines[1].split()[:2] == ["ID", "REGION"]
    assert any(line.split()[:2] == ["n-us", "us"] for line in lines)
    assert any(line.split()[:2] == ["r-eu", "eu"] for line in lines)


def test_each_session_reports_its_first_hop_apart_from_the_tunnel(steered: Cluster) -> None:
    """The node splits the client's round trip at the relay: status shows the relay, its region
    and the first hop; the metrics have it by region, and each tunnel's round trip."""
    seen: dict[str, Any] = {}

    def look() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            sessions = run_status(steered.endpoint, PREFIX)["sessions"]
            stats = sessions[0]["stats"] if sessions and sessions[0]["stats"] else {}
            if isinstance(stats.get("first_hop_rtt_ms"), int | float):
                seen.update(stats)
                break
            time.sleep(0.5)
        with urllib.request.urlopen(steered.nodes["us"].addresses["metrics"]) as response:
            seen["metrics"] = response.read().decode()

    call(steered, "us", "us", during=look)
    assert seen.get("relay") == "r-us" and seen["region"] == "us", seen
    assert 0 <= seen["first_hop_rtt_ms"] <= seen["rtt_ms"]
    assert isinstance(seen["tunnel_rtt_ms"], int | float) and seen["tunnel_rtt_ms"] >= 0
    metrics = seen["metrics"]
    assert 'parley_first_hop_rtt_seconds_count{region="us"}' in metrics
    assert 'parley_tunnel_rtt_seconds{peer="r-us"}' in metrics
