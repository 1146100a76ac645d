"""Fair admission at the signaling door (issue #15 item 3): what one source, or one token subject,
may hold and ask, and the node's capacity under concurrent offers.

A real server over real sockets, with the fake backend of tests/sessions/test_signaling.py. Two
sources are two loopback addresses (a client binds 127.0.0.2 as easily as 127.0.0.1: all of
127/8 is this host; loopback is not exempt). Time is MockClock's, or plain numbers.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import attrs
import h11
import pytest
import trio
import trio.testing
import trio_websocket

from ops.config import load_config
from sessions.node.settings import NodeSettings
from sessions.node.signaling import (
    Capacity,
    Gate,
    Limiter,
    SessionHandle,
    SignalingLimits,
    SignalingRefused,
    SignalingServer,
    node_limits,
)
from sessions.node.signaling.limits import (
    BUSY_RETRY,
    RateTable,
    Setup,
    TokenBucket,
    source_of,
)
from sessions.node.signaling.messages import Refusal
from tests.helpers import bearer, eventually, make_token, token_keys
from tests.sessions.test_signaling import FAST, FakeBackend, Reply, http_send, read_reply
from tests.sessions.test_tokens import token_gate

HOME, OTHER = "127.0.0.1", "127.0.0.2"
SDP = [("Content-Type", "application/sdp")]
#: limits that stay out of the way of the one a test is about
ROOMY = attrs.evolve(FAST, source_connections=256, offer_rate=1e3, offer_burst=999, half_open=999)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Trio's MockClock, jumping to the next deadline once the run loop has been idle for 10 ms
    of real time: loopback I/O (done by the kernel within the sending call) is always seen
    before a jump, so only the timers we wait for move time."""
    return trio.testing.MockClock(autojump_threshold=0.01)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return token_keys(tmp_path / "certs")


async def serve(
    nursery: trio.Nursery,
    backend: FakeBackend,
    limits: SignalingLimits,
    *,
    gate: Gate | None = None,
    capacity: Capacity | None = None,
) -> SignalingServer:
    server = SignalingServer(backend, limits=limits, gate=gate or Gate.open(), capacity=capacity)
    started: SignalingServer = await nursery.start(server.run)
    return started


# -- clients from a chosen source address ------------------------------------------------------


async def http_from(
    server: SignalingServer,
    local: str,
    method: str,
    path: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> Reply:
    client = h11.Connection(h11.CLIENT)
    data = http_send(client, method, path, [*headers, ("Connection", "close")], body, server.port)
    async with await trio.open_tcp_stream(HOME, server.port, local_address=local) as stream:
        await stream.send_all(data)
        return await read_reply(stream, client)


async def post_from(
    server: SignalingServer, local: str, token: str | None = None, sdp: str = "v=0 ok"
) -> Reply:
    headers = [*SDP, bearer(token)] if token is not None else SDP
    return await http_from(server, local, "POST", "/v1/session", headers=headers, body=sdp.encode())


@contextlib.asynccontextmanager
async def ws_from(
    server: SignalingServer, local: str
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A WebSocket to ``server`` whose socket is bound to ``local``; raises
    ``ConnectionRejected`` (as it is, not in a group) when the server refuses the upgrade."""
    stream = await trio.open_tcp_stream(HOME, server.port, local_address=local)
    connected = False
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, f"{HOME}:{server.port}", "/v1/session"
            )
            connected = True
            try:
                yield ws
            finally:
                with trio.move_on_after(1):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # the handshake's reader task raises the refusal inside trio-websocket's nursery
        rejected = None if connected else _rejection(group)
        if rejected is None:
            raise
        raise rejected from None
    finally:
        await trio.aclose_forcefully(stream)


def _rejection(error: BaseException) -> trio_websocket.ConnectionRejected | None:
    if isinstance(error, BaseExceptionGroup):
        return next(filter(None, map(_rejection, error.exceptions)), None)
    return error if isinstance(error, trio_websocket.ConnectionRejected) else None


async def receive(ws: trio_websocket.WebSocketConnection, within: float = 5) -> dict[str, Any]:
    with trio.fail_after(within):
        message = await ws.get_message()
    value = json.loads(message)
    assert isinstance(value, dict)
    return value


async def ws_offer(ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
    await ws.send_message(json.dumps({"type": "offer", "sdp": "v=0 ok"}))
    return await receive(ws)


async def released(server: SignalingServer, source: str) -> None:
    """Until the server has let go of every connection of ``source`` (after the client)."""

    async def held() -> int:
        await trio.lowlevel.checkpoint()
        return server.limiter.connections(source)

    await eventually(held, lambda count: count == 0, within=5)


def too_many(reply: Reply, code: str) -> int:
    """Check a 429 of ``code``; its Retry-After."""
    assert reply.status == 429, reply
    assert reply.json()["code"] == code
    retry_after = int(reply.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


def connect(backend: FakeBackend, session_id: str) -> None:
    backend.senders[session_id].send_nowait({"event": "ice_connected", "address": "x"})


def session_of(reply: Reply) -> str:
    assert reply.status == 201, reply
    return reply.headers["location"].split("/")[3]


# -- the arithmetic, without sockets ------------------------------------------------------------


def test_a_token_bucket_gives_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0, tokens=3.0, stamp=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # the next token in half a second
    assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(0.5) == 0.0
    # a long quiet spell saves up the burst, no more
    assert [bucket.take(100.0) > 0 for _ in range(4)] == [False, False, False, True]
    # a clock that goes back takes nothing away and gives nothing
    assert bucket.take(50.0) > 0


def test_rate_tables_stay_bounded_under_a_flood_of_sources() -> None:
    table = RateTable(rate=1.0, burst=1, size=100)
    for n in range(10_000):
        assert table.take(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", 0.0) == 0.0
    assert len(table) == 100
    # a source still remembered stays limited; the least recently seen were forgotten
    assert table.take("10.0.39.15", 0.0) > 0  # source 9999
    assert table.take("10.0.0.0", 0.0) == 0.0  # source 0: forgotten, a fresh bucket


def test_sources_are_addresses_and_ipv6_prefixes() -> None:
    assert source_of("127.0.0.1") != source_of("127.0.0.2")
    assert source_of("::ffff:192.0.2.7") == source_of("192.0.2.7") == "192.0.2.7"
    # one host usually has a whole /64: its addresses count as one source
    assert source_of("2001:db8::1") == source_of("2001:db8::ffff:1") == "2001:db8::/64"
    assert source_of("2001:db8:0:1::1") != source_of("2001:db8::1")
    assert source_of("fe80::1%eth0") == "fe80::/64"
    assert source_of("?") == "?"


def admitted(outcome: Setup | Refusal) -> Setup:
    assert isinstance(outcome, Setup), outcome
    return outcome


def refused(outcome: Setup | Refusal, code: str) -> Refusal:
    assert isinstance(outcome, Refusal) and outcome.code == code, outcome
    return outcome


def test_half_open_slots_and_capacity_are_taken_at_once() -> None:
    load = {"sessions": 0}
    limits = SignalingLimits(half_open=2, offer_burst=100, setup_within=10.0)
    limiter = Limiter(limits, Capacity(3, lambda: load["sessions"]))
    a, _ = admitted(limiter.admit("a", None, 0.0)), admitted(limiter.admit("a", None, 0.0))
    assert limiter.half_open("a") == 2
    # none answered yet: a whole setup away
    assert refused(limiter.admit("a", None, 0.0), "half_open_limit").retry_after == 10
    c = admitted(limiter.admit("c", None, 0.0))
    # three offers being answered fill a node of three, before any is a session
    assert refused(limiter.admit("d", None, 0.0), "node_over_capacity").status == 503
    limiter.cancel(c)  # that offer came to nothing: its place is free
    assert limiter.pending == 2 and limiter.half_open("c") == 0
    admitted(limiter.admit("d", None, 0.0))
    # answered: the session counts through the load, half-open until its ICE connects
    limiter.opened(a, "s1", 1.0)
    load["sessions"] = 1
    assert limiter.pending == 2 and limiter.deadline("s1") == 11.0
    assert refused(limiter.admit("a", None, 2.0), "half_open_limit").retry_after == 9
    limiter.connected("s1")
    assert limiter.deadline("s1") == math.inf and limiter.half_open("a") == 1
    # one session and two offers being answered: the node of three is full
    refused(limiter.admit("e", None, 3.0), "node_over_capacity")


def test_subjects_count_apart_from_sources() -> None:
    limiter = Limiter(SignalingLimits(half_open=2, offer_burst=3, offer_rate=0.1))
    x = admitted(limiter.admit("x", "eve", 0.0))
    y = admitted(limiter.admit("y", "eve", 0.0))
    # a third address, the same subject: the subject's half-open sessions are full
    refused(limiter.admit("z", "eve", 0.0), "half_open_limit")
    admitted(limiter.admit("z", "mallory", 0.0))
    limiter.cancel(x)
    admitted(limiter.admit("z", "eve", 0.0))  # the last offer of the subject's burst
    limiter.cancel(y)
    assert refused(limiter.admit("w", "eve", 0.0), "rate_limited").retry_after == 10
    admitted(limiter.admit("w", "eve", 10.0))


def test_connections_per_source() -> None:
    limiter = Limiter(SignalingLimits(source_connections=2))
    assert [limiter.connect(source) for source in "aab"] == [None, None, None]
    refusal = limiter.connect("a")
    assert refusal is not None and (refusal.status, refusal.code) == (429, "source_limit")
    limiter.disconnect("a")
    assert limiter.connect("a") is None
    for source in "aab":
        limiter.disconnect(source)
    assert limiter.connections("a") == limiter.connections("b") == 0  # no entries left behind


def test_node_settings_reach_the_limits() -> None:
    node = NodeSettings(
        source_connections=3, offer_rate=0.5, offer_burst=2, half_open=1, setup_within=4.0
    )
    limits = node_limits(node, FAST)
    assert (limits.request_timeout, limits.source_connections, limits.offer_rate) == (2.0, 3, 0.5)
    assert (limits.offer_burst, limits.half_open, limits.setup_within) == (2, 1, 4.0)
    defaults = node_limits(NodeSettings())
    assert (defaults.source_connections, defaults.offer_rate, defaults.offer_burst) == (32, 5.0, 10)
    assert (defaults.half_open, defaults.setup_within) == (8, 10.0)
    # PARLEY_NODE_* and TOML name them as NodeSettings does
    env = {"PARLEY_NODE_OFFER_RATE": "2.5", "PARLEY_NODE_SETUP_WITHIN": "3"}
    node = load_config(env=env, overrides={"node": {"half_open": 4}}).node
    assert (node.offer_rate, node.setup_within, node.half_open) == (2.5, 3.0, 4)
    for bad in ({"offer_rate": 0.0}, {"source_connections": 0}, {"setup_within": -1.0}):
        with pytest.raises(ValueError):
            NodeSettings(**bad)  # type: ignore[arg-type]


async def test_a_node_backend_gives_its_limits_and_capacity() -> None:
    backend = FakeBackend()
    settings = NodeSettings(capacity=7, source_connections=3, setup_within=4.0)
    node = SimpleNamespace(addresses={}, config=SimpleNamespace(node=settings), sessions={})
    backend.node = node  # type: ignore[attr-defined]
    server = SignalingServer(backend, gate=Gate.open())
    assert (server.limits.source_connections, server.limits.setup_within) == (3, 4.0)
    capacity = server.limiter.capacity
    assert capacity is not None and capacity.sessions == 7
    node.sessions["s1"] = object()
    assert capacity.load() == 1
    assert not capacity.busy()  # a node without a loop load is never busy
    node.busy = lambda: True
    assert SignalingServer(backend, gate=Gate.open()).limiter.capacity.busy()  # type: ignore[union-attr]


def test_a_busy_node_refuses_offers_and_keeps_no_place_for_them() -> None:
    busy = {"now": False}
    limiter = Limiter(
        SignalingLimits(offer_burst=100), Capacity(10, lambda: 1, lambda: busy["now"])
    )
    admitted(limiter.admit("a", None, 0.0))
    busy["now"] = True
    refusal = refused(limiter.admit("b", None, 0.0), "node_busy")
    assert (refusal.status, refusal.retry_after) == (503, BUSY_RETRY)
    assert limiter.pending == 1 and limiter.half_open("b") == 0  # nothing held for it
    busy["now"] = False
    admitted(limiter.admit("b", None, 0.0))


async def test_a_busy_node_answers_a_whip_post_with_503_node_busy(nursery: trio.Nursery) -> None:
    backend = FakeBackend()
    busy = {"now": True}
    capacity = Capacity(10, lambda: len(backend.senders), lambda: busy["now"])
    server = await serve(nursery, backend, ROOMY, capacity=capacity)
    reply = await post_from(server, HOME)
    assert (reply.status, reply.json()["code"]) == (503, "node_busy")
    assert int(reply.headers["retry-after"]) == BUSY_RETRY
    assert server.published_counters()["signaling_node_busy"] == 1
    busy["now"] = False
    assert (await post_from(server, HOME)).status == 201


# -- connections per source ----------------------------------------------------------------------


async def test_a_source_holds_at_most_its_connections(nursery: trio.Nursery) -> None:
    backend = FakeBackend()
    server = await serve(nursery, backend, attrs.evolve(ROOMY, source_connections=3))
    async with contextlib.AsyncExitStack() as idle:
        for _ in range(3):
            await idle.enter_async_context(ws_from(server, HOME))
        # a fourth from the same address: refused before the upgrade, with when to try again
        with pytest.raises(trio_websocket.ConnectionRejected) as info:
            async with ws_from(server, HOME):
                pass
        assert info.value.status_code == 429
        assert (b"retry-after", b"1") in [(k.lower(), v) for k, v in info.value.headers]
        reply = await http_from(server, HOME, "GET", "/healthz")
        assert too_many(reply, "source_limit") == 1
        # another address is not held back
        async with ws_from(server, OTHER) as ws:
            assert (await ws_offer(ws))["type"] == "answer"
        assert (await http_from(server, OTHER, "GET", "/healthz")).status == 200
    # the idle ones closed: the address may connect again
    await released(server, HOME)
    assert (await http_from(server, HOME, "GET", "/healthz")).status == 200
    assert server.counters["source_limit"] == 2
    assert server.published_counters()["signaling_source_limit"] == 2


async def test_one_greedy_client_does_not_lock_out_another(nursery: trio.Nursery) -> None:
    """The issue's case, with the production limits: one address opens more idle WebSockets
    than it may and floods WHIP POSTs; a client at another address still gets its answer."""
    backend = FakeBackend()
    limits = FAST  # production admission limits, short timeouts
    assert (limits.source_connections, limits.offer_burst, limits.half_open) == (32, 10, 8)
    server = await serve(nursery, backend, limits)
    rejected = 0
    async with contextlib.AsyncExitStack() as idle:
        for _ in range(limits.source_connections + 8):
            try:
                await idle.enter_async_context(ws_from(server, HOME))
            except trio_websocket.ConnectionRejected as exc:
                assert exc.status_code == 429
                rejected += 1
        assert rejected == 8
        async with ws_from(server, OTHER) as ws:
            assert (await ws_offer(ws))["type"] == "answer"
    await released(server, HOME)
    # 30 POSTs at once from the greedy address: its burst of offers, and of sessions that do
    # not connect, is all it gets
    replies: list[Reply] = []

    async def one() -> None:
        replies.append(await post_from(server, HOME))

    async with trio.open_nursery() as posts:
        for _ in range(30):
            posts.start_soon(one)
    answered = [reply for reply in replies if reply.status == 201]
    assert len(answered) == limits.half_open
    codes = [reply.json()["code"] for reply in replies if reply.status != 201]
    assert set(codes) <= {"rate_limited", "half_open_limit"} and "rate_limited" in codes
    assert all(too_many(reply, reply.json()["code"]) for reply in replies if reply.status != 201)
    # the other address is served as if nothing happened
    assert (await post_from(server, OTHER)).status == 201
    async with ws_from(server, OTHER) as ws:
        assert (await ws_offer(ws))["type"] == "answer"
    counters = server.published_counters()
    assert counters["signaling_rate_limited"] == codes.count("rate_limited")
    assert counters["signaling_half_open_limit"] == codes.count("half_open_limit")
    assert counters["signaling_source_limit"] == 8


# -- offers per second ---------------------------------------------------------------------------


async def test_offers_beyond_the_rate_wait_for_their_tokens(
    nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    backend = FakeBackend()
    server = await serve(nursery, backend, attrs.evolve(ROOMY, offer_rate=0.5, offer_burst=2))
    assert (await post_from(server, HOME)).status == 201
    async with ws_from(server, HOME) as ws:
        assert (await ws_offer(ws))["type"] == "answer"  # WHIP and WebSocket share the bucket
    assert too_many(await post_from(server, HOME), "rate_limited") == 2  # a token each 2 s
    async with ws_from(server, HOME) as ws:
        error = await ws_offer(ws)
        assert (error["type"], error["code"], error["retry_after"]) == ("error", "rate_limited", 2)
        # the socket stays open; the offer goes through once a token has come back
        await trio.sleep(2.0)  # MockClock: no real time passes
        assert (await ws_offer(ws))["type"] == "answer"
    assert (await post_from(server, OTHER)).status == 201  # another address has its own
    assert server.counters["rate_limited"] == 2
    assert len(backend.opened) == 4  # refused offers never reached the backend


async def test_a_token_subject_is_limited_whatever_its_address(
    nursery: trio.Nursery, certs: Path
) -> None:
    backend = FakeBackend()
    limits = attrs.evolve(ROOMY, offer_rate=0.01, offer_burst=3, half_open=2)
    server = await serve(nursery, backend, limits, gate=token_gate(certs))
    eve = make_token(certs, subject="eve")
    first = session_of(await post_from(server, HOME, eve))
    assert (await post_from(server, OTHER, eve)).status == 201
    # two half-open sessions of one subject, from two addresses: no third, from a third
    too_many(await post_from(server, "127.0.0.3", eve), "half_open_limit")
    connect(backend, first)
    await trio.testing.wait_all_tasks_blocked()
    # ... until one connects; then the subject spends the last offer of its burst
    third = session_of(await post_from(server, "127.0.0.4", eve))
    connect(backend, third)
    await trio.testing.wait_all_tasks_blocked()
    too_many(await post_from(server, "127.0.0.5", eve), "rate_limited")
    # another subject, from the same addresses, is not held back
    assert (await post_from(server, HOME, make_token(certs, subject="frank"))).status == 201
    # offers are counted per address before their token is checked: a flood of bad tokens
    # is held back by its address's rate
    for _ in range(limits.offer_burst):
        assert (await post_from(server, "127.0.0.6", "garbage")).status == 401
    too_many(await post_from(server, "127.0.0.6", "garbage"), "rate_limited")


# -- half-open sessions and the setup deadline ---------------------------------------------------


async def test_half_open_sessions_per_source(nursery: trio.Nursery) -> None:
    backend = FakeBackend()
    server = await serve(nursery, backend, attrs.evolve(ROOMY, half_open=2))
    async with ws_from(server, HOME) as a, ws_from(server, HOME) as b, ws_from(server, HOME) as c:
        first = (await ws_offer(a))["session"]
        assert (await ws_offer(b))["type"] == "answer"
        error = await ws_offer(c)
        assert (error["code"], error["retry_after"]) == ("half_open_limit", 10)
        too_many(await post_from(server, HOME), "half_open_limit")
        assert (await post_from(server, OTHER)).status == 201
        connect(backend, first)  # its ICE connected: no longer half-open
        assert (await receive(a))["event"] == "ice_connected"
        assert (await ws_offer(c))["type"] == "answer"
    await released(server, HOME)
    assert server.limiter.half_open(HOME) == 0  # the sockets closed, their sessions ended
    assert server.counters["half_open_limit"] == 2


async def test_a_session_that_does_not_connect_is_ended_with_a_reason(
    nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    backend = FakeBackend()
    limits = attrs.evolve(ROOMY, half_open=1, setup_within=5.0)
    server = await serve(nursery, backend, limits)
    async with ws_from(server, HOME) as ws:
        session = (await ws_offer(ws))["session"]
        start = trio.current_time()
        ended = await receive(ws, within=60)
        assert trio.current_time() - start == pytest.approx(5.0, abs=0.1)
        assert (ended["event"], ended["code"]) == ("session_ended", "setup_timeout")
        assert "5 s" in ended["reason"]
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await receive(ws)
        assert info.value.reason.code == 1000
    assert await backend.wait_closed(session) == "setup_timeout"
    # its slot is free: the address may open another
    assert server.limiter.half_open(HOME) == 0
    assert (await post_from(server, HOME)).status == 201
    assert server.published_counters()["signaling_setup_timeout"] == 1


async def test_a_connected_session_outlives_the_setup_deadline(
    nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    backend = FakeBackend()
    server = await serve(nursery, backend, attrs.evolve(ROOMY, setup_within=5.0))
    async with ws_from(server, HOME) as ws:
        session = (await ws_offer(ws))["session"]
        await trio.sleep(4.0)
        connect(backend, session)
        assert (await receive(ws))["event"] == "ice_connected"
        await trio.sleep(60.0)
        await ws.send_message(json.dumps({"type": "ping"}))
        assert (await receive(ws))["type"] == "pong"
    assert server.counters["setup_timeout"] == 0


async def test_a_whip_session_that_does_not_connect_is_ended(
    nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    backend = FakeBackend()
    server = await serve(nursery, backend, attrs.evolve(ROOMY, half_open=1, setup_within=5.0))
    session = session_of(await post_from(server, HOME))
    too_many(await post_from(server, HOME), "half_open_limit")
    await trio.sleep(4.9)  # MockClock: no real time passes
    assert backend.closed == []
    await trio.sleep(0.2)
    assert backend.closed == [(session, "setup_timeout")]
    assert (await post_from(server, HOME)).status == 201
    assert server.counters["setup_timeout"] == 1


async def test_attaching_does_not_reset_the_setup_deadline(
    nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    backend = FakeBackend()
    server = await serve(nursery, backend, attrs.evolve(ROOMY, half_open=1, setup_within=5.0))
    async with ws_from(server, HOME) as first:
        answer = await ws_offer(first)
        await trio.sleep(3.0)
        async with ws_from(server, OTHER) as second:
            attach = {"type": "attach", "session": answer["session"], "secret": answer["secret"]}
            await second.send_message(json.dumps(attach))
            assert (await receive(second))["type"] == "attached"
            assert (await receive(first))["event"] == "session_attached_elsewhere"
            with pytest.raises(trio_websocket.ConnectionClosed):
                await receive(first)
            await released(server, HOME)  # the old socket is gone on the server's side too
            # still half-open, and still its offerer's: the slot did not go with the old socket
            assert server.limiter.deadline(answer["session"]) < math.inf
            too_many(await post_from(server, HOME), "half_open_limit")
            start = trio.current_time()
            ended = await receive(second, within=60)
            assert ended["code"] == "setup_timeout"
            assert trio.current_time() - start == pytest.approx(2.0, abs=0.1)
    assert (await post_from(server, HOME)).status == 201


# -- capacity under concurrent offers ------------------------------------------------------------


class RacyBackend(FakeBackend):
    """Checks its capacity before an await and counts the session after it, as a node's claim
    does; ``go`` lets the answers out once each of the ``offers`` reached it or was refused."""

    def __init__(self, capacity: int, offers: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.offers = offers
        self.entered = 0
        self.answered = 0
        self.go = trio.Event()

    def progress(self) -> None:
        if self.entered + self.answered >= self.offers:
            self.go.set()

    async def open_session(
        self,
        offer_sdp: str,
        *,
        transport: Literal["websocket", "http"],
        region: str | None = None,
    ) -> SessionHandle:
        if len(self.senders) >= self.capacity:
            raise SignalingRefused("node_over_capacity", "full")
        self.entered += 1
        self.progress()
        await self.go.wait()
        return await super().open_session(offer_sdp, transport=transport)


async def test_capacity_holds_under_concurrent_whip_posts(nursery: trio.Nursery) -> None:
    backend = RacyBackend(capacity=5, offers=40)
    capacity = Capacity(5, lambda: len(backend.senders))
    server = await serve(nursery, backend, ROOMY, capacity=capacity)
    replies: list[Reply] = []

    async def one() -> None:
        reply = await post_from(server, HOME)
        replies.append(reply)
        if reply.status != 201:
            backend.answered += 1
            backend.progress()

    async with trio.open_nursery() as posts:
        for _ in range(40):
            posts.start_soon(one)
    assert sorted(reply.status for reply in replies) == [201] * 5 + [503] * 35
    refusals = {reply.json()["code"] for reply in replies if reply.status == 503}
    assert refusals == {"node_over_capacity"}
    assert len(backend.senders) == 5 and backend.entered == 5
    assert server.published_counters()["signaling_node_over_capacity"] == 35
    assert server.limiter.pending == 0
    # a session that ends frees its place
    first = next(reply for reply in replies if reply.status == 201)
    await backend.close_session(session_of(first), "test")
    assert (await post_from(server, OTHER)).status == 201
    assert (await post_from(server, OTHER)).status == 503


async def test_a_failed_offer_gives_its_place_back(nursery: trio.Nursery) -> None:
    backend = FakeBackend()
    capacity = Capacity(1, lambda: len(backend.senders))
    server = await serve(nursery, backend, ROOMY, capacity=capacity)
    for sdp in ("sdp-error bad_sdp", "refuse node_draining", "boom"):
        assert (await post_from(server, HOME, sdp=sdp)).status in (400, 500, 503)
    assert server.limiter.pending == 0 and server.limiter.half_open(HOME) == 0
    assert (await post_from(server, HOME)).status == 201
    reply = await post_from(server, HOME)
    assert (reply.status, reply.json()["code"]) == (503, "node_over_capacity")
