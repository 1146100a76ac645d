"""What a relay tells Prometheus, and the pieces a node's metrics share with it.

Names follow Prometheus' conventions: a ``parley_`` prefix, ``_total`` on counters, base units
(``_seconds``, ``_bytes``) and labels with a handful of values each (a direction, a drop reason,
a peer's id; never a session or a client address). Every figure is read at scrape time from
counters the packet path keeps anyway (relay/edge.py, relay/tunnel/quic.py), so the path does
no work of its own for metrics.

The relay's metrics (``parley_relay_*``) count datagrams on the public port: ``in`` from
clients, ``out`` to clients. Bytes are not counted there (it would cost every packet an
addition); a node counts its sessions' bytes (``parley_media_bytes_total``).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Final, final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from actors.histogram import Histogram
from actors.lag import LoopLag
from actors.pauses import PAUSES

if TYPE_CHECKING:
    from relay.daemon import Relay
    from relay.tunnel.quic import TunnelEndpoint
    from storage.lease import LeaseKeeper

__all__ = [
    "RELAY_DROPS",
    "RelayCollector",
    "counter",
    "gauge",
    "gc_metrics",
    "histogram",
    "info_metric",
    "labelled_counter",
    "labelled_gauge",
    "lag_metrics",
    "lease_metrics",
    "tunnel_metrics",
]

#: the edge's counters of datagrams it dropped, by reason (relay/edge.py ``_COUNTERS``)
RELAY_DROPS: Final = (
    "unknown_source",
    "malformed_stun",
    "forged_hint",
    "rate_limited_new",
    "rate_limited",
    "no_route",
    "no_tunnel",
    "tunnel_full",
    "malformed_frame",
    "fenced",
    "unknown_client",
    "send_failed",
)
#: a tunnel endpoint's drop counters (relay/tunnel/quic.py), by the reason label they get
_TUNNEL_DROPS: Final = {
    "too_big": "dropped_too_big",
    "closed": "dropped_closed",
    "backlog": "dropped_backlog",
    "early": "early_dropped",
    "send_failed": "send_failed",
    "malformed": "malformed",
    "unknown_connection": "unknown_connection",
    "half_open_full": "half_open_full",
}


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def labelled_counter(
    name: str, doc: str, label: str, values: Mapping[str, float]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def labelled_gauge(
    name: str, doc: str, label: str, values: Mapping[str, float]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def _buckets(value: Histogram) -> list[tuple[str, float]]:
    return [("+Inf" if b == float("inf") else repr(b), n) for b, n in value.cumulative()]


def histogram(
    name: str, doc: str, value: Histogram | Mapping[str, Histogram], label: str = ""
) -> HistogramMetricFamily:
    """One histogram, or one per value of ``label`` (``value`` then maps them)."""
    if isinstance(value, Histogram):
        family = HistogramMetricFamily(name, doc)
        family.add_metric([], _buckets(value), sum_value=value.sum)
        return family
    family = HistogramMetricFamily(name, doc, labels=[label])
    for key, series in value.items():
        family.add_metric([key], _buckets(series), sum_value=series.sum)
    return family


def lag_metrics(lag: LoopLag) -> Iterator[Metric]:
    """How late the process' event loop ran (actors/lag.py)."""
    yield histogram(
        "parley_event_loop_lag_seconds",
        "How late the event loop ran a task that asked to wake every 20 ms (seconds per wakeup).",
        lag.lateness,
    )
    yield counter(
        "parley_event_loop_stalls_total",
        "Event-loop wakeups 100 ms or more late: the process did not run (a long step, no CPU).",
        lag.stalls,
    )


def gc_metrics() -> Iterator[Metric]:
    """The garbage collector's pauses and frozen startup objects (actors/pauses.py)."""
    yield histogram(
        "parley_gc_pause_seconds",
        "How long each garbage collection stopped the process, by generation (2: a full one).",
        PAUSES.by_generation,
        label="generation",
    )
    yield gauge(
        "parley_gc_frozen_objects",
        "Objects alive at startup that no garbage collection walks again (gc.freeze).",
        gc.get_freeze_count(),
    )


def tunnel_metrics(
    endpoint: TunnelEndpoint | None,
    peers: Mapping[str, bool],
    rtts: Mapping[str, float | None] | None = None,
) -> Iterator[Metric]:
    """A tunnel endpoint's figures; ``peers``: every peer this process knows of, and whether
    a tunnel to it is open; ``rtts``: the open tunnels' round-trip times (None: no sample)."""
    yield labelled_gauge(
        "parley_tunnel_up",
        "1 for each peer (relay or node) with an open QUIC tunnel, 0 for one known without.",
        "peer",
        {peer: float(up) for peer, up in sorted(peers.items())},
    )
    yield gauge("parley_tunnels_open", "Open QUIC tunnels.", sum(peers.values()))
    yield labelled_gauge(
        "parley_tunnel_rtt_seconds",
        "Smoothed round-trip time of each open QUIC tunnel (relay to node), by peer.",
        "peer",
        {peer: rtt for peer, rtt in sorted((rtts or {}).items()) if rtt is not None},
    )
    counters = dict(endpoint.counters) if endpoint is not None else {}
    yield labelled_counter(
        "parley_tunnel_packets_total",
        "UDP datagrams of the QUIC tunnels (QUIC packets, ACK-only ones included).",
        "direction",
        {"in": counters.get("packets_in", 0), "out": counters.get("packets_out", 0)},
    )
    yield labelled_counter(
        "parley_tunnel_datagrams_total",
        "QUIC DATAGRAM frames (one carried media datagram each) through the tunnels.",
        "direction",
        {"in": counters.get("datagrams_in", 0), "out": counters.get("datagrams_out", 0)},
    )
    yield labelled_counter(
        "parley_tunnel_drops_total",
        "What the tunnels dropped, by reason.",
        "reason",
        {reason: counters.get(key, 0) for reason, key in _TUNNEL_DROPS.items()},
    )
    yield labelled_counter(
        "parley_tunnel_handshakes_total",
        "Tunnel handshakes, by outcome (auth_failed: the peer is not of the cluster CA).",
        "outcome",
        {
            "ok": counters.get("handshakes", 0),
            "auth_failed": counters.get("auth_failures", 0),
            "failed": counters.get("handshake_failures", 0),
        },
    )
    yield counter("parley_tunnels_closed_total", "Tunnels closed.", counters.get("closed", 0))


def lease_metrics(keeper: LeaseKeeper | None) -> Iterator[Metric]:
    """The process' etcd lease: how long it is sure to live, its keepalives, its grants."""
    lease = keeper.lease if keeper is not None else None
    yield gauge(
        "parley_lease_seconds_left",
        "Seconds until this process' lease could expire, as its last acknowledged keepalive "
        "proves, less the safety margin (0: no live lease; its work is held or stopped).",
        lease.time_left() if lease is not None else 0.0,
    )
    yield gauge(
        "parley_lease_stalled",
        "1 while no keepalive has been acknowledged since the lease's safety deadline.",
        float(lease is not None and lease.stalled.is_set()),
    )
    sent = keeper.keepalives_sent if keeper is not None else 0
    failed = keeper.keepalives_failed if keeper is not None else 0
    yield labelled_counter(
        "parley_lease_keepalives_total",
        "Lease keepalives sent to etcd, by outcome (failed: no answer in time, or an error).",
        "outcome",
        {"ok": max(0, sent - failed), "failed": failed},
    )
    yield counter(
        "parley_lease_grants_total",
        "etcd leases this process was granted (more than one: it lost one and took another).",
        keeper.grants if keeper is not None else 0,
    )


def info_metric(role: str, ident: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "parley_info",
        "1, labelled with what this process is: its role and id.",
        labels=["role", "id"],
    )
    family.add_metric([role, ident], 1.0)
    return family


@final
class RelayCollector:
    """A relay's metrics, read from its edge, route table, tunnel endpoint and loop monitor."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Iterable[Metric]:
        relay = self.relay
        edge, endpoint = relay.edge, relay.endpoint
        counters = edge.counters
        yield info_metric("relay", relay.id)
        yield labelled_counter(
            "parley_relay_packets_total",
            "Datagrams on the relay's public port: in from clients, out to clients.",
            "direction",
            {"in": counters["client_in"], "out": counters["client_out"]},
        )
        yield counter(
            "parley_relay_forwarded_total",
            "Client datagrams forwarded into a node's tunnel.",
            counters["forwarded"],
        )
        yield counter(
            "parley_relay_handed_on_total",
            "Client datagrams a session's old owner handed on to its new owner after a move.",
            counters["handed_on"],
        )
        yield labelled_counter(
            "parley_relay_drops_total",
            "Datagrams and tunnel frames the relay dropped, by reason (fenced: from a node whose "
            "epoch for the session is stale).",
            "reason",
            {reason: counters[reason] for reason in RELAY_DROPS},
        )
        yield labelled_counter(
            "parley_relay_client_events_total",
            "Client addresses admitted (by an authenticated hint), moved to another session, "
            "forgotten when idle, or evicted from a full cache.",
            "event",
            {
                "admitted": counters["new_clients"],
                "rerouted": counters["rerouted"],
                "expired": counters["expired"],
                "evicted": counters["evicted"],
            },
        )
        yield gauge(
            "parley_relay_cached_clients", "Client addresses in the cache.", len(edge.clients)
        )
        yield gauge(
            "parley_relay_sessions", "Sessions with a cached client address.", edge.sessions()
        )
        yield gauge("parley_relay_routes", "Sessions in the route table.", len(relay.routes))
        yield labelled_counter(
            "parley_kernel_drops_total",
            "Datagrams the kernel dropped for a full receive buffer (the process fell behind).",
            "socket",
            {
                "public": edge.kernel_drops(),
                "tunnel": endpoint.kernel_drops() if endpoint is not None else 0,
            },
        )
        rtts = {peer: getattr(sink, "rtt", None) for peer, sink in edge.tunnels.items()}
        yield from tunnel_metrics(endpoint, dict.fromkeys(edge.tunnels, True), rtts)
        yield from lease_metrics(relay.keeper)
        yield from lag_metrics(relay.lag)
        yield from gc_metrics()
