"""Configuration: one TOML file, overridden by ``PARLEY_*`` environment variables and CLI flags.

Precedence, lowest first: built-in defaults (which work with ``parley up``), the TOML file
(``--config``, ``$PARLEY_CONFIG`` or ``./parley.toml`` if present), environment variables named
``PARLEY_<SECTION>_<KEY>`` (for example ``PARLEY_NODE_LEASE_TTL=3``), then command-line flags.

Example ``parley.toml``::

    [cluster]
    etcd = "https://127.0.0.1:23790"  # etcd's client URL; a cluster's members as
                               # "h1:p1,h2:p2,h3:p3" (the client moves on when one fails);
                               # https://: etcd takes clients with a certificate of the cluster
                               # CA only, and each process presents its own from `certs`
    prefix = "/parley"        # every key of this cluster lives under it
    certs = ".parley/certs"   # cluster CA, member certificates, hint secret (`parley certs`)

    [node]
    id = "node-1"             # default: <hostname>-<pid>
    lease_ttl = 5             # seconds; keepalives go out every lease_ttl / 3
    lease_margin = 1.0        # stop owned work this long before the lease could expire
    capacity = 1000           # sessions this node accepts
    media_tick_ms = 20        # sessions' media served in batches on this grid (0: each alone)
    opus_complexity = 5       # libopus effort for what sessions say, 0-10 (CPU against quality)
    opus_bitrate = 32000      # bit/s of what sessions say
    signaling_host = "127.0.0.1"
    signaling_port = 0        # 0: any free port
    public_url = ""           # ws[s]://HOST[:PORT][/PREFIX]/v1/session where clients reach
                              # signaling, if not the bound address (a load balancer, a NAT)
    region = ""               # where it runs, e.g. "eu-west" (README: Regions); "": none
    steering = true           # offer clients their region's relays first, place them there
    region_header = ""        # e.g. "X-Client-Region", set by a trusted load balancer
    region_db = ""            # a MaxMind .mmdb of client addresses (the geoip extra) ...
    region_map = ""           # ... and its codes' regions: "DE=eu-west,NA=us-east"
    media = "direct"          # "direct": clients send to media_host:media_port;
                              # "relay": through the cluster's relays only (no client UDP port)
    media_host = "127.0.0.1"  # the node's client UDP port, one for all its sessions
    media_port = 0
    tunnel_host = "127.0.0.1" # the local address the node's QUIC tunnels to relays leave from
    agent = "turn-echo"       # or "echo" (the immediate echo test), or "bridge":
    agent_url = ""            #   ws://HOST:PORT/PATH of an external agent (docs/agent-protocol.md)
    ops_listen = "127.0.0.1:0" # the ops port: GET /metrics (Prometheus), GET /healthz; 0: any
                              # free port (the registration shows it); "": none

    [turns]
    min_speech_ms = 200       # voice needed before a turn starts (and before barge-in)
    end_silence_ms = 600      # silence that ends a turn
    padding_ms = 200          # audio kept before and after the voiced part of a turn
    vad = "energy"            # voice activity: "energy", "silero" (a neural detector) or
                              #   "hybrid" (energy's onsets, silero's verdicts); the last two:
                              #   pip install 'parley[vad]'; sessions/audio/neural_vad.py
    duck_after_ms = 20        # voice over the agent's reply that ducks it (fade out, hold)
    interrupt_ms = 400        # voice in a turn over the reply that makes barge-in final;
                              # shorter (a cough, an "mm-hm"): the reply comes back
    release_ms = 200          # no voice for this long ends a duck that was not a turn
    duck_max_ms = 2000        # longest duck that did not become an interruption
    ramp_ms = 5               # the fade out and back in (1-20)
    echo_aware = true         # the agent's own voice coming back never ducks or interrupts
    echo_max_delay_ms = 600   # longest echo delay looked for (20-2000)
    echo_margin_db = 6.0      # above the predicted echo, inbound audio is the user (0-40)

    [relay]
    id = "relay-1"            # default: relay-<hostname>-<pid>
    listen = "0.0.0.0:3478,[::]:3478"  # the public UDP port: one IPv4 and/or one IPv6 address
    region = ""               # where its public port is, e.g. "eu-west"; "": none
    advertise = ""            # the address(es) clients send to, if not the bound ones (a 1:1
                              # NAT, or listen on 0.0.0.0): one per family of listen
    tunnel_host = "127.0.0.1" # where nodes reach the relay's QUIC tunnel endpoint
    tunnel_port = 0
    tunnel_advertise = ""     # where nodes dial the tunnel, if not the bound address (a NAT)
    lease_ttl = 5
    tunnel_hold_ms = 2.0      # most a client datagram waits to share a QUIC packet (0-10; 0: never)
    idle_timeout = 60.0       # seconds before a silent client address is forgotten
    new_source_rate = 200.0   # STUN datagrams/s inspected from one unknown source IP
    client_rate = 1000.0      # datagrams/s forwarded for one client address
    max_clients = 100000
    receive_buffer = 16777216 # bytes queued on the public port while the relay is busy
    workers = 1               # processes sharing the public port (SO_REUSEPORT)
    audit = false             # tests: count SRTP/SRTCP indexes seen twice (relay/audit.py)
    ops_listen = "127.0.0.1:0" # the ops port: GET /metrics, GET /healthz (a worker: port + its
                              # number); never the public port; "": none

    [up]
    nodes = 3
    relays = 2
    relay_port = 3478         # relays listen on 127.0.0.1:relay_port, relay_port + 1, ...
    signaling_port = 8780     # node-1's signaling and demo page, node-2 on the next... (0: any)
    data_dir = ".parley"
    etcd_client_port = 23790  # member i of several on etcd_client_port + i - 1
    etcd_peer_port = 23800
    etcd_members = 1          # 1, 3 or 5 local etcd members (3: one may die or freeze)
    etcd_tls = true           # etcd takes only clients with a certificate of the cluster CA
    ops_port = 0              # relay-1's ops port (GET /metrics), the other relays' and then
                              # the nodes' after it; 0: free ports chosen once at start
    opsview_listen = "127.0.0.1:8770"  # the ops page, live plots (`parley opsview` too);
                              # port 0: any free; "": none
    ledger = true             # nodes write media ledgers (data_dir/ledger) for `parley chaos`

    [log]
    json = false
    level = "info"
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, final

import attrs

from ops.etcdserver import MEMBER_COUNTS
from relay.settings import HINT_SECRET_FILE, ClusterSettings, RelaySettings, SettingsError
from relay.tunnel.certs import Credentials
from relay.tunnel.quic import MAX_HOLD
from sessions.audio.neural_vad import VADS
from sessions.audio.neural_vad import available as vad_available
from sessions.node.geoip import parse_region_map
from sessions.node.settings import AGENTS, MEDIA_PATHS, NodeSettings, TurnsSettings
from storage.etcd import parse_endpoints

__all__ = [
    "HINT_SECRET_FILE",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "NodeConfig",
    "RelayConfig",
    "TurnsConfig",
    "load_config",
    "load_credentials",
    "load_secrets",
]

MAX_RELAY_WORKERS = 64

#: The configuration is invalid; the message names the setting and where it came from. The
#: packages' own settings raise the same error (relay.settings.SettingsError).
ConfigError = SettingsError

# Each package owns its settings; a configuration is one of each, named by its TOML section.
ClusterConfig = ClusterSettings
NodeConfig = NodeSettings
TurnsConfig = TurnsSettings
RelayConfig = RelaySettings


@final
@attrs.frozen
class UpConfig:
    nodes: int = 3
    relays: int = 2
    relay_port: int = 3478
    #: node-1 serves signaling and its demo page on this port, node-2 on the next...; the same
    #: port after a restart. 0: ports chosen once when `parley up` starts
    signaling_port: int = 8780
    data_dir: str = ".parley"
    etcd_client_port: int = 23790
    etcd_peer_port: int = 23800
    #: local etcd members; several form one cluster that outlives a member's loss
    etcd_members: int = 1
    #: etcd with client-certificate TLS from the cluster CA (https:// endpoints); false: plain
    etcd_tls: bool = True
    #: relay-1's ops port (GET /metrics, on 127.0.0.1), relay-2 the next, ..., then node-1, ...;
    #: each keeps its port across restarts. 0: free ports chosen once when `parley up` starts
    ops_port: int = 0
    #: where `parley up` (and `parley opsview`) serve the ops page, HOST:PORT; "": none
    opsview_listen: str = "127.0.0.1:8770"
    #: every node writes a media ledger under data_dir/ledger (node.ledger_dir), which `parley
    #: chaos` judges; false: none, as on a deployed node (benchmarks measure nodes this way)
    ledger: bool = True


@final
@attrs.frozen
class LogConfig:
    json: bool = False
    level: str = "info"


@final
@attrs.frozen
class Config:
    cluster: ClusterConfig = attrs.field(factory=ClusterConfig)
    node: NodeConfig = attrs.field(factory=NodeConfig)
    turns: TurnsConfig = attrs.field(factory=TurnsConfig)
    relay: RelayConfig = attrs.field(factory=RelayConfig)
    up: UpConfig = UpConfig()
    log: LogConfig = LogConfig()
    #: where the file layer came from, for messages
    source: str = "defaults"


_SECTIONS: dict[str, type[Any]] = {
    "cluster": ClusterConfig,
    "node": NodeConfig,
    "turns": TurnsConfig,
    "relay": RelayConfig,
    "up": UpConfig,
    "log": LogConfig,
}


def _coerce(value: Any, target: type[Any], where: str) -> Any:
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        }:
            return value.lower() in {"1", "true", "yes", "on"}
    elif target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif target is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif target is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected {target.__name__}, got {value!r}")


def _field_types(cls: type[Any]) -> dict[str, type[Any]]:
    hints = {"bool": bool, "int": int, "float": float, "str": str}
    return {f.name: hints[str(f.type)] for f in attrs.fields(cls)}


def _apply(base: Config, layer: Mapping[str, Mapping[str, Any]], origin: str) -> Config:
    changes: dict[str, Any] = {}
    for section, values in layer.items():
        cls = _SECTIONS.get(section)
        if cls is None:
            raise ConfigError(f"{origin}: unknown section [{section}]")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        types = _field_types(cls)
        coerced = {}
        for key, value in values.items():
            if key not in types:
                raise ConfigError(f"{origin}: unknown setting {section}.{key}")
            coerced[key] = _coerce(value, types[key], f"{origin}: {section}.{key}")
        try:
            changes[section] = attrs.evolve(getattr(base, section), **coerced)
        except ConfigError:
            raise
        except ValueError as exc:  # a field's own validator, e.g. a range
            detail = exc.args[0] if exc.args else exc
            raise ConfigError(f"{origin}: [{section}] {detail}") from None
    return attrs.evolve(base, **changes)


def _env_layer(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    layer: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        if not name.startswith("PARLEY_") or name == "PARLEY_CONFIG" or name == "PARLEY_ETCD_BIN":
            continue
        rest = name[len("PARLEY_") :].lower()
        section, _, key = rest.partition("_")
        if section in _SECTIONS and key:
            layer.setdefault(section, {})[key] = value
    return layer


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Build the effective configuration (see the module docstring for the precedence)."""
    env = os.environ if env is None else env
    config = Config()
    chosen = path or env.get("PARLEY_CONFIG")
    if chosen is None and Path("parley.toml").is_file():
        chosen = "parley.toml"
    if chosen is not None:
        file = Path(chosen)
        try:
            data = tomllib.loads(file.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: {exc}") from None
        config = attrs.evolve(_apply(config, data, str(file)), source=str(file))
    config = _apply(config, _env_layer(env), "environment")
    if overrides:
        cleaned = {
            s: {k: v for k, v in vals.items() if v is not None} for s, vals in overrides.items()
        }
        config = _apply(config, {s: v for s, v in cleaned.items() if v}, "command line")
    _validate(config)
    return config


def _validate(config: Config) -> None:
    try:
        parse_endpoints(config.cluster.etcd)
    except ValueError as exc:
        raise ConfigError(
            f"cluster.etcd must be host:port or a comma-separated list of them ({exc})"
        ) from None
    config.cluster.etcd_uses_tls()  # one scheme for every member
    if config.up.etcd_members not in MEMBER_COUNTS:
        choices = ", ".join(str(n) for n in MEMBER_COUNTS)
        raise ConfigError(f"up.etcd_members must be one of {choices}, not {config.up.etcd_members}")
    if not config.cluster.prefix.startswith("/") or config.cluster.prefix.endswith("/"):
        raise ConfigError("cluster.prefix must start with '/' and not end with one")
    if config.node.lease_ttl < 2:
        raise ConfigError("node.lease_ttl must be at least 2 seconds")
    if not 0 <= config.node.lease_margin < config.node.lease_ttl:
        raise ConfigError("node.lease_margin must be between 0 and node.lease_ttl")
    if config.node.agent not in AGENTS:
        raise ConfigError(
            f"node.agent must be one of {', '.join(AGENTS)}, not {config.node.agent!r}"
        )
    if config.node.agent == "bridge" and not config.node.agent_url.startswith(("ws://", "wss://")):
        raise ConfigError("node.agent = bridge needs node.agent_url = ws://HOST:PORT/PATH")
    turns = config.turns
    if min(turns.min_speech_ms, turns.end_silence_ms) < 20 or turns.padding_ms < 0:
        raise ConfigError("turns: min_speech_ms and end_silence_ms are at least 20, padding >= 0")
    if turns.vad not in VADS:
        raise ConfigError(f"turns.vad must be one of {', '.join(VADS)}, not {turns.vad!r}")
    if not vad_available(turns.vad):
        raise ConfigError(
            f"turns.vad = {turns.vad} needs an optional package: pip install 'parley[vad]'"
        )
    if min(turns.duck_after_ms, turns.interrupt_ms, turns.release_ms, turns.duck_max_ms) < 20:
        raise ConfigError(
            "turns: duck_after_ms, interrupt_ms, release_ms and duck_max_ms are at least 20"
        )
    if not 1 <= turns.ramp_ms <= 20:
        raise ConfigError("turns.ramp_ms must be between 1 and 20")
    if not 20 <= turns.echo_max_delay_ms <= 2000:
        raise ConfigError("turns.echo_max_delay_ms must be between 20 and 2000")
    if not 0.0 <= turns.echo_margin_db <= 40.0:
        raise ConfigError("turns.echo_margin_db must be between 0 and 40")
    if config.node.media not in MEDIA_PATHS:
        raise ConfigError(f"node.media must be direct or relay, not {config.node.media!r}")
    if config.node.media == "relay" and not config.cluster.certs:
        raise ConfigError("node.media = relay needs cluster.certs (see `parley certs init`)")
    config.relay.listen_addresses()
    config.relay.advertise_addresses()
    config.relay.tunnel_advertise_address()
    config.node.check_public_url()
    parse_region_map(config.node.region_map)
    if config.node.region_map and not config.node.region_db:
        raise ConfigError("node.region_map maps the codes of node.region_db, which is not set")
    if config.relay.lease_ttl < 2:
        raise ConfigError("relay.lease_ttl must be at least 2 seconds")
    relay = config.relay
    if min(relay.idle_timeout, relay.new_source_rate, relay.client_rate) <= 0:
        raise ConfigError("relay.idle_timeout, new_source_rate and client_rate must be > 0")
    if relay.max_clients < 1:
        raise ConfigError("relay.max_clients must be at least 1")
    if not 1 <= relay.workers <= MAX_RELAY_WORKERS:
        raise ConfigError(f"relay.workers must be between 1 and {MAX_RELAY_WORKERS}")
    if not 0 <= relay.tunnel_hold_ms <= MAX_HOLD * 1000:
        raise ConfigError(f"relay.tunnel_hold_ms must be between 0 and {MAX_HOLD * 1000:g}")
    if relay.receive_buffer < 0:
        raise ConfigError("relay.receive_buffer must be bytes >= 0 (0: the kernel's default)")
    config.node.ops_address()
    config.relay.ops_address()
    if not 0 <= config.up.ops_port <= 0xFFFF - config.up.nodes - config.up.relays:
        raise ConfigError("up.ops_port must leave room for a port per relay and node (0: any)")
    if config.up.opsview_listen:
        from ops.opsview import parse_listen

        try:
            parse_listen(config.up.opsview_listen)
        except ValueError as exc:
            raise ConfigError(f"up.opsview_listen: {exc}") from None
    if not 0 <= config.up.signaling_port <= 0xFFFF - config.up.nodes:
        raise ConfigError("up.signaling_port must leave room for a port per node (0: any free)")
    if config.up.nodes < 1 or config.up.relays < 0:
        raise ConfigError("up.nodes must be at least 1 and up.relays at least 0")
    if config.log.level.lower() not in {"debug", "info", "warning", "error"}:
        raise ConfigError("log.level must be debug, info, warning or error")


def load_credentials(config: Config, role: Literal["node", "relay"], ident: str) -> Credentials:
    """This member's tunnel certificate, key and the cluster CA, from ``cluster.certs``."""
    return config.cluster.credentials(role, ident)


def load_secrets(config: Config) -> list[bytes]:
    """The cluster's hint secrets, current first, from ``cluster.certs``/hint.secret."""
    return config.cluster.hint_secrets()
