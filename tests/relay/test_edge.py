"""The relay's packet path: hints, the address cache, fencing, rate limits, expiry, sockets."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from relay.edge import Limits, RelayEdge, TokenBucket
from relay.routes import RouteTable
from relay.tunnel import frames
from relay.tunnel.hint import mint_ufrag
from relay.udp import set_receive_buffer
from sessions.webrtc import stun
from storage.ownership import OwnershipChange

SECRET = b"cluster secret, 32 bytes long..."
SESSION = "sessionaaaaaaaaaaaaa"
CLIENT = ("198.51.100.7", 40000)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Sink:
    """A tunnel that records what the edge sends into it."""

    def __init__(self, accept: bool = True) -> None:
        self.sent: list[bytes] = []
        self.may_wait: list[bool] = []
        self.accept = accept

    def send_datagram(self, data: bytes, *, may_wait: bool = False) -> bool:
        self.sent.append(data)
        self.may_wait.append(may_wait)
        return self.accept


def check(ufrag: str, client_ufrag: str = "cli1") -> bytes:
    """A connectivity check from the client (RFC 8445 §7.2.2 USERNAME)."""
    request = stun.binding_request(
        os.urandom(12),
        username=f"{ufrag}:{client_ufrag}",
        priority=1,
        controlling=True,
        tie_breaker=1,
    )
    return stun.encode(request, integrity_key=b"pwd" * 8, fingerprint=True)


def make_edge(limits: Limits | None = None) -> tuple[RelayEdge, RouteTable, FakeClock]:
    clock = FakeClock()
    routes = RouteTable(clock=clock)
    edge = RelayEdge("relay-a", [SECRET], routes, limits=limits, clock=clock)
    return edge, routes, clock


def own(routes: RouteTable, session: str, node: str, epoch: int) -> None:
    routes.apply(OwnershipChange(session, node, epoch, epoch))


def test_first_check_routes_by_hint_then_by_address() -> None:
    edge, routes, _ = make_edge()
    node_a = edge.tunnels["node-a"] = Sink()
    ufrag = mint_ufrag(SESSION, "node-a", SECRET)
    first = check(ufrag)
    edge.from_client(first, CLIENT)
    # The table did not know the session: the hint made a provisional route to node-a.
    assert routes.lookup(SESSION) is not None and routes.lookup(SESSION).provisional  # type: ignore[union-attr]
    edge.from_client(b"\x80" + bytes(40), CLIENT)  # RTP from the cached address
    assert [frames.decode(f) for f in node_a.sent] == [
        frames.FromClient(SESSION, CLIENT, first),
        frames.FromClient(SESSION, CLIENT, b"\x80" + bytes(40)),
    ]
    assert edge.counters["new_clients"] == 1 and edge.counters["forwarded"] == 2


def test_only_media_may_wait_to_share_a_tunnel_packet() -> None:
    """SRTP and SRTCP may wait a moment for company (the tunnel's hold); STUN, DTLS and
    anything else a client sends leave at once, and an empty datagram is just forwarded."""
    edge, _, _ = make_edge()
    node_a = edge.tunnels["node-a"] = Sink()
    edge.from_client(check(mint_ufrag(SESSION, "node-a", SECRET)), CLIENT)
    for first in (0x80, 0xBF, 0x16, 0x14, 0x7F, 0xC0):  # RTP, RTCP, DTLS x2, neither x2
        edge.from_client(bytes([first]) + bytes(40), CLIENT)
    edge.from_client(b"", CLIENT)
    assert node_a.may_wait == [False, True, True, False, False, False, False, False]
    assert edge.counters["forwarded"] == 8


def test_forged_and_mutated_hints_never_reach_a_node() -> None:
    edge, routes, _ = make_edge()
    sink = edge.tunnels["node-a"] = Sink()
    genuine = mint_ufrag(SESSION, "node-a", SECRET)
    forged = mint_ufrag(SESSION, "node-a", b"another secret of 32 bytes......")
    mutated = genuine[:5] + ("A" if genuine[5] != "A" else "B") + genuine[6:]
    for index, ufrag in enumerate([forged, mutated, "plainufrag", ""]):
        edge.from_client(check(ufrag) if ufrag else b"\x00\x01\x00\x00", ("192.0.2.1", index))
    assert sink.sent == []
    assert len(routes) == 0 and not edge.clients
    assert edge.counters["forged_hint"] == 3
    assert edge.counters["malformed_stun"] == 1


def test_unknown_sources_and_non_stun_are_dropped() -> None:
    edge, _, _ = make_edge()
    sink = edge.tunnels["node-a"] = Sink()
    edge.from_client(b"\x80" + bytes(100), CLIENT)  # RTP from nobody we know
    edge.from_client(b"\x16\xfe\xfd" + bytes(20), CLIENT)  # DTLS from nobody we know
    assert sink.sent == [] and edge.counters["unknown_source"] == 2


def test_route_change_moves_the_next_packet_to_the_new_owner() -> None:
    edge, routes, _ = make_edge()
    a, b = edge.tunnels["node-a"], edge.tunnels["node-b"] = Sink(), Sink()
    own(routes, SESSION, "node-a", 10)
    edge.from_client(check(mint_ufrag(SESSION, "node-a", SECRET)), CLIENT)
    own(routes, SESSION, "node-b", 20)  # the session moved (a drain, a failover)
    edge.from_client(b"\x80" + bytes(40), CLIENT)
    assert len(a.sent) == 1 and len(b.sent) == 1


def test_fencing_drops_frames_from_a_former_owner() -> None:
    edge, routes, _ = make_edge()
    edge.tunnels["node-a"] = Sink()
    own(routes, SESSION, "node-a", 10)
    edge.from_client(check(mint_ufrag(SESSION, "node-a", SECRET)), CLIENT)
    sent: list[tuple[bytes, tuple[str, int]]] = []
    edge.send_to_client = lambda data, addr: sent.append((data, addr))  # type: ignore[method-assign]
    edge.from_node("node-a", frames.encode_to_client(SESSION, 10, CLIENT, b"answer"))
    own(routes, SESSION, "node-b", 20)
    edge.from_node("node-a", frames.encode_to_client(SESSION, 10, CLIENT, b"stale"))
    edge.from_node("node-b", frames.encode_to_client(SESSION, 10, CLIENT, b"wrong epoch"))
    edge.from_node("node-b", frames.encode_to_client(SESSION, 20, CLIENT, b"new owner"))
    assert sent == [(b"answer", CLIENT), (b"new owner", CLIENT)]
    assert edge.counters["fenced"] == 2


def test_a_node_cannot_send_to_an_address_that_did_not_join_its_session() -> None:
    edge, routes, _ = make_edge()
    own(routes, SESSION, "node-a", 10)
    own(routes, "othersession", "node-a", 11)
    edge.from_client(check(mint_ufrag(SESSION, "node-a", SECRET)), CLIENT)
    sent: list[bytes] = []
    edge.send_to_client = lambda data, addr: sent.append(data)  # type: ignore[method-assign]
    edge.from_node("node-a", frames.encode_to_client(SESSION, 10, ("192.0.2.99", 9), b"x"))
    edge.from_node("node-a", frames.encode_to_client("othersession", 11, CLIENT, b"x"))
    edge.from_node("node-a", b"\x01garbage")
    edge.from_node("node-a", frames.encode_from_client(SESSION, CLIENT, b"x"))  # wrong kind
    assert sent == []
    assert edge.counters["unknown_client"] == 2 and edge.counters["malformed_frame"] == 2


def test_a_flooding_source_is_limited_before_parsing() -> None:
    edge, _, clock = make_edge(Limits(new_source_rate=10))
    for port in range(1000):  # one IP, many ports, all garbage STUN
        edge.from_client(b"\x00\x01\x00\x08" + bytes(16), ("192.0.2.66", port))
    assert edge.counters["malformed_stun"] == 10
    assert edge.counters["rate_limited_new"] == 990
    clock.now += 1.0
    edge.from_client(b"\x00\x01\x00\x08" + bytes(16), ("192.0.2.66", 1))
    assert edge.counters["malformed_stun"] == 11  # the bucket refilled


def test_non_stun_floods_cost_no_budget_of_the_real_clients_sharing_the_ip() -> None:
    # Clients behind one NAT share an IP; an RTP flood from that IP must not use up the budget
    # their connectivity checks need.
    edge, routes, _ = make_edge(Limits(new_source_rate=5))
    sink = edge.tunnels["node-a"] = Sink()
    own(routes, SESSION, "node-a", 10)
    for port in range(10_000):
        edge.from_client(b"\x80" + bytes(100), ("192.0.2.66", port))
    edge.from_client(check(mint_ufrag(SESSION, "node-a", SECRET)), ("192.0.2.66", 65000))
    assert edge.counters["unknown_source"] == 10_000
    assert edge.counters["rate_limited_new"] == 0 and len(sink.sent) == 1


def test_a_known_client_over_its_rate_loses_only_its_own_packets() -> None:
    edge, routes, _ = make_edge(Limits(client_rate=400))
    sink = edge.tunnels["node-a"] = Sink()
    own(routes, SESSION, "node-a", 10)
    own(routes, "quietsession", "node-a", 11)
    edge.from_client(check(mint_ufrag(SESSION, "node-a", SECRET)), CLIENT)
    quiet = ("198.51.100.8", 1)
    edge.from_client(check(mint_ufrag("quietsession", "node-a", SECRET)), quiet)
    for _ in range(1000):
        edge.from_client(b"\x80" + bytes(20), CLIENT)
    edge.from_client(b"\x80" + bytes(20), quiet)
    assert edge.counters["rate_limited"] >= 1000 - 100
    assert frames.decode(sink.sent[-1]).client == quiet


def test_idle_clients_expire_and_the_cache_is_bounded() -> None:
    edge, _, clock = make_edge(Limits(idle_timeout=30, max_clients=3))
    for index in range(5):
        edge.from_client(check(mint_ufrag(SESSION, "node-a", SECRET)), ("192.0.2.1", index))
    assert len(edge.clients) == 3 and edge.counters["evicted"] == 2
    clock.now += 29
    edge.from_client(b"\x80" + bytes(20), ("192.0.2.1", 4))  # keeps one alive
    clock.now += 2
    assert edge.expire() == 2
    assert list(edge.clients) == [("192.0.2.1", 4)]


def test_a_client_reusing_its_socket_for_a_new_session_is_rerouted() -> None:
    edge, _, _ = make_edge()
    sink = edge.tunnels["node-a"] = Sink()
    edge.from_client(check(mint_ufrag(SESSION, "node-a", SECRET)), CLIENT)
    edge.from_client(b"\x80first", CLIENT)
    edge.from_client(check(mint_ufrag("secondsession", "node-a", SECRET)), CLIENT)
    assert edge.clients[CLIENT].session == "secondsession"
    assert edge.counters["rerouted"] == 1
    # What the client sends from now on is framed for its new session, not the old one.
    edge.from_client(b"\x80second", CLIENT)
    sessions = []
    for frame in sink.sent:
        decoded = frames.decode(frame)
        assert isinstance(decoded, frames.FromClient) and decoded.client == CLIENT
        sessions.append(decoded.session)
    assert sessions == [SESSION, SESSION, "secondsession", "secondsession"]
    assert frames.decode(sink.sent[-1]) == frames.FromClient("secondsession", CLIENT, b"\x80second")


def test_frames_for_a_client_it_forgot_or_cut_short_are_dropped() -> None:
    # The relay remembers how it read a client's frame header; that must not outlive the
    # client, nor let a truncated frame through.
    edge, routes, clock = make_edge(Limits(idle_timeout=10))
    own(routes, SESSION, "node-a", 10)
    edge.from_client(check(mint_ufrag(SESSION, "node-a", SECRET)), CLIENT)
    sent: list[bytes] = []
    edge.send_to_client = lambda data, addr: sent.append(data)  # type: ignore[method-assign]
    frame = frames.encode_to_client(SESSION, 10, CLIENT, b"answer")
    edge.from_node("node-a", frame)
    edge.from_node("node-a", frame[:-7])  # cut inside the session id
    assert sent == [b"answer"] and edge.counters["malformed_frame"] == 1
    clock.now += 11
    assert edge.expire() == 1
    edge.from_node("node-a", frame)
    assert sent == [b"answer"] and edge.counters["unknown_client"] == 1


def test_no_tunnel_and_refusing_tunnel_are_counted() -> None:
    edge, routes, _ = make_edge()
    own(routes, SESSION, "node-a", 10)
    edge.from_client(check(mint_ufrag(SESSION, "node-a", SECRET)), CLIENT)
    assert edge.counters["no_tunnel"] == 1
    edge.tunnels["node-a"] = Sink(accept=False)
    edge.from_client(b"\x80" + bytes(20), CLIENT)
    assert edge.counters["tunnel_full"] == 1


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2, burst=2, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)


def test_needs_a_secret() -> None:
    with pytest.raises(ValueError):
        RelayEdge("relay-a", [], RouteTable())


async def test_serves_a_real_socket_and_answers_from_the_same_port() -> None:
    routes = RouteTable()
    edge = RelayEdge("relay-a", [SECRET], routes)
    sink = edge.tunnels["node-a"] = Sink()
    flushes = 0

    def flush() -> None:
        nonlocal flushes
        flushes += 1

    edge.flush = flush
    async with trio.open_nursery() as nursery:
        (public,) = await nursery.start(edge.serve, [("127.0.0.1", 0)])
        client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with client:
            await client.bind(("127.0.0.1", 0))
            first = check(mint_ufrag(SESSION, "node-a", SECRET))
            await client.sendto(first, public)
            with trio.fail_after(5):
                while not sink.sent:  # noqa: ASYNC110 - the sink is a plain list
                    await trio.sleep(0.01)
            own(routes, SESSION, "node-a", 5)
            here = client.getsockname()
            edge.from_node("node-a", frames.encode_to_client(SESSION, 5, here, b"reply"))
            with trio.fail_after(5):
                data, source = await client.recvfrom(2048)
            assert data == b"reply" and source == public
        assert flushes >= 1
        nursery.cancel_scope.cancel()


async def test_counts_what_the_kernel_drops_while_the_relay_is_stalled() -> None:
    # A relay that does not run for a while (a busy machine) loses datagrams in the kernel once
    # its public port's buffer is full; only the kernel's count shows them.
    edge = RelayEdge("relay-a", [SECRET], RouteTable(), limits=Limits(receive_buffer=4096))
    async with trio.open_nursery() as nursery:
        (public,) = await nursery.start(edge.serve, [("127.0.0.1", 0)])
        assert edge.kernel_drops() == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
            for _ in range(200):  # no checkpoint: the edge cannot read meanwhile
                flood.sendto(b"\xff" * 200, public)
        assert edge.kernel_drops() > 0
        await trio.sleep(0.05)
        assert 0 < edge.counters["client_in"] < 200  # what fitted was read, and dropped
        nursery.cancel_scope.cancel()


def test_the_public_buffer_goes_past_rmem_max_when_allowed_and_warns_when_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    status = Path("/proc/self/status").read_text()
    effective = int(
        next(ln for ln in status.splitlines() if ln.startswith("CapEff:")).split()[1], 16
    )
    net_admin = bool(effective & (1 << 12))  # CAP_NET_ADMIN
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        granted = set_receive_buffer(sock, 2 * rmem_max)
    if net_admin:
        assert granted // 2 >= 2 * rmem_max  # SO_RCVBUFFORCE
        assert "rmem_max" not in caplog.text
    else:
        assert granted // 2 <= rmem_max and "raise net.core.rmem_max" in caplog.text


def test_an_old_owner_hands_a_late_datagram_on_to_the_new_owner() -> None:
    edge, routes, _ = make_edge()
    node_a = edge.tunnels["node-a"] = Sink()
    node_b = edge.tunnels["node-b"] = Sink()
    own(routes, SESSION, "node-a", 5)
    edge.from_client(check(mint_ufrag(SESSION, "node-a", SECRET)), CLIENT)
    # The session moved to node-b at epoch 9; the watch has not told this relay yet, so a
    # client packet still reached node-a, which hands it on.
    late = b"\x80" + bytes(40)
    edge.from_node("node-a", frames.encode_hand_on(SESSION, 9, "node-b", CLIENT, late))
    assert [frames.decode(f) for f in node_b.sent] == [frames.FromClient(SESSION, CLIENT, late)]
    assert edge.counters["handed_on"] == 1
    # The hand-on advanced the route: the client's next packet goes straight to node-b.
    edge.from_client(b"\x80" + bytes(41), CLIENT)
    assert frames.decode(node_b.sent[-1]) == frames.FromClient(SESSION, CLIENT, b"\x80" + bytes(41))
    assert len(node_a.sent) == 1  # only the first check


def test_hand_ons_that_go_backwards_or_elsewhere_are_refused() -> None:
    edge, routes, _ = make_edge()
    node_b = edge.tunnels["node-b"] = Sink()
    edge.tunnels["node-a"] = Sink()
    own(routes, SESSION, "node-b", 9)
    edge.from_client(check(mint_ufrag(SESSION, "node-b", SECRET)), CLIENT)
    sent = len(node_b.sent)
    # A stale epoch cannot move the session back to node-a ...
    edge.from_node("node-b", frames.encode_hand_on(SESSION, 5, "node-a", CLIENT, b"x"))
    # ... a node cannot hand on to itself, nor for an address that did not join the session.
    edge.from_node("node-b", frames.encode_hand_on(SESSION, 12, "node-b", CLIENT, b"x"))
    edge.from_node("node-a", frames.encode_hand_on(SESSION, 12, "node-b", ("192.0.2.1", 9), b"x"))
    assert len(node_b.sent) == sent and edge.counters["handed_on"] == 0
    assert edge.counters["fenced"] == 2 and edge.counters["unknown_client"] == 1


def test_an_owner_forwards_ahead_of_the_switch_without_moving_the_route() -> None:
    edge, routes, _ = make_edge()
    node_a = edge.tunnels["node-a"] = Sink()
    node_b = edge.tunnels["node-b"] = Sink()
    own(routes, SESSION, "node-a", 5)
    edge.from_client(check(mint_ufrag(SESSION, "node-a", SECRET)), CLIENT)
    # node-a's snapshot is ready: it forwards what reaches it to node-b at its own epoch.
    early = b"\x80" + bytes(40)
    edge.from_node("node-a", frames.encode_hand_on(SESSION, 5, "node-b", CLIENT, early))
    assert [frames.decode(f) for f in node_b.sent] == [frames.FromClient(SESSION, CLIENT, early)]
    # The route did not move: until node-b owns the session, the client still goes to node-a.
    edge.from_client(b"\x80" + bytes(41), CLIENT)
    assert frames.decode(node_a.sent[-1]) == frames.FromClient(SESSION, CLIENT, b"\x80" + bytes(41))
    # Nobody else may forward at node-a's epoch.
    edge.from_node("node-c", frames.encode_hand_on(SESSION, 5, "node-b", CLIENT, b"x"))
    assert len(node_b.sent) == 1 and edge.counters["fenced"] == 1


def test_forwarding_that_crosses_the_switch_still_reaches_the_new_owner() -> None:
    edge, routes, _ = make_edge()
    edge.tunnels["node-a"] = Sink()
    node_b = edge.tunnels["node-b"] = Sink()
    own(routes, SESSION, "node-a", 5)
    edge.from_client(check(mint_ufrag(SESSION, "node-a", SECRET)), CLIENT)
    own(routes, SESSION, "node-b", 9)  # node-b took the session; node-a does not know yet
    edge.from_node("node-a", frames.encode_hand_on(SESSION, 5, "node-b", CLIENT, b"\x80" * 12))
    assert [frames.decode(f).payload for f in node_b.sent] == [b"\x80" * 12]  # type: ignore[union-attr]
    assert edge.counters["fenced"] == 0
