"""What a node tells Prometheus: its sessions, their media and voice loop, moves and adoptions.

Two parts. :class:`SessionTally` follows the cores of the node's sessions (each core a session
actor runs, handed over by the actor when it starts one) and the events they send their
clients; it sums what they counted into node-wide totals that never go back, whatever the
sessions do (end, crash and restart from a checkpoint, move away, move in carrying the counts
of the node they came from: only what a core counted *here* is added). :class:`NodeCollector`
reads it, with the counters the media path, signaling, movers and adopters keep anyway, when
Prometheus scrapes the node's ops port (relay/opsport.py).

Nothing here runs per packet. The histograms are observed per event: a session's setup (offer
to DTLS connected), a move's blackout, an adoption, a barge-in, an agent's reply; loss, jitter
and round-trip time are sampled at scrape time, once per session and only when an RTCP report
brought new figures since the previous scrape (so their rate follows the scrape interval, and
each sample is one session's latest RTCP interval).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, final

import trio
from prometheus_client.core import Metric

from actors.histogram import Histogram
from actors.lag import LoopLag
from relay.metrics import (
    counter,
    gauge,
    gc_metrics,
    histogram,
    info_metric,
    labelled_counter,
    labelled_gauge,
    lag_metrics,
    lease_metrics,
    tunnel_metrics,
)
from sessions.node.regions import Hop, first_hop
from sessions.node.relayed import RelayedMedia

if TYPE_CHECKING:
    from sessions.node.daemon import Node
    from sessions.transceiver import Transceiver
    from storage.lease import LeaseKeeper

__all__ = [
    "ADOPTION_BUCKETS",
    "BLACKOUT_BUCKETS",
    "NodeCollector",
    "SessionTally",
]

SETUP_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: a planned move's blackout (the source's quiesce to the target's take)
BLACKOUT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: an orphaned session's owner key expiring, seen in etcd, to its actor running here
ADOPTION_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
LOSS_BUCKETS: Final = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
JITTER_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
RTT_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
REACTION_BUCKETS: Final = (0.02, 0.04, 0.06, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
TURN_BUCKETS: Final = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)

#: a core's counters summed over the node (Transceiver.stats: authentic RTP in, RTP sent,
#: their SRTP bytes, SRTCP packets)
_FIGURES: Final = ("packets_in", "packets_out", "bytes_in", "bytes_out", "rtcp_in", "rtcp_out")
#: the same of its inbound jitter buffer (Transceiver.stats' ``jitter_buffer``): packets dropped
#: to shorten the delay, all of them and those in speech (sessions/audio/jitter.py)
_JITTER_FIGURES: Final = {
    "jitter_dropped": "dropped",
    "jitter_dropped_in_speech": "dropped_in_speech",
}
#: the connection states a session can be in (sessions/transceiver/connection.py), and
#: ``starting``: hosted, its actor not running a core yet
STATES: Final = ("starting", "new", "connecting", "connected", "quiesced", "failed", "closed")
#: client events counted: a user's turn ended, the user barged in on the agent
_EVENTS: Final = {"speech_stopped": "turns", "agent_interrupted": "barge_ins"}
#: signaling's counters of offers (sessions/node/signaling/server.py), by outcome
_OFFER_OUTCOMES: Final = {
    "answered": "sessions_opened",
    "refused": "refused",
    "rate_limited": "rate_limited",
    "source_limit": "source_limit",
    "half_open_limit": "half_open_limit",
    "node_over_capacity": "node_over_capacity",
    "node_busy": "node_busy",
    "token_missing": "token_missing",
    "token_invalid": "token_invalid",
    "token_expired": "token_expired",
    "token_forbidden": "token_forbidden",
}
#: media path counters that are not drops
_NOT_DROPS: Final = frozenset({"received", "sent", "handed_on", "early"})


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _figures(stats: Mapping[str, Any]) -> dict[str, int]:
    """A core's counters that the tally sums: ``_FIGURES`` and ``_JITTER_FIGURES``."""
    out = {name: int(stats[name]) for name in _FIGURES}
    jitter = stats.get("jitter_buffer")
    jitter = jitter if isinstance(jitter, Mapping) else {}
    for name, key in _JITTER_FIGURES.items():
        out[name] = int(jitter.get(key) or 0)
    return out


@final
class _Tracked:
    """One core the tally follows: what it had counted when it came, and what was taken."""

    __slots__ = ("barge_ins", "base", "core", "dropped", "lost", "rtcp_in", "rtcp_out", "turns")

    def __init__(self, core: Transceiver, stats: Mapping[str, Any]) -> None:
        self.core = core
        self.base = _figures(stats)
        dropped = stats.get("dropped")
        self.dropped = Counter(dropped if isinstance(dropped, dict) else {})
        self.lost = int(stats.get("loss_cumulative") or 0)
        self.rtcp_in = self.base["rtcp_in"]
        self.rtcp_out = self.base["rtcp_out"]
        self.barge_ins = len(core.barge_ins)
        self.turns = len(core.turn_latencies)


@final
class SessionTally:
    """Node-wide totals of what its sessions' cores did (see the module docstring)."""

    def __init__(
        self,
        clock: Callable[[], float] = trio.current_time,
        *,
        hop: Hop | None = None,
        region: str = "",
    ) -> None:
        self._clock = clock
        #: the packet path's view of a client's first hop (sessions/node/regions.py)
        self._hop = hop
        self._region = region
        self._cores: dict[str, _Tracked] = {}
        self._offered: dict[str, float] = {}
        #: what cores no longer followed counted here, and their lost packets
        self.retired: Counter[str] = Counter()
        #: the client's datagrams the sessions dropped, by reason (bad SRTP, replays, ...)
        self.dropped: Counter[str] = Counter()
        #: client events counted (``turns``, ``barge_ins``)
        self.events: Counter[str] = Counter()
        self.setup = Histogram(SETUP_BUCKETS)
        self.loss = {"in": Histogram(LOSS_BUCKETS), "out": Histogram(LOSS_BUCKETS)}
        self.jitter = {"in": Histogram(JITTER_BUCKETS), "out": Histogram(JITTER_BUCKETS)}
        self.rtt = Histogram(RTT_BUCKETS)
        #: client-to-relay round-trip times (the RTCP one less the tunnel's), by the relay's
        #: region: what steering (issue #19) keeps short
        self.first_hop: dict[str, Histogram] = {}
        self.barge_in = Histogram(REACTION_BUCKETS)
        self.turn_latency = Histogram(TURN_BUCKETS)

    # -- what the session backend tells it (sessions/node/host.py) ------------------------------

    def offered(self, session: str, at: float) -> None:
        """``session`` was answered for an offer that arrived at ``at`` (Trio time)."""
        self._offered[session] = at

    def event(self, session: str, event: Mapping[str, Any]) -> None:
        """``event`` goes to the session's client."""
        name = event.get("event")
        if not isinstance(name, str):
            return
        if name in _EVENTS:
            self.events[_EVENTS[name]] += 1
        elif name == "dtls_connected":
            at = self._offered.pop(session, None)
            if at is not None:
                self.setup.observe(max(0.0, self._clock() - at))

    def track(self, session: str, core: Transceiver) -> None:
        """A session's actor runs ``core`` now (a new session, a restart, a move, an adoption)."""
        self.forget(session, keep_offer=True)
        self._cores[session] = _Tracked(core, core.stats())

    def forget(self, session: str, *, keep_offer: bool = False) -> None:
        """The session left (ended, moved away, lost): what its core counted stays in the totals."""
        tracked = self._cores.pop(session, None)
        if not keep_offer:
            self._offered.pop(session, None)
        if tracked is not None:
            self.retired.update(self._take(tracked, tracked.core.stats()))

    # -- read at scrape time -------------------------------------------------------------------

    def sample(self, hosted: Iterable[str]) -> tuple[Counter[str], Counter[str]]:
        """The node's totals (``_FIGURES`` and ``lost``) and its sessions by state, observing
        what is new since the last sample. Cores of sessions no longer ``hosted`` are retired."""
        hosted = set(hosted)
        for session in [s for s in self._cores if s not in hosted]:
            self.forget(session)
        totals = Counter(self.retired)
        states: Counter[str] = Counter(dict.fromkeys(STATES, 0))
        for session in hosted:
            tracked = self._cores.get(session)
            if tracked is None:
                states["starting"] += 1
                continue
            stats = tracked.core.stats()
            states[str(stats.get("state"))] += 1
            totals.update(self._take(tracked, stats, live=True))
        return totals, states

    def _take(
        self, tracked: _Tracked, stats: Mapping[str, Any], *, live: bool = False
    ) -> Counter[str]:
        """What ``tracked`` counted here, observing its new figures into the histograms (and,
        unless ``live``, moving its drops into :attr:`dropped` for good)."""
        out: Counter[str] = Counter(
            {name: max(0, value - tracked.base[name]) for name, value in _figures(stats).items()}
        )
        # RFC 3550's cumulative loss can go down (duplicates); the counter keeps what it saw.
        lost = int(stats.get("loss_cumulative") or 0)
        if lost > tracked.lost:
            self.retired["lost"] += lost - tracked.lost
            tracked.lost = lost
        if int(stats["rtcp_out"]) > tracked.rtcp_out:  # we reported on the client's stream
            tracked.rtcp_out = int(stats["rtcp_out"])
            self._observe(self.loss["in"], stats.get("loss_fraction"))
            self._observe(self.jitter["in"], stats.get("jitter_ms"), 1e-3)
        if int(stats["rtcp_in"]) > tracked.rtcp_in:  # the client reported on ours
            tracked.rtcp_in = int(stats["rtcp_in"])
            self._observe(self.loss["out"], stats.get("remote_loss_fraction"))
            self._observe(self.jitter["out"], stats.get("remote_jitter_ms"), 1e-3)
            self._observe(self.rtt, stats.get("rtt_ms"), 1e-3)
            if self._hop is not None:
                path = first_hop(stats, self._hop, self._region)
                region = str(path["region"] or "none")
                if path["first_hop_rtt_ms"] is not None:
                    series = self.first_hop.setdefault(region, Histogram(RTT_BUCKETS))
                    self._observe(series, path["first_hop_rtt_ms"], 1e-3)
        core = tracked.core
        for first_voiced, last_agent_frame in core.barge_ins[tracked.barge_ins :]:
            self.barge_in.observe(max(0.0, last_agent_frame - first_voiced))
        tracked.barge_ins = len(core.barge_ins)
        for turn_end, reply in core.turn_latencies[tracked.turns :]:
            self.turn_latency.observe(max(0.0, reply - turn_end))
        tracked.turns = len(core.turn_latencies)
        dropped = stats.get("dropped")
        if isinstance(dropped, dict):
            new = Counter({k: max(0, int(v) - tracked.dropped[k]) for k, v in dropped.items()})
            if live:
                out.update({f"dropped:{k}": v for k, v in new.items()})
            else:
                self.dropped.update(new)
        return out

    @staticmethod
    def _observe(into: Histogram, value: object, scale: float = 1.0) -> None:
        number = _number(value)
        if number is not None:
            into.observe(number * scale)


@final
class NodeCollector:
    """A node's metrics (a ``prometheus_client`` collector): read at scrape time only."""

    def __init__(
        self,
        node: Node,
        tally: SessionTally,
        *,
        lag: LoopLag,
        media: Callable[[], dict[str, int]],
        path: object,
        checkpoints: Mapping[str, int],
        moved: Mapping[str, int],
        adopted: Mapping[str, int],
        keeper: Callable[[], LeaseKeeper | None],
    ) -> None:
        self.node = node
        self.tally = tally
        self.lag = lag
        #: the media path's counters (sessions/node/relayed.py or media.py ``all_counters``)
        self.media = media
        #: the media path itself: RelayedMedia has tunnels to report
        self.path = path
        self.checkpoints = checkpoints
        self.moved = moved
        self.adopted = adopted
        self.keeper = keeper
        #: signaling's counters, once it serves (sessions/node/signaling/server.py)
        self.signaling: Mapping[str, int] = {}

    def collect(self) -> Iterable[Metric]:
        node, tally = self.node, self.tally
        yield info_metric("node", node.id)
        totals, states = tally.sample(node.sessions)
        yield labelled_gauge(
            "parley_sessions",
            "Sessions this node hosts, by the state of their connection (starting: its actor "
            "has not started yet; quiesced: paused for a move or held through a lease stall).",
            "state",
            states,
        )
        yield gauge(
            "parley_session_capacity", "Sessions this node accepts.", node.config.node.capacity
        )
        yield gauge(
            "parley_node_loop_load",
            "The share of one core the node's event loop used, averaged over a few seconds; "
            "new sessions are refused (node_busy) at node.max_load and above.",
            node.loop_load.value,
        )
        yield gauge(
            "parley_node_draining",
            "1 while the node takes no new sessions.",
            float(not node.active()),
        )
        signaling = self.signaling
        yield labelled_counter(
            "parley_session_offers_total",
            "Offers, by outcome: answered, or the code they were refused with (refused: the "
            "offer or the node, e.g. a bad SDP, draining, no relay; the others: admission).",
            "outcome",
            {outcome: signaling.get(key, 0) for outcome, key in _OFFER_OUTCOMES.items()},
        )
        yield labelled_counter(
            "parley_session_setups_total",
            "Answered sessions that connected (DTLS done) here, and that did not in time.",
            "outcome",
            {"connected": tally.setup.count, "timed_out": signaling.get("setup_timeout", 0)},
        )
        yield histogram(
            "parley_session_setup_seconds",
            "Seconds from an offer's arrival to its session's DTLS handshake completing.",
            tally.setup,
        )
        yield from self._media(totals)
        yield counter(
            "parley_turns_total", "User turns that ended (speech_stopped).", tally.events["turns"]
        )
        yield counter(
            "parley_barge_ins_total",
            "Times a user talked over the agent and its audio stopped (agent_interrupted).",
            tally.events["barge_ins"],
        )
        yield histogram(
            "parley_barge_in_reaction_seconds",
            "Seconds from the first voiced frame of a barge-in to the agent's last frame sent.",
            tally.barge_in,
        )
        yield histogram(
            "parley_turn_latency_seconds",
            "Seconds from the end of a user's turn to the first frame of the agent's reply.",
            tally.turn_latency,
        )
        yield from self._moves()
        yield from self._path()
        yield from lease_metrics(self.keeper())
        yield counter(
            "parley_lease_stalls_total",
            "Times the node's lease stalled (etcd did not answer by the safety deadline) and "
            "its sessions were held.",
            node.lease_stalls,
        )
        yield from lag_metrics(self.lag)
        yield from gc_metrics()

    def _media(self, totals: Counter[str]) -> Iterable[Metric]:
        tally = self.tally

        def both(prefix: str) -> dict[str, float]:
            return {"in": totals[f"{prefix}_in"], "out": totals[f"{prefix}_out"]}

        yield labelled_counter(
            "parley_media_packets_total",
            "RTP packets of the node's sessions: authentic ones in from clients, sent out.",
            "direction",
            both("packets"),
        )
        yield labelled_counter(
            "parley_media_bytes_total",
            "SRTP bytes of those RTP packets, in and out.",
            "direction",
            both("bytes"),
        )
        yield labelled_counter(
            "parley_rtcp_packets_total",
            "SRTCP packets of the node's sessions, in and out.",
            "direction",
            both("rtcp"),
        )
        yield labelled_counter(
            "parley_jitter_buffer_drops_total",
            "Client packets the sessions' jitter buffers dropped to shorten their delay: in a "
            "pause of the user's, or in speech when no pause came for shrink_wait.",
            "during",
            {
                "pause": totals["jitter_dropped"] - totals["jitter_dropped_in_speech"],
                "speech": totals["jitter_dropped_in_speech"],
            },
        )
        yield counter(
            "parley_media_packets_lost_total",
            "Client RTP packets lost on the way in (RFC 3550 cumulative loss, summed).",
            tally.retired["lost"],
        )
        dropped = Counter(tally.dropped)
        for key, value in totals.items():
            if key.startswith("dropped:"):
                dropped[key.removeprefix("dropped:")] += value
        yield labelled_counter(
            "parley_session_input_drops_total",
            "Client datagrams the sessions dropped, by reason (failed SRTP auth, replays, ...).",
            "reason",
            dict(sorted(dropped.items())),
        )
        yield histogram(
            "parley_media_loss_ratio",
            "Fraction of RTP packets lost over one RTCP interval, per session and report: in "
            "(the client's stream, as we count it), out (ours, as the client reports it).",
            tally.loss,
            "direction",
        )
        yield histogram(
            "parley_media_jitter_seconds",
            "RTP interarrival jitter (RFC 3550 §6.4.1) per session and report, in and out.",
            tally.jitter,
            "direction",
        )
        yield histogram(
            "parley_media_rtt_seconds",
            "Round-trip time to the client, from its reports on our sender reports.",
            tally.rtt,
        )
        yield histogram(
            "parley_first_hop_rtt_seconds",
            "Round-trip time from the client to the relay it uses (the RTCP round trip less the "
            "relay-to-node tunnel's), by that relay's region ('none': no region given).",
            dict(sorted(tally.first_hop.items())),
            "region",
        )

    def _moves(self) -> Iterable[Metric]:
        node, moved, adopted = self.node, self.moved, self.adopted
        yield labelled_counter(
            "parley_moves_total",
            "Live sessions moved out of this node, and into it (planned moves: drain, migrate).",
            "direction",
            {"out": moved.get("moved_out", 0), "in": moved.get("moved_in", 0)},
        )
        yield labelled_counter(
            "parley_move_failures_total",
            "Moves that did not happen: failed, or abandoned (the session resumed here).",
            "reason",
            {"failed": moved.get("move_failed", 0), "abandoned": moved.get("move_abandoned", 0)},
        )
        yield histogram(
            "parley_move_blackout_seconds",
            "Seconds from the source's quiesce to this node taking a moved-in session.",
            node.move_blackouts,
        )
        yield labelled_counter(
            "parley_adoptions_total",
            "Sessions of a dead node this node tried to adopt (failover), by outcome.",
            "outcome",
            {
                "adopted": adopted.get("adopted", 0),
                "lost": adopted.get("adoption_lost", 0),
                "unrestorable": adopted.get("unrestorable", 0),
            },
        )
        yield histogram(
            "parley_adoption_delay_seconds",
            "Seconds from an orphaned session's owner key expiring (seen in etcd) to its actor "
            "running here. The client's silence is this plus the dead owner's lease TTL.",
            node.adoption_delays,
        )
        yield labelled_counter(
            "parley_checkpoints_total",
            "Session checkpoints written to etcd (sealed), by outcome.",
            "outcome",
            {
                "stored": self.checkpoints.get("checkpoints_stored", 0),
                "failed": self.checkpoints.get("checkpoints_failed", 0),
            },
        )
        yield counter(
            "parley_checkpoint_bytes_total",
            "Sealed checkpoint bytes written to etcd.",
            self.checkpoints.get("checkpoint_bytes", 0),
        )

    def _path(self) -> Iterable[Metric]:
        counters = self.media()
        yield labelled_counter(
            "parley_node_datagrams_total",
            "Datagrams on the node's media path: in from clients (via relays or its own port), "
            "out to them.",
            "direction",
            {"in": counters.get("received", 0), "out": counters.get("sent", 0)},
        )
        yield labelled_counter(
            "parley_node_drops_total",
            "Datagrams the node's media path dropped, by reason.",
            "reason",
            {
                k: v
                for k, v in sorted(counters.items())
                if k not in _NOT_DROPS and not k.startswith("tunnel_") and "kernel" not in k
            },
        )
        path = self.path
        if isinstance(path, RelayedMedia):
            sockets = {"tunnel": counters.get("tunnel_kernel_drops", 0)}
            peers = dict.fromkeys(path.relays, False) | dict.fromkeys(path.tunnels, True)
            rtts = {relay: tunnel.rtt for relay, tunnel in path.tunnels.items()}
            yield from tunnel_metrics(path.endpoint, peers, rtts)
        else:
            sockets = {"media": counters.get("kernel_drops", 0)}
        yield labelled_counter(
            "parley_kernel_drops_total",
            "Datagrams the kernel dropped for a full receive buffer (the process fell behind).",
            "socket",
            sockets,
        )
