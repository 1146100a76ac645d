"""The bridge agent: a voice session's agent that lives in another program, over a WebSocket.

The session core drives :class:`BridgeAgent` like any other agent, synchronously and every 20 ms:
:meth:`~BridgeAgent.on_audio` with each frame of the user's voice, :meth:`~BridgeAgent.pull` for
the next frame to play, :meth:`~BridgeAgent.on_turn` and :meth:`~BridgeAgent.on_interrupted`
when the user starts or stops speaking or barges in, and :meth:`~BridgeAgent.poll_events` for
events to forward to the client. None of these ever waits: they only move data between the
session and bounded queues.

:meth:`BridgeAgent.run`, started by the session actor in its nursery, is the asynchronous side:
it connects to the agent's URL, says hello (``parley.agent.v2``, see ``docs/agent-protocol.md``;
the messages are in :mod:`sessions.agents.wire`), and pumps both directions until the connection
ends, then reconnects with exponential backoff for as long as the session lives. Nothing the
agent does can raise into the session: a dropped connection means silence and a reconnect, a
malformed message is counted and dropped.

Bounds, so that a slow or hostile agent costs a session a fixed amount of memory and never a
late media tick:

* user audio to the agent waits in a queue of a few frames; when the socket has not taken a
  frame for longer than :attr:`BridgeLimits.stall_ms`, or the queue is full, new frames are
  dropped and counted (the 20 ms loop never waits for the network);
* agent audio waits for playout in a queue of :attr:`BridgeLimits.max_playout_ms` (30 s);
  what does not fit is dropped and counted;
* control messages to the agent (turns, interruptions) are never dropped: when even they cannot
  be queued the link is declared stalled, closed, and a fresh one is opened;
* events for the client wait in a queue of :attr:`BridgeLimits.max_events`.

PCM is never logged, and neither is the agent URL's query string (it may carry a token).

Moves. The bridge is a :class:`~sessions.agents.StatefulAgent` and a
:class:`~sessions.agents.MoveAwareAgent`: in a planned move the old node's bridge saves the turn
count and how much of the agent's audio on its connection the user heard, and, handed off,
closes its connection with 1001 ("session moved") instead of 1000; the new node's bridge loads
that state, says a resuming hello and then ``session_moved``, so that the agent keeps one
conversation and can send again what the user did not hear.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import random
import urllib.parse
from collections.abc import Sequence
from typing import Any, Final, final

import trio
import trio_websocket

from sessions.agents import wire
from sessions.agents.echo import FRAME_BYTES
from sessions.agents.links import BridgeLimits, Link, redact_url
from sessions.agents.wire import FRAME_MS, PROTOCOL
from sessions.turns import SpeechStopped, TurnEvent

__all__ = ["FRAME_MS", "PROTOCOL", "BridgeAgent", "BridgeLimits"]

log = logging.getLogger("parley.agent")

#: a connection that lived this long resets the reconnect backoff
_STABLE_SECONDS: Final = 1.0
#: room in the outgoing queue for control messages, on top of the audio backlog
_CONTROL_ROOM: Final = 64


@final
class BridgeAgent:
    """An agent reached over a WebSocket (``parley.agent.v2``), reconnecting as needed.

    ``url`` is the agent's ``ws://`` or ``wss://`` URL; ``headers`` are extra HTTP headers for
    the WebSocket handshake (an ``Authorization`` header, say). A session restored from a
    checkpoint passes ``resume_turn`` (the last turn it knew of) so that its first hello already
    says ``resume``. ``interruptible=False`` makes the session let the agent talk over the user
    (no barge-in). The sync side (:meth:`on_audio`, :meth:`on_turn`, :meth:`on_interrupted`,
    :meth:`pull`, :meth:`poll_events`, :meth:`stats`) must be called from the Trio thread that
    runs :meth:`run`.
    """

    def __init__(
        self,
        url: str,
        session_id: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        limits: BridgeLimits | None = None,
        resume_turn: int | None = None,
        interruptible: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError("the agent URL must be ws:// or wss:// with a host")
        self.url: Final = url
        self.session_id: Final = session_id
        self.limits: Final = BridgeLimits() if limits is None else limits
        #: the URL as logs and stats show it: no credentials, no query string
        self.display_url: Final = redact_url(parts)
        #: whether the user talking over the agent stops it (barge-in, ``on_interrupted``)
        self.interruptible: Final = interruptible
        self._headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        self._rng = random.Random() if rng is None else rng
        self._turn = 0 if resume_turn is None else resume_turn
        self._resume = resume_turn is not None
        self._link: Link | None = None
        # agent audio, re-framed: whole frames, then the bytes of a frame still incomplete
        self._playout: collections.deque[bytes] = collections.deque()
        self._partial = bytearray()
        self._partial_waited = False  # a pull already found only the partial frame
        self._max_frames = max(1, self.limits.max_playout_ms // FRAME_MS)
        # A planned move: what the new node says after its hello, and how the old one closes.
        self._move: dict[str, Any] | None = None
        self._moved_played_ms: int | None = None
        self._moved_out = False
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        self._failure_streak = 0
        self._up_at: float | None = None  # when the current link said hello
        self._counts: collections.Counter[str] = collections.Counter()
        self._user_dropped: collections.Counter[str] = collections.Counter()
        self._agent_dropped: collections.Counter[str] = collections.Counter()
        self._malformed: collections.Counter[str] = collections.Counter()
        self._handshake_failures: collections.Counter[str] = collections.Counter()

    # --- sync side: called by the session core, never waits ----------------------------------

    @property
    def connected(self) -> bool:
        """Whether an agent is connected and has said hello."""
        return self._live() is not None

    def _live(self) -> Link | None:
        """The current link, unless it is being torn down."""
        link = self._link
        return link if link is not None and link.reason is None else None

    def on_audio(self, pcm: bytes, now: float) -> None:
        """One 20 ms frame of the user's voice: queued for the agent, or dropped and counted."""
        if len(pcm) != FRAME_BYTES:
            # The transceiver always hands out whole frames: anything else is a local bug.
            raise ValueError(f"a frame is {FRAME_BYTES} bytes of PCM, got {len(pcm)}")
        link = self._live()
        if link is None:
            self._user_dropped["disconnected"] += 1
            return
        stalled = (
            link.send_started is not None
            and (trio.current_time() - link.send_started) * 1000 > self.limits.stall_ms
        )
        if stalled or link.audio_backlog >= self.limits.send_backlog_frames:
            self._user_dropped["backpressure"] += 1
            return
        try:
            link.outgoing.send_nowait(bytes(pcm))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self._user_dropped["backpressure"] += 1
            return
        link.audio_backlog += 1
        link.audio_frames += 1

    def on_turn(self, event: TurnEvent, now: float) -> None:
        """A turn event from the voice loop (``SpeechStarted`` or ``SpeechStopped``); anything
        else is counted as ignored."""
        if type(event) not in wire.TURN_EVENTS:
            self._counts["turn_events_ignored"] += 1
            return
        self._turn = max(self._turn, event.turn)
        link = self._live()
        if link is None:
            self._counts["turn_events_unsent"] += 1
            return
        # Where the event falls in the audio this connection carried: what was queued before
        # this message, less how long ago the event happened.
        lag_ms = max(0.0, (now - event.at) * 1000)
        audio_ms = max(0, round(link.audio_frames * FRAME_MS - lag_ms))
        if isinstance(event, SpeechStopped):
            # A compliant agent answered the interruption with a clear long ago; one that did
            # not gets its new reply played anyway.
            link.discarding = False
        self._send_control(link, wire.turn(event, audio_ms=audio_ms))

    def on_interrupted(self, played_ms: int, now: float) -> None:
        """The user barged in: the core dropped the agent audio it held; so do we, and we tell
        the agent how much of its reply (``played_ms``) the user actually heard."""
        self._drop_playout("interrupted")
        link = self._live()
        if link is None:
            return
        link.discarding = True
        self._send_control(link, wire.interrupted(played_ms, turn=self._turn))

    def on_maybe_interrupted(self, played_ms: int, now: float) -> None:
        """The node ducked the reply (the user may be taking the turn): tell the agent; its
        audio is kept, nothing is dropped yet."""
        link = self._live()
        if link is not None:
            self._send_control(link, wire.maybe_interrupted(played_ms, turn=self._turn))

    def on_resumed(self, now: float) -> None:
        """Not a turn after all: the reply plays on; tell the agent."""
        link = self._live()
        if link is not None:
            self._send_control(link, wire.resumed(turn=self._turn))

    def pull(self, now: float) -> bytes | None:
        """The next 20 ms frame of the agent's voice, or ``None`` (silence) if there is none."""
        if self._live() is None:
            return None
        link = self._link
        if self._playout:
            self._counts["agent_frames_played"] += 1
            if link is not None:
                link.played_ms += FRAME_MS
            return self._playout.popleft()
        if self._partial:
            # The agent's reply ends on a partial frame, or its stream runs late: give it one
            # tick to complete the frame, then play what there is, padded with silence.
            if self._partial_waited:
                if link is not None:
                    link.played_ms += len(self._partial) * FRAME_MS // FRAME_BYTES
                frame = bytes(self._partial).ljust(FRAME_BYTES, b"\0")
                self._partial.clear()
                self._partial_waited = False
                self._counts["agent_frames_played"] += 1
                return frame
            self._partial_waited = True
        return None

    # --- moves (StatefulAgent, MoveAwareAgent) -------------------------------------------------

    def save_state(self, now: float) -> bytes:
        """What the bridge on the session's next node needs: the turn count, and how much of
        the agent audio on this connection (since its last ``clear``) the user heard."""
        link = self._live()
        state = {
            "kind": _STATE_KIND,
            "turn": self._turn,
            "played_ms": None if link is None else link.played_ms,
        }
        return json.dumps(state, separators=(",", ":")).encode()

    def load_state(self, data: bytes, now: float) -> None:
        """Take up the old node's :meth:`save_state`: every hello from here on resumes the
        session. Raises :class:`ValueError` for another agent's state."""
        try:
            state = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("not a bridge agent state") from None
        if not isinstance(state, dict) or state.get("kind") != _STATE_KIND:
            raise ValueError("not a bridge agent state")
        turn, played = state.get("turn"), state.get("played_ms")
        if not isinstance(turn, int) or not _count(turn) or not (played is None or _count(played)):
            raise ValueError("malformed bridge agent state")
        self._turn = max(self._turn, turn)
        self._resume = True
        self._moved_played_ms = played

    def moved_in(self, *, from_node: str, to_node: str, epoch: int) -> None:
        """The move is final: tell the agent (``session_moved``) on the connection that is up,
        or right after the next hello."""
        self._move = wire.session_moved(
            self.session_id,
            from_node=from_node,
            to_node=to_node,
            epoch=epoch,
            turn=self._turn,
            played_ms=self._moved_played_ms,
        )
        link = self._live()
        if link is not None:
            self._announce_move(link)

    def moved_out(self) -> None:
        """The session was handed off to another node: close with 1001 ("session moved"), not
        1000, so that the agent keeps the conversation for the new node's connection."""
        self._moved_out = True

    def _announce_move(self, link: Link) -> None:
        move, self._move = self._move, None
        if move is not None:
            self._send_control(link, move)

    def poll_events(self) -> list[dict[str, Any]]:
        """Events for the client since the last call (from the agent, and the bridge's own
        ``agent_connected`` / ``agent_disconnected`` / ``agent_error``)."""
        events = list(self._events)
        self._events.clear()
        return events

    def stats(self) -> dict[str, object]:
        """Counters for metrics and logs (plain values, JSON-friendly)."""
        c = self._counts
        return {
            "agent": self.display_url,
            "connected": self.connected,
            "turn": self._turn,
            "connects": c["connects"],
            "reconnects": c["reconnects"],
            "connect_failures": c["connect_failures"],
            "handshake_failures": dict(self._handshake_failures),
            "disconnects": c["disconnects"],
            "stalls": c["stalls"],
            "ping_timeouts": c["ping_timeouts"],
            "user_frames_sent": c["user_frames_sent"],
            "user_frames_dropped": dict(self._user_dropped),
            "agent_frames_received": c["agent_frames_received"],
            "agent_frames_played": c["agent_frames_played"],
            "agent_frames_queued": len(self._playout),
            "agent_frames_dropped": dict(self._agent_dropped),
            "agent_events": c["agent_events"],
            "agent_errors": c["agent_errors"],
            "events_dropped": c["events_dropped"],
            "turn_events_unsent": c["turn_events_unsent"],
            "turn_events_ignored": c["turn_events_ignored"],
            "malformed": dict(self._malformed),
            "internal_errors": c["internal_errors"],
        }

    def _send_control(self, link: Link, message: dict[str, Any]) -> None:
        try:
            link.outgoing.send_nowait(wire.encode(message))
        except trio.WouldBlock:
            # Dozens of control messages the socket did not take: the link is stuck. Drop it;
            # the agent hears the turn counter again in the resuming hello.
            self._counts["stalls"] += 1
            self._counts["turn_events_unsent"] += 1
            log.warning(
                "agent link stalled, reconnecting",
                extra={"session": self.session_id, "agent": self.display_url},
            )
            link.end("stalled")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._counts["turn_events_unsent"] += 1

    def _emit(self, event: dict[str, Any]) -> None:
        if len(self._events) >= self.limits.max_events:
            self._counts["events_dropped"] += 1
            return
        self._events.append(event)

    def _drop_playout(self, reason: str) -> None:
        frames = len(self._playout) + (1 if self._partial else 0)
        if frames:
            self._agent_dropped[reason] += frames
        self._playout.clear()
        self._partial.clear()
        self._partial_waited = False

    # --- async side ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, and reconnect for as long as the session lives (cancel to stop).

        Started at once (``task_status``): the session does not wait for the agent, whose
        absence is silence. Never raises but :class:`trio.Cancelled`: connection failures,
        agents that misbehave and even bugs in this module end one connection, not the session.
        """
        task_status.started()
        backoff = self.limits.backoff_initial
        while True:
            self._up_at = None
            try:
                await self._connect_and_serve()
            except wire.HandshakeFailed as exc:
                self._handshake_failures[exc.reason] += 1
                self._log_failure("agent refused the handshake", exc)
            except (
                OSError,
                trio.TooSlowError,
                trio_websocket.HandshakeError,
                trio_websocket.ConnectionClosed,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
            ) as exc:
                self._counts["connect_failures"] += 1
                self._log_failure("agent connection failed", exc)
            except Exception:
                # A bug of ours must not end the session: count it, log it, reconnect.
                self._counts["internal_errors"] += 1
                log.exception(
                    "agent bridge failed",
                    extra={"session": self.session_id, "agent": self.display_url},
                )
            up_at = self._up_at
            if up_at is not None and trio.current_time() - up_at >= _STABLE_SECONDS:
                backoff = self.limits.backoff_initial
            await trio.sleep(backoff * self._rng.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self.limits.backoff_max)

    def _log_failure(self, what: str, exc: BaseException) -> None:
        self._failure_streak += 1
        level = logging.WARNING if self._failure_streak == 1 else logging.DEBUG
        log.log(
            level,
            what,
            extra={
                "session": self.session_id,
                "agent": self.display_url,
                "error": type(exc).__name__,
                "detail": str(exc)[:200],
                "attempt": self._failure_streak,
            },
        )

    async def _connect_and_serve(self) -> None:
        """One connection: open, hello, serve until it ends."""
        limits = self.limits
        async with trio_websocket.open_websocket_url(
            self.url,
            extra_headers=self._headers,
            message_queue_size=4,
            max_message_size=limits.max_message_bytes,
            connect_timeout=limits.connect_timeout,
            disconnect_timeout=limits.close_timeout,
        ) as ws:
            await self._hello(ws)
            outgoing, incoming = trio.open_memory_channel[str | bytes](
                limits.send_backlog_frames + _CONTROL_ROOM
            )
            link = Link(ws, outgoing)
            self._up(link)
            try:
                with link.scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._write, link, incoming)
                        nursery.start_soon(self._keepalive, link)
                        await self._read(link)
            finally:
                ending = trio.current_effective_deadline() == -math.inf
                reason = link.reason or ("session ended" if ending else "error")
                self._down(link, reason)
                outgoing.close()
                incoming.close()
                # Say goodbye if the socket still works: 1000 when the session is over, 1001
                # when only this link is (a resuming hello follows). When the session is ending
                # the library's reader is cancelled too and never sees the agent's reply: do
                # not wait for it long.
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(0.1 if ending else limits.close_timeout),
                ):
                    if ending and self._moved_out:
                        await ws.aclose(wire.CLOSE_GOING_AWAY, "session moved")
                    elif ending:
                        await ws.aclose(wire.CLOSE_NORMAL, "session ended")
                    else:
                        await ws.aclose(wire.CLOSE_GOING_AWAY, reason)

    async def _hello(self, ws: trio_websocket.WebSocketConnection) -> None:
        await ws.send_message(wire.hello(self.session_id, resume=self._resume, turn=self._turn))
        with trio.fail_after(self.limits.hello_timeout):
            reply = await ws.get_message()
        try:
            wire.check_hello(reply)
        except wire.HandshakeFailed as exc:
            if exc.reason == "unsupported_protocol":
                with trio.move_on_after(self.limits.close_timeout):
                    await ws.send_message(wire.unsupported_protocol())
                    await ws.aclose(wire.CLOSE_PROTOCOL_ERROR, "unsupported protocol")
            raise

    def _up(self, link: Link) -> None:
        resumed = self._resume
        self._link = link
        self._up_at = trio.current_time()
        self._resume = True  # every later hello resumes this session
        self._failure_streak = 0
        self._counts["connects"] += 1
        if self._counts["connects"] > 1:
            self._counts["reconnects"] += 1
        self._partial_waited = False
        self._announce_move(link)
        log.info(
            "agent connected",
            extra={"session": self.session_id, "agent": self.display_url, "resumed": resumed},
        )
        self._emit({"event": "agent_connected", "resumed": resumed})

    def _down(self, link: Link, reason: str) -> None:
        if self._link is link:
            self._link = None
        self._counts["disconnects"] += 1
        self._drop_playout("disconnected")
        close = link.ws.closed
        fields: dict[str, Any] = {"reason": reason}
        if close is not None:
            fields["code"] = close.code
        log.info(
            "agent disconnected",
            extra={"session": self.session_id, "agent": self.display_url, **fields},
        )
        self._emit({"event": "agent_disconnected", **fields})

    async def _write(self, link: Link, incoming: trio.MemoryReceiveChannel[str | bytes]) -> None:
        """The only task that writes to the socket (so cancelling a producer never cuts a
        WebSocket frame in half)."""
        try:
            async for item in incoming:
                audio = isinstance(item, bytes)
                if audio:
                    link.audio_backlog -= 1
                link.send_started = trio.current_time()
                await link.ws.send_message(item)
                link.send_started = None
                if audio:
                    self._counts["user_frames_sent"] += 1
        except trio_websocket.ConnectionClosed:
            pass
        link.end("closed")

    async def _keepalive(self, link: Link) -> None:
        limits = self.limits
        try:
            while True:
                await trio.sleep(limits.ping_interval)
                with trio.move_on_after(limits.ping_timeout) as waited:
                    await link.ws.ping()
                if waited.cancelled_caught:
                    self._counts["ping_timeouts"] += 1
                    log.warning(
                        "agent stopped answering pings",
                        extra={"session": self.session_id, "agent": self.display_url},
                    )
                    link.end("ping_timeout")
                    return
        except trio_websocket.ConnectionClosed:
            pass
        link.end("closed")

    async def _read(self, link: Link) -> None:
        while True:
            try:
                message = await link.ws.get_message()
            except trio_websocket.ConnectionClosed:
                link.end("closed")
                return
            if isinstance(message, bytes):
                self._on_agent_audio(link, message)
            else:
                self._on_agent_text(link, message)

    # --- what the agent says ------------------------------------------------------------------

    def _on_agent_audio(self, link: Link, pcm: bytes) -> None:
        if len(pcm) % 2:
            self._malformed_message("odd_length_audio")
            return
        if link.discarding:
            self._agent_dropped["stale"] += -(-len(pcm) // FRAME_BYTES)
            return
        self._partial += pcm
        self._partial_waited = False
        whole = len(self._partial) // FRAME_BYTES * FRAME_BYTES
        if not whole:
            return
        view = memoryview(self._partial)
        frames = [bytes(view[i : i + FRAME_BYTES]) for i in range(0, whole, FRAME_BYTES)]
        view.release()
        del self._partial[:whole]
        room = self._max_frames - len(self._playout)
        if len(frames) > room:
            self._agent_dropped["overflow"] += len(frames) - max(0, room)
            frames = frames[: max(0, room)]
        self._playout.extend(frames)
        self._counts["agent_frames_received"] += len(frames)

    def _on_agent_text(self, link: Link, text: str) -> None:
        match wire.parse(text, max_chars=self.limits.max_text_chars):
            case wire.AgentEvent(name=name, fields=fields):
                self._counts["agent_events"] += 1
                self._emit({"event": name, **fields})
            case wire.Clear():
                self._drop_playout("cleared")
                link.discarding = False
                link.played_ms = 0
            case wire.AgentError(code=code):
                self._counts["agent_errors"] += 1
                log.warning(
                    "agent reported an error",
                    extra={"session": self.session_id, "agent": self.display_url, "code": code},
                )
                self._emit({"event": "agent_error", "code": code})
            case wire.Malformed(reason=reason):
                self._malformed_message(reason)

    def _malformed_message(self, reason: str) -> None:
        self._malformed[reason] += 1
        # The first of each kind is worth a warning; a flood of them is not worth a log flood.
        level = logging.WARNING if self._malformed[reason] == 1 else logging.DEBUG
        log.log(
            level,
            "malformed message from agent dropped",
            extra={"session": self.session_id, "agent": self.display_url, "reason": reason},
        )


_STATE_KIND: Final = "parley.bridge"


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
