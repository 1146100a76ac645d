"""Cluster membership: nodes and relays registered under their own leases.

A member's key is attached to its lease, so a member that dies disappears from the registry when
its lease expires; one that stops cleanly deletes its key and revokes its lease at once.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal, final

import attrs

from storage.etcd import Etcd, KeyValue
from storage.keys import Keyspace

log = logging.getLogger("parley.members")

NodeState = Literal["active", "draining"]
NODE_STATES: tuple[NodeState, ...] = ("active", "draining")


def _encode(record: NodeInfo | RelayInfo) -> bytes:
    """A registry record as compact, key-sorted JSON."""
    return json.dumps(attrs.asdict(record), separators=(",", ":"), sort_keys=True).encode()


@final
@attrs.frozen
class NodeInfo:
    """What a node publishes about itself."""

    id: str
    state: NodeState = "active"
    #: named endpoints, e.g. {"signaling": "ws://127.0.0.1:8701/v1/session"}
    addresses: dict[str, str] = attrs.field(factory=dict)
    sessions: int = 0
    capacity: int = 0
    #: the media path's counters (received, inbox_full, tunnel_* ...), for `parley status`
    counters: dict[str, int] = attrs.field(factory=dict)
    pid: int = 0
    host: str = ""
    started_at: float = 0.0
    #: where the node runs (``node.region``; "": none given)
    region: str = ""

    def encode(self) -> bytes:
        return _encode(self)

    @classmethod
    def decode(cls, data: bytes) -> NodeInfo:
        try:
            raw: Any = json.loads(data)
            if not isinstance(raw, dict):
                raise TypeError("not an object")
            state = raw.get("state", "active")
            if state not in NODE_STATES:
                raise ValueError(f"unknown state {state!r}")
            addresses = raw.get("addresses", {})
            if not isinstance(addresses, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in addresses.items()
            ):
                raise TypeError("addresses must map names to strings")
            counters = raw.get("counters", {})
            if not isinstance(counters, dict):
                raise TypeError("counters must be an object")
            return cls(
                id=str(raw["id"]),
                state=state,
                addresses=dict(addresses),
                sessions=int(raw.get("sessions", 0)),
                capacity=int(raw.get("capacity", 0)),
                counters={str(k): int(v) for k, v in counters.items()},
                pid=int(raw.get("pid", 0)),
                host=str(raw.get("host", "")),
                started_at=float(raw.get("started_at", 0.0)),
                region=str(raw.get("region", "")),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"bad node record: {exc}") from None


@final
@attrs.frozen
class RelayInfo:
    """What a relay publishes about itself.

    ``public`` are the UDP addresses clients send to (they become the candidates of every
    answer); ``tunnel`` is where nodes open their QUIC tunnel to it.
    """

    id: str
    #: the name in the relay's certificate; differs from ``id`` for a worker (``relay-1.w0``)
    identity: str = ""
    public: tuple[tuple[str, int], ...] = ()
    tunnel: tuple[str, int] = ("", 0)
    #: node ids with an open tunnel
    tunnels: tuple[str, ...] = ()
    sessions: int = 0
    clients: int = 0
    #: datagrams per second from clients, and to clients, over the last stats interval
    pps_in: float = 0.0
    pps_out: float = 0.0
    counters: dict[str, int] = attrs.field(factory=dict)
    pid: int = 0
    host: str = ""
    started_at: float = 0.0
    #: where Prometheus scrapes the relay (its ops port), ``http://HOST:PORT/metrics``
    metrics: str = ""
    #: where the relay's public port is (``relay.region``; "": none given)
    region: str = ""

    @property
    def certified_as(self) -> str:
        """The identity a node must find in this relay's tunnel certificate."""
        return self.identity or self.id

    def encode(self) -> bytes:
        return _encode(self)

    @classmethod
    def decode(cls, data: bytes) -> RelayInfo:
        """Parse a published record; raises ValueError for anything malformed."""
        try:
            raw: Any = json.loads(data)
            if not isinstance(raw, dict):
                raise TypeError("not an object")
            public = tuple(_address(a) for a in raw.get("public", ()))
            counters = raw.get("counters", {})
            if not isinstance(counters, dict):
                raise TypeError("counters must be an object")
            return cls(
                id=str(raw["id"]),
                identity=str(raw.get("identity", "")),
                public=public,
                tunnel=_address(raw["tunnel"]),
                tunnels=tuple(str(n) for n in raw.get("tunnels", ())),
                sessions=int(raw.get("sessions", 0)),
                clients=int(raw.get("clients", 0)),
                pps_in=float(raw.get("pps_in", 0.0)),
                pps_out=float(raw.get("pps_out", 0.0)),
                counters={str(k): int(v) for k, v in counters.items()},
                pid=int(raw.get("pid", 0)),
                host=str(raw.get("host", "")),
                started_at=float(raw.get("started_at", 0.0)),
                metrics=str(raw.get("metrics", "")),
                region=str(raw.get("region", "")),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"bad relay record: {exc}") from None


def _address(value: Any) -> tuple[str, int]:
    host, port = value
    if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise TypeError(f"an address is [host, port], not {value!r}")
    return host, port


@final
@attrs.frozen
class Member:
    """A registry entry as read back: the published info plus its lease."""

    info: NodeInfo
    lease: int
    revision: int


#: the largest stats value a node publishes (etcd's default request limit is 1.5 MiB)
STATS_MAX_BYTES = 512 * 1024


def _compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=str).encode()


@final
class Members:
    """Register, update and list the nodes and relays of one cluster."""

    def __init__(self, etcd: Etcd, keys: Keyspace) -> None:
        self.etcd = etcd
        self.keys = keys
        self.bad_values = 0

    async def register_node(self, info: NodeInfo, lease: int) -> int:
        """Publish (or update) ``info`` attached to ``lease``; returns the write revision."""
        return await self.etcd.put(self.keys.node(info.id), info.encode(), lease=lease)

    async def deregister_node(self, node_id: str) -> None:
        await self.etcd.delete(self.keys.node(node_id))

    def _member(self, kv: KeyValue) -> Member | None:
        try:
            info = NodeInfo.decode(kv.value)
        except ValueError as exc:
            self.bad_values += 1
            log.warning("skipping %r: %s", kv.key, exc)
            return None
        return Member(info=info, lease=kv.lease, revision=kv.mod_revision)

    async def nodes(self) -> list[Member]:
        kvs, _ = await self.etcd.get_prefix(self.keys.nodes_prefix)
        return [m for m in (self._member(kv) for kv in kvs) if m is not None]

    async def node(self, node_id: str) -> Member | None:
        kv = await self.etcd.get(self.keys.node(node_id))
        return self._member(kv) if kv else None

    async def publish_stats(
        self, node_id: str, stats: dict[str, Any], lease: int, *, max_bytes: int = STATS_MAX_BYTES
    ) -> int:
        """Per-session stats of one node, attached to its lease (read by ``parley status``);
        returns the bytes written. Sessions that do not fit in ``max_bytes`` are left out (in
        the order given) and counted under ``"_left_out"``: etcd refuses a request above 1.5 MiB
        by default, and a node with a thousand sessions would pass that."""
        value = _compact(stats)
        if len(value) > max_bytes:
            kept: dict[str, Any] = {}
            size = 32  # the braces and the count of those left out
            for session_id, entry in stats.items():
                size += len(_compact({session_id: entry})) - 1
                if size > max_bytes:
                    break
                kept[session_id] = entry
            kept["_left_out"] = len(stats) - len(kept)
            value = _compact(kept)
        await self.etcd.put(self.keys.stats(node_id), value, lease=lease)
        return len(value)

    async def _objects(self, prefix: str) -> list[dict[str, Any]]:
        """The JSON objects stored under ``prefix``; anything else is counted and skipped."""
        kvs, _ = await self.etcd.get_prefix(prefix)
        out: list[dict[str, Any]] = []
        for kv in kvs:
            try:
                value = json.loads(kv.value)
            except ValueError:
                value = None
            if isinstance(value, dict):
                out.append(value)
            else:
                self.bad_values += 1
        return out

    async def session_stats(self) -> dict[str, dict[str, Any]]:
        """Session id -> the stats its node last published (malformed entries skipped)."""
        out: dict[str, dict[str, Any]] = {}
        for per_node in await self._objects(self.keys.stats_prefix):
            out.update({k: v for k, v in per_node.items() if isinstance(v, dict)})
        return out

    async def relays(self) -> list[dict[str, Any]]:
        """Relay records as published, as JSON objects (for ``parley status``)."""
        return await self._objects(self.keys.relays_prefix)

    async def register_relay(self, info: RelayInfo, lease: int) -> int:
        """Publish (or update) a relay's record attached to ``lease``."""
        return await self.etcd.put(self.keys.relay(info.id), info.encode(), lease=lease)

    async def deregister_relay(self, relay_id: str) -> None:
        await self.etcd.delete(self.keys.relay(relay_id))

    async def relay_infos(self) -> list[RelayInfo]:
        """Every registered relay, parsed; malformed records are counted and skipped."""
        kvs, _ = await self.etcd.get_prefix(self.keys.relays_prefix)
        out: list[RelayInfo] = []
        for kv in kvs:
            try:
                out.append(RelayInfo.decode(kv.value))
            except ValueError as exc:
                self.bad_values += 1
                log.warning("skipping %r: %s", kv.key, exc)
        return out
