"""How a node serves its clients: its media path, the session backend, signaling, moves.

:func:`run_frontend` is the node daemon's ``frontend`` (sessions/node/daemon.py): it picks the
media path (the node's own UDP port, or the cluster's relays through QUIC tunnels), runs the
session backend (sessions/node/host.py) and the signaling server on it, and, in a cluster with a
cluster key, lets the node move and adopt sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import trio

from actors.lag import LoopLag
from relay.opsport import OpsPort, new_registry
from relay.settings import SettingsError
from sessions.node.daemon import Node
from sessions.node.failover import Adopter
from sessions.node.geoip import RegionDatabase, parse_region_map
from sessions.node.host import NodeSessions
from sessions.node.ledger import LedgerWriter
from sessions.node.media import MediaPort
from sessions.node.metrics import NodeCollector
from sessions.node.moves import NodeMover
from sessions.node.pages import HTML, echo_page
from sessions.node.regions import Placement
from sessions.node.relayed import RelayedMedia
from sessions.node.signaling import SignalingServer
from sessions.ports import PacketPath
from storage.lease import Lease
from storage.members import Member

__all__ = ["run_frontend"]

log = logging.getLogger("parley.node")


async def run_frontend(
    node: Node, *, task_status: trio.TaskStatus[NodeSessions] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``node``'s clients: its media port, the session backend and signaling.

    With ``node.media = "direct"`` the node's own UDP port receives client media
    (``node.media_host``/``media_port``); with ``"relay"`` (a cluster) the node opens no
    client-facing port at all and media comes through QUIC tunnels from the cluster's relays
    (sessions/node/relayed.py), without any change to sessions. Prometheus scrapes the node's
    ops port (``node.ops_listen``; relay/opsport.py, sessions/node/metrics.py).
    """
    cfg = node.config.node
    async with trio.open_nursery() as nursery:
        media: PacketPath
        counters: Callable[[], dict[str, int]]
        if cfg.media == "relay":
            relayed = RelayedMedia(
                node.id,
                node.config.cluster.credentials("node", node.id),
                node.config.cluster.hint_secrets()[0],
                lambda: node.members,
                node.epoch_of,
                tunnel_host=cfg.tunnel_host,
                steering=cfg.steering,
            )
            await nursery.start(relayed.run)
            media = relayed
            node.addresses["media"] = "relays"
            counters = relayed.all_counters
        else:
            direct = MediaPort(cfg.media_host, cfg.media_port)
            await nursery.start(direct.run)
            media = direct
            node.addresses["media"] = f"udp://{direct.host}:{direct.port}"
            counters = direct.all_counters
        lag = LoopLag()
        nursery.start_soon(lag.run)
        # What the media path counted, and how late the node's loop ran (a stall loses packets
        # in the kernel, where no counter of ours sees it).
        # ... and what the node's sessions did: checkpoints, moves and adoptions, counted over
        # every lease generation (a new mover and adopter start with each one)
        moved: dict[str, int] = {}
        adopted: dict[str, int] = {}
        backend = NodeSessions(node, media)
        node.counters_source = lambda: {
            **counters(),
            **lag.counters(),
            **backend.counters,
            **moved,
            **adopted,
        }
        if cfg.ledger_dir:
            backend.ledger = LedgerWriter(Path(cfg.ledger_dir) / f"{node.id}.jsonl", node.id)
            nursery.start_soon(backend.ledger.run)
        await nursery.start(backend.run)

        async def nodes() -> list[Member]:
            members = node.members
            return [] if members is None else await members.nodes()

        placement = Placement(node.id, cfg.region, nodes, steering=cfg.steering)
        regions = (
            RegionDatabase(cfg.region_db, parse_region_map(cfg.region_map))
            if cfg.region_db
            else None
        )
        server = SignalingServer(
            backend,
            host=cfg.signaling_host,
            port=cfg.signaling_port,
            public_url=cfg.public_url,
            placer=placement.elsewhere,
            region_header=cfg.region_header,
            region_lookup=regions.lookup if regions is not None else None,
            pages={"/": (HTML, echo_page())},  # a browser client: open the node's http://HOST:PORT/
        )
        await nursery.start(server.run)
        backend.server = server
        node.addresses.update(server.urls())
        ops_address = cfg.ops_address()
        if ops_address is not None:
            collector = NodeCollector(
                node,
                backend.tally,
                lag=lag,
                media=counters,
                path=media,
                checkpoints=backend.counters,
                moved=moved,
                adopted=adopted,
                keeper=lambda: node.keeper,
            )
            collector.signaling = server.counters
            ops = OpsPort(new_registry(collector), *ops_address)
            await nursery.start(ops.run)
            node.addresses["metrics"] = ops.url
        if cfg.media == "relay":
            try:
                sealer = node.config.cluster.sealer()
            except SettingsError as exc:
                log.warning("sessions will not move: %s", exc)
            else:
                backend.enable_checkpoints(sealer)

                def make_mover(node: Node, lease: Lease) -> NodeMover | None:
                    if node.etcd is None:
                        return None
                    mover = NodeMover(node, backend, node.etcd, node.keys, sealer)
                    mover.counters = _carried(moved, mover.counters)
                    return mover

                def make_adopter(node: Node, lease: Lease) -> Adopter | None:
                    if node.etcd is None:
                        return None
                    adopter = Adopter(node, backend, node.etcd, node.keys, sealer)
                    adopter.counters = _carried(adopted, adopter.counters)
                    return adopter

                node.make_mover = make_mover
                node.make_adopter = make_adopter
        log.info("serving clients", extra=dict(node.addresses))
        node.stats_source = backend.stats
        task_status.started(backend)


def _carried(totals: dict[str, int], fresh: dict[str, int]) -> dict[str, int]:
    """``totals`` with every counter of ``fresh`` in it (at zero if new): the dict a new lease
    generation's mover or adopter counts into, so that the node's counters never go back."""
    for name, value in fresh.items():
        totals.setdefault(name, value)
    return totals
