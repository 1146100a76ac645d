#!/usr/bin/env python3
"""An example Parley agent: it listens to each user turn and, when the turn ends, says it back.

A Parley node connects to this program over a WebSocket, once per voice session, and speaks
protocol ``parley.agent.v2`` (docs/agent-protocol.md): the user's voice arrives as binary
messages of 48 kHz mono 16-bit PCM, turn events and interruptions as JSON text; what this
program sends back as binary is played to the user.

A conversation outlives the connection that carries it: when the node reconnects (``resume``)
or the session moves to another node (which connects and says ``session_moved``), the
conversation goes on where it was — the reply being spoken included, from the point the user
stopped hearing it.

Copy this file to plug in your own model. The places marked ``MODEL:`` are where speech
recognition, a language model and speech synthesis would go; everything else (the handshake,
pacing replies, stopping them when the user barges in, following moves) is what any agent needs.

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

PROTOCOL = "parley.agent.v2"
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
#: a conversation whose node went away without ending it waits this long for it to come back
KEEP_SECONDS = 60.0
#: WebSocket close code of a node whose session is over (anything else: it may come back)
CLOSE_SESSION_OVER = 1000


class Connection:
    """One WebSocket from a node. Only :meth:`write` writes to it; everything else queues, so a
    reply can be cancelled at any moment without cutting a WebSocket frame in half."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.send, self._queue = trio.open_memory_channel[tuple[int | None, str | bytes]](32)
        #: where this connection's user audio starts in the conversation's, in ms: its
        #: ``audio_ms`` positions count from there
        self.audio_base_ms = 0

    async def write(self, conversation: Conversation) -> None:
        try:
            async for generation, message in self._queue:
                # Audio of an abandoned reply (an older generation) is never sent.
                if generation is None or generation == conversation.generation:
                    await self.ws.send_message(message)
        except trio_websocket.ConnectionClosed:
            pass  # the reader sees it too


class Reply:
    """A reply being spoken: its audio and how much of it went out.

    ``base`` is the position of the reply at which the current connection's count of heard
    audio started (the node counts from its last ``clear``, or from the connection's start);
    ``previous_base`` is that of the connection before, which ``session_moved`` reports on.
    """

    def __init__(self, turn: int, pcm: bytes) -> None:
        self.turn = turn
        self.pcm = pcm
        self.pos = 0
        self.base = 0
        self.previous_base = 0
        self.scope = trio.CancelScope()
        self.done = False


class Conversation:
    """One session: what the user said and the reply being spoken, across connections."""

    def __init__(self, session: str, nursery: trio.Nursery) -> None:
        self.session = session
        self.nursery = nursery  # the server's: replies outlive connections
        self.connection: Connection | None = None
        self.connected = trio.Event()
        self.generation = 0  # bumped whenever a reply is abandoned or rewound
        self._history = bytearray()  # the user's recent audio ...
        self._history_start = 0  # ... and where it starts in the stream, in bytes
        self._turn_start: tuple[int, int] | None = None  # (turn, where its audio starts in ms)
        self.reply: Reply | None = None

    def attach(self, connection: Connection) -> None:
        """A (new) connection carries the conversation from now on."""
        connection.audio_base_ms = (self._history_start + len(self._history)) // BYTES_PER_MS
        self.connection = connection
        self.connected.set()
        if self.reply is not None:
            # The new connection counts what the user hears from here.
            self.reply.previous_base, self.reply.base = self.reply.base, self.reply.pos

    def detach(self, connection: Connection) -> None:
        if self.connection is connection:
            self.connection = None
            self.connected = trio.Event()

    async def queue(self, message: str | bytes, generation: int | None = None) -> None:
        """Queue a message on the current connection (waiting for one if there is none)."""
        while self.connection is None:
            await self.connected.wait()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.connection.send.send((generation, message))

    # --- what the node says ---------------------------------------------------------------

    def hear(self, pcm: bytes) -> None:
        """User audio: a whole number of 20 ms frames, in order, with no gaps but lost ones."""
        # MODEL: a streaming speech recogniser would be fed here, frame by frame.
        self._history += pcm
        excess = len(self._history) - HISTORY_MS * BYTES_PER_MS
        if excess > 5_000 * BYTES_PER_MS:  # trim in big steps: cheap
            del self._history[:excess]
            self._history_start += excess

    async def on_text(self, text: str, connection: Connection) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            log.warning("node sent bad JSON")
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "turn":
            await self._on_turn(message, connection)
        elif kind == "interrupted":
            # The user spoke over the reply; ``played_ms`` of it reached their ears.
            # MODEL: cut the assistant's last message in the history to what was heard.
            await self._stop_reply(interrupted=True, played_ms=message.get("played_ms"))
        elif kind == "session_moved":
            log.info(
                "session %s moved from %s to %s",
                self.session,
                message.get("from_node"),
                message.get("to_node"),
            )
            await self._rewind(message.get("played_ms"))
        elif kind == "error":
            log.warning("node reported an error: %s", message.get("code"))
        # Anything else is from a newer protocol revision: ignore it.

    async def _on_turn(self, message: dict[str, Any], connection: Connection) -> None:
        turn, audio_ms = message.get("turn"), message.get("audio_ms")
        if not isinstance(turn, int) or not isinstance(audio_ms, int):
            return
        # audio_ms counts the audio of the connection it came on; our history spans them all.
        at_ms = connection.audio_base_ms + audio_ms
        if message.get("event") == "speech_started":
            self._turn_start = (turn, max(0, at_ms - PREROLL_MS))
        elif message.get("event") == "speech_stopped":
            if self._turn_start is not None and self._turn_start[0] == turn:
                start_ms = self._turn_start[1]
            else:  # its start was on a previous connection: go by its duration
                duration = message.get("duration_ms")
                spoken = duration if isinstance(duration, int) else 0
                start_ms = max(0, at_ms - spoken - PREROLL_MS)
            self._turn_start = None
            pcm = self._audio(start_ms, at_ms)
            # MODEL: transcribe ``pcm`` (or finish the streaming transcript), ask the language
            # model, and synthesize its answer. The echo answer is the user's own voice.
            answer = pcm
            await self._stop_reply(interrupted=False)  # a new turn supersedes the old reply
            # A clear before every reply: the node counts what the user heard from here.
            await self.queue(json.dumps({"type": "clear"}))
            self.reply = Reply(turn, answer)
            self.nursery.start_soon(self._speak, self.reply, True)

    def _audio(self, start_ms: int, end_ms: int) -> bytes:
        start = max(0, start_ms * BYTES_PER_MS - self._history_start)
        end = max(start, end_ms * BYTES_PER_MS - self._history_start)
        return bytes(self._history[start:end])

    # --- what we say ----------------------------------------------------------------------

    async def _speak(self, reply: Reply, announce: bool) -> None:
        """Stream a reply from where it stands, paced to real time plus a small lead (as a
        streaming TTS would)."""
        generation = self.generation
        with reply.scope:
            if announce:
                await self._event("agent_started", turn=reply.turn)
            began, first = trio.current_time(), reply.pos
            while reply.pos < len(reply.pcm):
                # MODEL: a streaming synthesiser yields its audio here, chunk by chunk; any
                # even number of bytes per message works, whole 20 ms frames work best.
                ahead_ms = (reply.pos - first) / BYTES_PER_MS - LEAD_MS
                await trio.sleep_until(began + ahead_ms / 1000)
                chunk = reply.pcm[reply.pos : reply.pos + FRAME_BYTES]
                await self.queue(chunk, generation)
                reply.pos += len(chunk)
            reply.done = True
            await self._event("agent_finished", turn=reply.turn)

    async def _rewind(self, played_ms: object) -> None:
        """After a move: go back to what the user heard, and speak the rest again."""
        reply = self.reply
        if reply is None or not isinstance(played_ms, int):
            return
        heard = reply.previous_base + played_ms * BYTES_PER_MS
        heard -= heard % FRAME_BYTES
        if heard >= reply.pos:
            return  # everything sent was heard
        was_done = reply.done
        reply.scope.cancel()
        self.generation += 1  # what is still queued from before is stale
        await self.queue(json.dumps({"type": "clear"}))
        reply.pos = reply.base = heard
        reply.scope, reply.done = trio.CancelScope(), False
        # Only a reply that had finished announces itself again.
        self.nursery.start_soon(self._speak, reply, was_done)

    async def _stop_reply(self, *, interrupted: bool, played_ms: object = None) -> None:
        """Abandon the reply being spoken (if any) and tell the node to drop what it queued."""
        reply, self.reply = self.reply, None
        speaking = reply is not None and not reply.done
        if reply is not None:
            reply.scope.cancel()
        self.generation += 1
        if speaking or interrupted:
            # The node waits for this clear after an interruption: audio before it is stale.
            await self.queue(json.dumps({"type": "clear"}))
        if speaking and reply is not None:
            await self._event(
                "agent_finished", turn=reply.turn, interrupted=True, played_ms=played_ms
            )

    async def _event(self, name: str, **fields: object) -> None:
        """An event for the node to forward to the client (``agent_started``, ...)."""
        await self.queue(json.dumps({"type": "event", "event": name, **fields}))


class Conversations:
    """The conversations of this server, by session id."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self._by_session: dict[str, Conversation] = {}

    def join(self, session: str, *, resume: bool) -> Conversation:
        """The session's conversation: the one it had if it resumes, else a new one."""
        conversation = self._by_session.get(session) if resume else None
        if conversation is None:
            conversation = Conversation(session, self.nursery)
            self._by_session[session] = conversation
        return conversation

    def left(self, conversation: Conversation, close_code: int | None) -> None:
        """A connection of ``conversation`` closed with ``close_code``."""
        if conversation.connection is not None:
            return  # another connection carries it (the session moved)
        if close_code == CLOSE_SESSION_OVER:
            self._forget(conversation)
        else:
            self.nursery.start_soon(self._forget_later, conversation)

    async def _forget_later(self, conversation: Conversation) -> None:
        await trio.sleep(KEEP_SECONDS)
        if conversation.connection is None:
            self._forget(conversation)

    def _forget(self, conversation: Conversation) -> None:
        if self._by_session.get(conversation.session) is conversation:
            del self._by_session[conversation.session]
        if conversation.reply is not None:
            conversation.reply.scope.cancel()


async def handle(
    request: trio_websocket.WebSocketRequest, *, path: str, conversations: Conversations
) -> None:
    """One connection from a node: hello, then the conversation until the node hangs up."""
    if request.path.split("?", 1)[0] != path:
        await request.reject(404)
        return
    ws = await request.accept()
    try:
        hello = await _hello(ws)
        if hello is None:
            return
        session, resume = hello
        conversation = conversations.join(session, resume=resume)
        log.info("session %s connected (resume: %s)", session, resume)
        connection = Connection(ws)
        conversation.attach(connection)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connection.write, conversation)
                with contextlib.suppress(trio_websocket.ConnectionClosed):
                    while True:
                        message = await ws.get_message()
                        if isinstance(message, bytes):
                            conversation.hear(message)
                        else:
                            await conversation.on_text(message, connection)
                nursery.cancel_scope.cancel()
        finally:
            conversation.detach(connection)
            code = None if ws.closed is None else ws.closed.code
            conversations.left(conversation, code)
        # 1000: the session is over. Anything else: the node (or another) may come back.
        log.info("session %s disconnected: %s", session, ws.closed)
    except trio_websocket.ConnectionClosed as exc:
        log.info("connection closed during hello: %s", exc.reason)
    except Exception:
        # One broken conversation must not take the server down with it.
        log.exception("conversation failed")
        with trio.move_on_after(1):
            await ws.aclose(1011, "internal error")


async def _hello(ws: trio_websocket.WebSocketConnection) -> tuple[str, bool] | None:
    """Check the node's hello and answer it: ``(session, resume)``, or ``None`` if we cannot
    talk to this node."""
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
        # reconnected, or moved to another node (``hello["turn"]`` is its last turn): its
        # conversation goes on.
        await ws.send_message(json.dumps({"type": "hello", "protocol": PROTOCOL}))
        return str(hello.get("session")), hello.get("resume") is True
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
        conversations = Conversations(nursery)
        server: trio_websocket.WebSocketServer = await nursery.start(
            partial(
                trio_websocket.serve_websocket,
                partial(handle, path=path, conversations=conversations),
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
