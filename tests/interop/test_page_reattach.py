"""The demo page re-attaches its signaling socket by itself when its session moves.

A headless Chromium loads ``echo.html`` from signaling server A. The backends are scripted (no
media: the answer is a well-formed SDP the browser accepts, and nothing answers its ICE checks),
so what is tested is the page's signaling only: on ``session_moved`` and a 4001 close it opens a
socket to the URL it was given (server B), sends its secret, follows B's redirect back to A, shows
"re-attached to A", and keeps its RTCPeerConnection; a 4000 close without a URL re-attaches to
its own origin; a ``session_ended`` is never re-attached.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import wave
from pathlib import Path
from typing import Any, Literal

import pytest
import trio

from sessions.node.pages import HTML, echo_page
from sessions.node.signaling import (
    Gate,
    Redirect,
    SessionHandle,
    SignalingRefused,
    SignalingServer,
)
from tests.interop.chromium_scenario import Cdp, browser_page, eventually

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed"),
]

Events = trio.MemorySendChannel[dict[str, object]]


def answer_to(offer: str) -> str:
    """An ICE-lite answer Chromium accepts for the page's audio offer (RFC 8829 §5.3)."""
    lines = offer.splitlines()
    mid = next(line.split(":", 1)[1] for line in lines if line.startswith("a=mid:"))
    opus = next(
        line.split(":", 1)[1].split()[0]
        for line in lines
        if line.startswith("a=rtpmap:") and "opus/48000" in line
    )
    fingerprint = ":".join(f"{byte:02X}" for byte in secrets.token_bytes(32))
    return "\r\n".join(
        [
            "v=0",
            "o=- 1 1 IN IP4 127.0.0.1",
            "s=-",
            "t=0 0",
            "a=ice-lite",
            f"a=group:BUNDLE {mid}",
            f"m=audio 9 UDP/TLS/RTP/SAVPF {opus}",
            "c=IN IP4 127.0.0.1",
            f"a=mid:{mid}",
            "a=ice-ufrag:pageufrag",
            "a=ice-pwd:" + "p" * 24,
            f"a=fingerprint:sha-256 {fingerprint}",
            "a=setup:passive",
            "a=rtcp-mux",
            "a=sendrecv",
            f"a=rtpmap:{opus} opus/48000/2",
            "a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host",
            "",
        ]
    )


class NodeA:
    """Owns the one session; attaching takes it over."""

    def __init__(self) -> None:
        self.session = "pagesession"
        self.secret = secrets.token_urlsafe(32)
        self.events: Events | None = None
        self.closed: list[str] = []
        self.attaches = 0

    def _channel(self) -> trio.MemoryReceiveChannel[dict[str, object]]:
        self.events, receive = trio.open_memory_channel[dict[str, object]](16)
        return receive

    async def open_session(
        self,
        offer_sdp: str,
        *,
        transport: Literal["websocket", "http"],
        region: str | None = None,
    ) -> SessionHandle:
        await trio.lowlevel.checkpoint()
        return SessionHandle(self.session, answer_to(offer_sdp), self._channel(), self.secret)

    async def close_session(self, session_id: str, reason: str) -> bool:
        await trio.lowlevel.checkpoint()
        self.closed.append(reason)
        return True

    async def attach_session(self, session_id: str, secret: str) -> SessionHandle | Redirect:
        await trio.lowlevel.checkpoint()
        if session_id != self.session:
            raise SignalingRefused("unknown_session", "no such session")
        if secret != self.secret:
            raise SignalingRefused("forbidden", "wrong secret")
        self.attaches += 1
        return SessionHandle(session_id, "", self._channel(), secret)

    async def end_session_by_secret(self, session_id: str, secret: str) -> bool:
        raise AssertionError("not used")

    def say(self, event: dict[str, object], *, last: bool = False) -> None:
        assert self.events is not None
        self.events.send_nowait(event)
        if last:
            self.events.close()


class NodeB:
    """Owns nothing: every attach is redirected to A."""

    def __init__(self, a_url: str) -> None:
        self.redirect = Redirect("A", a_url)
        self.asked: list[str] = []

    async def open_session(
        self,
        offer_sdp: str,
        *,
        transport: Literal["websocket", "http"],
        region: str | None = None,
    ) -> SessionHandle:
        raise AssertionError("not used")

    async def close_session(self, session_id: str, reason: str) -> bool:
        raise AssertionError("not used")

    async def attach_session(self, session_id: str, secret: str) -> SessionHandle | Redirect:
        await trio.lowlevel.checkpoint()
        self.asked.append(session_id)
        return self.redirect

    async def end_session_by_secret(self, session_id: str, secret: str) -> bool:
        raise AssertionError("not used")


def silent_wav(path: Path) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48000)
        out.writeframes(bytes(48000 * 2))


async def page_state(cdp: Cdp) -> dict[str, Any]:
    state: dict[str, Any] = await cdp.evaluate(
        "({...window.parleyState, events: window.parleyEvents,"
        " shown: document.getElementById('events').innerText,"
        " log: JSON.stringify(window.parleyLog), text: document.body.innerText,"
        " same: !!(window.parleyPeer() && window.parleyPeer().__mark === 'first')})"
    )
    return state


async def until(cdp: Cdp, what: str, check: Any) -> dict[str, Any]:
    async def ok() -> bool:
        return bool(check(await page_state(cdp)))

    if not await eventually(ok, within=15):
        raise AssertionError(f"the page never {what}: {json.dumps(await page_state(cdp))[:3000]}")
    return await page_state(cdp)


async def test_the_page_reattaches_after_moves(nursery: trio.Nursery, tmp_path: Path) -> None:
    a = NodeA()
    # fake nodes, and a test of re-attaching: an explicitly open gate
    server_a = SignalingServer(a, pages={"/": (HTML, echo_page())}, gate=Gate.open())
    await nursery.start(server_a.run)
    b = NodeB(server_a.urls()["signaling"])
    server_b = SignalingServer(b, gate=Gate.open())
    await nursery.start(server_b.run)
    wav = tmp_path / "silence.wav"
    silent_wav(wav)
    page = f"http://127.0.0.1:{server_a.port}/"
    result: dict[str, Any] = {}

    async with browser_page(page, tmp_path, wav, result) as cdp:
        started = await cdp.evaluate("window.parleyStart()", await_promise=True)
        assert started["session"] == a.session, started
        assert started["reattached"] == 0
        await cdp.evaluate("window.parleyPeer().__mark = 'first'")

        # the session moves; B does not own it (any more) and sends the page back to A
        a.say({"event": "session_moved", "node": "B", "url": server_b.urls()["signaling"]})
        state = await until(cdp, "re-attached", lambda s: s["reattached"] == 1)
        assert b.asked == [a.session]
        assert a.attaches == 1
        assert "re-attached to A" in state["shown"]
        assert state["same"], "the RTCPeerConnection was replaced"
        a.say({"event": "after_move"})
        await until(cdp, "heard events after the move", lambda s: "after_move" in s["events"])

        # the node goes away (4000) and says nowhere to go: the page's own origin
        a.say({"event": "session_moved", "node": "A", "close_code": 4000})
        state = await until(cdp, "re-attached again", lambda s: s["reattached"] == 2)
        assert state["same"]
        assert state["shown"].count("re-attached to A") == 2
        assert a.closed == []  # no socket the node closed ended the session

        # an ended session is not re-attached, whatever the close code
        ending = {"event": "session_ended", "code": "node_stopping", "close_code": 4000}
        a.say(ending, last=True)
        state = await until(cdp, "hung up", lambda s: s["connection"] == "closed")
        await trio.sleep(0.5)
        state = await page_state(cdp)
        assert state["reattached"] == 2
        assert a.attaches == 2
        # the secret went only into attach messages: not into the page's log or text
        assert a.secret not in state["log"]
        assert a.secret not in state["text"]


class Recovering(NodeA):
    """A's successor after a crash: the session is being resumed (``session_recovering``) for
    ``tries`` attaches, then attaching takes it over; or it is gone (``unknown_session``)."""

    def __init__(self, previous: NodeA, tries: int, *, gone: bool = False) -> None:
        super().__init__()
        self.session, self.secret = previous.session, previous.secret
        self.tries = tries
        self.gone = gone
        self.refused = 0

    async def attach_session(self, session_id: str, secret: str) -> SessionHandle | Redirect:
        await trio.lowlevel.checkpoint()
        if self.gone:
            self.refused += 1
            raise SignalingRefused("unknown_session", "no live session")
        if self.refused < self.tries:
            self.refused += 1
            raise SignalingRefused("session_recovering", "being resumed elsewhere")
        return await super().attach_session(session_id, secret)


def recording(server: SignalingServer) -> list[trio.SocketStream]:
    """The TCP streams ``server`` accepts from now on."""
    streams: list[trio.SocketStream] = []
    handle = server._handle_connection

    async def recorded(stream: trio.SocketStream) -> None:
        streams.append(stream)
        await handle(stream)

    server._handle_connection = recorded  # type: ignore[method-assign]
    return streams


async def crash(scope: trio.CancelScope, streams: list[trio.SocketStream]) -> None:
    """The node's process is gone: its connections end without a close frame, its listener
    is shut."""
    for stream in streams:
        with contextlib.suppress(OSError):  # one the server closed already
            stream.socket.shutdown(socket.SHUT_RDWR)
    scope.cancel()
    await trio.sleep(0.3)


@pytest.mark.parametrize("gone", [False, True], ids=["resumed", "gone"])
async def test_the_page_rides_out_its_node_crashing(
    nursery: trio.Nursery, tmp_path: Path, gone: bool
) -> None:
    """After a crash (the socket drops: 1006) the page keeps re-attaching to its origin while it
    cannot connect and while the node answers ``session_recovering``, and takes the session up
    again with the same RTCPeerConnection once it is resumed; a session that did not survive
    (``unknown_session``) ends the call at once, saying why."""
    a = NodeA()
    first = trio.CancelScope()

    async def serve(server: SignalingServer, scope: trio.CancelScope, *, task_status: Any) -> None:
        with scope:
            await server.run(task_status=task_status)

    server_a = SignalingServer(a, pages={"/": (HTML, echo_page())}, gate=Gate.open())
    streams = recording(server_a)
    await nursery.start(serve, server_a, first)
    wav = tmp_path / "silence.wav"
    silent_wav(wav)
    result: dict[str, Any] = {}

    async with browser_page(f"http://127.0.0.1:{server_a.port}/", tmp_path, wav, result) as cdp:
        await cdp.evaluate("window.parleyStart()", await_promise=True)
        await cdp.evaluate("window.parleyPeer().__mark = 'first'")
        await crash(first, streams)
        await trio.sleep(1.0)  # nothing listens meanwhile: the page's tries fail to connect
        successor = Recovering(a, tries=2, gone=gone)
        server = SignalingServer(
            successor, port=server_a.port, pages={"/": (HTML, echo_page())}, gate=Gate.open()
        )
        await nursery.start(serve, server, trio.CancelScope())
        if gone:
            state = await until(cdp, "hung up", lambda s: s["connection"] == "closed")
            assert "unknown_session" in str(state["error"]), state["error"]
            assert successor.refused == 1 and state["reattached"] == 0
            return
        state = await until(cdp, "re-attached", lambda s: s["reattached"] == 1)
        assert state["same"], "the RTCPeerConnection was replaced"
        assert successor.refused == 2 and successor.attaches == 1
        log = json.loads(state["log"])
        closed = [e["code"] for e in log if e["event"] == "socket_closed"]
        assert closed[0] == 1006, log
        retries = [e["message"] for e in log if e["event"] == "reattach_retry"]
        assert any("session_recovering" in m for m in retries), retries
        assert any("cannot connect" in m for m in retries), retries
        successor.say({"event": "after_crash"})
        await until(cdp, "heard events after the crash", lambda s: "after_crash" in s["events"])


async def test_the_page_follows_an_offer_to_a_node_of_its_region(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The page's node (another region's) sends the offer on to A: the page offers there once,
    with the same token, and its call is A's session (issue #19)."""
    a = NodeA()
    server_a = SignalingServer(a, gate=Gate.open())
    await nursery.start(server_a.run)
    asked: list[str | None] = []

    async def place(region: str | None) -> Redirect:
        await trio.lowlevel.checkpoint()
        asked.append(region)
        return Redirect("A", server_a.urls()["signaling"], "region")

    far = SignalingServer(
        NodeB(server_a.urls()["signaling"]),
        pages={"/": (HTML, echo_page())},
        gate=Gate.open(),
        placer=place,
        region_header="X-Client-Region",
    )
    await nursery.start(far.run)
    wav = tmp_path / "silence.wav"
    silent_wav(wav)
    result: dict[str, Any] = {}
    async with browser_page(f"http://127.0.0.1:{far.port}/", tmp_path, wav, result) as cdp:
        started = await cdp.evaluate("window.parleyStart()", await_promise=True)
        assert started["session"] == a.session, started
        state = await page_state(cdp)
        assert "placed" in state["events"] and state["connection"] != "closed", state
    assert asked == [None] and far.counters["placed_elsewhere"] == 1
