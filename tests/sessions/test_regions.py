"""Regions (issue #19): steered candidates, placement of an offer on a node of the client's
region, and where the client's region comes from (token claim, trusted header, the node's own).
Over real sockets against the signaling server, with an in-test backend and a real token key."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs
import jwt
import pytest
import trio
import trio.testing
import trio_websocket

from relay.settings import ClusterSettings
from sessions.node.regions import PLACEMENT_REFRESH, STEER_FALLBACKS, Placement, first_hop, steer
from sessions.node.signaling import Gate, Redirect, SignalingServer
from sessions.node.tokens import TokenRefused, TokenVerifier, mint_token
from sessions.webrtc.ice import PeerAddress
from storage.etcd import EtcdError
from storage.members import Member, NodeInfo, RelayInfo
from tests.helpers import bearer, make_token, token_keys
from tests.sessions.test_signaling import FAST, FakeBackend, closed_code, http, receive, send

# -- candidates ---------------------------------------------------------------------------------


def relay(name: str, region: str, port: int, *, worker: str = "") -> RelayInfo:
    return RelayInfo(
        id=f"{name}.{worker}" if worker else name,
        identity=name if worker else "",
        public=(("127.0.0.1", port),),
        region=region,
    )


RELAYS = [
    relay("eu-1", "eu", 1001),
    relay("eu-2", "eu", 1002),
    relay("us-1", "us", 2001),
    relay("us-2", "us", 2002),
    relay("ap-1", "ap", 3001),
    relay("ap-2", "ap", 3002),
]


def ports(addresses: Sequence[tuple[str, int]]) -> list[int]:
    return [port for _, port in addresses]


def test_a_client_is_offered_its_regions_relays_first_and_two_others_after() -> None:
    seen_first: set[int] = set()
    for n in range(40):
        got = ports(steer(RELAYS, f"s{n}", "eu"))
        assert sorted(got[:2]) == [1001, 1002], got
        assert len(got) == 2 + STEER_FALLBACKS
        assert all(p // 1000 != 1 for p in got[2:]), got
        seen_first.add(got[0])
    # the region's relays share its sessions
    assert seen_first == {1001, 1002}


def test_unsteered_an_answer_lists_every_relay_rotated_per_session() -> None:
    firsts = set()
    for n in range(60):
        got = ports(steer(RELAYS, f"s{n}", "eu", steering=False))
        assert sorted(got) == sorted(ports(r.public[0] for r in RELAYS))
        firsts.add(got[0])
    assert len(firsts) == len(RELAYS)  # any relay may come first: the problem steering solves


@pytest.mark.parametrize("region", ["", "mars"])
def test_an_unknown_region_or_one_without_relays_gets_every_relay(region: str) -> None:
    assert sorted(ports(steer(RELAYS, "s1", region))) == sorted(ports(r.public[0] for r in RELAYS))


def test_fallbacks_count_relays_not_their_workers() -> None:
    relays = [
        relay("eu-1", "eu", 1001),
        relay("us-1", "us", 2001, worker="w0"),
        relay("us-1", "us", 2001, worker="w1"),
        relay("ap-1", "ap", 3001, worker="w0"),
        relay("ap-1", "ap", 3001, worker="w1"),
    ]
    got = ports(steer(relays, "s1", "eu"))
    assert got[0] == 1001 and sorted(got[1:]) == [2001, 3001]


# -- placement ----------------------------------------------------------------------------------


def member(node: str, region: str, *, sessions: int = 0, state: str = "active") -> Member:
    info = NodeInfo(
        id=node,
        state=state,  # type: ignore[arg-type]
        addresses={"signaling": f"ws://{node}.example:8780/v1/session"},
        sessions=sessions,
        capacity=10,
        region=region,
    )
    return Member(info=info, lease=1, revision=1)


@attrs.define
class Nodes:
    view: list[Member]
    reads: int = 0
    fail: bool = False

    async def __call__(self) -> list[Member]:
        await trio.lowlevel.checkpoint()
        self.reads += 1
        if self.fail:
            raise EtcdError("etcd is away")
        return list(self.view)


async def test_an_offer_from_another_region_goes_to_the_roomiest_node_there(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = Nodes(
        [
            member("eu-a", "eu"),
            member("us-full", "us", sessions=10),
            member("us-busy", "us", sessions=7),
            member("us-idle", "us", sessions=2),
            member("us-draining", "us", state="draining"),
        ]
    )
    placement = Placement("eu-a", "eu", nodes)
    placed = await placement.elsewhere("us")
    assert placed == Redirect("us-idle", "ws://us-idle.example:8780/v1/session", "region")
    # its own region, an unknown one, or none: here
    assert await placement.elsewhere("eu") is None
    assert await placement.elsewhere("ap") is None
    assert await placement.elsewhere(None) is None
    assert placement.placed == {"us": 1}


async def test_placement_reads_the_nodes_at_most_every_refresh(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = Nodes([member("eu-a", "eu"), member("us-a", "us")])
    placement = Placement("eu-a", "eu", nodes)
    for _ in range(5):
        assert await placement.elsewhere("us") is not None
    assert nodes.reads == 1
    nodes.view = [member("eu-a", "eu"), member("us-a", "us", sessions=10)]
    await trio.sleep(PLACEMENT_REFRESH)
    assert await placement.elsewhere("us") is None  # the new view: no room there
    assert nodes.reads == 2


async def test_without_etcd_or_steering_the_node_keeps_the_offer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = Nodes([member("us-a", "us")], fail=True)
    assert await Placement("eu-a", "eu", nodes).elsewhere("us") is None
    nodes.fail = False
    assert await Placement("eu-a", "eu", nodes, steering=False).elsewhere("us") is None


# -- the client's region, over signaling ----------------------------------------------------------


class RegionBackend(FakeBackend):
    """Records the region each offer was opened for."""

    def __init__(self) -> None:
        super().__init__()
        self.regions: list[str | None] = []

    async def open_session(
        self, offer_sdp: str, *, transport: str, region: str | None = None
    ) -> object:
        self.regions.append(region)
        return await super().open_session(offer_sdp, transport=transport)  # type: ignore[arg-type]


@attrs.define
class Placer:
    """Places clients of ``region`` on node ``us-a``; remembers what it was asked."""

    region: str = "us"
    asked: list[str | None] = attrs.field(factory=list)

    async def __call__(self, region: str | None) -> Redirect | None:
        await trio.lowlevel.checkpoint()
        self.asked.append(region)
        if region == self.region:
            return Redirect("us-a", "wss://us-a.example/v1/session", "region")
        return None


async def serve(
    nursery: trio.Nursery, backend: FakeBackend, certs: Path, placer: Placer, header: str = ""
) -> SignalingServer:
    gate = Gate("token", verifier=TokenVerifier(ClusterSettings(certs=str(certs)).token_keys()))
    server = SignalingServer(backend, limits=FAST, gate=gate, placer=placer, region_header=header)
    started: SignalingServer = await nursery.start(server.run)
    return started


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return token_keys(tmp_path / "certs")


async def test_a_websocket_offer_is_redirected_to_its_region_and_holds_nothing_here(
    nursery: trio.Nursery, certs: Path
) -> None:
    backend, placer = RegionBackend(), Placer()
    server = await serve(nursery, backend, certs, placer)
    token = make_token(certs, subject="u", region="us")
    url = server.urls()["signaling"]
    async with trio_websocket.open_websocket_url(url) as ws:
        await send(ws, {"type": "offer", "sdp": "v=0 a", "token": token})
        assert await receive(ws) == {
            "type": "redirect",
            "node": "us-a",
            "url": "wss://us-a.example/v1/session",
            "reason": "region",
        }
        assert await closed_code(ws) == 1000
    await trio.aclose_forcefully(ws._stream)
    assert backend.opened == [] and placer.asked == ["us"]
    assert server.counters["placed_elsewhere"] == 1
    # the subject's slot went back: the same token opens a session where it belongs
    placer.region = "none"
    async with trio_websocket.open_websocket_url(url) as ws:
        await send(ws, {"type": "offer", "sdp": "v=0 b", "token": token})
        assert (await receive(ws))["type"] == "answer"
    await trio.aclose_forcefully(ws._stream)
    assert backend.regions == ["us"]


async def test_a_whip_offer_is_redirected_with_a_307_to_the_nodes_whip_url(
    nursery: trio.Nursery, certs: Path
) -> None:
    backend, placer = RegionBackend(), Placer()
    server = await serve(nursery, backend, certs, placer)
    token = make_token(certs, subject="u", region="us")
    headers = [("Content-Type", "application/sdp"), bearer(token)]
    reply = await http(server, "POST", "/v1/session", headers=headers, body=b"v=0 a")
    assert reply.status == 307
    assert reply.headers["location"] == "https://us-a.example/v1/session"
    assert reply.json()["code"] == "placed_in_region"
    assert backend.opened == []


async def test_the_trusted_header_names_the_region_and_the_token_claim_wins(
    nursery: trio.Nursery, certs: Path
) -> None:
    backend, placer = RegionBackend(), Placer(region="never")
    server = await serve(nursery, backend, certs, placer, header="X-Client-Region")
    plain, claimed = make_token(certs, subject="u"), make_token(certs, subject="v", region="eu")

    async def post(token: str, *extra: tuple[str, str]) -> int:
        headers = [("Content-Type", "application/sdp"), bearer(token), *extra]
        reply = await http(server, "POST", "/v1/session", headers=headers, body=b"v=0 x")
        return reply.status

    assert await post(plain, ("X-Client-Region", "AP")) == 201  # names are lower-cased
    assert await post(claimed, ("X-Client-Region", "ap")) == 201
    assert await post(plain, ("X-Client-Region", "not a region!")) == 201
    assert await post(plain) == 201
    assert backend.regions == ["ap", "eu", None, None]
    assert placer.asked == ["ap", "eu", None, None]


async def test_a_header_is_ignored_unless_the_node_trusts_it(
    nursery: trio.Nursery, certs: Path
) -> None:
    backend, placer = RegionBackend(), Placer()
    server = await serve(nursery, backend, certs, placer)
    headers = [
        ("Content-Type", "application/sdp"),
        bearer(make_token(certs, subject="u")),
        ("X-Client-Region", "us"),
    ]
    reply = await http(server, "POST", "/v1/session", headers=headers, body=b"v=0 x")
    assert reply.status == 201 and backend.regions == [None]


def test_a_token_region_claim_must_be_a_region_name(certs: Path) -> None:
    verifier = TokenVerifier(ClusterSettings(certs=str(certs)).token_keys())
    assert verifier.verify(make_token(certs, subject="u", region="eu-west")).region == "eu-west"
    assert verifier.verify(make_token(certs, subject="u")).region is None
    kid, key = ClusterSettings(certs=str(certs)).token_signer() or ("", None)
    assert key is not None
    with pytest.raises(ValueError, match="region"):
        mint_token(key, kid, subject="u", region="EU West")
    forged = jwt.encode(
        {"sub": "u", "iat": 0, "exp": 2**31, "region": "EU West"},
        key,
        algorithm="EdDSA",
        headers={"kid": kid},
    )
    with pytest.raises(TokenRefused, match="region"):
        verifier.verify(forged)


# -- the first hop ------------------------------------------------------------------------------


def test_the_first_hop_is_the_client_round_trip_less_the_tunnels() -> None:
    hops = {"r-us": (0.030, "us"), "r-new": (None, "eu"), "": (0.0, "")}
    stats = {"selected": PeerAddress("198.51.100.9", 5000, "r-us"), "rtt_ms": 42.5}
    assert first_hop(stats, hops.__getitem__, "eu") == {
        "relay": "r-us",
        "region": "us",
        "tunnel_rtt_ms": 30.0,
        "first_hop_rtt_ms": 12.5,
    }
    # no QUIC sample yet: nothing is made up
    stats["selected"] = PeerAddress("198.51.100.9", 5000, "r-new")
    assert first_hop(stats, hops.__getitem__, "eu")["first_hop_rtt_ms"] is None
    # the node's own port: the first hop is the whole way, in the node's region
    stats["selected"] = PeerAddress("198.51.100.9", 5000)
    assert first_hop(stats, hops.__getitem__, "eu") == {
        "relay": "",
        "region": "eu",
        "tunnel_rtt_ms": 0.0,
        "first_hop_rtt_ms": 42.5,
    }
    # before any RTCP round trip, or any selected pair
    assert first_hop({"selected": None}, hops.__getitem__, "eu")["first_hop_rtt_ms"] is None
