"""What the metrics tests share: expositions of a relay and a node that are not running (every
family is exposed from the start, so their names and types can be checked without a network)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from actors.lag import LoopLag
from ops.certs import init_cluster
from ops.config import ClusterConfig, Config, NodeConfig
from relay.daemon import Relay
from relay.metrics import RelayCollector
from relay.opsport import new_registry
from relay.tunnel.certs import Credentials, issue_files
from sessions.node.daemon import Node
from sessions.node.metrics import NodeCollector, SessionTally


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def families(text: str) -> dict[str, Metric]:
    """The families of an exposition by name (a counter's without ``_total``, as the parser
    gives it)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def relay_credentials(tmp_path: Path, relay_id: str) -> tuple[Credentials, list[bytes]]:
    certs = tmp_path / "certs"
    if not (certs / "ca.pem").exists():
        init_cluster(certs)
    issue_files(certs, "relay", relay_id)
    settings = ClusterConfig(certs=str(certs))
    return settings.credentials("relay", relay_id), settings.hint_secrets()


def relay_exposition(tmp_path: Path) -> str:
    credentials, secrets = relay_credentials(tmp_path, "r1")
    relay = Relay(
        "r1",
        etcd_endpoint="127.0.0.1:1",
        prefix="/parley-test",
        credentials=credentials,
        secrets=secrets,
        listen=[("127.0.0.1", 0)],
    )
    return exposition(new_registry(RelayCollector(relay)))


def idle_node() -> Node:
    """A node that is not running (a plain etcd endpoint: no certificate needed)."""
    return Node(Config(cluster=ClusterConfig(etcd="127.0.0.1:1"), node=NodeConfig(id="n1")))


def node_collector(
    node: Node,
    tally: SessionTally | None = None,
    *,
    media: Mapping[str, int] | None = None,
    path: Any = None,
    moved: Mapping[str, int] | None = None,
    adopted: Mapping[str, int] | None = None,
) -> NodeCollector:
    return NodeCollector(
        node,
        tally or SessionTally(),
        lag=LoopLag(),
        media=lambda: dict(media or {"received": 0, "sent": 0, "inbox_full": 0}),
        path=path,
        checkpoints={"checkpoints_stored": 0, "checkpoint_bytes": 0, "checkpoints_failed": 0},
        moved=moved or {},
        adopted=adopted or {},
        keeper=lambda: node.keeper,
    )


def node_exposition() -> str:
    return exposition(new_registry(node_collector(idle_node())))
