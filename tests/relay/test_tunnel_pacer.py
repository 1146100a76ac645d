"""The tunnels' pacer (relay/tunnel/connection.py ``TunnelPacer``): a flush leaves in one go on
a fast path, a slow path is still paced.

aioquic's own pacer, on a path whose congestion window has grown large (a tunnel is
application-limited and aioquic keeps growing the window anyway), lets one packet out per call
and sets a timer for each of the others: the tests below show that trap on plain aioquic and
that a tunnel does not fall into it.
"""

from __future__ import annotations

import pytest
from aioquic.quic.connection import QuicConnection
from aioquic.quic.recovery import QuicPacketPacer

from relay.tunnel.certs import Credentials, make_ca
from relay.tunnel.connection import (
    BURST_PACKETS,
    BURST_SPAN,
    LinkConfig,
    TunnelConnection,
    TunnelPacer,
)
from tests.relay import memory

CA = make_ca()
RELAY = LinkConfig(Credentials.issued(*CA, "relay", "r1"))
NODE = LinkConfig(Credentials.issued(*CA, "node", "n1"))
MDS = 1200  # bytes: aioquic's max datagram size before path MTU discovery

#: what a long-lived tunnel under load looked like on a relay (measured): a 34 MB window, 1 ms
FAST = (34_000_000, 0.001)
#: a narrow, far path: ten packets' window over 100 ms
SLOW = (10 * MDS, 0.100)


def burst(pacer: QuicPacketPacer, now: float, most: int = 1000) -> int:
    """How many packets the pacer lets out at ``now``, as aioquic's writer asks it."""
    sent = 0
    while sent < most and pacer.next_send_time(now) is None:
        pacer.update_after_send(now)
        sent += 1
    return sent


def paced(pacer: QuicPacketPacer, rate: tuple[int, float], now: float = 10.0) -> QuicPacketPacer:
    window, rtt = rate
    pacer.update_rate(congestion_window=window, smoothed_rtt=rtt)
    pacer.next_send_time(now)  # fills the bucket, as the first send on a new path does
    return pacer


def test_aiquics_own_pacer_lets_one_packet_out_at_a_time_on_a_fast_path() -> None:
    # The trap: the bucket (16 packets of the rate) is below one packet's clamped 1 µs. If an
    # aioquic release fixes this, TunnelPacer may no longer be needed.
    pacer = paced(QuicPacketPacer(max_datagram_size=MDS), FAST)
    assert pacer.bucket_max < (pacer.packet_time or 0)
    assert burst(pacer, 10.0) == 1
    assert burst(pacer, 10.0 + 50e-6) == 1  # a timer 50 µs later: one more


def test_the_tunnel_pacer_lets_a_burst_out_on_a_fast_path() -> None:
    pacer = paced(TunnelPacer(max_datagram_size=MDS), FAST)
    assert pacer.bucket_max == BURST_SPAN
    assert burst(pacer, 10.0) == 1000  # as many as asked: the window bounds it, not the pacer
    # Emptied, it refills at its rate: a timer 50 µs late releases 50 µs of packets.
    assert burst(pacer, 10.0, most=5000) in (1000, 1001)  # 2 ms at 1 µs (one more: rounding)
    assert 40 <= burst(pacer, 10.0 + 50e-6) <= 60


def test_the_tunnel_pacer_still_paces_a_slow_path() -> None:
    pacer = paced(TunnelPacer(max_datagram_size=MDS), SLOW)
    assert pacer.packet_time == pytest.approx(0.010)
    # the initial window's burst (RFC 9002 §7.7; aioquic lets one more out when the bucket
    # keeps a rounding error's worth)
    assert burst(pacer, 10.0) in (BURST_PACKETS, BURST_PACKETS + 1)
    wait = pacer.next_send_time(10.0)
    assert wait == pytest.approx(10.010)  # then a packet per 10 ms
    assert burst(pacer, 10.010) == 1


def test_a_paced_bucket_is_never_smaller_than_aioquics() -> None:
    for rate in (FAST, SLOW, (100 * MDS, 0.020), (2 * MDS, 0.001)):
        ours = paced(TunnelPacer(max_datagram_size=MDS), rate)
        theirs = paced(QuicPacketPacer(max_datagram_size=MDS), rate)
        assert ours.packet_time == theirs.packet_time
        assert ours.bucket_max >= theirs.bucket_max


def flushed_packets(kind: type[QuicConnection], datagrams: int) -> int:
    """Packets a handshaken connection of ``kind`` writes in one flush of ``datagrams`` 1,000-
    byte datagrams, its window and RTT as a long-lived tunnel's under load."""
    now = 1.0
    client, _server = memory.handshake(kind, kind, node=NODE, relay=RELAY, now=now)
    now += 1.0
    loss = client._loss
    loss._cc.congestion_window, loss._rtt_smoothed = FAST
    loss._pacer.update_rate(congestion_window=FAST[0], smoothed_rtt=FAST[1])  # as on an ACK
    for _ in range(datagrams):
        client.send_datagram_frame(bytes(1000))
    return len(client.datagrams_to_send(now))


def test_a_tunnel_flush_leaves_in_one_go() -> None:
    # What the relay's and the node's flushes do: every queued datagram leaves in this call
    # (one segmented send), none waits for a timer of its own.
    assert flushed_packets(TunnelConnection, 40) == 40
    fresh = TunnelConnection(configuration=NODE.quic(is_client=True))
    assert isinstance(fresh._loss._pacer, TunnelPacer)


def test_a_plain_aioquic_flush_leaves_one_packet() -> None:
    assert flushed_packets(QuicConnection, 40) == 1
