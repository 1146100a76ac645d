"""Settings the node daemon owns: the node's own and its sessions' turn detection.

Plain attrs values with working defaults. ``ops/config.py`` maps TOML, environment variables and
command-line flags onto them; nothing here reads a file of settings or the environment.
"""

from __future__ import annotations

import os
import socket
from typing import Protocol, final
from urllib.parse import urlsplit

import attrs

from relay.addresses import Address, parse_listen
from relay.settings import ClusterSettings, SettingsError, check_region

__all__ = ["AGENTS", "MEDIA_PATHS", "NodeSettings", "NodeSetup", "TurnsSettings"]

#: the built-in agents a node can give its sessions
AGENTS = ("turn-echo", "echo", "bridge")
#: how client media reaches a node
MEDIA_PATHS = ("direct", "relay")

_positive = attrs.validators.gt(0)
_positive_float = attrs.validators.gt(0.0)


@final
@attrs.frozen
class NodeSettings:
    id: str = ""
    lease_ttl: int = 5
    lease_margin: float = 0.0  # 0: derived from the TTL (storage.lease.default_margin)
    #: seconds past the lease's safety deadline that sessions are held (not processed, state
    #: kept) while etcd does not answer; if the lease is confirmed alive meanwhile they go on
    lease_hold: float = 60.0
    #: a directory for the node's media ledger (``<id>.jsonl``: what it processed for each
    #: session and epoch, for checking single ownership from outside; sessions/node/ledger.py)
    ledger_dir: str = ""
    capacity: int = 1000
    #: the share of one core the node's event loop may use (its thread's CPU time, averaged
    #: over a few seconds: sessions/node/load.py) and still take new sessions, moves and
    #: adoptions; at or above it offers get 503 ``node_busy``. 0: no limit but ``capacity``
    max_load: float = attrs.field(
        default=0.85, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)]
    )
    signaling_host: str = "127.0.0.1"
    signaling_port: int = 0
    #: the signaling URL clients reach this node at, when it is not ``ws://`` + the bound
    #: address (a load balancer, an ingress, a NAT in between): ``ws[s]://HOST[:PORT]
    #: [/PREFIX]/v1/session``; published in the registration, sent to clients whose session
    #: moved here; the WHIP URL is the same with http[s]. "": the bound address
    public_url: str = ""
    #: where this node runs, e.g. "eu-west" (lowercase letters, digits, dashes); "": none. Its
    #: answers offer its clients' region's relays first, and it sends a client from another
    #: region to a node of that region when one has room
    region: str = attrs.field(default="", validator=lambda _, __, v: check_region(v, "node.region"))
    #: offer each client its own region's relays first (the highest priority) and at most
    #: ``STEER_FALLBACKS`` others, and place it on a node of its region; off: every relay,
    #: rotated per session, and the node that got the offer keeps the session
    steering: bool = True
    #: the HTTP header in which the load balancer in front of signaling names the client's
    #: region (e.g. "X-Client-Region"; it must overwrite whatever a client sent in it); "":
    #: not trusted. An access token's ``region`` claim wins over it
    region_header: str = ""
    #: a MaxMind-format database (.mmdb) of client addresses, and which region each country or
    #: continent code in it goes to ("DE=eu-west,NA=us-east"; sessions/node/geoip.py): after
    #: the token's claim and the header, before the node's own region. "": none
    region_db: str = ""
    region_map: str = ""
    #: "direct": the node's own client-facing UDP port (media_host:media_port) takes media;
    #: "relay": media only comes through the cluster's relays, and no client port is opened
    media: str = "direct"
    media_host: str = "127.0.0.1"
    media_port: int = 0
    #: local address of the node's QUIC tunnels to the relays
    tunnel_host: str = "127.0.0.1"
    #: who the user talks to: "turn-echo" (plays each finished turn back), "echo" (at once) or
    #: "bridge" (an external agent over WebSocket at agent_url; docs/agent-protocol.md)
    agent: str = "turn-echo"
    agent_url: str = ""
    #: who may open sessions: "token" (a valid access token, sessions/node/tokens.py) or "open"
    #: (anyone: only when set explicitly; the node warns when it starts)
    auth: str = attrs.field(default="token", validator=attrs.validators.in_(("token", "open")))
    #: mint short-lived tokens for the demo page at /v1/demo-token, for loopback clients only
    #: (needs a private token key in cluster.certs; `parley up` sets it)
    demo_tokens: bool = False
    #: fair admission at the signaling port (issue #15; sessions/node/signaling/limits.py): the
    #: connections one source address (an IPv6 /64) holds at once, ...
    source_connections: int = attrs.field(default=32, validator=_positive)
    #: ... the offers per second one source, and one token subject, make in the long run ...
    offer_rate: float = attrs.field(default=5.0, validator=_positive_float)
    #: ... and at once after a quiet spell, ...
    offer_burst: int = attrs.field(default=10, validator=_positive)
    #: ... the sessions of one source, and of one subject, answered but not connected yet, ...
    half_open: int = attrs.field(default=8, validator=_positive)
    #: ... and the seconds an answered session has to connect (ICE) before it is ended
    setup_within: float = attrs.field(default=10.0, validator=_positive_float)
    #: the ops port (GET /metrics for Prometheus, GET /healthz), ``IP:PORT``: apart from the
    #: signaling port, on loopback unless set otherwise; port 0 picks a free one (the node's
    #: registration shows it as its ``metrics`` address); "" serves none
    ops_listen: str = "127.0.0.1:0"
    #: the node's media tick, milliseconds: once a session's media flows, its media loop wakes
    #: only on this shared grid (its playout, its agent's frames and what arrived since the last
    #: tick, all at once), so the node's sessions are served in batches and a tunnel carries
    #: many of their frames in one QUIC packet; up to this much later than their own times.
    #: 0: every session on its own timers, every datagram at once (sessions/session.py)
    media_tick_ms: int = attrs.field(default=20, validator=attrs.validators.in_(range(0, 21)))
    #: libopus's complexity for what sessions say, 0-10: CPU per frame against fidelity (README,
    #: Benchmarks, ``ops/bench/codec.py``: 10 costs 1.8x the codec CPU of 5 for +0.15 dB)
    opus_complexity: int = attrs.field(default=5, validator=attrs.validators.in_(range(0, 11)))
    #: the bitrate of what sessions say, bit/s (6,000-510,000; 32,000 is wideband speech)
    opus_bitrate: int = attrs.field(
        default=32_000, validator=[attrs.validators.ge(6_000), attrs.validators.le(510_000)]
    )

    def check_public_url(self) -> None:
        """Raises SettingsError unless ``public_url`` is empty or a WebSocket URL of signaling."""
        if not self.public_url:
            return
        from sessions.node.signaling.messages import SESSION_PATH  # it imports this module

        url = urlsplit(self.public_url)
        try:
            url.port  # noqa: B018 - parsing it is the check
        except ValueError:
            raise SettingsError(f"node.public_url: bad port in {self.public_url!r}") from None
        if (
            url.scheme not in ("ws", "wss")
            or not url.hostname
            or not url.path.endswith(SESSION_PATH)
            or url.query
            or url.fragment
        ):
            raise SettingsError(
                f"node.public_url must be ws[s]://HOST[:PORT][/PREFIX]{SESSION_PATH}, "
                f"not {self.public_url!r}"
            )

    def ops_address(self) -> Address | None:
        """``ops_listen`` parsed (None: no ops port); raises SettingsError."""
        if not self.ops_listen:
            return None
        try:
            return parse_listen(self.ops_listen, "node.ops_listen")
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

    def node_id(self) -> str:
        return self.id or f"{socket.gethostname().split('.')[0]}-{os.getpid()}"


@final
@attrs.frozen
class TurnsSettings:
    """Turn detection and barge-in thresholds (see sessions.turns.TurnConfig), and the voice
    activity detector.

    ``vad`` is one of :data:`sessions.audio.neural_vad.VADS`: "energy" (the default, no extra
    package), "silero" (a neural detector) or "hybrid" (energy's onsets, silero's verdicts), the
    last two needing ``pip install 'parley[vad]'``; ``ops/config.py`` checks that the one named
    can be built on this machine.
    """

    min_speech_ms: int = 200
    end_silence_ms: int = 600
    padding_ms: int = 200
    vad: str = "energy"
    #: voice in a row over the agent's reply that ducks it (fades it out and holds it)
    duck_after_ms: int = 20
    #: voice counted in a turn over the reply that makes the interruption final
    interrupt_ms: int = 400
    #: no voice for this long ends a duck that was not a turn: the reply comes back
    release_ms: int = 200
    #: longest duck that did not become an interruption
    duck_max_ms: int = 2000
    #: the fade out and back in
    ramp_ms: int = 5
    #: tell the agent's own voice coming back (echo) from the user's
    echo_aware: bool = True
    #: longest echo delay looked for (sent to heard back, both network legs included)
    echo_max_delay_ms: int = 600
    #: how far above the predicted echo an inbound frame is the user
    echo_margin_db: float = 6.0


class NodeSetup(Protocol):
    """Everything a node reads: the cluster's settings, its own, and its sessions' turns.
    ``ops.config.Config`` is one; tests may pass any value of this shape."""

    @property
    def cluster(self) -> ClusterSettings: ...

    @property
    def node(self) -> NodeSettings: ...

    @property
    def turns(self) -> TurnsSettings: ...
