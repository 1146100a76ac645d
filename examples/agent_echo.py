#!/usr/bin/env python3
"""An example Parley agent: it listens to each user turn and, when the turn ends, says it back.

A Parley node connects to this program over a WebSocket, once per voice session, and speaks
protocol ``parley.agent.v1`` (docs/agent-protocol.md): the user's voice arrives as binary
messages of 48 kHz mono 16-bit PCM, turn events and interruptions as JSON text; what this
program sends back as binary is played to the user.

Copy this file to plug in your own model. The places marked ``MODEL:`` are where speech
recognition, a language model and speech synthesis would go; everything else (the handshake,
pacing replies, stopping them when the user barges in) is what any agent needs.

Run it, then point a session's agent at its URL::

    python examples/agent_echo.py --port 9000      # ws://127.0.0.1:9000/agent

It needs only ``trio`` and ``trio-websocket``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from functools import partial
from typing import Any

import trio
import trio_websocket

log = logging.getLogger("agent_echo")

PROTOCOL = "parley.agent.v1"
SAMPLE_RATE = 48_000
BYTES_PER_MS = SAMPLE_RATE * 2 // 1000  # mono int16: 96 bytes per millisecond
FRAME_MS = 20
FRAME_BYTES = FRAME_MS * BYTES_PER_MS

#: speech_started comes a little after the user starts speaking: keep this much before it
PREROLL_MS = 200
#: user audio kept in memory, which bounds how long a turn can be
HISTORY_MS = 30_000
#: replies are streamed at most this far ahead of real time, so that stopping one is cheap
LEAD_MS = 200
HELLO_TIMEOUT = 10.0


class Conversation:
    """One session's connection: what the user said, and the reply being spoken.

    Only :meth:`_write` writes to the socket; everything else queues messages for it. A reply
    can then be cancelled at any moment without cutting a WebSocket frame in half, and audio
    still queued from a cancelled reply is recognised by its generation and never sent.
    """

    def __init__(self, ws: trio_websocket.WebSocketConnection, session: str) -> None:
        self.ws = ws
        self.session = session
        self._send, self._queue = trio.open_memory_channel[tuple[int | None, str | bytes]](32)
        self._generation = 0  # bumped whenever a reply is abandoned
        self._history = bytearray()  # the user's recent audio ...
        self._history_start = 0  # ... and where it starts in the stream, in bytes
        self._turn_start: tuple[int, int] | None = None  # (turn, where its audio starts in ms)
        self._reply: trio.CancelScope | None = None  # the reply being spoken ...
        self._reply_turn = 0  # ... and the turn it answers

    async def run(self) -> None:
        """Until the node hangs up."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write)
            try:
                while True:
                    message = await self.ws.get_message()
                    if isinstance(message, bytes):
                        self._hear(message)
                    else:
                        await self._on_text(message, nursery)
            except trio_websocket.ConnectionClosed:
                pass
            nursery.cancel_scope.cancel()

    # --- what the node says ---------------------------------------------------------------

    def _hear(self, pcm: bytes) -> None:
        """User audio: a whole number of 20 ms frames, in order, with no gaps but lost ones."""
        # MODEL: a streaming speech recogniser would be fed here, frame by frame.
        self._history += pcm
        excess = len(self._history) - HISTORY_MS * BYTES_PER_MS
        if excess > 5_000 * BYTES_PER_MS:  # trim in big steps: cheap
            del self._history[:excess]
            self._history_start += excess

    async def _on_text(self, text: str, nursery: trio.Nursery) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            log.warning("node sent bad JSON")
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "turn":
            await self._on_turn(message, nursery)
        elif kind == "interrupted":
            # The user spoke over the reply; ``played_ms`` of it reached their ears.
            # MODEL: cut the assistant's last message in the history to what was heard.
            await self._stop_reply(interrupted=True, played_ms=message.get("played_ms"))
        elif kind == "error":
            log.warning("node reported an error: %s", message.get("code"))
        # Anything else is from a newer protocol revision: ignore it.

    async def _on_turn(self, message: dict[str, Any], nursery: trio.Nursery) -> None:
        turn, audio_ms = message.get("turn"), message.get("audio_ms")
        if not isinstance(turn, int) or not isinstance(audio_ms, int):
            return
        if message.get("event") == "speech_started":
            self._turn_start = (turn, max(0, audio_ms - PREROLL_MS))
        elif message.get("event") == "speech_stopped":
            if self._turn_start is not None and self._turn_start[0] == turn:
                start_ms = self._turn_start[1]
            else:  # its start was on a previous connection: go by its duration
                duration = message.get("duration_ms")
                spoken = duration if isinstance(duration, int) else 0
                start_ms = max(0, audio_ms - spoken - PREROLL_MS)
            self._turn_start = None
            pcm = self._audio(start_ms, audio_ms)
            # MODEL: transcribe ``pcm`` (or finish the streaming transcript), ask the language
            # model, and synthesize its answer. The echo answer is the user's own voice.
            answer = pcm
            await self._stop_reply(interrupted=False)  # a new turn supersedes the old reply
            scope = trio.CancelScope()
            self._reply, self._reply_turn = scope, turn
            nursery.start_soon(self._speak, scope, turn, answer, self._generation)

    def _audio(self, start_ms: int, end_ms: int) -> bytes:
        start = max(0, start_ms * BYTES_PER_MS - self._history_start)
        end = max(start, end_ms * BYTES_PER_MS - self._history_start)
        return bytes(self._history[start:end])

    # --- what we say ----------------------------------------------------------------------

    async def _speak(self, scope: trio.CancelScope, turn: int, pcm: bytes, generation: int) -> None:
        """Stream one reply, paced to real time plus a small lead (as a streaming TTS would)."""
        with scope:
            await self._event("agent_started", turn=turn)
            began = trio.current_time()
            for offset in range(0, len(pcm), FRAME_BYTES):
                # MODEL: a streaming synthesiser yields its audio here, chunk by chunk; any
                # even number of bytes per message works, whole 20 ms frames work best.
                await trio.sleep_until(began + (offset / BYTES_PER_MS - LEAD_MS) / 1000)
                await self._send.send((generation, pcm[offset : offset + FRAME_BYTES]))
            await self._event("agent_finished", turn=turn)
        if self._reply is scope:
            self._reply = None

    async def _stop_reply(self, *, interrupted: bool, played_ms: object = None) -> None:
        """Abandon the reply being spoken (if any) and tell the node to drop what it queued."""
        speaking = self._reply is not None
        if self._reply is not None:
            self._reply.cancel()
            self._reply = None
        self._generation += 1
        if speaking or interrupted:
            # The node waits for this clear after an interruption: audio before it is stale.
            await self._send.send((None, json.dumps({"type": "clear"})))
        if speaking:
            await self._event(
                "agent_finished", turn=self._reply_turn, interrupted=True, played_ms=played_ms
            )

    async def _event(self, name: str, **fields: object) -> None:
        """An event for the node to forward to the client (``agent_started``, ...)."""
        await self._send.send((None, json.dumps({"type": "event", "event": name, **fields})))

    async def _write(self) -> None:
        try:
            async for generation, message in self._queue:
                if generation is None or generation == self._generation:
                    await self.ws.send_message(message)
        except trio_websocket.ConnectionClosed:
            pass  # the reader sees it too, and ends the conversation


async def handle(request: trio_websocket.WebSocketRequest, *, path: str) -> None:
    """One connection from a node: hello, then the conversation until the node hangs up."""
    if request.path.split("?", 1)[0] != path:
        await request.reject(404)
        return
    ws = await request.accept()
    try:
        session = await _hello(ws)
        if session is None:
            return
        log.info("session %s connected", session)
        await Conversation(ws, session).run()
        # 1000: the session is over. Anything else: the node may come back with resume: true.
        log.info("session %s disconnected: %s", session, ws.closed)
    except trio_websocket.ConnectionClosed as exc:
        log.info("connection closed during hello: %s", exc.reason)
    except Exception:
        # One broken conversation must not take the server down with it.
        log.exception("conversation failed")
        with trio.move_on_after(1):
            await ws.aclose(1011, "internal error")


async def _hello(ws: trio_websocket.WebSocketConnection) -> str | None:
    """Check the node's hello and answer it; ``None`` if we cannot talk to this node."""
    with trio.move_on_after(HELLO_TIMEOUT):
        first = await ws.get_message()
        try:
            hello = json.loads(first) if isinstance(first, str) else None
        except ValueError:
            hello = None
        if not isinstance(hello, dict) or hello.get("type") != "hello":
            await _refuse(ws, "bad_hello", "the first message must be a hello")
            return None
        if hello.get("protocol") != PROTOCOL:
            await _refuse(ws, "unsupported_protocol", f"this agent speaks {PROTOCOL}")
            return None
        audio = hello.get("audio")
        if not isinstance(audio, dict) or (
            audio.get("encoding"),
            audio.get("sample_rate"),
            audio.get("channels"),
        ) != ("pcm16le", SAMPLE_RATE, 1):
            await _refuse(ws, "unsupported_audio", "this agent takes 48 kHz mono pcm16le")
            return None
        # MODEL: with ``hello["resume"]`` true this session was here before and has just
        # reconnected (``hello["turn"]`` is its last turn): pick its conversation back up.
        await ws.send_message(json.dumps({"type": "hello", "protocol": PROTOCOL}))
        return str(hello.get("session"))
    await ws.aclose(1002, "no hello")
    return None


async def _refuse(ws: trio_websocket.WebSocketConnection, code: str, message: str) -> None:
    await ws.send_message(json.dumps({"type": "error", "code": code, "message": message}))
    await ws.aclose(1002, code)


async def serve(
    host: str = "127.0.0.1",
    port: int = 9000,
    *,
    path: str = "/agent",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve agents on ``ws://host:port/path`` until cancelled; reports the bound port."""
    async with trio.open_nursery() as nursery:
        server: trio_websocket.WebSocketServer = await nursery.start(
            partial(
                trio_websocket.serve_websocket,
                partial(handle, path=path),
                host,
                port,
                None,
                max_message_size=1 << 20,
            )
        )
        task_status.started(server.port)


async def _main(host: str, port: int, path: str) -> None:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(partial(serve, host, port, path=path))
        print(f"echo agent listening on ws://{host}:{bound}{path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A Parley agent that echoes each user turn.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9000, help="port (0: any free one)")
    parser.add_argument("--path", default="/agent", help="URL path to serve")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C stops it
        trio.run(_main, args.host, args.port, args.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
