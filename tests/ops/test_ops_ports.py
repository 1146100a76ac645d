"""Where the ops ports are: a setting for nodes and relays (loopback by default), one port per
child of `parley up` (kept across restarts, printed), and a column of `parley status`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ops.cli import build_parser, config_from
from ops.config import ConfigError, load_config
from ops.status import format_status
from ops.up import LocalCluster


def test_ops_ports_default_to_a_free_port_on_loopback() -> None:
    config = load_config(env={})
    assert config.node.ops_address() == ("127.0.0.1", 0)
    assert config.relay.ops_address() == ("127.0.0.1", 0)
    assert config.up.ops_port == 0


def test_ops_listen_is_a_setting_and_a_flag() -> None:
    env = {"PARLEY_NODE_OPS_LISTEN": "0.0.0.0:9464", "PARLEY_RELAY_OPS_LISTEN": "[::]:9465"}
    config = load_config(env=env)
    assert config.node.ops_address() == ("0.0.0.0", 9464)
    assert config.relay.ops_address() == ("::", 9465)
    # a relay's workers each serve one, on the port plus their number (a free one with 0)
    assert config.relay.ops_address(worker=2) == ("::", 9467)
    assert load_config(env={"PARLEY_RELAY_OPS_LISTEN": "127.0.0.1:0"}).relay.ops_address(3) == (
        "127.0.0.1",
        0,
    )
    assert load_config(env={"PARLEY_NODE_OPS_LISTEN": ""}).node.ops_address() is None
    args = build_parser().parse_args(["node", "--ops-listen", "127.0.0.1:9100"])
    assert config_from(args).node.ops_listen == "127.0.0.1:9100"
    args = build_parser().parse_args(["relay", "--ops-listen", "127.0.0.1:9101"])
    assert config_from(args).relay.ops_listen == "127.0.0.1:9101"
    assert config_from(build_parser().parse_args(["up", "--ops-port", "9400"])).up.ops_port == 9400


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PARLEY_NODE_OPS_LISTEN": "localhost:9100"}, "node.ops_listen"),
        ({"PARLEY_RELAY_OPS_LISTEN": "127.0.0.1:99999"}, "relay.ops_listen"),
        ({"PARLEY_UP_OPS_PORT": "65534"}, "up.ops_port"),
    ],
)
def test_bad_ops_settings_are_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(env=env)


def ops_flags(argv: list[str]) -> str:
    return argv[argv.index("--ops-listen") + 1]


def test_parley_up_gives_each_relay_and_node_its_own_ops_port(tmp_path: Path) -> None:
    env = {"PARLEY_UP_DATA_DIR": str(tmp_path), "PARLEY_UP_OPS_PORT": "9700"}
    cluster = LocalCluster(load_config(env=env))
    assert [ops_flags(c.argv) for c in cluster.children] == [
        f"127.0.0.1:{port}" for port in range(9700, 9705)
    ]
    assert [c.name for c in cluster.children][:2] == ["relay-1", "relay-2"]  # relays first
    assert cluster.nodes[0].metrics == "http://127.0.0.1:9702/metrics"
    described = cluster.describe()
    assert described["relays"][1]["metrics"] == "http://127.0.0.1:9701/metrics"
    # 0: free ports, chosen once (a restarted child gets the same argv)
    cluster = LocalCluster(load_config(env={"PARLEY_UP_DATA_DIR": str(tmp_path)}))
    ports = [ops_flags(c.argv) for c in cluster.children]
    assert len(set(ports)) == len(ports) == 5 and all(":0" not in p for p in ports)


def test_parley_status_shows_where_each_is_scraped() -> None:
    status: dict[str, Any] = {
        "nodes": [
            {
                "id": "node-1",
                "state": "active",
                "lease_ttl_left": 4,
                "sessions": 0,
                "signaling": "ws://127.0.0.1:8780/v1/session",
                "metrics": "http://127.0.0.1:9702/metrics",
                "addresses": {},
            }
        ],
        "relays": [{"id": "relay-1", "metrics": "http://127.0.0.1:9700/metrics"}],
        "sessions": [],
    }
    text = format_status(status)
    assert "METRICS" in text
    assert "http://127.0.0.1:9702/metrics" in text and "http://127.0.0.1:9700/metrics" in text
