"""The ops ports of a relay and a node as Prometheus sees them, around a real call: a relay and a
node (relay mode) on one Trio loop beside etcd, an aiortc client calling through the relay, and
their ``/metrics`` scraped before the call, during it and after it ended.

The counters must move with the traffic, the gauges must show the one session, and nothing may
go back once the session is gone (its core's counts stay in the node's totals).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ops.certs import init_cluster
from ops.config import ClusterConfig, Config, NodeConfig
from ops.etcdserver import EtcdServer
from relay.daemon import Relay
from relay.tunnel.certs import issue_files
from sessions.audio import speech
from sessions.node.daemon import Node
from sessions.node.frontend import run_frontend
from tests.helpers import eventually, make_token, run_status
from tests.interop.conftest import whip_delete, whip_post
from tests.peers import AiortcCall, loopback_ice  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("loopback_ice")

PREFIX = "/parley-metrics"


@attrs.define
class Cluster:
    relay: Relay
    node: Node
    token: trio.lowlevel.TrioToken
    certs: Path
    endpoint: str

    def relay_url(self) -> str:
        assert self.relay.ops is not None
        return self.relay.ops.url

    def node_url(self) -> str:
        return self.node.addresses["metrics"]


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> tuple[Samples, dict[str, str]]:
    """Every sample of ``url``'s exposition by (name, labels), and every family's type."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


@pytest.fixture
def cluster(etcd_server: EtcdServer, tmp_path: Path) -> Iterator[Cluster]:
    certs = tmp_path / "certs"
    init_cluster(certs)
    issue_files(certs, "relay", "r1")
    issue_files(certs, "node", "n1")
    settings = ClusterConfig(etcd=etcd_server.endpoint, prefix=PREFIX, certs=str(certs))
    config = Config(
        cluster=settings,
        node=NodeConfig(id="n1", lease_ttl=3, agent="echo", media="relay"),
    )
    relay = Relay(
        "r1",
        etcd_endpoint=settings.etcd,
        prefix=PREFIX,
        credentials=settings.credentials("relay", "r1"),
        secrets=settings.hint_secrets(),
        listen=[("127.0.0.1", 0)],
        ops_listen=("127.0.0.1", 0),
    )
    node = Node(config, frontend=run_frontend)
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            async with trio.open_nursery() as serving:
                await serving.start(node.run)

                async def tunnels() -> dict[str, object]:
                    return dict(relay.edge.tunnels)

                # ready for calls: the node has its tunnel to the relay
                await eventually(tunnels, lambda found: "n1" in found, within=15)
                ready.set()
            # the node stopped (request_stop): the relay goes with it
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=lambda: trio.run(main), daemon=True)
    thread.start()
    assert ready.wait(30), "relay and node did not start"
    try:
        yield Cluster(relay, node, box["token"], certs, etcd_server.endpoint)
    finally:
        trio.from_thread.run_sync(node.request_stop, trio_token=box["token"])
        thread.join(30)
        assert not thread.is_alive()


@functools.cache
def utterance() -> bytes:
    return speech.speak("one two three four", rate=190)


def test_relay_and_node_metrics_move_with_a_real_call(cluster: Cluster) -> None:
    token = make_token(cluster.certs, subject="metrics")
    relay_before, relay_types = scrape(cluster.relay_url())
    node_before, node_types = scrape(cluster.node_url())

    async def call() -> tuple[Samples, Samples, Samples, Samples]:
        peer = AiortcCall(utterance())
        try:
            offer = await peer.offer()
            status, location, answer = await asyncio.to_thread(
                whip_post, cluster.node.addresses["whip"], offer, token
            )
            assert status == 201
            await peer.answer(answer)
            await asyncio.sleep(3.0)
            during = await asyncio.to_thread(scrape, cluster.relay_url())
            node_during = await asyncio.to_thread(scrape, cluster.node_url())
            deleted = await asyncio.to_thread(
                whip_delete, cluster.node.addresses["whip"], location, token
            )
            assert deleted == 200
        finally:
            await peer.close()
        after = await asyncio.to_thread(scrape, cluster.relay_url())
        node_after = await asyncio.to_thread(scrape, cluster.node_url())
        return during[0], node_during[0], after[0], node_after[0]

    relay_during, node_during, relay_after, node_after = asyncio.run(call())

    # -- types, as the conventions want them ------------------------------------------------
    for name in ("parley_relay_packets", "parley_relay_drops", "parley_tunnel_packets"):
        assert relay_types[name] == "counter", name
    for name in ("parley_relay_sessions", "parley_lease_seconds_left", "parley_tunnels_open"):
        assert relay_types[name] == "gauge", name
    assert relay_types["parley_event_loop_lag_seconds"] == "histogram"
    assert node_types["parley_sessions"] == "gauge"
    assert node_types["parley_media_packets"] == node_types["parley_media_bytes"] == "counter"
    for name in ("parley_session_setup_seconds", "parley_move_blackout_seconds"):
        assert node_types[name] == "histogram", name
    assert "process_cpu_seconds" in node_types  # the process' own, from the private registry

    # -- the relay forwarded the call both ways, and saw one session ------------------------
    for direction in ("in", "out"):
        grew = value(relay_during, "parley_relay_packets_total", direction=direction) - value(
            relay_before, "parley_relay_packets_total", direction=direction
        )
        assert grew > 50, (direction, grew)
    assert value(relay_during, "parley_relay_sessions") == 1
    assert value(relay_during, "parley_relay_forwarded_total") > 50
    assert value(relay_during, "parley_tunnel_up", peer="n1") == 1
    assert value(relay_during, "parley_lease_seconds_left") > 0
    assert value(relay_during, "parley_info", role="relay", id="r1") == 1
    assert value(relay_during, "parley_event_loop_lag_seconds_count") > 0

    # -- the node: one connected session, its media both ways -------------------------------
    assert value(node_during, "parley_sessions", state="connected") == 1
    assert value(node_during, "parley_session_offers_total", outcome="answered") == 1
    assert value(node_during, "parley_session_setups_total", outcome="connected") == 1
    assert value(node_during, "parley_session_setup_seconds_count") == 1
    assert 0 < value(node_during, "parley_session_setup_seconds_sum") < 5
    for name in ("parley_media_packets_total", "parley_media_bytes_total"):
        for direction in ("in", "out"):
            grew = value(node_during, name, direction=direction) - value(
                node_before, name, direction=direction
            )
            assert grew > 50, (name, direction, grew)
    assert value(node_during, "parley_node_datagrams_total", direction="in") > 50
    assert value(node_during, "parley_tunnel_up", peer="r1") == 1
    assert value(node_during, "parley_lease_seconds_left") > 0

    # -- after the call: no session, and no counter went back --------------------------------
    assert value(node_after, "parley_sessions", state="connected") == 0
    for direction in ("in", "out"):
        for name in ("parley_media_packets_total", "parley_media_bytes_total"):
            assert value(node_after, name, direction=direction) >= value(
                node_during, name, direction=direction
            )
        assert value(relay_after, "parley_relay_packets_total", direction=direction) >= value(
            relay_during, "parley_relay_packets_total", direction=direction
        )
    # the client's RTCP reached the node's sessions, and was counted
    assert value(node_after, "parley_rtcp_packets_total", direction="in") > 0

    # -- `parley status` tells where each is scraped -----------------------------------------
    status = run_status(cluster.endpoint, PREFIX)
    (node_entry,) = status["nodes"]
    (relay_entry,) = status["relays"]
    assert node_entry["metrics"] == cluster.node_url()
    assert relay_entry["metrics"] == cluster.relay_url()
