"""The tunnel connection's short ways (relay/tunnel/connection.py) do what aioquic's own does.

``TunnelConnection`` receives an open connection's 1-RTT packets, and writes packets that carry
only DATAGRAMs (with ACKs and limits), without aioquic's general code. Each test here runs the
same conversation twice, in two worlds of two connections each, one world with the short ways
and one without, and compares after every step what the connections did: the events each side
reported, the packets each sent (how many, how large: contents differ, the keys are the worlds'
own) and the state aioquic keeps about them (packet numbers, ACK ranges and timers, congestion
window and bytes in flight, pacing, idle timer, connection state). The conversations are random
but seeded: datagrams of any size in bursts either way, control-stream data, PINGs, key updates,
time passing with timers run, and a network that loses, duplicates, reorders and corrupts
packets and once in a while delivers one from another address. A second test hands the short
receive a packet sealed with the right keys whose frame is malformed: it must close the
connection with aioquic's error, code and reason alike.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from aioquic import tls
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicPacketBuilder

from relay.tunnel.certs import Credentials, make_ca
from relay.tunnel.connection import LinkConfig, TunnelConnection
from tests.relay.memory import CLIENT_ADDR, SERVER_ADDR, handshake, pump

CA = make_ca()
RELAY = LinkConfig(Credentials.issued(*CA, "relay", "r1"))
NODE = LinkConfig(Credentials.issued(*CA, "node", "n1"))
ELSEWHERE = ("127.0.0.2", 40002)


class AioquicsOwn(TunnelConnection):
    """A tunnel connection that leaves every packet to aioquic, from its first."""

    short_receive = short_send = False


class World:
    """A node's connection (client) and a relay's (server), handshaken in memory, with or
    without the short ways, and the packets each has sent that the network still holds."""

    def __init__(self, short: bool, now: float) -> None:
        kind = TunnelConnection if short else AioquicsOwn
        self.client, self.server = handshake(kind, kind, node=NODE, relay=RELAY, now=now)
        self.drain_events()
        self.client.send_stream_data(0, b"hello\n")  # the tunnels' control stream
        pump(self.client, self.server, now)
        self.drain_events()

    def conn(self, side: str) -> TunnelConnection:
        return self.client if side == "client" else self.server

    def drain_events(self) -> list[tuple[str, Any]]:
        seen = []
        for side in ("client", "server"):
            while (event := self.conn(side).next_event()) is not None:
                seen.append((side, describe(event)))
        return seen


def describe(event: events.QuicEvent) -> Any:
    if isinstance(event, events.DatagramFrameReceived):
        return ("datagram", event.data)
    if isinstance(event, events.StreamDataReceived):
        return ("stream", event.stream_id, event.data, event.end_stream)
    if isinstance(event, events.PingAcknowledged):
        return ("ping", event.uid)
    if isinstance(event, events.ConnectionTerminated):
        return ("terminated", event.error_code, event.reason_phrase)
    if isinstance(event, events.ConnectionIdIssued | events.ConnectionIdRetired):
        return (type(event).__name__,)  # the IDs are each world's own
    return (type(event).__name__,)


def state(conn: QuicConnection) -> tuple[Any, ...]:
    """What aioquic keeps about the packets a connection sent and received."""
    space = conn._spaces[tls.Epoch.ONE_RTT]
    loss = conn._loss
    return (
        conn._state,
        conn.get_timer(),
        conn._close_at,
        conn._pacing_at,
        conn._packet_number,
        conn._spin_bit,
        conn._spin_highest_pn,
        conn._ack_eliciting_sent_since_receipt,
        len(conn._datagrams_pending),
        [path.addr for path in conn._network_paths],
        [path.is_validated for path in conn._network_paths],
        space.expected_packet_number,
        space.largest_received_packet,
        space.largest_received_time,
        space.ack_at,
        list(space.ack_queue),
        space.received_packets._lower,
        sorted(space.received_packets._received),
        sorted(space.sent_packets),
        loss.bytes_in_flight,
        loss.congestion_window,
        loss._rtt_smoothed,
        loss._pacer.bucket_time,
    )


def conversation(seed: int, steps: int) -> Iterator[tuple[str, Any]]:
    """A random conversation: each step one action, with the random choices it needs."""
    rng = random.Random(seed)
    for _ in range(steps):
        roll = rng.random()
        side = rng.choice(("client", "server"))
        if roll < 0.45:
            sizes = [rng.choice((1, 60, 172, 600, 1100, 1300)) for _ in range(rng.randint(1, 40))]
            yield "datagrams", (side, sizes)
        elif roll < 0.5:
            yield "stream", (side, rng.randint(1, 3000))
        elif roll < 0.53:
            yield "ping", (side,)
        elif roll < 0.55:
            yield "key update", (side,)
        elif roll < 0.8:
            yield "wait", (rng.choice((0.0005, 0.002, 0.02, 0.05, 0.3)),)
        else:
            yield "network", (side, rng.random(), rng.getrandbits(64))


class Run:
    def __init__(self, short: bool) -> None:
        self.now = 10.0
        self.world = World(short, self.now)
        self.in_flight: dict[str, list[bytes]] = {"client": [], "server": []}

    def act(self, action: str, args: Any) -> list[Any]:
        """One step; returns everything observable about it."""
        world = self.world
        seen: list[Any] = []
        if action == "datagrams":
            side, sizes = args
            for size in sizes:
                world.conn(side).send_datagram_frame(bytes([size % 251]) * size)
        elif action == "stream":
            side, size = args
            stream_id = 0 if side == "client" else 1
            world.conn(side).send_stream_data(stream_id, b"x" * size)
        elif action == "ping":
            (side,) = args
            world.conn(side).send_ping(7)
        elif action == "key update":
            (side,) = args
            world.conn(side).request_key_update()
        elif action == "wait":
            (seconds,) = args
            self.now += seconds
            for side in ("client", "server"):
                conn = world.conn(side)
                timer = conn.get_timer()
                if timer is not None and timer <= self.now:
                    conn.handle_timer(self.now)
        elif action == "network":
            side, fate, bits = args
            seen.append(self.deliver(side, fate, bits))
        for side in ("client", "server"):
            sent = [data for data, _ in world.conn(side).datagrams_to_send(self.now)]
            seen.append((side, [len(data) for data in sent]))
            self.in_flight[side] += sent
        seen.append(world.drain_events())
        seen.append((state(world.client), state(world.server)))
        return seen

    def deliver(self, side: str, fate: float, bits: int) -> list[str]:
        """Hand what ``side`` sent to the other side, through a misbehaving network."""
        rng = random.Random(bits)
        packets, self.in_flight[side] = self.in_flight[side], []
        if fate < 0.2:
            rng.shuffle(packets)
        receiver = self.world.conn("server" if side == "client" else "client")
        sender_addr = CLIENT_ADDR if side == "client" else SERVER_ADDR
        what = []
        for data in packets:
            roll = rng.random()
            if roll < 0.1:
                what.append("lost")
                continue
            if roll < 0.15:
                corrupt = bytearray(data)
                corrupt[rng.randrange(len(corrupt))] ^= 1 << rng.randrange(8)
                data = bytes(corrupt)
                what.append("corrupt")
            addr = ELSEWHERE if (side == "client" and fate > 0.97) else sender_addr
            receiver.receive_datagram(data, addr, self.now)
            if roll > 0.95:
                receiver.receive_datagram(data, addr, self.now)  # duplicated
                what.append("twice")
            else:
                what.append("once")
        return what


def twin_runs() -> tuple[Run, Run]:
    """A run with the short ways and one without whose handshakes left the same state.

    The handshakes' ECDSA signatures vary in length by a byte or two, and with them the bytes
    each side counts in flight (eight different states in 60 handshakes, none more likely than
    a third); pairs are made until two came out the same size and start even.
    """
    made: dict[bool, dict[str, Run]] = {True: {}, False: {}}
    for _ in range(60):
        for short in (True, False):
            run = Run(short=short)
            key = repr([state(run.world.conn(side)) for side in SIDES])
            made[short].setdefault(key, run)
            twin = made[not short].get(key)
            if twin is not None:
                return (run, twin) if short else (twin, run)
    raise AssertionError("no two handshakes of the same size in 60 pairs")


SIDES = ("client", "server")


@pytest.mark.parametrize("seed", range(12))
def test_the_short_ways_do_what_aioquic_does(seed: int) -> None:
    short, plain = twin_runs()
    for number, (action, args) in enumerate(conversation(seed, 400)):
        assert short.act(action, args) == plain.act(action, args), (
            f"seed {seed}: step {number} ({action} {args}) differs"
        )
    taken = [short.world.conn(side) for side in ("client", "server")]
    assert all(conn.short_received >= 10 and conn.short_sent >= 10 for conn in taken)
    untaken = [plain.world.conn(side) for side in ("client", "server")]
    assert all(conn.short_received == conn.short_sent == 0 for conn in untaken)


#: frames no peer of ours sends: (frame type, the bytes after it), each a protocol error
FORGED = {
    "datagram longer than its packet": (0x31, b"\x40\xff" + b"x" * 20),
    "unknown frame type": (0x3F, b"x" * 20),
    "ack cut short": (0x02, b"\x05"),
    "crypto frame cut short": (0x06, b"\x00\x40\xff" + b"x" * 20),
}


def forge(sender: TunnelConnection, frame_type: int, body: bytes) -> bytes:
    """A 1-RTT packet sealed with ``sender``'s keys that carries one frame as given."""
    builder = QuicPacketBuilder(
        host_cid=sender.host_cid,
        peer_cid=sender._peer_cid.cid,
        version=sender._version,
        is_client=sender._is_client,
        max_datagram_size=1200,
        packet_number=sender._packet_number,
        spin_bit=sender._spin_bit,
    )
    builder.start_packet(QuicPacketType.ONE_RTT, sender._cryptos[tls.Epoch.ONE_RTT])
    builder.start_frame(frame_type).push_bytes(body)
    (datagram,), _ = builder.flush()
    sender._packet_number += 1
    return datagram


@pytest.mark.parametrize("name", sorted(FORGED))
def test_a_malformed_frame_closes_the_connection_as_aioquic_does(name: str) -> None:
    short, plain = twin_runs()
    for action, args in conversation(seed=99, steps=60):
        assert short.act(action, args) == plain.act(action, args)
    frame_type, body = FORGED[name]
    for run in (short, plain):
        world = run.world
        world.server.receive_datagram(forge(world.client, frame_type, body), CLIENT_ADDR, run.now)
    after = [run.act("wait", (0.02,)) for run in (short, plain)]
    assert after[0] == after[1]
    closed = [run.world.server.close_event for run in (short, plain)]
    assert closed[0] is not None and closed[1] is not None
    assert (closed[0].error_code, closed[0].reason_phrase) == (
        closed[1].error_code,
        closed[1].reason_phrase,
    )
    assert short.world.server.short_received > plain.world.server.short_received == 0
