"""Configuration layering: defaults < TOML file < PARLEY_* environment < command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.cli import build_parser, config_from
from ops.config import ConfigError, load_config


def test_defaults_work_with_parley_up() -> None:
    config = load_config(env={})
    assert config.cluster.etcd == "https://127.0.0.1:23790"  # parley up's etcd: TLS
    assert config.up.etcd_tls
    assert config.node.lease_ttl == 5
    assert (config.up.nodes, config.up.relays) == (3, 2)
    assert config.node.media == "direct" and config.relay.listen_addresses() == [
        ("0.0.0.0", 3478),
        ("::", 3478),
    ]


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "parley.toml"
    file.write_text('[node]\nlease_ttl = 7\ncapacity = 10\n[cluster]\nprefix = "/a"\n')
    config = load_config(file, env={})
    assert (config.node.lease_ttl, config.node.capacity, config.cluster.prefix) == (7, 10, "/a")
    env = {"PARLEY_NODE_LEASE_TTL": "9", "PARLEY_LOG_JSON": "true", "HOME": "/x"}
    config = load_config(file, env=env)
    assert (config.node.lease_ttl, config.node.capacity, config.log.json) == (9, 10, True)
    config = load_config(file, env=env, overrides={"node": {"lease_ttl": 3, "capacity": None}})
    assert (config.node.lease_ttl, config.node.capacity) == (3, 10)
    assert config.source == str(file)


def test_agent_and_turn_thresholds_are_settings(tmp_path: Path) -> None:
    file = tmp_path / "parley.toml"
    file.write_text('[node]\nagent = "echo"\n[turns]\nend_silence_ms = 800\n')
    config = load_config(file, env={"PARLEY_TURNS_MIN_SPEECH_MS": "120"})
    assert config.node.agent == "echo"
    assert (config.turns.min_speech_ms, config.turns.end_silence_ms) == (120, 800)
    assert load_config(env={}).node.agent == "turn-echo"
    with pytest.raises(ConfigError, match=r"node\.agent must be one of"):
        load_config(env={"PARLEY_NODE_AGENT": "parrot"})
    with pytest.raises(ConfigError, match="turns:"):
        load_config(env={"PARLEY_TURNS_END_SILENCE_MS": "5"})


def test_barge_in_and_echo_thresholds_are_settings(tmp_path: Path) -> None:
    from sessions.node.agents import turn_config

    file = tmp_path / "parley.toml"
    file.write_text("[turns]\nduck_after_ms = 20\ninterrupt_ms = 500\necho_aware = false\n")
    config = load_config(file, env={"PARLEY_TURNS_ECHO_MARGIN_DB": "9"})
    turns = turn_config(config)
    assert (turns.duck_after_ms, turns.interrupt_ms, turns.release_ms) == (20, 500, 200)
    assert (turns.echo_aware, turns.echo_margin_db, turns.ramp_ms) == (False, 9.0, 5)
    assert turn_config(load_config(env={})).echo_aware
    with pytest.raises(ConfigError, match="ramp_ms"):
        load_config(env={"PARLEY_TURNS_RAMP_MS": "0"})
    with pytest.raises(ConfigError, match="interrupt_ms"):
        load_config(env={"PARLEY_TURNS_INTERRUPT_MS": "10"})


def test_the_voice_codec_is_a_setting(tmp_path: Path) -> None:
    from sessions.audio.opus import VoiceCodec
    from sessions.node.agents import voice_codec

    file = tmp_path / "parley.toml"
    file.write_text("[node]\nopus_complexity = 9\n")
    config = load_config(file, env={"PARLEY_NODE_OPUS_BITRATE": "24000"})
    assert voice_codec(config) == VoiceCodec(complexity=9, bitrate=24_000)
    assert voice_codec(load_config(env={})) == VoiceCodec(complexity=5, bitrate=32_000)
    with pytest.raises(ConfigError, match="opus_complexity"):
        load_config(env={"PARLEY_NODE_OPUS_COMPLEXITY": "11"})
    with pytest.raises(ConfigError, match="opus_bitrate"):
        load_config(env={"PARLEY_NODE_OPUS_BITRATE": "1000"})
    with pytest.raises(ConfigError, match=r"environment: \[node\] 'media_tick_ms' must be in"):
        load_config(env={"PARLEY_NODE_MEDIA_TICK_MS": "25"})


def test_the_relay_tunnel_hold_is_a_setting(tmp_path: Path) -> None:
    file = tmp_path / "parley.toml"
    file.write_text("[relay]\ntunnel_hold_ms = 0.5\n")
    assert load_config(file, env={}).relay.tunnel_hold_ms == 0.5
    assert load_config(env={}).relay.tunnel_hold_ms == 2.0
    assert load_config(env={"PARLEY_RELAY_TUNNEL_HOLD_MS": "0"}).relay.tunnel_hold_ms == 0
    with pytest.raises(ConfigError, match=r"relay\.tunnel_hold_ms must be between 0 and 10"):
        load_config(env={"PARLEY_RELAY_TUNNEL_HOLD_MS": "11"})
    with pytest.raises(ConfigError, match=r"relay\.tunnel_hold_ms"):
        load_config(env={"PARLEY_RELAY_TUNNEL_HOLD_MS": "-1"})


def test_config_file_from_environment(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text("[up]\nnodes = 4\n")
    assert load_config(env={"PARLEY_CONFIG": str(file)}).up.nodes == 4


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[nodes]\nid = 'x'\n", {}, "unknown section"),
        ("[node]\nttl = 3\n", {}, "unknown setting node.ttl"),
        ("[node]\nlease_ttl = 'soon'\n", {}, "node.lease_ttl: expected int"),
        ("[node]\nlease_ttl = 1\n", {}, "at least 2 seconds"),
        ("[cluster]\netcd = 'nohost'\n", {}, "host:port"),
        ("node = [", {}, "parley.toml"),
        ("", {"PARLEY_NODE_CAPACITY": "many"}, "environment: node.capacity"),
    ],
)
def test_bad_settings_are_named(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    file = tmp_path / "parley.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(file, env=env)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml", env={})


def test_cli_flags_override_and_up_points_nodes_at_its_etcd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("PARLEY_CLUSTER_ETCD", "PARLEY_CLUSTER_CERTS", "PARLEY_UP_ETCD_TLS"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["up", "--nodes", "3", "--etcd-port", "24000"])
    config = config_from(args)
    assert config.up.nodes == 3 and config.cluster.etcd == "https://127.0.0.1:24000"
    monkeypatch.setenv("PARLEY_UP_ETCD_TLS", "false")
    plain = config_from(build_parser().parse_args(["up", "--etcd-port", "24000"]))
    assert plain.cluster.etcd == "127.0.0.1:24000"
    monkeypatch.delenv("PARLEY_UP_ETCD_TLS")
    # an operator's commands find the operator certificate where `parley up` keeps it
    status = config_from(build_parser().parse_args(["status", "--etcd", "https://h:1"]))
    assert status.cluster.certs == str(Path(status.up.data_dir) / "certs")
    args = build_parser().parse_args(["node", "--id", "n1", "--lease-ttl", "4", "--log-json"])
    config = config_from(args)
    assert (config.node.id, config.node.lease_ttl, config.log.json) == ("n1", 4, True)


def test_advertised_addresses_and_public_url_are_checked() -> None:
    env = {
        "PARLEY_RELAY_LISTEN": "0.0.0.0:3478,[::]:3478",
        "PARLEY_RELAY_ADVERTISE": "[2001:db8::7]:3478,203.0.113.7:3478",
        "PARLEY_NODE_PUBLIC_URL": "wss://voice.example.net/node-0/v1/session",
    }
    config = load_config(env=env)
    assert config.relay.advertise_addresses() == [("2001:db8::7", 3478), ("203.0.113.7", 3478)]
    assert config.node.public_url == "wss://voice.example.net/node-0/v1/session"
    assert load_config(env={}).relay.advertise_addresses() == []  # the bound addresses
    single = {"PARLEY_RELAY_LISTEN": "10.0.0.5:3478"}
    for advertise, message in [
        ("0.0.0.0:3478", "0.0.0.0 is no address a client can reach"),
        ("203.0.113.7:0", "port out of range"),
        ("203.0.113.7:3478,[2001:db8::7]:3478", "one address per address family"),
        ("[2001:db8::7]:3478", "one address per address family"),
        ("voice.example.net:3478", "is not IP:PORT"),
    ]:
        with pytest.raises(ConfigError, match=r"relay\.advertise: .*" + message):
            load_config(env={**single, "PARLEY_RELAY_ADVERTISE": advertise})
    for url in [
        "http://voice.example.net/v1/session",
        "wss:///v1/session",
        "wss://voice.example.net/v1/sessions",
        "wss://voice.example.net/v1/session?x=1",
        "wss://voice.example.net:99999/v1/session",
    ]:
        with pytest.raises(ConfigError, match=r"node\.public_url"):
            load_config(env={"PARLEY_NODE_PUBLIC_URL": url})


def test_the_tunnel_advertise_address_is_checked() -> None:
    assert load_config(env={}).relay.tunnel_advertise_address() is None  # the bound address
    env = {"PARLEY_RELAY_TUNNEL_ADVERTISE": "127.1.2.2:4478"}
    assert load_config(env=env).relay.tunnel_advertise_address() == ("127.1.2.2", 4478)
    for value, message in [
        ("0.0.0.0:4478", "one address nodes can dial"),
        ("127.1.2.2:0", "port out of range"),
        ("127.1.2.2:4478,[::1]:4478", "one address nodes can dial"),
        ("relay.example.net:4478", "is not IP:PORT"),
    ]:
        with pytest.raises(ConfigError, match=r"relay\.tunnel_advertise: .*" + message):
            load_config(env={"PARLEY_RELAY_TUNNEL_ADVERTISE": value})
    with pytest.raises(ConfigError, match=r"relay\.workers > 1"):
        load_config(env={**env, "PARLEY_RELAY_WORKERS": "2"})


def test_parley_up_writes_media_ledgers_unless_told_not_to(tmp_path: Path) -> None:
    from ops.up import LocalCluster

    env = {"PARLEY_UP_DATA_DIR": str(tmp_path), "PARLEY_UP_OPS_PORT": "0"}
    (node, *_) = LocalCluster(load_config(env=env)).nodes
    assert node.env["PARLEY_NODE_LEDGER_DIR"] == str(tmp_path.resolve() / "ledger")
    (node, *_) = LocalCluster(load_config(env={**env, "PARLEY_UP_LEDGER": "false"})).nodes
    assert "PARLEY_NODE_LEDGER_DIR" not in node.env
