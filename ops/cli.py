"""The ``parley`` command: what an operator types."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final, final

import attrs
import trio

from actors.pauses import PAUSES, freeze_startup
from ops.children import stop_on
from ops.config import Config, ConfigError, load_config
from ops.log import setup_logging

log = logging.getLogger("parley.cli")

#: commands an operator types against a running cluster: they present the operator's
#: certificate to etcd (cluster.etcd_tls), from <up.data_dir>/certs unless cluster.certs says
OPERATOR_COMMANDS = ("status", "opsview", "migrate", "drain", "chaos", "token")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="TOML config file (default: $PARLEY_CONFIG or ./parley.toml)"
    )
    parser.add_argument(
        "--etcd",
        help="etcd client endpoint host:port, or several: h1:p1,h2:p2; https://host:port for "
        "an etcd that takes client certificates only (cluster.etcd)",
    )
    parser.add_argument("--prefix", help="etcd key prefix of the cluster (cluster.prefix)")
    parser.add_argument(
        "--certs",
        help="cluster certificate directory (cluster.certs; commands default to the one of "
        "`parley up`, <up.data_dir>/certs)",
    )
    parser.add_argument(
        "--log-json", action="store_true", default=None, help="one JSON object a log line"
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = commands.add_parser("node", help="run a node daemon (the transceiver)")
    _common(node)
    node.add_argument("--id", help="node id (node.id; default <hostname>-<pid>)")
    node.add_argument("--lease-ttl", type=int, help="lease TTL in seconds (node.lease_ttl)")
    node.add_argument("--capacity", type=int, help="sessions this node accepts (node.capacity)")
    node.add_argument(
        "--media", choices=["direct", "relay"], help="how client media arrives (node.media)"
    )
    node.add_argument(
        "--signaling-port", type=int, help="signaling and demo page TCP port (node.signaling_port)"
    )
    node.add_argument(
        "--ops-listen",
        help="IP:PORT of the ops port, GET /metrics for Prometheus (node.ops_listen; '': none)",
    )
    node.add_argument(
        "--parent-pid", type=int, help="stop gracefully when this process is gone (parley up)"
    )

    relay = commands.add_parser(
        "relay", help="run a relay: the cluster's public UDP port, tunnels to the nodes"
    )
    _common(relay)
    relay.add_argument("--id", help="relay id (relay.id; default relay-<hostname>-<pid>)")
    relay.add_argument(
        "--listen", help="public UDP address(es), e.g. 0.0.0.0:3478,[::]:3478 (relay.listen)"
    )
    relay.add_argument("--tunnel-host", help="address nodes tunnel to (relay.tunnel_host)")
    relay.add_argument("--tunnel-port", type=int, help="QUIC tunnel port (relay.tunnel_port)")
    relay.add_argument(
        "--workers",
        type=int,
        help="processes sharing the public port through SO_REUSEPORT (relay.workers)",
    )
    relay.add_argument(
        "--ops-listen",
        help="IP:PORT of the ops port, GET /metrics for Prometheus; a worker adds its number to "
        "the port (relay.ops_listen; '': none)",
    )
    relay.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    relay.add_argument(
        "--parent-pid", type=int, help="stop gracefully when this process is gone (parley up)"
    )

    certs = commands.add_parser(
        "certs", help="make the cluster CA and hint secret, and issue node and relay certificates"
    )
    certs_commands = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    init = certs_commands.add_parser("init", help="a new cluster CA and hint secret in --dir")
    init.add_argument("--dir", required=True, help="the certificate directory (cluster.certs)")
    init.add_argument("--force", action="store_true", help="replace an existing CA and secret")
    issue = certs_commands.add_parser(
        "issue", help="a certificate for one node or relay, for etcd, or for the operator"
    )
    issue.add_argument("--dir", required=True, help="the certificate directory (cluster.certs)")
    issue.add_argument(
        "role",
        choices=["node", "relay", "etcd", "operator"],
        help="what the certificate is for (etcd: etcd's own; operator: parley-cli, the commands')",
    )
    issue.add_argument("id", nargs="?", help="the node or relay id it names")
    issue.add_argument(
        "--host",
        action="append",
        help="etcd: a name or address its clients dial (repeat, or comma-separated; "
        "default 127.0.0.1,::1,localhost)",
    )

    up = commands.add_parser("up", help="run etcd and nodes locally, supervised, until Ctrl-C")
    _common(up)
    up.add_argument("--nodes", type=int, help="how many nodes (up.nodes)")
    up.add_argument("--relays", type=int, help="how many relays (up.relays; 0: direct media)")
    up.add_argument("--data-dir", help="where etcd data and logs go (up.data_dir)")
    up.add_argument("--etcd-port", type=int, help="local etcd client port (up.etcd_client_port)")
    up.add_argument(
        "--etcd-members",
        type=int,
        help="local etcd members: 1, 3 or 5 (up.etcd_members; 3 outlive a member's loss)",
    )
    up.add_argument(
        "--signaling-port",
        type=int,
        help="node-1's signaling port, node-2 the next... (up.signaling_port; 0: any free)",
    )
    up.add_argument(
        "--ops-port",
        type=int,
        help="relay-1's ops port (GET /metrics), the next relays' and the nodes' after it "
        "(up.ops_port; 0: free ports chosen at start)",
    )
    up.add_argument(
        "--lease-ttl", type=int, help="lease TTL of the nodes, seconds (node.lease_ttl)"
    )
    up.add_argument(
        "--opsview-listen",
        help="HOST:PORT of the ops page, live plots of the cluster (up.opsview_listen; '': none)",
    )

    migrate = commands.add_parser(
        "migrate", help="move one live session to another node (no renegotiation)"
    )
    _common(migrate)
    migrate.add_argument("session", help="the session id (parley status lists them)")
    migrate.add_argument("--to", required=True, metavar="NODE", help="the node to move it to")
    migrate.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (30)")
    migrate.add_argument("--json", action="store_true", help="print JSON for scripts")

    drain = commands.add_parser(
        "drain", help="move every session of a node to the other active nodes"
    )
    _common(drain)
    drain.add_argument("node", help="the node id to empty")
    drain.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (120)")
    drain.add_argument("--json", action="store_true", help="print JSON for scripts")

    status = commands.add_parser("status", help="nodes, relays and sessions of a cluster")
    _common(status)
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument(
        "--watch", action="store_true", help="redraw the tables every --interval until Ctrl-C"
    )
    status.add_argument(
        "--interval", type=float, default=2.0, help="seconds between refreshes of --watch (2)"
    )

    opsview = commands.add_parser(
        "opsview", help="serve a live page of the cluster: sessions, packet rates, quality, moves"
    )
    _common(opsview)
    opsview.add_argument(
        "--listen", help="HOST:PORT to serve the page on (up.opsview_listen; 127.0.0.1:8770)"
    )
    opsview.add_argument(
        "--interval", type=float, default=1.0, help="seconds between samples of etcd (1)"
    )

    chaos = commands.add_parser(
        "chaos", help="faults against a running `parley up` while calls talk; verdicts at the end"
    )
    _common(chaos)
    chaos.add_argument("--data-dir", required=True, help="the data directory of that `parley up`")
    chaos.add_argument("--duration", type=float, default=60.0, help="seconds of faults (60)")
    chaos.add_argument("--sessions", type=int, default=6, help="talking sessions held (6)")
    chaos.add_argument("--every", type=float, default=8.0, help="seconds between faults (8)")
    chaos.add_argument("--seed", type=int, help="seed of the fault choices (default: random)")
    chaos.add_argument(
        "--faults",
        help="kinds to choose from, comma-separated (default all: kill-node,term-node,"
        "kill-relay,kill-etcd,freeze-etcd)",
    )
    chaos.add_argument("--json", metavar="FILE", help="also write the verdicts as JSON to FILE")
    chaos.add_argument(
        "--bound", type=float, help="seconds to hear the echo again (lease TTL + margin + 3)"
    )

    # -- token: access tokens (issue #15; ops/tokens.py) --
    token = commands.add_parser("token", help="mint an access token, or rotate the token keys")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_commands.add_parser("create", help="print one access token")
    rotate = token_commands.add_parser("rotate", help="add a new token key pair; it signs next")
    for action in (create, rotate):
        _common(action)
    create.add_argument("--ttl", type=float, default=3600.0, help="seconds it is valid (3600)")
    create.add_argument("--sub", default="parley-cli", help="its subject (parley-cli)")
    create.add_argument("--agent", help="the only agent it may talk to (default: any)")
    create.add_argument("--room", help="the room it names (default: none)")
    create.add_argument(
        "--max-sessions", type=int, help="sessions of its subject a node runs at once"
    )
    create.add_argument(
        "--region", help="where the client is: nodes offer it that region's relays first"
    )
    # -- end token --
    return parser


def config_from(args: argparse.Namespace) -> Config:
    def get(name: str) -> Any:
        return getattr(args, name, None)

    command = args.command
    overrides: dict[str, dict[str, Any]] = {
        "cluster": {"etcd": get("etcd"), "prefix": get("prefix"), "certs": get("certs")},
        "node": {
            "id": get("id") if command == "node" else None,
            "lease_ttl": get("lease_ttl"),
            "capacity": get("capacity"),
            "media": get("media"),
            "signaling_port": get("signaling_port") if command == "node" else None,
            "ops_listen": get("ops_listen") if command == "node" else None,
        },
        "relay": {
            "id": get("id") if command == "relay" else None,
            "listen": get("listen") if command == "relay" else None,
            "tunnel_host": get("tunnel_host"),
            "tunnel_port": get("tunnel_port"),
            "workers": get("workers"),
            "ops_listen": get("ops_listen") if command == "relay" else None,
        },
        "up": {
            "nodes": get("nodes"),
            "relays": get("relays"),
            "data_dir": get("data_dir"),
            "etcd_client_port": get("etcd_port"),
            "etcd_members": get("etcd_members"),
            "signaling_port": get("signaling_port") if command == "up" else None,
            "ops_port": get("ops_port"),
            "opsview_listen": get("listen") if command == "opsview" else get("opsview_listen"),
        },
        "log": {"json": get("log_json"), "level": get("log_level")},
    }
    config = load_config(get("config"), overrides=overrides)
    cluster = config.cluster
    if args.command == "up" and get("etcd") is None:
        # The nodes of `parley up` talk to the etcd it starts.
        scheme = "https://" if config.up.etcd_tls else ""
        cluster = attrs.evolve(cluster, etcd=f"{scheme}127.0.0.1:{config.up.etcd_client_port}")
    if command in OPERATOR_COMMANDS and not cluster.certs:
        # An operator's commands find the operator certificate where `parley up` keeps it.
        cluster = attrs.evolve(cluster, certs=str(Path(config.up.data_dir) / "certs"))
    return attrs.evolve(config, cluster=cluster)


@final
class _WhenUp:
    """The ``task_status`` of a node or relay daemon that runs as the process: once it reports
    itself up (registered in etcd, its ports open), what its startup left alive is frozen out
    of the garbage collector's walks, which made every full collection stall the process for
    tens of milliseconds (actors/pauses.py)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def started(self, value: object = None) -> None:
        frozen = freeze_startup()
        log.info("startup objects frozen", extra={"daemon": self.name, "objects": frozen})


def cmd_node(config: Config, parent_pid: int | None = None) -> int:
    from sessions.node.daemon import Node
    from sessions.node.frontend import run_frontend

    try:
        node = Node(config, frontend=run_frontend)
        if config.node.region_db:  # fail now, not at the first offer
            from sessions.node.geoip import RegionDatabase, parse_region_map

            regions = config.node.region_db, parse_region_map(config.node.region_map)
            RegionDatabase(*regions).close()
    except ConfigError as exc:
        print(f"parley node: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on, node.request_stop, parent_pid)
            await node.run(task_status=_WhenUp(node.id))
            nursery.cancel_scope.cancel()

    log.info("node starting", extra={"node": node.id, "etcd": config.cluster.etcd})
    PAUSES.install()
    trio.run(main)
    return 0


def cmd_relay(
    config: Config,
    parent_pid: int | None = None,
    worker: int | None = None,
    argv: Sequence[str] = (),
) -> int:
    from relay.daemon import Relay, worker_id

    cfg = config.relay
    relay_id = cfg.relay_id()
    if worker is None and cfg.workers > 1:
        from ops.workers import run_relay_workers

        return run_relay_workers(relay_id, cfg.workers, argv, parent_pid)
    tunnel_port = cfg.tunnel_port
    if worker is not None and tunnel_port:
        tunnel_port += worker  # each worker is its own tunnel endpoint
    try:
        relay = Relay(
            relay_id,
            etcd_endpoint=config.cluster.etcd,
            prefix=config.cluster.prefix,
            credentials=config.cluster.credentials("relay", relay_id),
            etcd_tls=config.cluster.etcd_tls("relay", relay_id),
            secrets=config.cluster.hint_secrets(),
            listen=cfg.listen_addresses(),
            tunnel_host=cfg.tunnel_host,
            tunnel_port=tunnel_port,
            lease_ttl=cfg.lease_ttl,
            limits=cfg.limits(),
            worker=worker,
            ops_listen=cfg.ops_address(worker),
            advertise=cfg.advertise_addresses(),
            region=cfg.region,
            tunnel_advertise=cfg.tunnel_advertise_address(),
            tunnel_hold=cfg.tunnel_hold_ms / 1000,
        )
    except (ConfigError, ValueError) as exc:
        print(f"parley relay: {exc}", file=sys.stderr)
        return 2

    name = relay_id if worker is None else worker_id(relay_id, worker)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(relay.run, task_status=_WhenUp(name)))
            await stop_on(nursery.cancel_scope.cancel, parent_pid)

    log.info("relay starting", extra={"relay": name, "etcd": config.cluster.etcd})
    PAUSES.install()
    trio.run(main)
    log.info("relay stopped", extra={"relay": name})
    return 0


#: seconds ``parley status`` gives etcd to answer (a leader election's worth and more)
_STATUS_TIMEOUT: Final = 6.0


def cmd_status(config: Config, as_json: bool, watch: float | None = None) -> int:
    """``parley status``; ``watch``: refresh every that many seconds until Ctrl-C (exit 0)."""
    from ops.status import format_status, gather_status, watch_status
    from storage.etcd import EtcdError, open_etcd
    from storage.keys import Keyspace

    try:
        tls = config.cluster.etcd_tls("operator")
    except ConfigError as exc:
        print(f"parley status: {exc}", file=sys.stderr)
        return 2

    async def main() -> dict[str, Any]:
        # An operator asks once, so it waits out what a cluster rides out: a frozen leader
        # takes about 1-2 s to replace, during which the other members answer no read, and a
        # new process tries the frozen member first (half of the call each way).
        async with open_etcd(config.cluster.etcd, tls=tls, rpc_timeout=_STATUS_TIMEOUT) as etcd:
            return await gather_status(etcd, Keyspace(config.cluster.prefix))

    async def watching(interval: float) -> None:
        async with open_etcd(config.cluster.etcd, tls=tls) as etcd, trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_interrupt, nursery.cancel_scope)
            keys = Keyspace(config.cluster.prefix)
            tty = sys.stdout.isatty()
            await watch_status(etcd, keys, interval=interval, out=sys.stdout, tty=tty)

    if watch is not None:
        if not watch > 0:
            print("parley status: --interval must be above 0", file=sys.stderr)
            return 2
        try:
            trio.run(watching, watch)
        except* (KeyboardInterrupt, BrokenPipeError):
            pass  # Ctrl-C before our handler was in place, or the reader went away
        return 0
    try:
        status = trio.run(main)
    except EtcdError as exc:
        print(
            f"parley status: etcd at {config.cluster.etcd} did not answer: {exc}", file=sys.stderr
        )
        return 2
    print(json.dumps(status, indent=2) if as_json else format_status(status))
    return 0


async def stop_on_interrupt(scope: trio.CancelScope) -> None:
    """Cancel ``scope`` at the first SIGINT or SIGTERM: Ctrl-C ends a watch cleanly."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from(args)
    except ConfigError as exc:
        print(f"parley: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.command, json_lines=config.log.json, level=config.log.level)
    if args.command == "node":
        return cmd_node(config, args.parent_pid)
    if args.command == "relay":
        return cmd_relay(
            config, args.parent_pid, args.worker, sys.argv[1:] if argv is None else argv
        )
    if args.command == "certs":
        from ops.certs import run_certs

        return run_certs(args)
    if args.command == "up":
        from ops.up import run_up

        return run_up(config)
    if args.command == "status":
        return cmd_status(config, args.json, args.interval if args.watch else None)
    if args.command == "opsview":
        from ops.opsview import run_opsview

        return run_opsview(config, interval=args.interval)
    if args.command in ("migrate", "drain"):
        from ops import moving

        endpoint, prefix = config.cluster.etcd, config.cluster.prefix
        try:
            tls = config.cluster.etcd_tls("operator")
        except ConfigError as exc:
            print(f"parley {args.command}: {exc}", file=sys.stderr)
            return 2
        if args.command == "migrate":
            return trio.run(
                lambda: moving.migrate(
                    endpoint,
                    prefix,
                    args.session,
                    args.to,
                    within=args.timeout,
                    as_json=args.json,
                    tls=tls,
                )
            )
        return trio.run(
            lambda: moving.drain(
                endpoint, prefix, args.node, within=args.timeout, as_json=args.json, tls=tls
            )
        )
    if args.command == "chaos":
        from ops.chaos import run_chaos

        return run_chaos(args, config)
    # -- token: access tokens (issue #15) --
    if args.command == "token":
        from ops.tokens import run_token

        cluster = config.cluster
        if not cluster.certs:  # where `parley up` keeps them
            cluster = attrs.evolve(cluster, certs=f"{config.up.data_dir}/certs")
        return run_token(args, cluster)
    # -- end token --
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
