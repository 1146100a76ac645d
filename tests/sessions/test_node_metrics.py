"""What a node tells Prometheus (sessions/node/metrics.py): totals that never go back whatever
its sessions do, histograms observed once per event, and conventional names and types."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import trio

from actors import Actor
from ops.config import ClusterConfig, Config, NodeConfig
from ops.etcdserver import EtcdServer
from relay.opsport import new_registry
from relay.tunnel.certs import issue_files
from sessions.node.daemon import Node
from sessions.node.metrics import STATES, SessionTally
from sessions.node.relayed import RelayedMedia
from sessions.transceiver import Transceiver
from storage.members import RelayInfo
from tests.metrics_support import (
    exposition,
    families,
    idle_node,
    node_collector,
    relay_credentials,
)


class FakeCore:
    """The part of a Transceiver the tally reads."""

    def __init__(self, **figures: Any) -> None:
        self.figures: dict[str, Any] = {
            "state": "connected",
            "packets_in": 0,
            "packets_out": 0,
            "bytes_in": 0,
            "bytes_out": 0,
            "rtcp_in": 0,
            "rtcp_out": 0,
            "loss_fraction": 0.0,
            "loss_cumulative": 0,
            "jitter_ms": 0.0,
            "rtt_ms": None,
            "remote_loss_fraction": None,
            "remote_jitter_ms": None,
            "dropped": {},
            **figures,
        }
        self.barge_ins: list[tuple[float, float]] = []
        self.turn_latencies: list[tuple[float, float]] = []

    def stats(self) -> dict[str, object]:
        return dict(self.figures)

    def add(self, **more: int) -> None:
        for name, n in more.items():
            self.figures[name] += n


def core(fake: FakeCore) -> Transceiver:
    return cast(Transceiver, fake)


def test_totals_count_only_what_each_core_did_here_and_never_go_back() -> None:
    tally = SessionTally()
    first = FakeCore()
    tally.track("s1", core(first))
    first.add(packets_in=100, bytes_in=10_000, packets_out=90, bytes_out=9_000)
    totals, states = tally.sample(["s1"])
    assert (totals["packets_in"], totals["bytes_out"]) == (100, 9_000)
    assert states["connected"] == 1 and set(states) == set(STATES)
    # The actor crashes and restarts from a checkpoint: the new core comes with the counts the
    # snapshot carried (packets sent), which were already counted; only what it does is added.
    first.add(packets_in=5)
    second = FakeCore(packets_out=80)
    tally.track("s1", core(second))
    second.add(packets_in=10, packets_out=10)
    totals, _ = tally.sample(["s1"])
    assert (totals["packets_in"], totals["packets_out"]) == (115, 100)
    # The session ends: its counts stay.
    tally.forget("s1")
    totals, states = tally.sample([])
    assert (totals["packets_in"], totals["packets_out"]) == (115, 100)
    assert sum(states.values()) == 0


def test_a_session_moved_in_counts_from_its_arrival_and_one_gone_is_retired_at_scrape() -> None:
    tally = SessionTally()
    moved_in = FakeCore(packets_in=5_000, packets_out=5_000)  # the source node's counts
    tally.track("s2", core(moved_in))
    moved_in.add(packets_in=7)
    assert tally.sample(["s2"])[0]["packets_in"] == 7
    moved_in.add(packets_in=3)
    # No longer hosted (lost with the lease, say): retired at the next scrape, its last counts in
    totals, states = tally.sample([])
    assert totals["packets_in"] == 10 and sum(states.values()) == 0
    assert tally.sample(["s3"])[1]["starting"] == 1  # hosted, its actor not started yet


def test_jitter_buffer_drops_are_summed_by_pause_and_speech_and_never_go_back() -> None:
    tally = SessionTally()
    fake = FakeCore(jitter_buffer={"dropped": 2, "dropped_in_speech": 1})  # before: not ours
    tally.track("s1", core(fake))
    fake.figures["jitter_buffer"] = {"dropped": 7, "dropped_in_speech": 2}
    totals, _ = tally.sample(["s1"])
    assert (totals["jitter_dropped"], totals["jitter_dropped_in_speech"]) == (5, 1)
    # A restart brings a fresh jitter buffer: what the old one dropped stays counted.
    tally.track("s1", core(FakeCore(jitter_buffer={"dropped": 0, "dropped_in_speech": 0})))
    tally.forget("s1")
    totals, _ = tally.sample([])
    assert (totals["jitter_dropped"], totals["jitter_dropped_in_speech"]) == (5, 1)
    node = idle_node()
    found = families(exposition(new_registry(node_collector(node, tally))))
    drops = {
        s.labels["during"]: s.value
        for s in found["parley_jitter_buffer_drops"].samples
        if s.name.endswith("_total")
    }
    assert drops == {"pause": 4, "speech": 1}


def test_loss_jitter_and_rtt_are_sampled_once_per_new_rtcp_report() -> None:
    tally = SessionTally()
    fake = FakeCore()
    tally.track("s1", core(fake))
    tally.sample(["s1"])
    assert tally.loss["in"].count == tally.rtt.count == 0
    fake.figures.update(rtcp_out=1, loss_fraction=0.05, jitter_ms=12.0)
    tally.sample(["s1"])
    tally.sample(["s1"])  # no new report: nothing more observed
    assert tally.loss["in"].count == 1 and tally.loss["in"].sum == pytest.approx(0.05)
    assert tally.jitter["in"].sum == pytest.approx(0.012)
    fake.figures.update(rtcp_in=1, rtt_ms=40.0, remote_loss_fraction=0.0, remote_jitter_ms=2.0)
    tally.sample(["s1"])
    assert tally.rtt.count == 1 and tally.rtt.sum == pytest.approx(0.04)
    assert tally.loss["out"].count == tally.jitter["out"].count == 1


def test_barge_ins_turns_losses_and_drops_are_counted_once() -> None:
    tally = SessionTally()
    fake = FakeCore()
    fake.barge_ins.append((1.0, 1.5))  # before the tally saw the core: not ours to count
    tally.track("s1", core(fake))
    fake.barge_ins.append((10.0, 10.06))
    fake.turn_latencies.append((20.0, 20.7))
    fake.figures.update(loss_cumulative=4, dropped={"srtp_auth": 2})
    tally.sample(["s1"])
    tally.sample(["s1"])
    assert tally.barge_in.count == 1 and tally.barge_in.sum == pytest.approx(0.06)
    assert tally.turn_latency.count == 1 and tally.turn_latency.sum == pytest.approx(0.7)
    assert tally.retired["lost"] == 4
    fake.figures.update(loss_cumulative=3, dropped={"srtp_auth": 3})  # RFC 3550 loss can drop
    tally.forget("s1")
    assert tally.retired["lost"] == 4 and tally.dropped == {"srtp_auth": 3}
    for name in ("speech_stopped", "speech_stopped", "agent_interrupted", "media_started"):
        tally.event("s1", {"type": "event", "event": name})
    assert tally.events == {"turns": 2, "barge_ins": 1}


def test_setup_latency_runs_from_the_offer_to_dtls_connected() -> None:
    now = [100.0]
    tally = SessionTally(clock=lambda: now[0])
    tally.offered("s1", 99.6)
    tally.event("s1", {"event": "dtls_connected"})
    tally.event("s1", {"event": "dtls_connected"})  # once per offer
    tally.event("s2", {"event": "dtls_connected"})  # moved in: no offer here
    tally.offered("s3", 99.0)
    tally.forget("s3")  # never connected: forgotten with its session
    tally.event("s3", {"event": "dtls_connected"})
    assert tally.setup.count == 1 and tally.setup.sum == pytest.approx(0.4)


def test_a_node_exposes_conventional_families_without_per_session_labels() -> None:
    node = idle_node()
    tally = SessionTally()
    for session in ("a", "b"):
        tally.track(session, core(FakeCore(packets_in=1)))
        node.sessions[session] = cast(Any, object())
    node.move_blackouts.observe(0.04)
    collector = node_collector(
        node, tally, moved={"moved_in": 1, "moved_out": 2}, adopted={"adopted": 3}
    )
    found = families(exposition(new_registry(collector)))
    parley = {name: f for name, f in found.items() if name.startswith("parley_")}
    for name, family in parley.items():
        assert family.documentation, name
        assert not any({"session", "client"} & set(s.labels) for s in family.samples), name
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), name
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in parley.values()
        for s in f.samples
    }
    assert samples["parley_sessions", (("state", "connected"),)] == 2
    assert samples["parley_info", (("id", "n1"), ("role", "node"))] == 1
    assert samples["parley_moves_total", (("direction", "out"),)] == 2
    assert samples["parley_adoptions_total", (("outcome", "adopted"),)] == 3
    assert samples["parley_move_blackout_seconds_count", ()] == 1
    assert samples["parley_move_blackout_seconds_bucket", (("le", "0.05"),)] == 1
    assert samples["parley_node_drops_total", (("reason", "inbox_full"),)] == 0
    expected = {
        "parley_sessions": "gauge",
        "parley_media_packets": "counter",
        "parley_media_bytes": "counter",
        "parley_session_setup_seconds": "histogram",
        "parley_media_loss_ratio": "histogram",
        "parley_media_jitter_seconds": "histogram",
        "parley_media_rtt_seconds": "histogram",
        "parley_barge_in_reaction_seconds": "histogram",
        "parley_turns": "counter",
        "parley_barge_ins": "counter",
        "parley_adoption_delay_seconds": "histogram",
        "parley_lease_seconds_left": "gauge",
        "parley_event_loop_lag_seconds": "histogram",
        "parley_kernel_drops": "counter",
        "parley_jitter_buffer_drops": "counter",
    }
    assert {name: parley[name].type for name in expected} == expected


def test_a_relayed_node_tells_which_relays_it_has_tunnels_to(tmp_path: Path) -> None:
    credentials, secrets = relay_credentials(tmp_path, "r1")  # makes the cluster CA
    issue_files(tmp_path / "certs", "node", "n1")
    settings = ClusterConfig(certs=str(tmp_path / "certs"))
    path = RelayedMedia(
        "n1", settings.credentials("node", "n1"), secrets[0], lambda: None, lambda _: None
    )
    path.relays = {"r1": RelayInfo("r1"), "r2": RelayInfo("r2")}
    node = idle_node()
    found = families(exposition(new_registry(node_collector(node, path=path))))
    up = {s.labels["peer"]: s.value for s in found["parley_tunnel_up"].samples}
    assert up == {"r1": 0.0, "r2": 0.0}
    assert {s.labels["socket"] for s in found["parley_kernel_drops"].samples} == {"tunnel"}
    del credentials


class Idle(Actor):
    async def receive(self, message: object) -> object:
        return message


async def test_a_session_moved_in_observes_its_blackout(etcd_server: EtcdServer) -> None:
    config = Config(
        cluster=ClusterConfig(etcd=etcd_server.endpoint, prefix="/parley-test"),
        node=NodeConfig(lease_ttl=3),
    )
    node = Node(config, node_id="n1")
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await node.adopt_session("s1", 7, lambda: Idle("s1"), moves=1, blackout_ms=42.0)
        await node.adopt_session("s2", 8, lambda: Idle("s2"))  # adopted: no move's blackout
        assert node.move_blackouts.count == 1
        assert node.move_blackouts.sum == pytest.approx(0.042)
        found = families(exposition(new_registry(node_collector(node))))
        left = found["parley_lease_seconds_left"].samples[0].value
        assert 0 < left <= 3
        assert found["parley_lease_grants"].samples[0].value == 1
        node.request_stop()
