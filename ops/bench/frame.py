"""What one echo session costs per 20 ms frame, beside the codec floor, in one process.

    python -m ops.bench.frame [--frames 1000] [--rounds 5] [--complexity C] [--turns N] [--json]
                              [--profile]

One real :class:`~sessions.transceiver.Transceiver` holds a call with the minimal WebRTC client
of ops/bench/lite_client.py, entirely in memory on a virtual clock: ICE, the DTLS handshake and
SRTP keying are done for real, then the client sends espeak-ng speech as 20 ms Opus frames
(and a consent check every few seconds) and the node's echo agent (``node.agent = "echo"``,
built the way a node builds it, with its turn settings, detector and ``node.opus_*`` codec)
sends it back. Each frame gets what a node's grid step does for the session
(``sessions/session.py``, ``_grid_step``): the datagrams that arrived, the core's due timers,
its datagrams to send, its events; then the clock moves 20 ms on. Nothing sleeps.

The CPU time of this thread (``time.thread_time``) is measured over ``--frames`` frames of
that loop, then over as many frames of the **codec floor** (libopus decoding the client's
Opus packets and encoding the PCM again at the session's complexity and bitrate, as
ops/bench/sessions_profile.py ``codec_floor`` does): the two alternate ``--rounds`` times,
so a machine that speeds up or slows down between runs moves both figures together, and each
round's ratio holds. The figures are the medians over rounds of: the session's microseconds
per frame, the floor's, their difference (what Python adds: the transceiver's bookkeeping,
SRTP, RTP, the jitter buffer, the turn detector, the agent), session / floor and floor /
session (the share of the floor's session count a node could reach if this loop were all it
did).

A second session, timed in the same rounds, has its datagrams cross a relay's QUIC tunnel as in
cluster mode (:class:`TunnelPath`: two real tunnel links in memory, real aioquic, real tunnel
frames): each client datagram reaches the node in a QUIC packet of its own, as a relay forwards
one client frame at a time, and each echo leaves in one, as if the session ticked alone (on a
node with N sessions on the grid, N echoes share a packet, so this is the dear end). Only the
node's side is timed. ``session + tunnel`` and ``floor / (s + tunnel)`` are its figures;
``tunnel`` is what the tunnel adds per frame.

With ``--turns N``, N more sessions (without the tunnel) are timed in the same rounds, each
taking its step at every grid point one after the other in a fixed order, as a node's grid
serves its riders: ``N sessions in turn`` is their cost per session and frame, and ``in turn /
alone`` its ratio to the single session's. It tells whether a node's sessions cost more for
sharing the caches: each one's state (its codec, jitter buffer, SRTP) is cold again when its
turn comes. They are served as a node's grid serves them (sessions/grid.py): every session's
step up to the frames it sends, then every session's rest (encoding and sending). In the same
rounds, ``floor, N in turn`` is the codec floor paid the same way: N decoders and encoders,
each decoding and encoding in turn, what those sessions would cost if Python cost nothing
(``in turn / its floor`` is their ratio).

Left out, and in ops/bench/sessions.py instead: sockets and the kernel, Trio's scheduling and
the grid's own bookkeeping, the tunnel endpoint's Trio tasks, the node's other tasks
(signaling, leases, checkpoints made durable, metrics) and the client's side (its encoding and
SRTP are done before the timed loop; what the session sends is handed to the client after it).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import pstats
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Final, final

import attrs
from aioquic._buffer import Buffer
from aioquic.quic.packet import pull_quic_header

from ops.bench.arrivals import SPEECH_TEXT
from ops.bench.lite_client import Client, certificates, offer_sdp
from ops.bench.turns import CLIENT_ADDR, FRAME, SERVER_ADDR
from ops.config import Config
from relay.tunnel import frames
from relay.tunnel.certs import Credentials, make_ca
from relay.tunnel.connection import CID_LENGTH, LinkConfig
from relay.tunnel.link import DatagramReceived, Link, Terminated
from sessions.audio import speech
from sessions.audio.opus import OpusDecoder, OpusEncoder, VoiceCodec
from sessions.grid import grid_index
from sessions.node.agents import make_agent, session_vad, turn_config, voice_codec
from sessions.session import handle_due_timers
from sessions.transceiver import (
    CheckpointDue,
    SessionClosed,
    SessionFailed,
    Transceiver,
)
from sessions.webrtc.ice.state import PeerAddress

__all__ = ["FrameResult", "RoundFigures", "main", "measure", "render"]

#: the client's consent checks (a browser's come every few seconds; consent lasts 30)
CONSENT_FRAMES: Final = 250
#: untimed frames before the first round (the jitter buffer fills, caches warm up)
WARMUP_FRAMES: Final = 100
#: how long the connection may take on the virtual clock, and its step while waiting
CONNECT_WITHIN: Final = 10.0
CONNECT_STEP: Final = 0.001
PROFILE_TOP: Final = 15
#: the tunnel's two ends, as the node dials the relay (only names: nothing is sent)
RELAY_TUNNEL_ADDR: Final = ("198.51.100.1", 4434)
NODE_TUNNEL_ADDR: Final = ("198.51.100.2", 40000)
SESSION: Final = "frame-bench"
EPOCH: Final = 1


@final
@attrs.frozen
class RoundFigures:
    """One round: CPU microseconds per frame of the session loop and of the codec floor."""

    session_us: float
    codec_us: float
    #: the same session's loop with its datagrams through a relay's QUIC tunnel (cluster mode)
    tunneled_us: float = math.nan
    #: per session and frame, ``FrameResult.turns`` sessions each taking its step in turn
    turns_us: float = math.nan
    #: the codec floor with as many codec states, each decoding and encoding in turn
    turns_codec_us: float = math.nan

    @property
    def turns_over_session(self) -> float:
        return self.turns_us / self.session_us if self.session_us > 0 else math.nan

    @property
    def turns_over_codec(self) -> float:
        return self.turns_us / self.turns_codec_us if self.turns_codec_us > 0 else math.nan

    @property
    def python_us(self) -> float:
        return self.session_us - self.codec_us

    @property
    def tunnel_us(self) -> float:
        return self.tunneled_us - self.session_us

    @property
    def codec_over_tunneled(self) -> float:
        return self.codec_us / self.tunneled_us if self.tunneled_us > 0 else math.nan

    @property
    def session_over_codec(self) -> float:
        return self.session_us / self.codec_us if self.codec_us > 0 else math.nan

    @property
    def codec_over_session(self) -> float:
        return self.codec_us / self.session_us if self.session_us > 0 else math.nan


@final
@attrs.frozen
class FrameResult:
    """The medians over rounds, every round, and what the session exchanged."""

    frames: int
    rounds: tuple[RoundFigures, ...]
    complexity: int
    bitrate: int
    machine: dict[str, object]
    #: the session's RTP packets the client received (the echo)
    client_rtp_received: int
    #: datagrams the client sent the session during the rounds (media and consent checks)
    client_datagrams_sent: int
    #: why the session ended, if it did (it should not)
    session_ended: str | None
    #: the same for the session whose datagrams crossed the tunnel
    tunneled_rtp_received: int = 0
    tunneled_ended: str | None = None
    profile: str | None = None
    #: sessions served in turn for ``turns_us`` (1: not measured)
    turns: int = 1
    #: why a session served in turn ended, if one did
    turns_ended: str | None = None

    def _median(self, name: str) -> float:
        return statistics.median(float(getattr(r, name)) for r in self.rounds)

    @property
    def session_us(self) -> float:
        return self._median("session_us")

    @property
    def codec_us(self) -> float:
        return self._median("codec_us")

    @property
    def python_us(self) -> float:
        return self._median("python_us")

    @property
    def session_over_codec(self) -> float:
        return self._median("session_over_codec")

    @property
    def codec_over_session(self) -> float:
        return self._median("codec_over_session")

    @property
    def tunneled_us(self) -> float:
        return self._median("tunneled_us")

    @property
    def tunnel_us(self) -> float:
        return self._median("tunnel_us")

    @property
    def codec_over_tunneled(self) -> float:
        return self._median("codec_over_tunneled")

    @property
    def turns_us(self) -> float:
        return self._median("turns_us")

    @property
    def turns_over_session(self) -> float:
        return self._median("turns_over_session")

    @property
    def turns_codec_us(self) -> float:
        return self._median("turns_codec_us")

    @property
    def turns_over_codec(self) -> float:
        return self._median("turns_over_codec")

    def as_dict(self) -> dict[str, object]:
        return {
            "frames": self.frames,
            "complexity": self.complexity,
            "bitrate": self.bitrate,
            "machine": self.machine,
            "session_us": round(self.session_us, 2),
            "codec_us": round(self.codec_us, 2),
            "python_us": round(self.python_us, 2),
            "session_over_codec": round(self.session_over_codec, 3),
            "codec_over_session": round(self.codec_over_session, 3),
            "tunneled_us": round(self.tunneled_us, 2),
            "tunnel_us": round(self.tunnel_us, 2),
            "codec_over_tunneled": round(self.codec_over_tunneled, 3),
            "turns": self.turns,
            "turns_us": None if self.turns == 1 else round(self.turns_us, 2),
            "turns_over_session": None if self.turns == 1 else round(self.turns_over_session, 3),
            "turns_codec_us": None if self.turns == 1 else round(self.turns_codec_us, 2),
            "turns_over_codec": None if self.turns == 1 else round(self.turns_over_codec, 3),
            "rounds": [
                {
                    "session_us": round(r.session_us, 2),
                    "codec_us": round(r.codec_us, 2),
                    "python_us": round(r.python_us, 2),
                    "session_over_codec": round(r.session_over_codec, 3),
                    "tunneled_us": round(r.tunneled_us, 2),
                }
                for r in self.rounds
            ],
            "client_rtp_received": self.client_rtp_received,
            "client_datagrams_sent": self.client_datagrams_sent,
            "session_ended": self.session_ended,
            "tunneled_rtp_received": self.tunneled_rtp_received,
            "tunneled_ended": self.tunneled_ended,
        }


def machine() -> dict[str, object]:
    """The machine line's figures, as ops/bench/sessions.py reports them."""
    from ops.bench.sessions import machine as sessions_machine

    return sessions_machine()


def node_config(complexity: int | None) -> Config:
    """The default settings with the echo agent (and ``complexity``, if given)."""
    config = Config()
    node = attrs.evolve(config.node, agent="echo")
    if complexity is not None:
        node = attrs.evolve(node, opus_complexity=complexity)
    return attrs.evolve(config, node=node)


@final
class TunnelPath:
    """A relay's tunnel link and the node's, open and greeted, in memory: real aioquic and TLS,
    real tunnel frames, time passed in by hand. The relay's side is not timed; the node's is
    what a node does per datagram in cluster mode (relay/tunnel/quic.py, sessions/node/
    relayed.py): receive the relay's QUIC packet, read each DATAGRAM's frame, hand the payload
    to the session; frame what the session sends, and transmit once per grid step or when
    aioquic's timer (its ACK delay) is due."""

    def __init__(self, now: float) -> None:
        ca = make_ca()
        relay_config = LinkConfig(Credentials.issued(*ca, "relay", "bench-relay"))
        node_config = LinkConfig(Credentials.issued(*ca, "node", "bench-node"))
        self.node = Link.dial(node_config, RELAY_TUNNEL_ADDR, now, totals=Counter())
        flight = [data for data, _ in self.node.conn.datagrams_to_send(now)]
        dcid = pull_quic_header(Buffer(data=flight[0]), host_cid_length=CID_LENGTH)
        self.relay = Link.accept(
            relay_config, NODE_TUNNEL_ADDR, now, dcid.destination_cid, totals=Counter()
        )
        self.to_relay = flight
        self.header = frames.client_header(SESSION, CLIENT_ADDR.socket_address)
        self.from_client = frames.FromClientReader()
        self.to_client = frames.ToClientReader()
        for _ in range(100):
            if self.relay.phase == self.node.phase == "open":
                return
            now += 0.05  # aioquic paces what it sends: a moment between flights
            packets, _ = self.relay_side([], now)
            self.node_receive(packets, now, None)
            self.node_transmit(now, force=True)
        raise RuntimeError("the in-memory tunnel did not open")

    def relay_side(self, datagrams: list[bytes], now: float) -> tuple[list[bytes], list[bytes]]:
        """The relay, untimed: it takes the node's packets (the session's datagrams for the
        client, returned second; ACKs), runs its timers, and forwards ``datagrams`` from the
        client; the QUIC packets for the node first."""
        relay, for_client = self.relay, []
        for packet in self.to_relay:
            relay.receive(packet, NODE_TUNNEL_ADDR, now)
        self.to_relay = []
        while (event := relay.next_event()) is not None:
            if type(event) is DatagramReceived:
                read = self.to_client.read(event.data)
                if read is not None:
                    for_client.append(read[3])
            elif isinstance(event, Terminated):
                raise RuntimeError(f"the in-memory tunnel closed: {event.reason}")
        if relay.deadline() <= now:
            relay.handle_timer(now)
        header = self.header
        for data in datagrams:
            if not relay.send_datagram(header + data):
                raise RuntimeError("the relay's tunnel refused a datagram")
        return [data for data, _ in relay.conn.datagrams_to_send(now)], for_client

    def node_receive(self, packets: list[bytes], now: float, core: Transceiver | None) -> None:
        """The node's receive path for the relay's packets (timed)."""
        node, reader = self.node, self.from_client
        for packet in packets:
            node.receive(packet, RELAY_TUNNEL_ADDR, now)
            while (event := node.next_event()) is not None:
                if type(event) is DatagramReceived:
                    read = reader.read(event.data)
                    if read is not None and core is not None:
                        _, client, payload = read
                        core.receive(payload, PeerAddress(client[0], client[1], ""), now)
                elif isinstance(event, Terminated):
                    raise RuntimeError(f"the in-memory tunnel closed: {event.reason}")

    def node_send(self, data: bytes, addr: PeerAddress) -> None:
        """Frame one of the session's datagrams and queue it on the tunnel (timed)."""
        frame = frames.encode_to_client(SESSION, EPOCH, addr.socket_address, data)
        if not self.node.send_datagram(frame):
            raise RuntimeError("the node's tunnel refused a datagram")

    def node_transmit(self, now: float, *, force: bool) -> None:
        """The node's transmit (timed): after the grid step queued something (``force``), or
        when aioquic's timer is due (its ACK delay, loss detection)."""
        node = self.node
        if node.deadline() <= now:
            node.handle_timer(now)
            force = True
        if force:
            self.to_relay += [data for data, _ in node.conn.datagrams_to_send(now)]


@final
class Bench:
    """The session core, the client, their speech, and the codec floor's material."""

    def __init__(
        self, config: Config, *, tunnel: bool = False, payloads: list[bytes] | None = None
    ) -> None:
        server_cert, client_cert = certificates()
        self.codec: VoiceCodec = voice_codec(config)
        self.core, answer = Transceiver.accept(
            offer_sdp(client_cert.fingerprint_sha256),
            session_id="frame-bench",
            certificate=server_cert,
            candidates=[SERVER_ADDR],
            now=0.0,
            agent=make_agent(config, "frame-bench"),
            turn_config=turn_config(config),
            vad=session_vad(config),
            codec=self.codec,
        )
        self.client = Client(answer, client_cert)
        # The client's speech, encoded once the way the client would (lite_client's encoder):
        # the same Opus packets feed the session and the codec floor.
        if payloads is None:
            encoder = OpusEncoder()
            payloads = [encoder.encode(pcm) for pcm in speech.frames(speech.speak(SPEECH_TEXT))]
        self.payloads = payloads
        self._cursor = 0
        self.sent = 0
        self.ended: str | None = None
        self.now = self._connect()
        self._point = grid_index(self.now, FRAME) + 1
        #: in cluster mode, the relay's tunnel the client's datagrams come through
        self.tunnel = TunnelPath(self.now) if tunnel else None

    def _drain(self) -> None:
        core = self.core
        while (event := core.next_event()) is not None:
            if isinstance(event, CheckpointDue):
                core.confirm(core.snapshot(self.now))
            elif isinstance(event, SessionFailed | SessionClosed):
                self.ended = event.reason

    def _connect(self) -> float:
        """ICE, DTLS and SRTP keying on the virtual clock (no delay on the wire)."""
        core, client = self.core, self.client
        now = 0.0
        inbound = [client.check()]
        steps = 0
        while not (client.keyed and core.media_ready):
            steps += 1
            if now > CONNECT_WITHIN or steps > 100_000 or self.ended is not None:
                raise RuntimeError(f"the session did not connect ({self.ended or 'timeout'})")
            for data in inbound:
                core.receive(data, CLIENT_ADDR, now)
            inbound = []
            timer = core.get_timer()
            if timer is not None and timer <= now:
                core.handle_timer(now)
            for data, addr in core.datagrams_to_send():
                if addr == CLIENT_ADDR:
                    inbound += client.receive(data, now)
            wait = client.dtls_timeout()
            if wait is not None and wait <= 0:
                inbound += client.handle_dtls_timeout()
            self.now = now
            self._drain()
            if client.keyed and not core.media_ready:
                # A browser starts media at once; the first packet completes the session's side.
                inbound.append(self._media())
            if not inbound:
                now += CONNECT_STEP
        return now

    def _media(self) -> bytes:
        payload = self.payloads[self._cursor % len(self.payloads)]
        self._cursor += 1
        return self.client.packet(payload)

    def inputs(self, frames: int) -> list[list[bytes]]:
        """What the client sends in the next ``frames`` frames (made before timing)."""
        out: list[list[bytes]] = []
        for _ in range(frames):
            datagrams = [self._media()]
            if self._cursor % CONSENT_FRAMES == 0:
                datagrams.insert(0, self.client.check())
            out.append(datagrams)
            self.sent += len(datagrams)
        return out

    def run(self, inputs: list[list[bytes]]) -> float:
        """The session's grid steps for these frames; this thread's CPU seconds for them.
        What the session sends reaches the client afterwards (untimed)."""
        if self.tunnel is not None:
            return self._run_tunneled(inputs, self.tunnel)
        sent: list[tuple[bytes, float]] = []
        step = self.step
        started = time.thread_time()
        for datagrams in inputs:
            step(datagrams, sent)
        elapsed = time.thread_time() - started
        self.deliver(sent)
        return elapsed

    def step(self, datagrams: list[bytes], sent: list[tuple[bytes, float]]) -> None:
        """One grid step at the next point: what arrived, the due timers, what the session
        sends to the client (into ``sent``, with the time), its events."""
        self.first(datagrams)
        self.rest(sent)

    def first(self, datagrams: list[bytes]) -> None:
        """A grid step up to the frames it sends: what arrived, the due timers (the grid runs
        these of several sessions before their rests, sessions/grid.py)."""
        core, tick = self.core, FRAME
        now = self._point * tick
        self.now = now
        for data in datagrams:
            core.receive(data, CLIENT_ADDR, now)
        handle_due_timers(core, now, tick, send=False)

    def rest(self, sent: list[tuple[bytes, float]]) -> None:
        """The rest of the grid step: its frames encoded and sent to the client (into
        ``sent``, with the time), its events."""
        core, now = self.core, self.now
        core.send_due(now)
        for data, addr in core.datagrams_to_send():
            if addr == CLIENT_ADDR:
                sent.append((data, now))
        self._drain()
        self._point += 1

    def deliver(self, sent: list[tuple[bytes, float]]) -> None:
        """Hand what the session sent to the client (after the timing)."""
        for data, at in sent:
            self.client.receive(data, at)

    def _run_tunneled(self, inputs: list[list[bytes]], tunnel: TunnelPath) -> float:
        """:meth:`run` with the datagrams through the relay's tunnel; only the node's side of
        it is timed."""
        core = self.core
        tick = FRAME
        sent: list[tuple[bytes, float]] = []
        point = self._point
        elapsed = 0.0
        for datagrams in inputs:
            now = point * tick
            self.now = now
            packets, echoed = tunnel.relay_side(datagrams, now)
            sent += [(data, now) for data in echoed]
            started = time.thread_time()
            tunnel.node_receive(packets, now, core)
            handle_due_timers(core, now, tick)
            queued = False
            for data, addr in core.datagrams_to_send():
                if addr == CLIENT_ADDR:
                    tunnel.node_send(data, addr)
                    queued = True
            tunnel.node_transmit(now, force=queued)
            self._drain()
            elapsed += time.thread_time() - started
            point += 1
        self._point = point
        for data, at in sent:
            self.client.receive(data, at)
        return elapsed

    def floor(self, frames: int) -> float:
        """The codec floor for ``frames`` frames: decode the client's packets, encode again
        at the session's settings; this thread's CPU seconds. The loop of ``floor_in_turn``
        with one codec, so that the two floors are measured alike."""
        return floor_in_turn(self, 1, frames) * frames


def floor_in_turn(bench: Bench, count: int, frames: int) -> float:
    """The codec floor as ``count`` sessions pay it: each its own decoder and encoder (libopus
    state of some 70 KiB a session), decoding a packet and encoding the PCM again in turn at
    each of ``frames`` points, at their own places in the speech. This thread's CPU seconds
    per session-frame: what a node's sessions would cost with that many codecs in the CPU's
    caches if Python cost nothing."""
    payloads = bench.payloads
    count_payloads = len(payloads)
    codecs = [(OpusDecoder(), bench.codec.encoder(), 7 * index) for index in range(count)]
    started = time.thread_time()
    for index in range(frames):
        for decoder, encoder, offset in codecs:
            encoder.encode(decoder.decode(payloads[(index + offset) % count_payloads]))
    return (time.thread_time() - started) / (frames * count)


def run_in_turn(benches: Sequence[Bench], frames: int) -> float:
    """``frames`` grid points at which every session of ``benches`` takes its step, in a fixed
    order, as a node's grid serves its riders (every session's step up to the frames it sends,
    then the rests that encode and send them, sessions/grid.py): this thread's CPU seconds per
    session-frame."""
    inputs = [bench.inputs(frames) for bench in benches]
    sent: list[list[tuple[bytes, float]]] = [[] for _ in benches]
    firsts = [bench.first for bench in benches]
    rests = [bench.rest for bench in benches]
    started = time.thread_time()
    for index in range(frames):
        for first, made in zip(firsts, inputs, strict=True):
            first(made[index])
        for rest, out in zip(rests, sent, strict=True):
            rest(out)
    elapsed = time.thread_time() - started
    for bench, out in zip(benches, sent, strict=True):
        bench.deliver(out)
    return elapsed / (frames * len(benches))


def _profile(bench: Bench, frames: int) -> str:
    inputs = bench.inputs(frames)
    profiler = cProfile.Profile()
    profiler.enable()
    bench.run(inputs)
    profiler.disable()
    out = io.StringIO()
    for key in ("cumulative", "tottime"):
        out.write(f"--- top {PROFILE_TOP} by {key}, one round of {frames} frames ---\n")
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key).print_stats(PROFILE_TOP)
    return out.getvalue()


def measure(
    *,
    frames: int = 1000,
    rounds: int = 5,
    complexity: int | None = None,
    profile: bool = False,
    turns: int = 1,
) -> FrameResult:
    """Alternate ``rounds`` times: ``frames`` frames of the session loop, then of the floor
    (and, with ``turns`` above 1, of that many sessions taking their steps in turn)."""
    if frames < 1 or rounds < 1 or turns < 1:
        raise ValueError("frames, rounds and turns are at least 1")
    config = node_config(complexity)
    bench = Bench(config)
    tunneled = Bench(config, tunnel=True, payloads=bench.payloads)
    crowd = [Bench(config, payloads=bench.payloads) for _ in range(turns)] if turns > 1 else []
    bench.run(bench.inputs(WARMUP_FRAMES))
    tunneled.run(tunneled.inputs(WARMUP_FRAMES))
    if crowd:
        run_in_turn(crowd, WARMUP_FRAMES)
        floor_in_turn(bench, turns, WARMUP_FRAMES // 10)
    bench.floor(WARMUP_FRAMES)
    figures: list[RoundFigures] = []
    for _ in range(rounds):
        session = bench.run(bench.inputs(frames))
        through = tunneled.run(tunneled.inputs(frames))
        in_turn = run_in_turn(crowd, frames) * 1e6 if crowd else math.nan
        codec = bench.floor(frames)
        codec_in_turn = floor_in_turn(bench, turns, frames) * 1e6 if crowd else math.nan
        figures.append(
            RoundFigures(
                session / frames * 1e6,
                codec / frames * 1e6,
                through / frames * 1e6,
                in_turn,
                codec_in_turn,
            )
        )
    text = _profile(bench, frames) if profile else None
    return FrameResult(
        frames=frames,
        rounds=tuple(figures),
        complexity=bench.codec.complexity,
        bitrate=bench.codec.bitrate,
        machine=machine(),
        client_rtp_received=bench.client.received,
        client_datagrams_sent=bench.sent,
        session_ended=bench.ended,
        tunneled_rtp_received=tunneled.client.received,
        tunneled_ended=tunneled.ended,
        profile=text,
        turns=turns,
        turns_ended=next((b.ended for b in crowd if b.ended is not None), None),
    )


def render(result: FrameResult) -> str:
    m = result.machine
    lines = [
        f"machine: nproc {m['nproc']}, {m['cpu_model']}, python {m['python']}, "
        f"libopus {m.get('libopus', '?')}, linux {m['kernel']}",
        f"one echo session in memory, Opus complexity {result.complexity}, "
        f"{result.bitrate // 1000} kbit/s; {len(result.rounds)} rounds of {result.frames} "
        "frames, session loop and codec floor alternating; medians",
        "",
        f"  {'':<22}{'µs/frame':>10}",
        f"  {'session (grid step)':<22}{result.session_us:>10.1f}",
        f"  {'codec floor':<22}{result.codec_us:>10.1f}",
        f"  {'python (difference)':<22}{result.python_us:>10.1f}",
        f"  {'session / floor':<22}{result.session_over_codec:>10.2f}",
        f"  {'floor / session':<22}{result.codec_over_session:>10.2f}",
        f"  {'session + tunnel':<22}{result.tunneled_us:>10.1f}",
        f"  {'tunnel (difference)':<22}{result.tunnel_us:>10.1f}",
        f"  {'floor / (s + tunnel)':<22}{result.codec_over_tunneled:>10.2f}",
    ]
    if result.turns > 1:
        lines += [
            f"  {f'{result.turns} sessions in turn':<22}{result.turns_us:>10.1f}",
            f"  {'in turn / alone':<22}{result.turns_over_session:>10.2f}",
            f"  {f'floor, {result.turns} in turn':<22}{result.turns_codec_us:>10.1f}",
            f"  {'in turn / its floor':<22}{result.turns_over_codec:>10.2f}",
        ]
    lines += [
        "",
        "floor / session: the share of the codec floor's sessions per core a node could hold if"
        " this loop were all it did (no sockets, tunnel, Trio or other tasks); with the tunnel:"
        " the same with each client datagram arriving in a QUIC packet of its own from a relay"
        " (cluster mode) and each echo leaving in one (the node's side of the tunnel, in memory).",
        f"client: {result.client_datagrams_sent} datagrams sent, "
        f"{result.client_rtp_received} echoed RTP packets received; session "
        + (f"ENDED: {result.session_ended}" if result.session_ended else "alive")
        + f"; through the tunnel: {result.tunneled_rtp_received} received, session "
        + (f"ENDED: {result.tunneled_ended}" if result.tunneled_ended else "alive")
        + (
            f"; in turn: {result.turns} sessions, "
            + (f"one ENDED: {result.turns_ended}" if result.turns_ended else "all alive")
            if result.turns > 1
            else ""
        ),
    ]
    if result.profile:
        lines += ["", result.profile.rstrip()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> FrameResult:
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.frame", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument("--frames", type=int, default=1000, help="frames per round (1000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument(
        "--complexity", type=int, choices=range(11), default=None, help="node.opus_complexity"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile one more round of the session loop"
    )
    parser.add_argument(
        "--turns",
        type=int,
        default=1,
        help="also time this many sessions taking their steps in turn, as a node's grid serves"
        " them (default 1: not measured)",
    )
    args = parser.parse_args(argv)
    if args.frames < 1 or args.rounds < 1 or args.turns < 1:
        parser.error("--frames, --rounds and --turns are at least 1")
    try:
        result = measure(
            frames=args.frames,
            rounds=args.rounds,
            complexity=args.complexity,
            profile=args.profile,
            turns=args.turns,
        )
    except speech.SpeechUnavailableError as exc:
        raise SystemExit(f"frame bench: {exc}") from None
    if args.json:
        out = result.as_dict()
        if result.profile:
            out["profile"] = result.profile
        print(json.dumps(out, indent=2))
    else:
        print(render(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
