"""The agent bridge over real sockets: BridgeAgent against examples/agent_echo.py (in process, and
as a process that is SIGKILLed and restarted) and against scripted, hostile fake agents."""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessions.agents import FRAME_BYTES, Agent, DuckAwareAgent, RunningAgent, wire
from sessions.agents.bridge import PROTOCOL, BridgeAgent, BridgeLimits
from sessions.audio.speech import correlation, frames, speak
from sessions.turns import SpeechStarted, SpeechStopped

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "agent_echo.py"
SILENCE = bytes(FRAME_BYTES)
#: the example agent replays this much audio from before speech_started
PREROLL_MS = 200


def _load_example_serve() -> Callable[..., Awaitable[None]]:
    spec = importlib.util.spec_from_file_location("parley_example_agent_echo", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return cast(Callable[..., Awaitable[None]], module.serve)


serve_example = _load_example_serve()


@pytest.fixture(scope="module")
def speech() -> bytes:
    return speak("Hello agent, say this back.", rate=280)


class Caller:
    """Drives a bridge's sync side like the session core: a frame of user audio every 20 ms of
    a virtual clock, synthetic turn events, and 20 ms pulls (in real time while listening)."""

    def __init__(self, bridge: BridgeAgent) -> None:
        self.bridge = bridge
        self.now = 1000.0
        self.turn = 0
        self.events: list[dict[str, Any]] = []

    async def feed(self, pcm_frames: list[bytes]) -> None:
        for frame in pcm_frames:
            self.bridge.on_audio(frame, self.now)
            self.now += 0.02
            await trio.sleep(0.004)  # faster than real time, slow enough for the socket

    async def say(self, pcm: bytes) -> int:
        """One user turn: silence, speech (detected 100 ms late), 300 ms of hangover."""
        self.turn += 1
        speech_frames = frames(pcm)
        await self.feed([SILENCE] * 10)
        onset = self.now
        await self.feed(speech_frames[:5])
        self.bridge.on_turn(SpeechStarted(at=onset, turn=self.turn), self.now)
        await self.feed(speech_frames[5:])
        end = self.now
        await self.feed([SILENCE] * 15)
        duration_ms = round((end - onset) * 1000)
        self.bridge.on_turn(
            SpeechStopped(at=end, turn=self.turn, duration_ms=duration_ms), self.now
        )
        return self.turn

    def poll(self) -> list[dict[str, Any]]:
        new = self.bridge.poll_events()
        self.events += new
        return new

    async def listen(self, *, frames_wanted: int | None = None, within: float = 8.0) -> bytes:
        """Pull every 20 ms until the agent finishes its reply (or ``frames_wanted`` arrive)."""
        heard = bytearray()
        finished = False
        with trio.fail_after(within):
            while True:
                finished = finished or any(e["event"] == "agent_finished" for e in self.poll())
                pcm = self.bridge.pull(self.now)
                if pcm is not None:
                    assert len(pcm) == FRAME_BYTES
                    heard += pcm
                    if frames_wanted is not None and len(heard) >= frames_wanted * FRAME_BYTES:
                        return bytes(heard)
                elif finished:
                    # everything the agent sent came before its agent_finished; a partial last
                    # frame is played on the second empty pull
                    pcm = self.bridge.pull(self.now)
                    if pcm is None:
                        return bytes(heard)
                    heard += pcm
                    continue
                self.bridge.on_audio(SILENCE, self.now)
                self.now += 0.02
                await trio.sleep(0.02)


async def wait_for(probe: Callable[[], bool], within: float = 10.0) -> None:
    """Poll state that another task or process changes (no event of ours announces it)."""
    with trio.fail_after(within):
        while True:
            if probe():
                return
            await trio.sleep(0.01)


def assert_echo(sent: bytes, heard: bytes) -> None:
    assert len(heard) >= len(sent)
    score, lag = correlation(sent, heard, 48_000 // 2)
    assert score > 0.9, (score, lag)
    # the reply starts PREROLL_MS before the onset the turn event gave
    assert abs(lag - PREROLL_MS * 48) <= 2 * 960, lag


@pytest.fixture
async def example_url(nursery: trio.Nursery) -> str:
    port = await nursery.start(partial(serve_example, "127.0.0.1", 0))
    return f"ws://127.0.0.1:{port}/agent"


@pytest.fixture
async def bridge(nursery: trio.Nursery, example_url: str) -> AsyncIterator[BridgeAgent]:
    agent = BridgeAgent(example_url, "s1")
    nursery.start_soon(agent.run)
    await wait_for(lambda: agent.connected)
    yield agent


# --- against the example agent ------------------------------------------------------------------


async def test_a_turn_is_echoed_by_the_example_agent(bridge: BridgeAgent, speech: bytes) -> None:
    caller = Caller(bridge)
    assert caller.poll() == [{"event": "agent_connected", "resumed": False}]
    assert bridge.pull(caller.now) is None  # nothing to say yet
    turn = await caller.say(speech)
    heard = await caller.listen()
    assert_echo(speech, heard)
    names = [(e["event"], e.get("turn")) for e in caller.events]
    assert ("agent_started", turn) in names and ("agent_finished", turn) in names
    stats = bridge.stats()
    assert stats["connected"] is True and stats["turn"] == turn
    assert stats["user_frames_dropped"] == {} and stats["malformed"] == {}
    assert stats["agent_frames_dropped"] == {} and stats["internal_errors"] == 0


async def test_interrupted_reply_stops_then_the_next_turn_is_served(
    bridge: BridgeAgent, speech: bytes
) -> None:
    caller = Caller(bridge)
    await caller.say(speech)
    await caller.listen(frames_wanted=10)
    bridge.on_interrupted(200, caller.now)
    assert bridge.pull(caller.now) is None  # queued agent audio went with the interruption
    await wait_for(lambda: any(e.get("interrupted") for e in caller.poll()), within=2)
    stopped = next(e for e in caller.events if e.get("interrupted"))
    assert stopped == {"event": "agent_finished", "turn": 1, "interrupted": True, "played_ms": 200}
    received = bridge.stats()["agent_frames_received"]
    for _ in range(25):  # half a second: the rest of the reply (over a second) never comes
        assert bridge.pull(caller.now) is None
        await trio.sleep(0.02)
    stats = bridge.stats()
    assert stats["agent_frames_received"] == received
    assert cast(dict[str, int], stats["agent_frames_dropped"])["interrupted"] > 0

    # the agent's clear ended the discard: the next reply plays
    await caller.say(speech)
    assert_echo(speech, await caller.listen())


async def test_agent_process_killed_and_restarted(nursery: trio.Nursery, speech: bytes) -> None:
    async def start_agent(port: int) -> tuple[trio.Process, int]:
        argv = [sys.executable, str(EXAMPLE), "--port", str(port)]
        proc: trio.Process = await nursery.start(
            partial(trio.run_process, argv, stdout=subprocess.PIPE, check=False)
        )
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(10):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(256)
                assert chunk, "the agent exited before listening"
                line += chunk
        found = re.search(rb":(\d+)/agent", line)
        assert found is not None, line
        return proc, int(found[1])

    proc, port = await start_agent(0)
    bridge = BridgeAgent(f"ws://127.0.0.1:{port}/agent", "s-kill")
    caller = Caller(bridge)
    nursery.start_soon(bridge.run)
    await wait_for(lambda: bridge.connected)
    await caller.say(speech)
    assert_echo(speech, await caller.listen())

    proc.kill()  # SIGKILL: no closing handshake, the kernel resets the connection
    await proc.wait()
    await wait_for(lambda: not bridge.connected, within=5)
    await caller.feed([SILENCE] * 5)  # the session goes on, its audio has nowhere to go
    assert bridge.pull(caller.now) is None
    assert cast(dict[str, int], bridge.stats()["user_frames_dropped"])["disconnected"] >= 5

    proc, _ = await start_agent(port)
    await wait_for(lambda: bridge.connected, within=10)
    await caller.say(speech)
    assert_echo(speech, await caller.listen())
    events = [e["event"] for e in caller.events]
    assert "agent_disconnected" in events
    assert {"event": "agent_connected", "resumed": True} in caller.events
    stats = bridge.stats()
    assert stats["reconnects"] == 1 and stats["connects"] == 2
    assert stats["internal_errors"] == 0
    proc.kill()


async def test_example_agent_refuses_other_protocol_versions(example_url: str) -> None:
    async with trio_websocket.open_websocket_url(example_url) as ws:
        await ws.send_message(json.dumps({"type": "hello", "protocol": "parley.agent.v0"}))
        reply = json.loads(await ws.get_message())
        assert reply["type"] == "error" and reply["code"] == "unsupported_protocol"
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason is not None and closed.value.reason.code == 1002


# --- against scripted agents ----------------------------------------------------------------------

Script = Callable[[trio_websocket.WebSocketConnection, dict[str, Any]], Awaitable[None]]


class FakeAgent:
    """An agent server whose every connection runs ``script`` after reading the node's hello."""

    def __init__(self, script: Script, *, reply_hello: bool = True) -> None:
        self.script = script
        self.reply_hello = reply_hello
        self.hellos: list[dict[str, Any]] = []
        self.received: list[str | bytes] = []
        self.close_codes: list[int | None] = []
        self.url = ""

    async def start(self, nursery: trio.Nursery) -> FakeAgent:
        server = await nursery.start(
            trio_websocket.serve_websocket, self._handle, "127.0.0.1", 0, None
        )
        self.url = f"ws://127.0.0.1:{server.port}/agent"
        return self

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            hello = json.loads(await ws.get_message())
            self.hellos.append(hello)
            if self.reply_hello:
                await ws.send_message(json.dumps({"type": "hello", "protocol": PROTOCOL}))
            await self.script(ws, hello)
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            self.close_codes.append(None if ws.closed is None else ws.closed.code)

    async def record(self, ws: trio_websocket.WebSocketConnection) -> None:
        """Keep what the node sends until it hangs up."""
        while True:
            self.received.append(await ws.get_message())

    def control(self) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.received if isinstance(m, str)]


async def test_agent_audio_is_reframed_bounded_and_cleared(nursery: trio.Nursery) -> None:
    go, go_on = trio.Event(), trio.Event()

    async def script(ws: trio_websocket.WebSocketConnection, hello: dict[str, Any]) -> None:
        pcm = bytes(range(256)) * 30  # 7680 bytes: 4 frames
        await ws.send_message(pcm[:3000])
        await ws.send_message(pcm[3000:])
        await ws.send_message(json.dumps({"type": "event", "event": "step", "n": 1}))
        await go.wait()
        await ws.send_message(b"\x01\x02" * 500)  # 1000 bytes: half a frame
        await ws.send_message(SILENCE * 10)  # 6 whole frames fit behind the partial one
        await ws.send_message(json.dumps({"type": "event", "event": "step", "n": 2}))
        await go_on.wait()
        await ws.send_message(json.dumps({"type": "clear"}))
        await ws.send_message(json.dumps({"type": "event", "event": "step", "n": 3}))
        await fake.record(ws)

    fake = await FakeAgent(script).start(nursery)
    bridge = BridgeAgent(fake.url, "s-frames", limits=BridgeLimits(max_playout_ms=120))
    nursery.start_soon(bridge.run)
    caller = Caller(bridge)
    await wait_for(lambda: {"event": "step", "n": 1} in caller.poll() + caller.events)
    pcm = bytes(range(256)) * 30
    assert [bridge.pull(0) for _ in range(5)] == [
        pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)
    ] + [None]
    go.set()
    await wait_for(lambda: {"event": "step", "n": 2} in caller.poll() + caller.events)
    stats = bridge.stats()
    assert stats["agent_frames_queued"] == 6  # 120 ms
    assert stats["agent_frames_dropped"] == {"overflow": 10 - 6}
    go_on.set()
    await wait_for(lambda: {"event": "step", "n": 3} in caller.poll() + caller.events)
    assert bridge.pull(0) is None and bridge.pull(0) is None  # the clear took the partial too
    assert cast(dict[str, int], bridge.stats()["agent_frames_dropped"])["cleared"] == 7


async def test_partial_frame_is_played_padded_after_one_tick(nursery: trio.Nursery) -> None:
    async def script(ws: trio_websocket.WebSocketConnection, hello: dict[str, Any]) -> None:
        await ws.send_message(b"\x07" * 1000)
        await ws.send_message(json.dumps({"type": "event", "event": "sent"}))
        await fake.record(ws)

    fake = await FakeAgent(script).start(nursery)
    bridge = BridgeAgent(fake.url, "s-partial")
    nursery.start_soon(bridge.run)
    await wait_for(lambda: any(e["event"] == "sent" for e in bridge.poll_events()))
    assert bridge.pull(0) is None  # the agent may still complete the frame
    assert bridge.pull(0) == b"\x07" * 1000 + bytes(FRAME_BYTES - 1000)
    assert bridge.pull(0) is None


async def test_turns_and_interruptions_reach_the_agent(nursery: trio.Nursery) -> None:
    async def script(ws: trio_websocket.WebSocketConnection, hello: dict[str, Any]) -> None:
        await fake.record(ws)

    fake = await FakeAgent(script).start(nursery)
    bridge = BridgeAgent(fake.url, "s-turns")
    nursery.start_soon(bridge.run)
    await wait_for(lambda: bridge.connected)
    caller = Caller(bridge)
    await caller.feed([SILENCE] * 10)
    onset = caller.now - 0.1
    bridge.on_turn(SpeechStarted(at=onset, turn=7), caller.now)
    await caller.feed([SILENCE] * 20)
    stop = SpeechStopped(at=caller.now - 0.3, turn=7, duration_ms=300, cut=True)
    bridge.on_turn(stop, caller.now)
    bridge.on_maybe_interrupted(1000, caller.now)
    bridge.on_resumed(caller.now)
    bridge.on_maybe_interrupted(1234, caller.now)
    bridge.on_interrupted(1234, caller.now)

    class SomethingElse:
        at, turn = 0.0, 1

    # not a turn event this protocol knows
    bridge.on_turn(SomethingElse(), caller.now)  # type: ignore[arg-type]
    await wait_for(lambda: len(fake.control()) == 6)
    assert fake.hellos == [
        {
            "type": "hello",
            "protocol": PROTOCOL,
            "session": "s-turns",
            "audio": {"encoding": "pcm16le", "sample_rate": 48_000, "channels": 1, "frame_ms": 20},
            "resume": False,
            "turn": 0,
        }
    ]
    started, stopped, ducked, resumed, ducked_again, interrupted = fake.control()
    assert ducked == {"type": "maybe_interrupted", "played_ms": 1000, "turn": 7}
    assert resumed == {"type": "resumed", "turn": 7}
    assert ducked_again["played_ms"] == 1234
    assert started == {
        "type": "turn",
        "event": "speech_started",
        "turn": 7,
        "at": round(onset, 3),
        "audio_ms": 100,
    }
    assert stopped["event"] == "speech_stopped" and stopped["duration_ms"] == 300
    assert stopped["cut"] is True
    assert stopped["audio_ms"] == 600 - 300
    assert interrupted == {"type": "interrupted", "played_ms": 1234, "turn": 7}
    audio = [m for m in fake.received if isinstance(m, bytes)]
    assert all(len(m) == FRAME_BYTES for m in audio) and len(audio) == 30
    assert bridge.stats()["turn_events_ignored"] == 1


async def test_reconnect_resumes_with_the_turn_counter(nursery: trio.Nursery) -> None:
    async def script(ws: trio_websocket.WebSocketConnection, hello: dict[str, Any]) -> None:
        if len(fake.hellos) == 1:
            await ws.get_message()  # the turn event, then drop the connection
            await ws.aclose(1011, "agent restarting")
        else:
            await fake.record(ws)

    fake = await FakeAgent(script).start(nursery)
    bridge = BridgeAgent(fake.url, "s-resume", rng=random.Random(1))
    nursery.start_soon(bridge.run)
    await wait_for(lambda: bridge.connected)
    bridge.on_turn(SpeechStarted(at=1.0, turn=3), 1.0)
    await wait_for(lambda: len(fake.hellos) == 2)
    await wait_for(lambda: bridge.connected)
    assert fake.hellos[1]["resume"] is True and fake.hellos[1]["turn"] == 3
    events = bridge.poll_events()
    assert [e["event"] for e in events] == [
        "agent_connected",
        "agent_disconnected",
        "agent_connected",
    ]
    assert events[1]["code"] == 1011 and events[2]["resumed"] is True
    assert bridge.stats()["reconnects"] == 1


async def test_session_end_closes_the_agent_connection_normally(nursery: trio.Nursery) -> None:
    async def script(ws: trio_websocket.WebSocketConnection, hello: dict[str, Any]) -> None:
        await fake.record(ws)

    fake = await FakeAgent(script).start(nursery)
    bridge = BridgeAgent(fake.url, "s-end")

    async def session(*, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await bridge.run()

    scope: trio.CancelScope = await nursery.start(session)
    await wait_for(lambda: bridge.connected)
    scope.cancel()
    await wait_for(lambda: fake.close_codes == [1000], within=2)
    assert not bridge.connected


async def test_protocol_version_mismatch(nursery: trio.Nursery) -> None:
    async def script(ws: trio_websocket.WebSocketConnection, hello: dict[str, Any]) -> None:
        await ws.send_message(json.dumps({"type": "hello", "protocol": "parley.agent.v9"}))
        await fake.record(ws)

    fake = await FakeAgent(script, reply_hello=False).start(nursery)
    limits = BridgeLimits(backoff_initial=0.05, backoff_max=0.1)
    bridge = BridgeAgent(fake.url, "s-version", limits=limits)
    nursery.start_soon(bridge.run)

    def refused_twice() -> bool:
        # The fake may see a close before the bridge has counted that handshake failure.
        failures = cast(dict[str, int], bridge.stats()["handshake_failures"])
        return len(fake.close_codes) >= 2 and failures.get("unsupported_protocol", 0) >= 2

    await wait_for(refused_twice)
    assert fake.close_codes[:2] == [1002, 1002]
    error = fake.control()[0]
    assert error["type"] == "error" and error["code"] == "unsupported_protocol"
    assert not bridge.connected
    bridge.on_audio(SILENCE, 0)
    assert bridge.pull(0) is None
    stats = bridge.stats()
    assert cast(dict[str, int], stats["handshake_failures"])["unsupported_protocol"] >= 2
    assert stats["user_frames_dropped"] == {"disconnected": 1} and stats["connects"] == 0


async def test_agent_that_refuses_our_hello(nursery: trio.Nursery) -> None:
    async def script(ws: trio_websocket.WebSocketConnection, hello: dict[str, Any]) -> None:
        await ws.send_message(json.dumps({"type": "error", "code": "unsupported_protocol"}))
        await ws.aclose(1002)

    fake = await FakeAgent(script, reply_hello=False).start(nursery)
    bridge = BridgeAgent(fake.url, "s-refused", limits=BridgeLimits(backoff_initial=0.05))
    nursery.start_soon(bridge.run)
    await wait_for(lambda: bool(bridge.stats()["handshake_failures"]))
    assert set(cast(dict[str, int], bridge.stats()["handshake_failures"])) == {"agent_error"}
    assert not bridge.connected


async def test_no_agent_listening_means_silence_and_retries(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    limits = BridgeLimits(backoff_initial=0.02, backoff_max=0.05)
    bridge = BridgeAgent(f"ws://user:secret@127.0.0.1:{port}/agent?token=t0k3n", "s", limits=limits)
    nursery.start_soon(bridge.run)
    await wait_for(lambda: cast(int, bridge.stats()["connect_failures"]) >= 3)
    bridge.on_audio(SILENCE, 0)
    assert bridge.pull(0) is None
    assert bridge.stats()["agent"] == f"ws://127.0.0.1:{port}/agent"
    assert "secret" not in caplog.text and "t0k3n" not in caplog.text
    # one warning for a streak of failures, not one per attempt
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1


def test_the_bridge_is_an_agent() -> None:
    agent: Agent = BridgeAgent("ws://127.0.0.1:9/agent", "s")  # mypy checks the protocol
    assert agent.interruptible and agent.poll_events() == [] and agent.pull(0) is None
    # one with a task of its own, which the session actor starts beside the media
    running: RunningAgent = BridgeAgent("ws://127.0.0.1:9/agent", "s")
    assert isinstance(agent, RunningAgent) and isinstance(running, RunningAgent)
    assert not BridgeAgent("ws://127.0.0.1:9/agent", "s", interruptible=False).interruptible
    assert isinstance(agent, DuckAwareAgent)  # told of ducks (maybe_interrupted, resumed)


def test_agent_url_must_be_a_websocket_url() -> None:
    for url in ("http://127.0.0.1/agent", "ws:///agent", "127.0.0.1:9000"):
        with pytest.raises(ValueError, match="ws://"):
            BridgeAgent(url, "s")
    with pytest.raises(ValueError, match="1920"):
        BridgeAgent("ws://127.0.0.1/agent", "s").on_audio(b"\0" * 100, 0)


async def test_user_audio_is_dropped_not_queued_when_the_agent_stops_reading(
    nursery: trio.Nursery,
) -> None:
    async def script(ws: trio_websocket.WebSocketConnection, hello: dict[str, Any]) -> None:
        if len(fake.hellos) == 1:
            await trio.sleep_forever()  # never reads again: TCP backs up
        await fake.record(ws)

    fake = await FakeAgent(script).start(nursery)
    bridge = BridgeAgent(fake.url, "s-slow", limits=BridgeLimits(close_timeout=0.2))
    nursery.start_soon(bridge.run)
    await wait_for(lambda: bridge.connected)
    frame = b"\x11" * FRAME_BYTES
    for _ in range(10_000):  # 200 s of audio, as fast as the loop goes (on_audio never waits)
        bridge.on_audio(frame, 0)
        await trio.lowlevel.checkpoint()
    stats = bridge.stats()
    dropped = cast(dict[str, int], stats["user_frames_dropped"])
    assert dropped["backpressure"] > 0
    assert cast(int, stats["user_frames_sent"]) + dropped["backpressure"] <= 10_000
    # control messages are never dropped: when even they cannot be queued, the link is
    # replaced by a fresh one
    for turn in range(1, 101):
        bridge.on_turn(SpeechStarted(at=0.0, turn=turn), 0.0)
    await wait_for(lambda: len(fake.hellos) == 2 and bridge.connected)
    assert bridge.stats()["stalls"] == 1
    assert fake.hellos[1]["resume"] is True and fake.hellos[1]["turn"] == 100


# --- hostile agents -------------------------------------------------------------------------------

KNOWN_TYPES = {"event", "clear", "error", "hello"}


def _typed_object(text: str) -> bool:
    try:
        value = json.loads(text, parse_constant=float)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and isinstance(value.get("type"), str)


# (message, malformed?) pairs
_malformed_texts = st.one_of(
    st.text(max_size=40).filter(lambda t: not _typed_object(t)),
    st.sampled_from(
        [
            "[1, 2]",
            '"event"',
            "{}",
            '{"type": 5}',
            '{"type": "event", "event": "x", "v": NaN}',
            '{"type": "event"}',
            '{"type": "event", "event": "Upper"}',
            '{"type": "event", "event": "has space"}',
            '{"type": "event", "event": "agent_connected"}',
            '{"type": "hello", "protocol": "parley.agent.v1"}',
            "x" * 2000,  # beyond max_text_chars in this test
        ]
    ),
    st.text(min_size=1, max_size=20)
    .filter(lambda t: t not in KNOWN_TYPES)
    .map(lambda t: json.dumps({"type": t})),
)
_hostile_messages = st.one_of(
    _malformed_texts.map(lambda m: (m, True)),
    st.binary(min_size=1, max_size=3001).filter(lambda b: len(b) % 2 == 1).map(lambda b: (b, True)),
    st.binary(max_size=3000).map(lambda b: (b[: len(b) // 2 * 2], False)),
    st.builds(
        lambda name, n: json.dumps({"type": "event", "event": name, "n": n}),
        st.sampled_from(["agent_started", "thinking", "tool.call-1"]),
        st.integers(),
    ).map(lambda m: (m, False)),
    st.just((json.dumps({"type": "clear"}), False)),
)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(st.lists(_hostile_messages, min_size=1, max_size=12))
async def test_malformed_agent_messages_are_counted_and_dropped(
    messages: list[tuple[str | bytes, bool]],
) -> None:
    async def script(ws: trio_websocket.WebSocketConnection, hello: dict[str, Any]) -> None:
        for message, _ in messages:
            await ws.send_message(message)
        await ws.send_message(json.dumps({"type": "event", "event": "probe_done"}))
        await checked.wait()
        await ws.aclose()  # hanging up first makes the bridge's teardown instant

    checked = trio.Event()

    async with trio.open_nursery() as nursery:
        fake = await FakeAgent(script).start(nursery)
        bridge = BridgeAgent(fake.url, "s-hostile", limits=BridgeLimits(max_text_chars=1024))
        nursery.start_soon(bridge.run)
        events: list[dict[str, Any]] = []

        def done() -> bool:
            events.extend(bridge.poll_events())
            return any(e["event"] == "probe_done" for e in events)

        await wait_for(done, within=5)
        stats = bridge.stats()
        malformed = cast(dict[str, int], stats["malformed"])
        assert sum(malformed.values()) == sum(bad for _, bad in messages), malformed
        forwarded = [e for e in events if e["event"] not in ("agent_connected", "probe_done")]
        expected = [json.loads(m) for m, bad in messages if not bad and isinstance(m, str)]
        assert forwarded == [
            {k: v for k, v in m.items() if k != "type"} for m in expected if m["type"] == "event"
        ]
        assert stats["connected"] is True and stats["internal_errors"] == 0
        assert fake.close_codes == []  # malformed messages never cost the connection
        checked.set()
        await wait_for(lambda: not bridge.connected)
        nursery.cancel_scope.cancel()


def test_wire_messages_without_a_socket() -> None:
    """The wire protocol is plain values: what the bridge sends and how it reads replies."""
    assert json.loads(wire.hello("s", resume=True, turn=4)) == {
        "type": "hello",
        "protocol": PROTOCOL,
        "session": "s",
        "audio": {"encoding": "pcm16le", "sample_rate": 48_000, "channels": 1, "frame_ms": 20},
        "resume": True,
        "turn": 4,
    }
    stopped = SpeechStopped(at=1.23456, turn=2, duration_ms=480, cut=True)
    assert wire.turn(stopped, audio_ms=700) == {
        "type": "turn",
        "event": "speech_stopped",
        "turn": 2,
        "at": 1.235,
        "audio_ms": 700,
        "duration_ms": 480,
        "cut": True,
    }
    assert "duration_ms" not in wire.turn(SpeechStarted(at=1.0, turn=3), audio_ms=0)
    assert wire.interrupted(-5, turn=3) == {"type": "interrupted", "played_ms": 0, "turn": 3}
    wire.check_hello(json.dumps({"type": "hello", "protocol": PROTOCOL}))
    for reply, reason in (
        (b"\0", "bad_hello"),
        ("[]", "bad_hello"),
        ('{"type": "error", "code": "busy"}', "agent_error"),
        ('{"type": "turn"}', "bad_hello"),
        ('{"type": "hello", "protocol": "parley.agent.v0"}', "unsupported_protocol"),
    ):
        with pytest.raises(wire.HandshakeFailed) as failed:
            wire.check_hello(reply)
        assert failed.value.reason == reason
    parsed = [
        wire.parse(text, max_chars=64)
        for text in (
            '{"type": "event", "event": "mood", "level": 3}',
            '{"type": "clear"}',
            '{"type": "error", "code": 7}',
            '{"type": "event", "event": "speech_started"}',
            '{"type": "event", "event": "Bad Name"}',
            '{"type": "hello"}',
            '{"type": "nope"}',
            "{}",
            "NaN",
            "[1]",
            " " * 65,
        )
    ]
    assert parsed == [
        wire.AgentEvent("mood", {"level": 3}),
        wire.Clear(),
        wire.AgentError("unknown"),
        wire.Malformed("reserved_event"),
        wire.Malformed("bad_event"),
        wire.Malformed("unexpected_hello"),
        wire.Malformed("unknown_type"),
        wire.Malformed("no_type"),
        wire.Malformed("bad_json"),
        wire.Malformed("not_an_object"),
        wire.Malformed("too_large"),
    ]
