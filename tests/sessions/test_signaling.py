"""The signaling server over real sockets: WebSocket and WHIP clients against an in-test backend."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal

import attrs
import h11
import pytest
import trio
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessions.node.signaling import (
    ClientMessageError,
    Gate,
    Redirect,
    SessionHandle,
    SignalingLimits,
    SignalingRefused,
    SignalingServer,
    parse_client_message,
)
from sessions.node.signaling.messages import is_control_token
from sessions.node.signaling.websocket import TRANSITIONS, SocketPhase, _SessionState
from sessions.webrtc.errors import SdpError, StateTransitionError
from tests.helpers import eventually

FAST = SignalingLimits(request_timeout=2.0, close_timeout=1.0, send_timeout=2.0)
SDP_CODES = ("bad_sdp", "no_audio", "no_common_codec", "unsupported")
KNOWN_CODES = {
    "bad_json",
    "bad_message",
    *SDP_CODES,
    "node_draining",
    "node_over_capacity",
    "internal",
    "timeout",
    "forbidden",
    "unknown_session",
}


class FakeBackend:
    """Answers offers by their text: ``sdp-error CODE``, ``refuse CODE`` and ``boom`` fail;
    ``early`` queues an event before the answer; anything else opens session ``s<n>``.

    A live session is one in ``senders``; its secret is in ``secrets``. Sessions in
    ``elsewhere`` are owned by another node (attaching to them is redirected)."""

    def __init__(self) -> None:
        self.opened: list[tuple[str, str]] = []
        self.closed: list[tuple[str, str]] = []
        self.senders: dict[str, trio.MemorySendChannel[dict[str, object]]] = {}
        self.secrets: dict[str, str] = {}
        self.elsewhere: dict[str, Redirect] = {}
        self.attached: list[str] = []
        self._count = 0
        self._closed_changed = trio.Event()

    async def open_session(
        self,
        offer_sdp: str,
        *,
        transport: Literal["websocket", "http"],
        region: str | None = None,
    ) -> SessionHandle:
        await trio.lowlevel.checkpoint()
        self.opened.append((offer_sdp, transport))
        word, _, arg = offer_sdp.partition(" ")
        if word == "sdp-error":
            raise SdpError(arg, f"offer refused: {arg}")
        if word == "refuse":
            raise SignalingRefused(arg, f"node refused: {arg}")
        if word == "boom":
            raise RuntimeError("backend bug")
        self._count += 1
        session_id = f"s{self._count}"
        send, receive = trio.open_memory_channel[dict[str, object]](16)
        self.senders[session_id] = send
        self.secrets[session_id] = secrets.token_urlsafe(32)
        if word == "early":
            send.send_nowait({"event": "early"})
        answer = f"answer to {offer_sdp}"
        return SessionHandle(session_id, answer, receive, self.secrets[session_id])

    def _check(self, session_id: str, secret: str) -> None:
        if session_id not in self.senders and session_id not in self.elsewhere:
            raise SignalingRefused("unknown_session", "no such session")
        if secret != self.secrets.get(session_id):
            raise SignalingRefused("forbidden", "wrong secret")

    async def attach_session(self, session_id: str, secret: str) -> SessionHandle | Redirect:
        await trio.lowlevel.checkpoint()
        self._check(session_id, secret)
        if session_id in self.elsewhere:
            return self.elsewhere[session_id]
        old = self.senders[session_id]
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock
        ):
            old.send_nowait({"event": "session_attached_elsewhere"})
        old.close()
        send, receive = trio.open_memory_channel[dict[str, object]](16)
        self.senders[session_id] = send
        self.attached.append(session_id)
        return SessionHandle(session_id, "", receive, secret)

    async def end_session_by_secret(self, session_id: str, secret: str) -> bool:
        await trio.lowlevel.checkpoint()
        self._check(session_id, secret)
        return await self.close_session(session_id, "whip delete")

    def move(self, session_id: str, close_code: int | None = 4001) -> None:
        """The session moves to node B: its socket hears where, then its channel closes."""
        sender = self.senders[session_id]
        moved: dict[str, object] = {
            "event": "session_moved",
            "node": "B",
            "url": "ws://b.example:7000/v1/session",
        }
        if close_code is not None:
            moved["close_code"] = close_code
        sender.send_nowait(moved)
        sender.close()

    async def close_session(self, session_id: str, reason: str) -> bool:
        await trio.lowlevel.checkpoint()
        self.closed.append((session_id, reason))
        self._closed_changed.set()
        self._closed_changed = trio.Event()
        sender = self.senders.pop(session_id, None)
        if sender is None:
            return False
        sender.close()
        return True

    async def wait_closed(self, session_id: str) -> str:
        """The reason ``session_id`` was closed with, once it is."""
        with trio.fail_after(5):
            while True:
                for closed_id, reason in self.closed:
                    if closed_id == session_id:
                        return reason
                await self._closed_changed.wait()


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


async def start(
    nursery: trio.Nursery,
    backend: FakeBackend,
    limits: SignalingLimits = FAST,
    pages: Mapping[str, tuple[str, bytes]] | None = None,
) -> SignalingServer:
    # these tests are about signaling itself: an explicitly open gate (tests/sessions/test_tokens.py
    # has the tokens)
    server = SignalingServer(backend, limits=limits, pages=pages, gate=Gate.open())
    started: SignalingServer = await nursery.start(server.run)
    return started


@pytest.fixture
async def server(nursery: trio.Nursery, backend: FakeBackend) -> SignalingServer:
    return await start(nursery, backend)


# -- clients ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def ws_open(server: SignalingServer) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    url = server.urls()["signaling"]
    async with trio_websocket.open_websocket_url(url, max_message_size=1 << 22) as ws:
        yield ws
    # trio-websocket's client leaves its socket open when the server closed first
    await trio.aclose_forcefully(ws._stream)


async def send(ws: trio_websocket.WebSocketConnection, message: Mapping[str, object]) -> None:
    await ws.send_message(json.dumps(message))


async def receive(ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(5):
        message = await ws.get_message()
    assert isinstance(message, str)
    value = json.loads(message)
    assert isinstance(value, dict)
    return value


async def request(ws: trio_websocket.WebSocketConnection, message: Any) -> dict[str, Any]:
    if isinstance(message, str | bytes):
        await ws.send_message(message)
    else:
        await send(ws, message)
    return await receive(ws)


async def offer(ws: trio_websocket.WebSocketConnection, sdp: str = "v=0 ok") -> str:
    answer = await request(ws, {"type": "offer", "sdp": sdp})
    assert answer == {
        "type": "answer",
        "sdp": f"answer to {sdp}",
        "session": answer["session"],
        "secret": answer["secret"],
    }
    session = answer["session"]
    assert isinstance(session, str)
    # issue #15: the secret is long, URL-safe, and never in the SDP
    assert is_control_token(answer["secret"]) and len(answer["secret"]) >= 32
    assert answer["secret"] not in answer["sdp"]
    return session


async def attach(
    ws: trio_websocket.WebSocketConnection, session: str, secret: str
) -> dict[str, Any]:
    return await request(ws, {"type": "attach", "session": session, "secret": secret})


async def closed_code(ws: trio_websocket.WebSocketConnection) -> int:
    """Wait for the server to close the socket; its close code."""
    with trio.fail_after(5):
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            while True:
                await ws.get_message()
    assert info.value.reason is not None
    return info.value.reason.code


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


async def read_reply(stream: trio.SocketStream, client: h11.Connection) -> Reply:
    status, headers, body = 0, {}, bytearray()
    with trio.fail_after(5):
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Reply(status, headers, bytes(body))


def http_send(
    client: h11.Connection,
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    port: int,
) -> bytes:
    all_headers = [("Host", f"127.0.0.1:{port}"), *headers]
    if body or method == "POST":
        all_headers.append(("Content-Length", str(len(body))))
    data = client.send(h11.Request(method=method, target=path, headers=all_headers))
    if body:
        data += client.send(h11.Data(data=body))
    return data + client.send(h11.EndOfMessage())


async def http(
    server: SignalingServer,
    method: str,
    path: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> Reply:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        client = h11.Connection(h11.CLIENT)
        data = http_send(
            client, method, path, [*headers, ("Connection", "close")], body, server.port
        )
        await stream.send_all(data)
        return await read_reply(stream, client)


async def whip(server: SignalingServer, sdp: str) -> Reply:
    headers = [("Content-Type", "application/sdp")]
    return await http(server, "POST", "/v1/session", headers=headers, body=sdp.encode())


async def raw(port: int, data: bytes, *, within: float = 5) -> bytes:
    """Send ``data``; everything the server sends until it closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        if data:
            await stream.send_all(data)
        received = bytearray()
        with trio.fail_after(within):
            while chunk := await stream.receive_some(65536):
                received += chunk
        return bytes(received)


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:80]
    return int(response.split(b" ", 2)[1])


def body_json(response: bytes) -> Any:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


# -- WebSocket ----------------------------------------------------------------------------------


async def test_offer_answer_then_events_in_order(
    server: SignalingServer, backend: FakeBackend
) -> None:
    assert server.port != 0
    assert server.urls() == {
        "signaling": f"ws://127.0.0.1:{server.port}/v1/session",
        "whip": f"http://127.0.0.1:{server.port}/v1/session",
    }
    async with ws_open(server) as ws:
        session = await offer(ws, "early v=0")
        assert backend.opened == [("early v=0", "websocket")]
        assert (await receive(ws))["event"] == "early"  # queued before the answer, sent after
        for n in range(5):
            await backend.senders[session].send({"event": "speech", "n": n, "text": "héllo"})
        for n in range(5):
            event = await receive(ws)
            assert event["type"] == "event"
            assert event["event"] == "speech"
            assert event["n"] == n
            assert event["text"] == "héllo"
            assert isinstance(event["ts"], float)
        assert await request(ws, {"type": "ping"}) == {"type": "pong"}
    assert server.counters["sessions_opened"] == 1
    assert server.counters["events_forwarded"] == 6


async def test_closing_the_socket_closes_the_session(
    server: SignalingServer, backend: FakeBackend
) -> None:
    async with ws_open(server) as ws:
        session = await offer(ws)
    assert await backend.wait_closed(session) == "signaling closed"
    assert server.counters["sessions_closed"] == 1


async def test_dropped_connection_closes_the_session(
    server: SignalingServer, backend: FakeBackend
) -> None:
    async with ws_open(server) as ws:
        session = await offer(ws)
        await ws._stream.aclose()  # no close handshake: the network went away
    assert await backend.wait_closed(session) == "signaling closed"


async def test_node_side_end_sends_session_ended_and_closes(
    server: SignalingServer, backend: FakeBackend
) -> None:
    async with ws_open(server) as ws:
        session = await offer(ws)
        await backend.senders[session].send({"event": "agent_left"})
        backend.senders.pop(session).close()  # the node ended the session
        assert (await receive(ws))["event"] == "agent_left"
        ended = await receive(ws)
        assert ended["type"] == "event"
        assert ended["event"] == "session_ended"
        # issue #11: the node sent no session_ended of its own, the client still learns why
        assert ended["code"] == "ended"
        assert isinstance(ended["reason"], str) and ended["reason"]
        assert await closed_code(ws) == 1000
    await trio.sleep(0.05)
    assert backend.closed == []  # the node ended it: nothing to close


async def test_session_ended_from_the_backend_is_not_repeated(
    server: SignalingServer, backend: FakeBackend
) -> None:
    async with ws_open(server) as ws:
        session = await offer(ws)
        sender = backend.senders.pop(session)
        await sender.send({"event": "session_ended", "reason": "ice timeout"})
        sender.close()
        ended = await receive(ws)
        assert ended["event"] == "session_ended"
        assert ended["reason"] == "ice timeout"
        assert await closed_code(ws) == 1000


@pytest.mark.parametrize("close_code", [1001, 1012, 4000])
async def test_session_ended_close_code_closes_the_socket_with_it(
    server: SignalingServer, backend: FakeBackend, close_code: int
) -> None:
    async with ws_open(server) as ws:
        session = await offer(ws)
        sender = backend.senders.pop(session)
        ending = {"event": "session_ended", "code": "node_stopping", "reason": "node stopping"}
        await sender.send({**ending, "close_code": close_code})
        sender.close()
        ended = await receive(ws)  # the reason first, then the close
        assert ended["event"] == "session_ended"
        assert ended["code"] == "node_stopping"
        assert ended["reason"] == "node stopping"
        assert "close_code" not in ended  # for the server's close frame only
        assert await closed_code(ws) == close_code
    await trio.sleep(0.05)
    assert backend.closed == []


@pytest.mark.parametrize("close_code", [1005, 1006, 1015, 999, 5000, True, "1001", 1001.0])
async def test_a_close_code_we_may_not_send_closes_with_1000(
    server: SignalingServer, backend: FakeBackend, close_code: object
) -> None:
    async with ws_open(server) as ws:
        session = await offer(ws)
        sender = backend.senders.pop(session)
        await sender.send({"event": "session_ended", "code": "x", "close_code": close_code})
        sender.close()
        ended = await receive(ws)
        assert ended["code"] == "x"
        assert "close_code" not in ended
        assert await closed_code(ws) == 1000


async def test_close_code_only_counts_on_session_ended(
    server: SignalingServer, backend: FakeBackend
) -> None:
    async with ws_open(server) as ws:
        session = await offer(ws)
        sender = backend.senders.pop(session)
        await sender.send({"event": "moved", "close_code": 4001})
        sender.close()
        assert (await receive(ws))["close_code"] == 4001  # any other event is forwarded whole
        assert (await receive(ws))["code"] == "ended"
        assert await closed_code(ws) == 1000


async def test_close_code_holds_when_the_server_stops_first(backend: FakeBackend) -> None:
    async with trio.open_nursery() as outer:
        server_scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[SignalingServer]) -> None:
            with server_scope:
                await SignalingServer(backend, limits=FAST, gate=Gate.open()).run(
                    task_status=task_status
                )

        server: SignalingServer = await outer.start(serve)
        async with ws_open(server) as ws:
            session = await offer(ws)
            ending = {"event": "session_ended", "code": "node_stopping", "close_code": 1001}
            await backend.senders[session].send(ending)
            assert (await receive(ws))["code"] == "node_stopping"
            server_scope.cancel()  # before the backend closes the session's events
            assert await closed_code(ws) == 1001


async def test_unserializable_event_is_dropped(
    server: SignalingServer, backend: FakeBackend
) -> None:
    async with ws_open(server) as ws:
        session = await offer(ws)
        await backend.senders[session].send({"event": "bad", "value": object()})
        await backend.senders[session].send({"no": "name"})
        await backend.senders[session].send({"event": "good"})
        assert (await receive(ws))["event"] == "good"
    assert server.counters["events_dropped"] == 2


async def test_a_client_that_stops_reading_loses_its_session(
    nursery: trio.Nursery, backend: FakeBackend
) -> None:
    server = await start(nursery, backend, attrs.evolve(FAST, send_timeout=0.3))
    async with ws_open(server) as ws:
        session = await offer(ws)
        sender = backend.senders[session]

        async def flood() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while True:
                    await sender.send({"event": "flood", "pad": "x" * 60_000})

        nursery.start_soon(flood)  # and never read
        assert await backend.wait_closed(session) == "signaling closed"
    assert server.counters["stalled"] == 1


CLIENT_ERRORS: list[tuple[str | bytes, str]] = [
    ("not json", "bad_json"),
    ("", "bad_json"),
    ("[1, 2]", "bad_json"),
    ('"offer"', "bad_json"),
    ('{"sdp": "v=0"}', "bad_json"),
    ('{"type": 5}', "bad_json"),
    ("[" * 50_000, "bad_json"),
    (b"\x00binary", "bad_json"),
    ('{"type": "dance"}', "bad_message"),
    ('{"type": "answer", "sdp": "v=0"}', "bad_message"),
    ('{"type": "offer"}', "bad_message"),
    ('{"type": "offer", "sdp": ""}', "bad_message"),
    ('{"type": "offer", "sdp": 7}', "bad_message"),
    (json.dumps({"type": "offer", "sdp": "v=0 " + "a" * 100_000}), "bad_message"),
    ('{"type": "attach"}', "bad_message"),
    ('{"type": "attach", "session": "s1"}', "bad_message"),
    ('{"type": "attach", "secret": "x"}', "bad_message"),
    ('{"type": "attach", "session": "s1", "secret": 7}', "bad_message"),
    ('{"type": "attach", "session": ["s1"], "secret": "x"}', "bad_message"),
    ('{"type": "attach", "session": "", "secret": "x"}', "bad_message"),
    ('{"type": "attach", "session": "s1", "secret": "a/b"}', "bad_message"),
    ('{"type": "attach", "session": "s 1", "secret": "x"}', "bad_message"),
    (json.dumps({"type": "attach", "session": "s1", "secret": "x" * 129}), "bad_message"),
]


@pytest.mark.parametrize(("message", "code"), CLIENT_ERRORS)
async def test_bad_messages_get_errors_and_the_connection_lives(
    server: SignalingServer, message: str | bytes, code: str
) -> None:
    async with ws_open(server) as ws:
        error = await request(ws, message)
        assert error["type"] == "error"
        assert error["code"] == code
        assert isinstance(error["message"], str) and error["message"]
        assert await request(ws, {"type": "ping"}) == {"type": "pong"}
        await offer(ws)  # still usable for a session
    assert server.counters[code] == 1


BACKEND_ERRORS = [
    *((f"sdp-error {code}", code) for code in SDP_CODES),
    ("refuse node_draining", "node_draining"),
    ("refuse node_over_capacity", "node_over_capacity"),
    ("boom", "internal"),
]


@pytest.mark.parametrize(("sdp", "code"), BACKEND_ERRORS)
async def test_backend_refusals_become_error_codes(
    server: SignalingServer,
    backend: FakeBackend,
    caplog: pytest.LogCaptureFixture,
    sdp: str,
    code: str,
) -> None:
    async with ws_open(server) as ws:
        error = await request(ws, {"type": "offer", "sdp": sdp})
        assert error["type"] == "error"
        assert error["code"] == code
        assert await request(ws, {"type": "ping"}) == {"type": "pong"}
        await offer(ws)  # a failed offer leaves room for another
    if code == "internal":
        assert error["message"] == "internal error"  # no backend internals leak to clients
        failures = [r for r in caplog.records if r.name == "parley.signaling" and r.exc_info]
        assert failures, "an unexpected backend failure is logged with its traceback"


async def test_second_offer_is_refused(server: SignalingServer, backend: FakeBackend) -> None:
    async with ws_open(server) as ws:
        session = await offer(ws)
        error = await request(ws, {"type": "offer", "sdp": "v=0 again"})
        assert error["code"] == "bad_message"
        assert error["message"] == "one session per connection"
        assert await request(ws, {"type": "ping"}) == {"type": "pong"}
        assert backend.closed == []
        await backend.senders[session].send({"event": "still_alive"})
        assert (await receive(ws))["event"] == "still_alive"
    assert len(backend.opened) == 1


# -- attach, moves -------------------------------------------------------------------------------


async def test_attach_takes_the_session_over(server: SignalingServer, backend: FakeBackend) -> None:
    async with ws_open(server) as old:
        session = await offer(old)
        async with ws_open(server) as new:
            reply = await attach(new, session, backend.secrets[session])
            assert reply == {"type": "attached", "session": session}
            # the old socket hears why, and closes with 4003 (not a re-attach code)
            told = await receive(old)
            assert told["event"] == "session_attached_elsewhere"
            assert "close_code" not in told
            assert await closed_code(old) == 4003
            await trio.sleep(0.05)
            assert backend.closed == []  # the old socket's close did not end the session
            await backend.senders[session].send({"event": "later", "n": 1})
            assert (await receive(new))["event"] == "later"
            assert await request(new, {"type": "ping"}) == {"type": "pong"}
        # the attached socket is the session's life line, as the first one was
        assert await backend.wait_closed(session) == "signaling closed"
    assert server.counters["attached"] == 1
    assert server.counters["sessions_handed_over"] == 1


async def test_bye_on_an_attached_socket_ends_the_session(
    server: SignalingServer, backend: FakeBackend
) -> None:
    async with ws_open(server) as old:
        session = await offer(old)
        async with ws_open(server) as new:
            await attach(new, session, backend.secrets[session])
            await send(new, {"type": "bye"})
            assert await closed_code(new) == 1000
    assert await backend.wait_closed(session) == "bye"
    assert len(backend.closed) == 1


async def test_an_old_socket_closing_at_once_leaves_the_session(
    server: SignalingServer, backend: FakeBackend
) -> None:
    async with ws_open(server) as new:
        async with ws_open(server) as old:
            session = await offer(old)
            assert (await attach(new, session, backend.secrets[session]))["type"] == "attached"
        # the old socket is gone before it could read session_attached_elsewhere
        await trio.sleep(0.1)
        assert backend.closed == []
        await backend.senders[session].send({"event": "still_here"})
        assert (await receive(new))["event"] == "still_here"


async def test_a_stuck_old_socket_leaves_the_session_to_the_new_one(
    nursery: trio.Nursery, backend: FakeBackend
) -> None:
    server = await start(nursery, backend, attrs.evolve(FAST, send_timeout=30))
    async with ws_open(server) as new:
        async with trio.open_nursery() as client:  # its reader task dies with it
            url = server.urls()["signaling"]
            old = await trio_websocket.connect_websocket_url(client, url)
            session = await offer(old)
            sender = backend.senders[session]
            # the old client stops reading: its forwarder blocks in a send, the channel fills
            with trio.move_on_after(1):
                while True:
                    await sender.send({"event": "flood", "pad": "x" * 60_000})
            assert (await attach(new, session, backend.secrets[session]))["type"] == "attached"
            await old._stream.aclose()  # then its network goes, before it heard of the attach
            await trio.sleep(0.2)
            client.cancel_scope.cancel()
        # the backend had let go of the old socket: its loss does not end the session
        assert backend.closed == []
        await backend.senders[session].send({"event": "still_here"})
        assert (await receive(new))["event"] == "still_here"


async def test_attach_to_another_nodes_session_is_redirected(
    server: SignalingServer, backend: FakeBackend
) -> None:
    backend.secrets["far"] = secret = secrets.token_urlsafe(32)
    backend.elsewhere["far"] = Redirect("B", "ws://b.example:7000/v1/session")
    async with ws_open(server) as ws:
        reply = await attach(ws, "far", secret)
        assert reply == {"type": "redirect", "node": "B", "url": "ws://b.example:7000/v1/session"}
        assert await closed_code(ws) == 1000
    assert server.counters["redirects"] == 1
    assert backend.closed == []


@pytest.mark.parametrize(
    ("session", "secret", "code"),
    [
        ("s1", "wrong", "forbidden"),
        ("s1", None, "forbidden"),  # another session's secret
        ("s9", None, "unknown_session"),
    ],
)
async def test_attach_refusals(
    server: SignalingServer,
    backend: FakeBackend,
    session: str,
    secret: str | None,
    code: str,
) -> None:
    async with ws_open(server) as first, ws_open(server) as second, ws_open(server) as thief:
        await offer(first)
        await offer(second)
        error = await attach(thief, session, secret or backend.secrets["s2"])
        assert error["type"] == "error"
        assert error["code"] == code
        assert await request(thief, {"type": "ping"}) == {"type": "pong"}  # the socket lives on
        await backend.senders["s1"].send({"event": "untouched"})
        assert (await receive(first))["event"] == "untouched"  # and so does the session
        await offer(thief)  # a refused attach leaves room for a session
    assert server.counters[code] == 1
    assert server.counters["attached"] == 0


async def test_attach_when_the_socket_has_a_session_is_refused(
    server: SignalingServer, backend: FakeBackend
) -> None:
    async with ws_open(server) as ws:
        session = await offer(ws)
        error = await attach(ws, session, backend.secrets[session])
        assert (error["code"], error["message"]) == ("bad_message", "one session per connection")
        assert backend.attached == []


async def test_a_backend_attaching_the_wrong_session_fails_closed(
    server: SignalingServer, backend: FakeBackend
) -> None:
    async def wrong(session_id: str, secret: str) -> SessionHandle:
        await trio.lowlevel.checkpoint()
        _, receive = trio.open_memory_channel[dict[str, object]](1)
        return SessionHandle("other", "", receive, secrets.token_urlsafe(32))

    backend.attach_session = wrong  # type: ignore[method-assign]
    async with ws_open(server) as ws:
        error = await attach(ws, "s1", "x" * 43)
        assert (error["code"], error["message"]) == ("internal", "internal error")


@pytest.mark.parametrize(("asked", "expected"), [(4001, 4001), (4000, 4000), (None, 4001)])
async def test_session_moved_closes_for_a_reattach(
    server: SignalingServer, backend: FakeBackend, asked: int | None, expected: int
) -> None:
    async with ws_open(server) as ws:
        session = await offer(ws)
        await backend.senders[session].send({"event": "before"})
        backend.move(session, asked)
        assert (await receive(ws))["event"] == "before"
        moved = await receive(ws)
        assert moved["event"] == "session_moved"
        assert (moved["node"], moved["url"]) == ("B", "ws://b.example:7000/v1/session")
        assert "close_code" not in moved
        assert await closed_code(ws) == expected  # no session_ended before it
    await trio.sleep(0.05)
    assert backend.closed == []  # the session lives on at B
    assert server.counters["sessions_handed_over"] == 1


async def test_reattach_after_a_move_receives_later_events(
    server: SignalingServer, backend: FakeBackend
) -> None:
    async with ws_open(server) as ws:
        session = await offer(ws)
        secret = backend.secrets[session]
        backend.senders[session].send_nowait({"event": "spare"})  # keep the channel open
        backend.move(session)
        assert (await receive(ws))["event"] == "spare"
        assert (await receive(ws))["event"] == "session_moved"
        assert await closed_code(ws) == 4001
    # the fake is also node B: the client attaches there with its secret
    async with ws_open(server) as ws:
        assert await attach(ws, session, secret) == {"type": "attached", "session": session}
        for n in range(3):
            await backend.senders[session].send({"event": "after", "n": n})
        assert [(await receive(ws))["n"] for _ in range(3)] == [0, 1, 2]
        sender = backend.senders.pop(session)
        await sender.send({"event": "session_ended", "code": "hung_up", "close_code": 1000})
        sender.close()
        assert (await receive(ws))["code"] == "hung_up"
        assert await closed_code(ws) == 1000
    assert backend.closed == []


async def test_the_secret_is_never_logged(
    server: SignalingServer, backend: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="parley.signaling")
    async with ws_open(server) as ws:
        session = await offer(ws)
        async with ws_open(server) as again, ws_open(server) as thief:
            await attach(again, session, backend.secrets[session])
            assert (await attach(thief, session, "wrong"))["code"] == "forbidden"
    location = (await whip(server, "v=0")).headers["location"]
    assert (await http(server, "DELETE", location)).status == 200
    assert (await http(server, "DELETE", location)).status == 404
    await backend.wait_closed("s1")
    logged = " ".join(
        str(vars(r)) + r.getMessage() for r in caplog.records if r.name == "parley.signaling"
    )
    assert "socket attached" in logged
    for secret in backend.secrets.values():
        assert secret not in logged


def test_session_handles_refuse_weak_or_leaked_secrets() -> None:
    _, events = trio.open_memory_channel[dict[str, object]](1)
    good = secrets.token_urlsafe(32)
    assert SessionHandle("s1", "v=0", events, good).secret == good
    for bad in ["", "short", "x" * 31, "y" * 129, "z" * 40 + "/", "é" * 40]:
        with pytest.raises(ValueError, match="URL-safe"):
            SessionHandle("s1", "v=0", events, bad)
    with pytest.raises(ValueError, match="must not appear"):
        SessionHandle("s1", f"a=ice-ufrag:{good}", events, good)
    with pytest.raises(ValueError, match="must not appear"):
        SessionHandle(f"x{good}", "v=0", events, good)
    for bad_id in ["", "a/b", "s 1", "x" * 129]:
        with pytest.raises(ValueError, match="session id"):
            SessionHandle(bad_id, "v=0", events, good)


def test_socket_phases_change_only_along_the_table() -> None:
    state = _SessionState("test")
    assert state.phase is SocketPhase.WAITING
    with pytest.raises(StateTransitionError):
        state.set_phase(SocketPhase.ENDED)  # no session yet: nothing to end
    state.set_phase(SocketPhase.LIVE)
    state.set_phase(SocketPhase.HANDED_OVER)
    for phase in SocketPhase:
        with pytest.raises(StateTransitionError):
            state.set_phase(phase)  # final
    assert set(TRANSITIONS) == set(SocketPhase)
    assert all(not TRANSITIONS[final] for final in (SocketPhase.ENDED, SocketPhase.HANDED_OVER))


async def test_bye_ends_the_session_and_closes(
    server: SignalingServer, backend: FakeBackend
) -> None:
    async with ws_open(server) as ws:
        session = await offer(ws)
        await send(ws, {"type": "bye"})
        assert await closed_code(ws) == 1000
    assert await backend.wait_closed(session) == "bye"
    assert len(backend.closed) == 1


async def test_bye_without_a_session_closes(server: SignalingServer) -> None:
    async with ws_open(server) as ws:
        await send(ws, {"type": "bye"})
        assert await closed_code(ws) == 1000


async def test_oversized_frame_closes_with_1009(server: SignalingServer) -> None:
    async with ws_open(server) as ws:
        await ws.send_message("x" * (FAST.max_frame_chars + 1))
        assert await closed_code(ws) == 1009
    async with ws_open(server) as ws:  # the server serves on
        assert await request(ws, {"type": "ping"}) == {"type": "pong"}


async def test_socket_without_an_offer_times_out(
    nursery: trio.Nursery, backend: FakeBackend
) -> None:
    server = await start(nursery, backend, attrs.evolve(FAST, offer_timeout=0.3))
    async with ws_open(server) as ws:
        assert await request(ws, {"type": "ping"}) == {"type": "pong"}
        error = await receive(ws)
        assert error["code"] == "timeout"
        assert await closed_code(ws) == 1000
    async with ws_open(server) as ws:  # a session lifts the deadline
        await offer(ws)
        await trio.sleep(0.5)
        assert await request(ws, {"type": "ping"}) == {"type": "pong"}


async def test_stopping_the_server_closes_websocket_sessions(backend: FakeBackend) -> None:
    async with trio.open_nursery() as outer:
        server_scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[SignalingServer]) -> None:
            with server_scope:
                await SignalingServer(backend, limits=FAST, gate=Gate.open()).run(
                    task_status=task_status
                )

        server: SignalingServer = await outer.start(serve)
        async with ws_open(server) as ws:
            session = await offer(ws)
            server_scope.cancel()
            assert await backend.wait_closed(session) == "signaling closed"
            with pytest.raises(trio_websocket.ConnectionClosed):
                await receive(ws)


async def test_sdp_is_never_logged_at_info(
    server: SignalingServer, backend: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="parley.signaling")
    secret = "a=ice-pwd:s3cr3tpassw0rd"
    async with ws_open(server) as ws:
        await offer(ws, f"v=0 {secret}")
    await whip(server, f"v=0 {secret}")
    await backend.wait_closed("s1")
    records = [r for r in caplog.records if r.name == "parley.signaling"]
    assert any(secret in str(vars(r)) for r in records if r.levelno == logging.DEBUG)
    for record in records:
        if record.levelno >= logging.INFO:
            assert secret not in str(vars(record)), record


async def test_websocket_upgrade_elsewhere_is_rejected(server: SignalingServer) -> None:
    head = (
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n\r\n"
    )
    response = await raw(server.port, head.format(path="/v2/nowhere", version=13).encode())
    assert status_of(response) == 404
    response = await raw(server.port, head.format(path="/v1/session", version=8).encode())
    assert status_of(response) == 426
    assert b"Sec-WebSocket-Version: 13" in response
    no_key = head.format(path="/v1/session", version=13).replace("Sec-WebSocket-Key", "X-Key")
    assert status_of(await raw(server.port, no_key.encode())) == 400
    async with ws_open(server) as ws:  # and a proper upgrade still works
        assert await request(ws, {"type": "ping"}) == {"type": "pong"}


# -- WHIP ---------------------------------------------------------------------------------------


async def test_whip_post_then_delete(server: SignalingServer, backend: FakeBackend) -> None:
    reply = await whip(server, "v=0 whip")
    assert reply.status == 201
    assert reply.headers["content-type"] == "application/sdp"
    # RFC 9725 §4.2: the session URL, here carrying the session's secret
    location = reply.headers["location"]
    assert location == f"/v1/session/s1/{backend.secrets['s1']}"
    assert reply.body == b"answer to v=0 whip"
    assert backend.secrets["s1"] not in reply.body.decode()
    assert backend.opened == [("v=0 whip", "http")]
    reply = await http(server, "DELETE", location)
    assert reply.status == 200
    assert await backend.wait_closed("s1") == "whip delete"
    reply = await http(server, "DELETE", location)
    assert reply.status == 404
    assert reply.json()["code"] == "unknown_session"


async def test_whip_session_ended_by_the_node_is_gone(
    server: SignalingServer, backend: FakeBackend
) -> None:
    location = (await whip(server, "v=0")).headers["location"]
    await backend.senders["s1"].send({"event": "ignored"})  # HTTP sessions have no event channel
    backend.senders.pop("s1").close()

    async def delete_status() -> int:
        return (await http(server, "DELETE", location)).status

    await eventually(delete_status, lambda status: status == 404, within=5)
    assert backend.closed == []


@pytest.mark.parametrize("suffix", ["", "/", "/wrong-secret-" + "x" * 30, "/bad%20chars", "/a.b"])
async def test_a_whip_session_is_not_deleted_without_its_secret(
    server: SignalingServer, backend: FakeBackend, suffix: str
) -> None:
    assert (await whip(server, "v=0")).status == 201
    # issue #15: the id is in every STUN check; it alone (or with a wrong secret) ends nothing
    reply = await http(server, "DELETE", f"/v1/session/s1{suffix}")
    assert reply.status == 403
    assert reply.json()["code"] == "forbidden"
    assert backend.closed == []
    assert "s1" in backend.senders  # the session lives on
    assert server.counters["forbidden"] == 1


async def test_whip_delete_of_an_unknown_session(server: SignalingServer) -> None:
    reply = await http(server, "DELETE", "/v1/session/nosuch/" + "x" * 43)
    assert (reply.status, reply.json()["code"]) == (404, "unknown_session")
    assert server.counters["unknown_session"] == 1


async def test_whip_delete_with_the_secret_ends_any_session(
    server: SignalingServer, backend: FakeBackend
) -> None:
    # the backend ends it wherever it lives, whichever transport opened it
    async with ws_open(server) as ws:
        await offer(ws)
        reply = await http(server, "DELETE", f"/v1/session/s1/{backend.secrets['s1']}")
        assert reply.status == 200
        assert await backend.wait_closed("s1") == "whip delete"
        assert (await receive(ws))["event"] == "session_ended"


async def test_a_session_id_alone_deletes_nothing(
    server: SignalingServer, backend: FakeBackend
) -> None:
    async with ws_open(server) as ws:
        session = await offer(ws)
        assert (await http(server, "DELETE", f"/v1/session/{session}")).status == 403
        assert await request(ws, {"type": "ping"}) == {"type": "pong"}
        assert backend.closed == []


@pytest.mark.parametrize(
    ("content_type", "body", "status", "code"),
    [
        ("application/json", b'{"sdp": "v=0"}', 415, "unsupported_media_type"),
        ("text/plain", b"v=0", 415, "unsupported_media_type"),
        ("application/sdp", b"", 400, "bad_sdp"),
        ("application/sdp", b"\xff\xfe", 400, "bad_sdp"),
        *(("application/sdp", f"sdp-error {c}".encode(), 400, c) for c in SDP_CODES),
        ("application/sdp", b"refuse node_draining", 503, "node_draining"),
        ("application/sdp", b"refuse node_over_capacity", 503, "node_over_capacity"),
        ("application/sdp", b"boom", 500, "internal"),
        ("application/sdp", b"v=0 " + b"a" * 70_000, 413, "bad_message"),
    ],
)
async def test_whip_errors(
    server: SignalingServer, content_type: str, body: bytes, status: int, code: str
) -> None:
    headers = [("Content-Type", content_type)]
    reply = await http(server, "POST", "/v1/session", headers=headers, body=body)
    assert reply.status == status
    error = reply.json()
    assert error["type"] == "error"
    assert error["code"] == code
    assert isinstance(error["message"], str)
    if status == 415:
        assert reply.headers["accept-post"] == "application/sdp"
    assert (await http(server, "GET", "/healthz")).status == 200


async def test_content_type_parameters_are_accepted(server: SignalingServer) -> None:
    headers = [("Content-Type", "Application/SDP; charset=utf-8")]
    reply = await http(server, "POST", "/v1/session", headers=headers, body=b"v=0")
    assert reply.status == 201


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/nowhere", 404, None),
        ("GET", "/v1/session/", 404, None),
        ("GET", "/v1/session/a/b/c", 404, None),
        ("GET", "/v1/session/a/b", 405, "DELETE, OPTIONS"),
        ("PUT", "/v1/session", 405, "GET, POST, OPTIONS"),
        ("DELETE", "/v1/session", 405, "GET, POST, OPTIONS"),
        ("GET", "/v1/session", 426, None),
        ("PATCH", "/v1/session/s1", 405, "DELETE, OPTIONS"),
        ("GET", "/v1/session/s1", 405, "DELETE, OPTIONS"),
        ("POST", "/healthz", 405, "GET, HEAD"),
    ],
)
async def test_routing_errors(
    server: SignalingServer, method: str, path: str, status: int, allow: str | None
) -> None:
    reply = await http(server, method, path)
    assert reply.status == status
    assert reply.json()["type"] == "error"
    assert reply.headers.get("allow") == allow


async def test_options_healthz_and_pages(nursery: trio.Nursery, backend: FakeBackend) -> None:
    page = b"<!doctype html><title>parley</title>"
    server = await start(nursery, backend, pages={"/": ("text/html; charset=utf-8", page)})
    reply = await http(server, "OPTIONS", "/v1/session")
    assert reply.status == 204
    assert reply.headers["accept-post"] == "application/sdp"
    reply = await http(server, "GET", "/healthz")
    assert (reply.status, reply.json()) == (200, {"ok": True})
    reply = await http(server, "GET", "/?cache=no")
    assert (reply.status, reply.headers["content-type"], reply.body) == (
        200,
        "text/html; charset=utf-8",
        page,
    )
    reply = await http(server, "HEAD", "/")
    assert (reply.status, reply.body) == (200, b"")
    assert reply.headers["content-length"] == str(len(page))
    with pytest.raises(ValueError, match="not a free absolute path"):
        SignalingServer(backend, pages={"/healthz": ("text/plain", b"")})


async def test_keep_alive_serves_several_requests(
    server: SignalingServer, backend: FakeBackend
) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        client = h11.Connection(h11.CLIENT)
        await stream.send_all(http_send(client, "GET", "/healthz", [], b"", server.port))
        assert (await read_reply(stream, client)).status == 200
        client.start_next_cycle()
        headers = [("Content-Type", "application/sdp")]
        await stream.send_all(
            http_send(client, "POST", "/v1/session", headers, b"v=0", server.port)
        )
        assert (await read_reply(stream, client)).status == 201
        client.start_next_cycle()
        await stream.send_all(http_send(client, "GET", "/nowhere", [], b"", server.port))
        assert (await read_reply(stream, client)).status == 404
        client.start_next_cycle()
        location = f"/v1/session/s1/{backend.secrets['s1']}"
        await stream.send_all(http_send(client, "DELETE", location, [], b"", server.port))
        assert (await read_reply(stream, client)).status == 200


async def test_expect_100_continue(server: SignalingServer) -> None:
    head = (
        "POST /v1/session HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\n"
        "Content-Length: 3\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(head.encode())
        with trio.fail_after(5):
            interim = await stream.receive_some(65536)
        assert interim.startswith(b"HTTP/1.1 100 ")
        await stream.send_all(b"v=0")
        response = bytearray()
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                response += chunk
    assert status_of(bytes(response)) == 201


# -- hostile HTTP -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x00\x01\x02 garbage\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", 431),
        (b"POST /v1/session HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n", 413),
    ],
)
async def test_malformed_http_gets_an_error_and_a_close(
    server: SignalingServer, data: bytes, status: int
) -> None:
    response = await raw(server.port, data)
    assert status_of(response) == status
    assert b"Connection: close" in response
    assert body_json(response)["type"] == "error"
    assert (await http(server, "GET", "/healthz")).status == 200
    assert server.counters["http_errors"] == 1


async def test_slow_clients_time_out_while_others_are_served(
    nursery: trio.Nursery, backend: FakeBackend
) -> None:
    server = await start(nursery, backend, attrs.evolve(FAST, request_timeout=0.5))
    results: dict[str, bytes] = {}

    async def slow(name: str, data: bytes) -> None:
        results[name] = await raw(server.port, data, within=3)

    with trio.fail_after(4):
        async with trio.open_nursery() as clients:
            clients.start_soon(slow, "silent", b"")
            clients.start_soon(slow, "head", b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            body_head = b"POST /v1/session HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nv=0"
            clients.start_soon(slow, "body", body_head)
            for _ in range(3):
                assert (await http(server, "GET", "/healthz")).status == 200
                await trio.sleep(0.05)
    assert results["silent"] == b""  # no request at all: closed without a word
    assert status_of(results["head"]) == 408
    assert body_json(results["head"])["code"] == "timeout"
    assert status_of(results["body"]) == 408
    assert server.counters["timeouts"] == 2
    assert backend.opened == []


async def test_connections_beyond_the_limit_are_refused(
    nursery: trio.Nursery, backend: FakeBackend
) -> None:
    server = await start(nursery, backend, attrs.evolve(FAST, max_connections=1))
    async with ws_open(server) as ws:
        response = await raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(response) == 503
        assert body_json(response)["code"] == "node_over_capacity"
        assert await request(ws, {"type": "ping"}) == {"type": "pong"}
    assert server.counters["connections_refused"] == 1

    async def healthz() -> int:
        return (await http(server, "GET", "/healthz")).status

    await eventually(healthz, lambda status: status == 200, within=5)


# -- properties ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
control_tokens = st.one_of(
    st.from_regex(r"[A-Za-z0-9_-]{1,50}", fullmatch=True), st.text(max_size=30), json_values
)
typed_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["offer", "ping", "bye", "attach", "answer", "", "OFFER", "event"])},
    optional={
        "sdp": st.one_of(st.text(max_size=30), json_values),
        "session": control_tokens,
        "secret": control_tokens,
        "extra": json_values,
    },
)
client_messages = st.one_of(
    st.text(max_size=100),
    st.binary(max_size=20),
    json_values.map(json.dumps),
    typed_messages.map(json.dumps),
)


@settings(max_examples=500, deadline=None)
@given(client_messages)
def test_parse_client_message_accepts_or_refuses(message: str | bytes) -> None:
    try:
        parsed = parse_client_message(message)
    except ClientMessageError as exc:
        assert exc.code in ("bad_json", "bad_message")
        return
    assert parsed["type"] in ("offer", "ping", "bye", "attach")
    if parsed["type"] == "offer":
        sdp = parsed["sdp"]
        assert isinstance(sdp, str) and sdp.strip()
    if parsed["type"] == "attach":
        assert is_control_token(parsed["session"]) and is_control_token(parsed["secret"])


def is_bye(message: str | bytes) -> bool:
    try:
        value = json.loads(message)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("type") == "bye"


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(st.lists(client_messages, min_size=1, max_size=6))
async def test_random_messages_never_break_the_server(messages: list[str | bytes]) -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        server = await start(nursery, backend)
        async with ws_open(server) as ws:
            closed = False
            for message in messages:
                await ws.send_message(message)
                if is_bye(message):
                    assert await closed_code(ws) == 1000
                    closed = True
                    break
                reply = await receive(ws)
                assert reply["type"] in ("error", "pong", "answer")
                if reply["type"] == "error":
                    assert reply["code"] in KNOWN_CODES - {"internal"}
            if not closed:
                assert await request(ws, {"type": "ping"}) == {"type": "pong"}
        assert server.counters["internal"] == 0
        nursery.cancel_scope.cancel()
