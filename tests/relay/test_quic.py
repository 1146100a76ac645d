"""QUIC tunnels over real UDP on 127.0.0.1, with real TLS handshakes both ways.

Some peers here are ones a TunnelEndpoint would never be (no certificate, one that falls silent,
one that sends garbage on the control stream): those are bare aioquic connections driven by
:class:`RawClient`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

import relay.tunnel.quic
from relay.tunnel.certs import Credentials, Identity, issue, make_ca
from relay.tunnel.connection import ACK_DELAY, ALPN, TunnelConnection
from relay.tunnel.quic import Tunnel, TunnelEndpoint, TunnelError

CA = make_ca()
OTHER_CA = make_ca("Another cluster's CA")
RELAY = Credentials.issued(*CA, "relay", "r1")
NODE = Credentials.issued(*CA, "node", "n1")


class Recorder:
    """A TunnelHandler that remembers everything."""

    def __init__(self) -> None:
        self.opened: list[Tunnel] = []
        self.datagrams: list[tuple[Tunnel, bytes]] = []
        self.controls: list[tuple[Tunnel, dict[str, Any]]] = []
        self.closed: list[tuple[Tunnel, str]] = []

    def tunnel_opened(self, tunnel: Tunnel) -> None:
        assert tunnel not in self.opened
        self.opened.append(tunnel)

    def datagram_received(self, tunnel: Tunnel, data: bytes) -> None:
        assert tunnel in self.opened and not tunnel.closed
        self.datagrams.append((tunnel, data))

    def control_received(self, tunnel: Tunnel, message: dict[str, Any]) -> None:
        assert tunnel in self.opened and not tunnel.closed
        self.controls.append((tunnel, message))

    def tunnel_closed(self, tunnel: Tunnel, reason: str) -> None:
        assert tunnel in self.opened and tunnel.closed
        assert all(t is not tunnel for t, _ in self.closed), "tunnel_closed called twice"
        self.closed.append((tunnel, reason))


@contextlib.asynccontextmanager
async def connected(
    *, within: float = 5.0
) -> AsyncIterator[tuple[TunnelEndpoint, TunnelEndpoint, Tunnel, Recorder, Recorder]]:
    """A relay endpoint and a node endpoint, the node's tunnel to the relay open at both ends:
    ``(relay, node, tunnel, relay_side, node_side)``. Everything stops on the way out, and the
    whole block must finish ``within`` seconds."""
    relay_side, node_side = Recorder(), Recorder()
    with trio.fail_after(within):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side).run)
            node = await nursery.start(client(node_side).run)
            tunnel = await node.connect("127.0.0.1", relay.port)
            await until(lambda: len(relay_side.opened) == 1)
            yield relay, node, tunnel, relay_side, node_side
            nursery.cancel_scope.cancel()


async def greet(raw: RawClient, relay_side: Recorder) -> None:
    """Once the raw peer's handshake is done, say the node's hello: the relay opens a tunnel."""
    await until(lambda: raw.handshake_done)
    raw.conn.send_stream_data(0, b'{"type":"parley-hello","version":1}\n')
    await until(lambda: len(relay_side.opened) == 1)


async def until(condition: Callable[[], bool], *, within: float = 3.0) -> None:
    """Wait for state that arrives over the loopback, which no event of ours announces."""
    with trio.fail_after(within):
        while True:
            if condition():
                return
            await trio.sleep(0.005)


def server(handler: Recorder, credentials: Credentials = RELAY, **kwargs: Any) -> TunnelEndpoint:
    return TunnelEndpoint(credentials, handler, server=True, **kwargs)


def client(handler: Recorder, credentials: Credentials = NODE, **kwargs: Any) -> TunnelEndpoint:
    return TunnelEndpoint(credentials, handler, server=False, **kwargs)


class RawClient:
    """A bare aioquic client on its own socket: a peer our endpoint would never be."""

    def __init__(self, credentials: Credentials | None, ca_pem: bytes = CA[0]) -> None:
        configuration = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            cadata=ca_pem,
            max_datagram_frame_size=65536,
        )
        if credentials is not None:
            configuration.certificate = x509.load_pem_x509_certificate(credentials.cert_pem)
            configuration.private_key = load_pem_private_key(credentials.key_pem, None)
        self.conn = QuicConnection(configuration=configuration)
        self.events: list[events.QuicEvent] = []
        self.terminated: events.ConnectionTerminated | None = None
        self.received = b""

    @property
    def handshake_done(self) -> bool:
        return any(isinstance(e, events.HandshakeCompleted) for e in self.events)

    async def run(
        self, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            self.conn.connect(("127.0.0.1", port), trio.current_time())
            task_status.started()
            while self.terminated is None:
                for data, addr in self.conn.datagrams_to_send(trio.current_time()):
                    await sock.sendto(data, addr)
                timer = self.conn.get_timer()
                # Poll briefly, so what the test queues from outside leaves soon.
                wake = min(math.inf if timer is None else timer, trio.current_time() + 0.01)
                with trio.move_on_at(wake):
                    data, addr = await sock.recvfrom(65536)
                    self.conn.receive_datagram(data, addr[:2], trio.current_time())
                timer = self.conn.get_timer()
                if timer is not None and timer <= trio.current_time():
                    self.conn.handle_timer(trio.current_time())
                while (event := self.conn.next_event()) is not None:
                    self.events.append(event)
                    if isinstance(event, events.StreamDataReceived):
                        self.received += event.data
                    if isinstance(event, events.ConnectionTerminated):
                        self.terminated = event


# -- the happy path -----------------------------------------------------------------------------


async def test_node_dials_relay_and_both_know_who_is_who() -> None:
    relay_side, node_side = Recorder(), Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side).run)
            node = await nursery.start(client(node_side).run)
            assert relay.port != 0 and relay.address == ("127.0.0.1", relay.port)
            tunnel = await node.connect("127.0.0.1", relay.port, expect=Identity("relay", "r1"))
            assert tunnel.peer == Identity("relay", "r1")
            assert tunnel.remote == ("127.0.0.1", relay.port)
            assert node_side.opened == [tunnel] and node.tunnels == [tunnel]
            await until(lambda: len(relay_side.opened) == 1)
            (back,) = relay_side.opened
            assert back.peer == Identity("node", "n1")
            assert back.remote == ("127.0.0.1", node.port)
            assert relay.tunnels == [back]
            assert relay.counters["handshakes"] == node.counters["handshakes"] == 1
            assert relay.counters["auth_failures"] == node.counters["auth_failures"] == 0
            assert relay_side.closed == []
            nursery.cancel_scope.cancel()


async def test_datagrams_both_ways_in_batches_arrive_intact() -> None:
    async with connected() as (relay, node, tunnel, relay_side, node_side):
        back = relay_side.opened[0]

        # Far more than one congestion window: what does not fit waits in aioquic's queue
        # and leaves as ACKs come back, without another flush from us.
        sent = [os.urandom(1 + i * 7 % tunnel.max_datagram) for i in range(400)]
        assert all(tunnel.send_datagram(d) for d in sent)
        node.flush()
        replies = [b"reply %d " % i + bytes(i % 300) for i in range(300)]
        assert all(back.send_datagram(d) for d in replies)
        relay.flush()

        await until(lambda: len(relay_side.datagrams) == 400 and len(node_side.datagrams) == 300)
        # Loopback neither loses nor reorders these; the tunnel must not either.
        assert [d for _, d in relay_side.datagrams] == sent
        assert [d for _, d in node_side.datagrams] == replies
        assert all(t is back for t, _ in relay_side.datagrams)
        assert tunnel.counters["datagrams_out"] == back.counters["datagrams_in"] == 400
        assert relay.counters["datagrams_in"] == node.counters["datagrams_out"] == 400


async def test_frames_queued_by_several_senders_in_one_batch_share_a_packet() -> None:
    """Ten sessions that tick together each queue a frame and flush: one QUIC packet leaves."""
    async with connected() as (relay, node, tunnel, relay_side, _):
        await trio.sleep(0.1)  # the handshake's last ACKs
        before = relay.counters["packets_in"]

        async def session(index: int) -> None:
            assert tunnel.send_datagram(b"frame %d " % index + bytes(150))
            node.flush()

        async with trio.open_nursery() as sessions:
            for index in range(10):
                sessions.start_soon(session, index)
        await until(lambda: len(relay_side.datagrams) == 10)
        # one packet (another may carry an ACK of the handshake's last packets), not ten
        assert relay.counters["packets_in"] - before <= 2


async def test_a_caller_that_batches_transmits_at_once_and_full_packets_leave_together() -> None:
    """The relay's public port transmits at the end of each drained batch, without a task
    switch; a burst of full packets to one peer leaves in segmented sends (UDP_SEGMENT)."""
    async with connected() as (_relay, node, tunnel, relay_side, _):
        await trio.sleep(0.1)
        before = node.counters["packets_out"]
        # Three frames fill a packet: 12 packets of the same size (aioquic's pacer lets the
        # first few leave at once, the rest on its timer).
        burst = [bytes([i]) * (tunnel.max_datagram // 3 - 8) for i in range(36)]
        assert all(tunnel.send_datagram(d) for d in burst)
        node.transmit_pending()  # no checkpoint: it has left when this returns
        assert node.counters["packets_out"] - before >= 2
        assert node.counters["segmented_sends"] >= 1
        await until(lambda: len(relay_side.datagrams) == len(burst))
        assert [d for _, d in relay_side.datagrams] == burst


async def test_without_segmentation_every_packet_is_a_send_of_its_own() -> None:
    relay_side = Recorder()
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(server(relay_side).run)
        node = await nursery.start(client(Recorder(), gso=False).run)
        tunnel = await node.connect("127.0.0.1", relay.port)
        burst = [bytes([i]) * (tunnel.max_datagram // 3 - 8) for i in range(36)]
        assert all(tunnel.send_datagram(d) for d in burst)
        node.transmit_pending()
        await until(lambda: len(relay_side.datagrams) == len(burst))
        assert node.counters["segmented_sends"] == 0 and node.counters["packets_out"] > 4
        nursery.cancel_scope.cancel()


async def one_frame_packets(tunnel: Tunnel, endpoint: TunnelEndpoint, count: int) -> None:
    """``count`` frames 2 ms apart, each flushed alone: one QUIC packet per frame."""
    for index in range(count):
        assert tunnel.send_datagram(b"frame %d" % index)
        endpoint.flush()
        await trio.sleep(0.002)


async def test_datagram_only_packets_are_acknowledged_together() -> None:
    """RFC 9221 §5.2: ACKs for DATAGRAM-only packets wait (up to ACK_DELAY) and cover many."""
    async with connected() as (relay, node, tunnel, relay_side, _):
        await trio.sleep(0.1)
        acks_before = relay.counters["packets_out"]
        # 20 packets 2 ms apart: with aioquic's own 1 ms delay, each gets an ACK of its own.
        await one_frame_packets(tunnel, node, 20)
        await until(lambda: len(relay_side.datagrams) == 20)
        await trio.sleep(ACK_DELAY * 2)
        acks = relay.counters["packets_out"] - acks_before
        assert 1 <= acks <= 8, acks


async def test_media_alone_is_not_answered_until_its_ack_is_due(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A packet of DATAGRAM frames needs nothing sent back at once: aioquic's ACK timer sends
    the ACK within ACK_DELAY. Asking aioquic after every such packet built an empty one."""
    async with connected() as (relay, node, tunnel, relay_side, node_side):
        back = relay_side.opened[0]
        await trio.sleep(0.1)  # the handshake's last ACKs
        conn = tunnel._link.conn
        asked: list[int] = []
        original = TunnelConnection.datagrams_to_send

        def counted(self: TunnelConnection, now: float) -> list[tuple[bytes, Any]]:
            out = original(self, now)
            if self is conn:
                asked.append(len(out))
            return out

        monkeypatch.setattr(TunnelConnection, "datagrams_to_send", counted)
        before = node.counters["packets_out"]
        # 20 packets 2 ms apart, one frame each: media from clients as a relay forwards it
        await one_frame_packets(back, relay, 20)
        await until(lambda: len(node_side.datagrams) == 20)
        await until(lambda: node.counters["packets_out"] > before, within=ACK_DELAY * 5)
        # one transmit per ACK timer (every ACK_DELAY), not one per packet
        assert 1 <= len(asked) <= 6, asked
        assert asked.count(0) <= 2, asked


@contextlib.asynccontextmanager
async def holding(
    hold: float,
) -> AsyncIterator[tuple[TunnelEndpoint, Tunnel, Recorder]]:
    """A relay endpoint that holds datagrams ``hold`` seconds, its tunnel to a node, and what
    the node received: ``(relay, tunnel at the relay, node_side)``."""
    relay_side, node_side = Recorder(), Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side, hold=hold).run)
            node = await nursery.start(client(node_side).run)
            await node.connect("127.0.0.1", relay.port)
            await until(lambda: len(relay_side.opened) == 1)
            await trio.sleep(0.1)  # the handshake's last ACKs
            yield relay, relay_side.opened[0], node_side
            nursery.cancel_scope.cancel()


async def test_held_datagrams_share_a_packet_that_leaves_when_the_first_waited_enough() -> None:
    """A relay forwarding client frames a little apart packs them: one packet to seal and one
    for the node to open, instead of one per frame; none waits longer than the hold."""
    async with holding(0.010) as (relay, back, node_side):
        before = relay.counters["packets_out"]
        assert back.send_datagram(b"client frame 0" + bytes(150), may_wait=True)
        relay.transmit_pending()  # as the public port does after each drained batch
        assert relay.counters["packets_out"] == before + 1  # a quiet tunnel: no waiting
        for index in range(1, 4):
            await trio.sleep(0.001)
            assert back.send_datagram(b"client frame %d" % index + bytes(150), may_wait=True)
            relay.transmit_pending()
            # No checkpoint since the send: a packet sent by this call would be counted now.
            assert relay.counters["packets_out"] == before + 1
        await until(lambda: len(node_side.datagrams) == 4, within=1.0)
        assert relay.counters["packets_out"] == before + 2
        arrived = [data[:14] for _, data in node_side.datagrams]
        assert arrived == [b"client frame %d" % index for index in range(4)]


async def test_a_packets_worth_of_held_datagrams_leaves_at_once() -> None:
    async with holding(0.010) as (relay, back, node_side):
        frame = bytes(back.max_datagram // 4)
        assert back.send_datagram(frame, may_wait=True)
        relay.transmit_pending()
        before = relay.counters["packets_out"]
        for _ in range(3):
            assert back.send_datagram(frame, may_wait=True)
            relay.transmit_pending()
        assert relay.counters["packets_out"] == before  # three quarters of a packet: held
        assert back.send_datagram(frame, may_wait=True)
        relay.transmit_pending()  # a packet's worth: no waiting (and no checkpoint here)
        assert relay.counters["packets_out"] > before
        await until(lambda: len(node_side.datagrams) == 5, within=1.0)


async def test_a_datagram_that_may_not_wait_takes_the_held_ones_along() -> None:
    async with holding(0.010) as (relay, back, node_side):
        assert back.send_datagram(b"rtp 0", may_wait=True)
        relay.transmit_pending()
        before = relay.counters["packets_out"]
        assert back.send_datagram(b"rtp 1", may_wait=True)
        relay.transmit_pending()
        assert relay.counters["packets_out"] == before  # busy: held
        assert back.send_datagram(b"a STUN check")  # a handshake or consent check
        relay.transmit_pending()
        assert relay.counters["packets_out"] == before + 1  # both, now, in one packet
        await until(lambda: len(node_side.datagrams) == 3)
        assert [data for _, data in node_side.datagrams][1:] == [b"rtp 1", b"a STUN check"]


async def test_a_quiet_tunnel_holds_nothing() -> None:
    """Media more than a hold apart (one session's frames, 20 ms apart) never waits."""
    async with holding(0.010) as (relay, back, node_side):
        before = relay.counters["packets_out"]
        for index in range(3):
            assert back.send_datagram(b"frame %d" % index, may_wait=True)
            relay.transmit_pending()
            assert relay.counters["packets_out"] == before + index + 1
            await trio.sleep(0.020)
        await until(lambda: len(node_side.datagrams) == 3)


async def test_without_a_hold_each_batch_leaves_at_once() -> None:
    async with holding(0.0) as (relay, back, node_side):
        before = relay.counters["packets_out"]
        for index in range(3):
            assert back.send_datagram(b"client frame %d" % index)
            relay.transmit_pending()
            assert relay.counters["packets_out"] == before + index + 1
        await until(lambda: len(node_side.datagrams) == 3)


@pytest.mark.parametrize("hold", [-0.001, 0.011])
def test_a_hold_out_of_range_is_refused(hold: float) -> None:
    with pytest.raises(ValueError, match=r"hold must be between 0 and 0\.01"):
        server(Recorder(), hold=hold)


async def test_control_messages_both_ways() -> None:
    async with connected() as (relay, node, tunnel, relay_side, node_side):
        back = relay_side.opened[0]
        messages = [{"op": "epoch", "session": f"s{i}", "epoch": i} for i in range(50)]
        messages.append({"text": "line\nbreaks and ünïcode stay inside one line"})
        for message in messages:
            tunnel.send_control(message)
        back.send_control({"op": "drain", "nested": {"list": [1, 2.5, None, True]}})
        await until(lambda: len(relay_side.controls) == 51 and len(node_side.controls) == 1)
        assert [m for _, m in relay_side.controls] == messages
        assert node_side.controls == [
            (tunnel, {"op": "drain", "nested": {"list": [1, 2.5, None, True]}})
        ]
        # The hello and welcome lines are the tunnel's own, never the handler's.
        assert relay.counters["control_in"] == 51 and node.counters["control_in"] == 1


async def test_several_nodes_on_one_relay_and_one_node_on_two_relays() -> None:
    relay_side, other_side = Recorder(), Recorder()
    nodes = [Recorder() for _ in range(3)]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side).run)
            other = await nursery.start(
                server(other_side, Credentials.issued(*CA, "relay", "r2")).run
            )
            endpoints = []
            for i, recorder in enumerate(nodes):
                credentials = Credentials.issued(*CA, "node", f"n{i}")
                endpoints.append(await nursery.start(client(recorder, credentials).run))
            tunnels = [await e.connect("127.0.0.1", relay.port) for e in endpoints]
            # The first node also dials the second relay over the same socket.
            second = await endpoints[0].connect(
                "127.0.0.1", other.port, expect=Identity("relay", "r2")
            )
            assert endpoints[0].tunnels == [tunnels[0], second]
            for i, tunnel in enumerate(tunnels):
                assert tunnel.send_datagram(b"from n%d" % i)
                endpoints[i].flush()
            assert second.send_datagram(b"to r2")
            endpoints[0].flush()
            await until(lambda: len(relay_side.datagrams) == 3 and len(other_side.datagrams) == 1)
            assert {(t.peer.ident, d) for t, d in relay_side.datagrams} == {
                ("n0", b"from n0"),
                ("n1", b"from n1"),
                ("n2", b"from n2"),
            }
            assert other_side.datagrams[0][0].peer == Identity("node", "n0")
            assert other_side.datagrams[0][1] == b"to r2"
            # Replies reach the right node.
            for tunnel in relay.tunnels:
                tunnel.send_datagram(b"back to " + tunnel.peer.ident.encode())
            relay.flush()
            await until(lambda: all(len(r.datagrams) == 1 for r in nodes))
            assert [r.datagrams[0][1] for r in nodes] == [
                b"back to n0",
                b"back to n1",
                b"back to n2",
            ]
            nursery.cancel_scope.cancel()


async def test_the_largest_datagram_passes_and_a_larger_one_is_refused() -> None:
    relay_side, node_side = Recorder(), Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side).run)
            node = await nursery.start(client(node_side).run)
            tunnel = await node.connect("127.0.0.1", relay.port)
            assert 1300 < tunnel.max_datagram < 1452
            assert not tunnel.send_datagram(bytes(tunnel.max_datagram + 1))
            assert not tunnel.send_datagram(bytes(70000))  # above the peer's frame limit too
            assert tunnel.counters["dropped_too_big"] == node.counters["dropped_too_big"] == 2
            # The refused ones block nothing behind them.
            assert tunnel.send_datagram(b"\xab" * tunnel.max_datagram)
            assert tunnel.send_datagram(b"small")
            node.flush()
            await until(lambda: len(relay_side.datagrams) == 2)
            assert [d for _, d in relay_side.datagrams] == [b"\xab" * tunnel.max_datagram, b"small"]
            nursery.cancel_scope.cancel()


# -- authentication ----------------------------------------------------------------------------


async def test_a_client_certificate_from_another_ca_is_rejected() -> None:
    relay_side, node_side = Recorder(), Recorder()
    # Trusts our CA (so the handshake itself completes) but proves itself with a foreign leaf.
    impostor = Credentials(CA[0], *issue(*OTHER_CA, "node", "n1"))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side).run)
            node = await nursery.start(client(node_side, impostor).run)
            with pytest.raises(TunnelError, match="not issued by the cluster CA"):
                await node.connect("127.0.0.1", relay.port)
            assert relay.counters["auth_failures"] == 1
            assert relay.counters["handshakes"] == 0
            assert relay_side.opened == [] and relay.tunnels == []
            assert node_side.opened == [] and node.tunnels == []
            # The relay still serves the honest.
            good = await nursery.start(client(Recorder()).run)
            await good.connect("127.0.0.1", relay.port)
            await until(lambda: len(relay_side.opened) == 1)
            nursery.cancel_scope.cancel()


async def test_a_client_without_a_certificate_is_rejected() -> None:
    relay_side = Recorder()
    raw = RawClient(credentials=None)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side).run)
            await nursery.start(raw.run, relay.port)
            await until(lambda: raw.handshake_done)
            # It speaks the tunnel's protocol, but has proved nothing.
            raw.conn.send_stream_data(0, b'{"type":"parley-hello","version":1}\n')
            raw.conn.send_datagram_frame(b"let me in")
            await until(lambda: raw.terminated is not None)
            assert raw.terminated is not None
            # RFC 9001 §4.8: the certificate_required alert (116) as a CRYPTO_ERROR.
            assert raw.terminated.error_code == QuicErrorCode.CRYPTO_ERROR + 116
            assert relay.counters["auth_failures"] == 1
            assert relay_side.opened == [] and relay_side.datagrams == []
            assert raw.received == b""  # no welcome
            nursery.cancel_scope.cancel()


async def test_a_server_certificate_from_another_ca_fails_connect() -> None:
    relay_side, node_side = Recorder(), Recorder()
    foreign_relay = Credentials.issued(*OTHER_CA, "relay", "r1")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side, foreign_relay).run)
            node = await nursery.start(client(node_side).run)
            with pytest.raises(TunnelError):
                await node.connect("127.0.0.1", relay.port)
            assert node.counters["handshake_failures"] == 1
            assert node_side.opened == [] and relay_side.opened == []
            assert node.tunnels == []
            nursery.cancel_scope.cancel()


async def test_a_server_with_a_foreign_ca_and_leaf_that_trusts_ours_fails_connect() -> None:
    # aioquic checks the chain against the CA; verify_peer checks it again. Here the relay's
    # leaf is foreign but its trust store is ours, so only the client's checks stand in the way.
    relay_side, node_side = Recorder(), Recorder()
    foreign_relay = Credentials(CA[0], *issue(*OTHER_CA, "relay", "r1"))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side, foreign_relay).run)
            node = await nursery.start(client(node_side).run)
            with pytest.raises(TunnelError):
                await node.connect("127.0.0.1", relay.port)
            assert node_side.opened == [] and relay_side.opened == []
            nursery.cancel_scope.cancel()


async def test_connect_checks_the_expected_identity() -> None:
    relay_side, node_side = Recorder(), Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side).run)
            node = await nursery.start(client(node_side).run)
            with pytest.raises(TunnelError, match="peer is relay:r1, expected relay:r2"):
                await node.connect("127.0.0.1", relay.port, expect=Identity("relay", "r2"))
            assert node.counters["auth_failures"] == 1
            assert node_side.opened == []
            # The relay saw its peer hang up before the hello: nothing opened, nothing left.
            await until(lambda: not relay._links)
            assert relay_side.opened == []
            nursery.cancel_scope.cancel()


async def test_connect_times_out_against_silence() -> None:
    node_side = Recorder()
    quiet = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with quiet, trio.fail_after(5):
        await quiet.bind(("127.0.0.1", 0))
        async with trio.open_nursery() as nursery:
            node = await nursery.start(client(node_side).run)
            with pytest.raises(TunnelError, match=r"within 0\.3 s"):
                await node.connect("127.0.0.1", quiet.getsockname()[1], timeout=0.3)
            assert node.tunnels == []
            # The abandoned connection lingers only for aioquic's closing period.
            await until(lambda: not node._links and not node._by_cid)
            nursery.cancel_scope.cancel()


async def test_connect_to_a_name_that_does_not_resolve_raises_tunnel_error() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            node = await nursery.start(client(Recorder()).run)
            with pytest.raises(TunnelError, match="cannot resolve"):
                await node.connect("no-such-host.invalid", 4433)
            nursery.cancel_scope.cancel()


# -- bad input -----------------------------------------------------------------------------------


def _fake_initial(dcid: bytes, *, version: int = 1, size: int = 1200) -> bytes:
    """A long-header Initial that parses, with a payload nobody can decrypt."""
    header = bytes([0xC3]) + struct.pack("!I", version)
    header += bytes([len(dcid)]) + dcid + bytes([8]) + os.urandom(8) + b"\x00"
    length = size - len(header) - 2
    return header + struct.pack("!H", 0x4000 | length) + os.urandom(length)


async def test_garbage_is_counted_and_dropped_and_the_relay_keeps_serving() -> None:
    relay_side, node_side = Recorder(), Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side).run)
            node = await nursery.start(client(node_side).run)
            tunnel = await node.connect("127.0.0.1", relay.port)
            await until(lambda: len(relay_side.opened) == 1)

            junk = [
                b"",
                b"\x00",
                b"\xff" * 3,  # a long header cut short
                b"\x40" + os.urandom(40),  # a short header for nobody
                os.urandom(1300),
                _fake_initial(os.urandom(8), version=0x0A0A0A0A),  # unsupported version
                _fake_initial(os.urandom(8), size=400),  # RFC 9000 §14.1: too small
                _fake_initial(os.urandom(4)),  # RFC 9000 §7.2: DCID too short
                _fake_initial(os.urandom(8)),  # parses, never decrypts
            ]
            # Bytes for the live connection's ID, but not from its peer's keys.
            junk += [b"\x41" + cid + os.urandom(60) for cid in relay._by_cid]
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock:
                for data in junk * 3:
                    await sock.sendto(data, ("127.0.0.1", relay.port))
            await until(
                lambda: relay.counters["malformed"] + relay.counters["unknown_connection"] >= 21
            )
            assert relay.counters["internal_errors"] == 0
            assert relay_side.datagrams == [] and relay_side.controls == []
            # The established tunnel and a brand new one both still work.
            assert tunnel.send_datagram(b"still here")
            node.flush()
            await until(lambda: [d for _, d in relay_side.datagrams] == [b"still here"])
            late = await nursery.start(
                client(Recorder(), Credentials.issued(*CA, "node", "n2")).run
            )
            await late.connect("127.0.0.1", relay.port)
            await until(lambda: len(relay_side.opened) == 2)
            assert relay_side.closed == []
            nursery.cancel_scope.cancel()


async def test_half_open_connections_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay.tunnel.quic, "MAX_HALF_OPEN", 2)
    relay_side = Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay_endpoint = await nursery.start(server(relay_side).run)
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock:
                for _ in range(5):
                    await sock.sendto(_fake_initial(os.urandom(8)), relay_endpoint.address)
            await until(lambda: relay_endpoint.counters["half_open_full"] == 3)
            assert len(relay_endpoint._links) == 2
            # A real node waits until the strangers time out... or, here, is refused for now.
            node = await nursery.start(client(Recorder()).run)
            with pytest.raises(TunnelError):
                await node.connect("127.0.0.1", relay_endpoint.port, timeout=0.5)
            nursery.cancel_scope.cancel()


async def test_bad_control_lines_are_counted_and_dropped() -> None:
    relay_side = Recorder()
    raw = RawClient(Credentials.issued(*CA, "node", "raw"))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side).run)
            await nursery.start(raw.run, relay.port)
            await greet(raw, relay_side)
            assert json.loads(raw.received) == {"type": "parley-welcome", "version": 1}
            raw.conn.send_stream_data(
                0,
                b"not json\n"
                + b"[1, 2]\n"  # JSON, but not an object
                + b"[" * 50_000  # nested deep enough to blow the parser's stack
                + b"\n"
                + b'{"x": "'
                + b"y" * 100_000
                + b'"}\n'  # longer than any control line
                + b'{"ok": 1}\n',
            )
            raw.conn.send_stream_data(4, b'{"other": "stream"}\n')
            # the two streams' data may arrive in either order: wait for both
            await until(lambda: len(relay_side.controls) == 1 and relay.counters["malformed"] == 5)
            assert relay_side.controls[0][1] == {"ok": 1}
            assert relay.counters["malformed"] == 5
            assert relay_side.opened[0].counters["malformed"] == 4
            assert relay_side.closed == []
            nursery.cancel_scope.cancel()


# -- closing -------------------------------------------------------------------------------------


async def test_closing_one_side_closes_the_other_once() -> None:
    async with connected() as (relay, node, tunnel, relay_side, node_side):
        tunnel.close("node draining")
        assert tunnel.closed and node_side.closed == [(tunnel, "node draining")]
        assert not tunnel.send_datagram(b"late")
        tunnel.send_control({"late": True})
        tunnel.close("again")  # no second callback
        await until(lambda: len(relay_side.closed) == 1)
        assert relay_side.closed[0][1] == "node draining"
        assert relay.tunnels == [] and node.tunnels == []
        assert tunnel.counters["dropped_closed"] == 2
        # aioquic's closing and draining periods end, and nothing is left behind.
        await until(lambda: not relay._links and not node._links)
        assert not relay._by_cid and not node._by_cid
        assert len(node_side.closed) == 1 and len(relay_side.closed) == 1


async def test_stopping_an_endpoint_closes_its_tunnels_on_both_sides() -> None:
    relay_side, node_side = Recorder(), Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            node = await nursery.start(client(node_side).run)
            async with trio.open_nursery() as relay_nursery:
                relay = await relay_nursery.start(server(relay_side).run)
                tunnels = [
                    await node.connect("127.0.0.1", relay.port),
                    await node.connect("127.0.0.1", relay.port),
                ]
                await until(lambda: len(relay_side.opened) == 2)
                relay_nursery.cancel_scope.cancel()
            # Back from the relay's nursery: its tasks are gone and its handler heard of every
            # tunnel; the best-effort CONNECTION_CLOSE tells the node within a moment.
            assert sorted(r for _, r in relay_side.closed) == ["endpoint stopped"] * 2
            assert relay.tunnels == [] and not relay._links
            await until(lambda: len(node_side.closed) == 2)
            assert all(t.closed for t in tunnels)
            nursery.cancel_scope.cancel()
        assert not node._links
        with pytest.raises(RuntimeError, match="not running"):
            await node.connect("127.0.0.1", relay.port)


async def test_an_idle_tunnel_stays_up_on_keepalives() -> None:
    relay_side, node_side = Recorder(), Recorder()
    with trio.fail_after(6):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side, idle_timeout=0.6).run)
            node = await nursery.start(client(node_side, idle_timeout=0.6).run)
            tunnel = await node.connect("127.0.0.1", relay.port)
            await trio.sleep(2.0)  # more than three idle timeouts without a byte of ours
            assert not tunnel.closed and relay_side.closed == [] and node_side.closed == []
            assert node.counters["keepalives"] > 0 and relay.counters["keepalives"] > 0
            assert tunnel.send_datagram(b"alive")
            node.flush()
            await until(lambda: len(relay_side.datagrams) == 1)
            nursery.cancel_scope.cancel()


async def test_a_silent_peer_is_closed_after_the_idle_timeout() -> None:
    relay_side = Recorder()
    raw = RawClient(Credentials.issued(*CA, "node", "raw"))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side, idle_timeout=0.5).run)
            with trio.CancelScope() as raw_scope:
                async with trio.open_nursery() as raw_nursery:
                    await raw_nursery.start(raw.run, relay.port)
                    await greet(raw, relay_side)
                    raw_scope.cancel()  # the peer dies: it sends nothing more, not even a close
            opened_at = trio.current_time()
            await until(lambda: len(relay_side.closed) == 1)
            assert trio.current_time() - opened_at >= 0.4
            assert relay_side.closed[0][1] == "Idle timeout"
            await until(lambda: not relay._links)
            nursery.cancel_scope.cancel()


async def test_a_peer_ending_the_control_stream_loses_its_tunnel() -> None:
    relay_side = Recorder()
    raw = RawClient(Credentials.issued(*CA, "node", "raw"))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side).run)
            await nursery.start(raw.run, relay.port)
            await greet(raw, relay_side)
            raw.conn.send_stream_data(0, b'{"last": "words"}\n', end_stream=True)
            await until(lambda: len(relay_side.closed) == 1)
            assert relay_side.controls[0][1] == {"last": "words"}
            assert relay_side.closed[0][1] == "control stream finished by peer"
            await until(lambda: raw.terminated is not None)
            assert raw.terminated is not None and raw.terminated.error_code == 1
            nursery.cancel_scope.cancel()


async def test_a_handler_may_close_a_tunnel_as_it_opens() -> None:
    class Refuser(Recorder):
        def tunnel_opened(self, tunnel: Tunnel) -> None:
            super().tunnel_opened(tunnel)
            if tunnel.peer.role != "node":
                tunnel.close("only nodes tunnel to a relay")

    relay_side, intruder_side = Refuser(), Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side).run)
            # A relay certificate is from the cluster, but this relay only takes nodes.
            other_relay = Credentials.issued(*CA, "relay", "r9")
            intruder = await nursery.start(client(intruder_side, other_relay).run)
            with contextlib.suppress(TunnelError):  # the close may overtake the welcome
                await intruder.connect("127.0.0.1", relay.port)
            await until(lambda: len(relay_side.closed) == 1)
            assert relay_side.closed[0][1] == "only nodes tunnel to a relay"
            assert relay.tunnels == []
            await until(lambda: intruder.tunnels == [] and not intruder._links)
            assert len(intruder_side.closed) == len(intruder_side.opened)
            nursery.cancel_scope.cancel()


# -- logging -------------------------------------------------------------------------------------


def tunnel_logs(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "parley.tunnel" and r.getMessage() == message]


def field(record: logging.LogRecord, name: str) -> Any:
    """A structured field the record got through ``extra``."""
    return vars(record)[name]


async def test_each_tunnel_event_is_logged_once_and_a_clean_close_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="parley.tunnel")
    async with connected() as (_, _, tunnel, relay_side, _):
        opened = tunnel_logs(caplog, "tunnel open")
        assert sorted(field(r, "peer") for r in opened) == ["node:n1", "relay:r1"]
        assert {r.levelno for r in opened} == {logging.INFO}
        tunnel.close("node draining")
        await until(lambda: len(relay_side.closed) == 1)
        closed = tunnel_logs(caplog, "tunnel closed")
        # Both ends: the node closed it, the relay heard a close without error.
        assert len(closed) == 2 and {r.levelno for r in closed} == {logging.INFO}
        assert {field(r, "reason") for r in closed} == {"node draining"}
    assert len(tunnel_logs(caplog, "tunnel open")) == 2
    assert len(tunnel_logs(caplog, "tunnel closed")) == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_stopping_an_endpoint_is_logged_at_info_on_both_sides(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="parley.tunnel")
    node_side = Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            node = await nursery.start(client(node_side).run)
            async with trio.open_nursery() as relay_nursery:
                relay = await relay_nursery.start(server(Recorder()).run)
                await node.connect("127.0.0.1", relay.port)
                relay_nursery.cancel_scope.cancel()
            await until(lambda: len(node_side.closed) == 1)
            nursery.cancel_scope.cancel()
    closed = tunnel_logs(caplog, "tunnel closed")
    assert len(closed) == 2 and {r.levelno for r in closed} == {logging.INFO}
    assert {field(r, "reason") for r in closed} == {"endpoint stopped"}


async def test_a_lost_tunnel_is_logged_as_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="parley.tunnel")
    relay_side = Recorder()
    raw = RawClient(Credentials.issued(*CA, "node", "raw"))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(server(relay_side, idle_timeout=0.5).run)
            with trio.CancelScope() as raw_scope:
                async with trio.open_nursery() as raw_nursery:
                    await raw_nursery.start(raw.run, relay.port)
                    await greet(raw, relay_side)
                    raw_scope.cancel()  # the peer dies without a word
            await until(lambda: len(relay_side.closed) == 1)
            nursery.cancel_scope.cancel()
    closed = tunnel_logs(caplog, "tunnel closed")
    # (The endpoint stopping later finds it already closed: nothing more.)
    assert [(r.levelno, field(r, "reason")) for r in closed] == [(logging.WARNING, "Idle timeout")]
