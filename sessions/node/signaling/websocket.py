"""WebSocket signaling sessions: one session per socket, its events forwarded as they come.

``ws://HOST:PORT/v1/session``, JSON text messages::

    client → {"type": "offer", "sdp": "..."}
    node   → {"type": "answer", "sdp": "...", "session": "<id>"}
    client → {"type": "ping"}                 node → {"type": "pong"}
    client → {"type": "bye"}                  node ends the session, closes the socket (1000)
    node   → {"type": "event", "event": "<name>", "ts": <unix seconds>, ...fields}
    node   → {"type": "error", "code": "<machine-readable>", "message": "<human>"}

The socket lives as long as its session: closing it (or losing it) ends the session. Every way the
node ends a session sends a final ``session_ended`` event with a ``code`` and a ``reason`` before
the socket closes: the backend's own, or ``{"code": "ended"}`` if it sent none. The close frame
carries 1000, or the ``close_code`` the backend's ``session_ended`` asked for (1001 for a node
going away, ...). A bad message gets an error reply and the connection carries on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from typing import final

import attrs
import h11
import trio
import trio_websocket

from sessions.node.signaling.backend import BackendCalls
from sessions.node.signaling.http import HttpError, ReplayStream, header
from sessions.node.signaling.messages import (
    SESSION_PATH,
    ClientMessageError,
    Gone,
    Refusal,
    SessionHandle,
    SignalingLimits,
    error_object,
    parse_client_message,
)

__all__ = ["ENDED_CODE", "ENDED_REASON", "WebSocketSessions"]

log = logging.getLogger("parley.signaling")

#: the ``session_ended`` code and reason when the backend ended a session without saying why
ENDED_CODE = "ended"
ENDED_REASON = "the session ended on the node"

#: RFC 6455 §7.4.1 "normal closure": the close code unless the backend asks for another
_NORMAL_CLOSURE = 1000
#: codes a backend may ask for when it ends a session: normal closure, going away, policy
#: violation, internal error (RFC 6455 §7.4.1), service restart and try again later (IANA
#: registry); and the registered and private ranges 3000-4999 (RFC 6455 §7.4.2). Never 1005,
#: 1006 or 1015, which must not appear in a close frame.
_BACKEND_CLOSE_CODES = frozenset({1000, 1001, 1008, 1011, 1012, 1013})


def _may_send(code: int) -> bool:
    return code in _BACKEND_CLOSE_CODES or 3000 <= code <= 4999


def _close_code(value: object, session_id: str) -> int:
    """The close code a ``session_ended`` event asks for; 1000 if none, or none we may send."""
    if value is None:
        return _NORMAL_CLOSURE
    # bool is an int to Python, not a close code to anyone
    if isinstance(value, int) and not isinstance(value, bool) and _may_send(value):
        return value
    log.error("backend asked for a close code we cannot send", extra={"session": session_id})
    return _NORMAL_CLOSURE


@attrs.define(eq=False)  # identity: the server keeps the live ones in a set
class _SessionState:
    """One WebSocket connection's session, shared by its reader and its event forwarder."""

    remote: str
    handle: SessionHandle | None = None
    #: the session is over (ended by the node, or closed by us); no close_session needed
    ended: bool = False
    #: the client said bye: no final session_ended event
    bye: bool = False
    ended_sent: bool = False
    #: the code of the close frame we send (a backend's session_ended may change it)
    close_code: int = _NORMAL_CLOSURE


@final
class WebSocketSessions:
    """Serves WebSocket connections handed over by the HTTP layer, one session each."""

    def __init__(self, calls: BackendCalls, limits: SignalingLimits) -> None:
        self.calls = calls
        self.limits = limits
        self._live: set[_SessionState] = set()
        self._gone = trio.Event()

    async def wind_down(self) -> None:
        """Return once no connection that opened a session is still being served (its last
        events sent and its socket closed). Callers bound the wait."""
        while any(state.handle is not None for state in self._live):
            await self._gone.wait()

    def check_upgrade(self, request: h11.Request) -> None:
        """Raise the :class:`HttpError` that refuses an upgrade we will not accept
        (RFC 6455 §4.2.1: only version 13, and a ``Sec-WebSocket-Key`` is required)."""
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        if path != SESSION_PATH:
            raise HttpError(404, "not_found", "no WebSocket endpoint here", close=True)
        if header(request, b"sec-websocket-version") != b"13":
            raise HttpError(
                426,
                "bad_request",
                "unsupported WebSocket version",
                [("Sec-WebSocket-Version", "13")],
                close=True,
            )
        if not header(request, b"sec-websocket-key"):
            raise HttpError(400, "bad_request", "missing Sec-WebSocket-Key", close=True)

    async def serve(self, stream: trio.SocketStream, head: bytes, remote: str) -> None:
        """Complete the handshake whose request ``head`` was already read from ``stream``, then
        run its session until either side ends it; the close is bounded."""
        self.calls.count("ws_connections")
        replay = ReplayStream(stream, head)
        async with trio.open_nursery() as nursery:
            ws: trio_websocket.WebSocketConnection | None = None
            with trio.move_on_after(self.limits.request_timeout):
                request = await trio_websocket.wrap_server_stream(
                    nursery, replay, max_message_size=self.limits.max_frame_chars
                )
                ws = await request.accept()
            if ws is None:
                self.calls.count("timeouts")
                log.info("websocket handshake did not complete", extra={"remote": remote})
                nursery.cancel_scope.cancel()
                return
            log.info("websocket connected", extra={"remote": remote})
            state = _SessionState(remote)
            self._live.add(state)
            try:
                await self._session(ws, state)
            finally:
                # when the server is stopping, our reader task is cancelled too and cannot see the
                # client's close reply: send our close frame and go
                stopping = trio.current_effective_deadline() == -math.inf
                timeout = (
                    min(0.1, self.limits.close_timeout) if stopping else self.limits.close_timeout
                )
                with trio.CancelScope(shield=True), trio.move_on_after(timeout):
                    await ws.aclose(state.close_code)
                self._live.discard(state)
                self._gone.set()
                self._gone = trio.Event()
                nursery.cancel_scope.cancel()
                log.info("websocket closed", extra={"remote": remote})

    async def _session(self, ws: trio_websocket.WebSocketConnection, state: _SessionState) -> None:
        try:
            async with trio.open_nursery() as tasks:
                await self._receive(ws, state, tasks)
                tasks.cancel_scope.cancel()
        finally:
            if state.handle is not None:
                state.handle.events.close()
                if not state.ended:
                    state.ended = True
                    await self.calls.close_session(state.handle.session_id, "signaling closed")

    async def _receive(
        self, ws: trio_websocket.WebSocketConnection, state: _SessionState, tasks: trio.Nursery
    ) -> None:
        offer_deadline = trio.current_time() + self.limits.offer_timeout
        try:
            while True:
                message: str | bytes | None = None
                with trio.move_on_at(offer_deadline if state.handle is None else math.inf):
                    try:
                        message = await ws.get_message()
                    except trio_websocket.ConnectionClosed:
                        return
                if message is None:
                    self.calls.count("timeouts")
                    timeout = self.limits.offer_timeout
                    await self._error(ws, "timeout", f"no session opened within {timeout:g} s")
                    return
                if not await self._message(ws, state, tasks, message):
                    return
        except Gone:
            return

    async def _message(
        self,
        ws: trio_websocket.WebSocketConnection,
        state: _SessionState,
        tasks: trio.Nursery,
        message: str | bytes,
    ) -> bool:
        """Handle one client message; False when the connection is to close."""
        try:
            parsed = parse_client_message(message, max_chars=self.limits.max_message_chars)
        except ClientMessageError as exc:
            await self._error(ws, exc.code, exc.message)
            return True
        kind = parsed["type"]
        if kind == "ping":
            await self._send(ws, {"type": "pong"})
            return True
        if kind == "bye":
            state.bye = True
            if state.handle is not None and not state.ended:
                state.ended = True
                await self.calls.close_session(state.handle.session_id, "bye")
            return False
        # an offer (parse_client_message admits nothing else)
        if state.handle is not None:
            await self._error(ws, "bad_message", "one session per connection")
            return True
        sdp = parsed["sdp"]
        assert isinstance(sdp, str)
        outcome = await self.calls.open_session(sdp, "websocket", state.remote)
        if isinstance(outcome, Refusal):
            await self._error(ws, outcome.code, outcome.message)
            return True
        state.handle = outcome
        answer = {"type": "answer", "sdp": outcome.answer_sdp, "session": outcome.session_id}
        await self._send(ws, answer)
        tasks.start_soon(self._forward_events, ws, state, outcome, tasks.cancel_scope)
        return True

    async def _forward_events(
        self,
        ws: trio_websocket.WebSocketConnection,
        state: _SessionState,
        handle: SessionHandle,
        connection_scope: trio.CancelScope,
    ) -> None:
        """Forward the session's events until it ends; then end the connection too."""
        try:
            async with handle.events:
                async for item in handle.events:
                    text = self._event_text(item, handle.session_id)
                    if text is None:
                        continue
                    if item.get("event") == "session_ended":
                        state.ended_sent = True
                        state.close_code = _close_code(item.get("close_code"), handle.session_id)
                    await self._send_text(ws, text)
                    self.calls.count("events_forwarded")
            # the backend closed the channel: the session is over on the node's side
            if state.bye:
                return
            state.ended = True
            log.info("session ended by the node", extra={"session": handle.session_id})
            if not state.ended_sent:
                # issue #11: a session never ends without a reason the client can read
                state.ended_sent = True
                ended = {
                    "type": "event",
                    "event": "session_ended",
                    "ts": time.time(),
                    "code": ENDED_CODE,
                    "reason": ENDED_REASON,
                }
                await self._send(ws, ended)
            with trio.move_on_after(self.limits.close_timeout):
                await ws.aclose(state.close_code, "session ended")
        except Gone:
            return
        finally:
            # the session ended, or the client cannot be written to: either way, we are done
            connection_scope.cancel()

    def _event_text(self, item: Mapping[str, object], session_id: str) -> str | None:
        name = item.get("event") if isinstance(item, Mapping) else None
        if not isinstance(name, str):
            self.calls.count("events_dropped")
            log.error("backend event without a name dropped", extra={"session": session_id})
            return None
        # close_code is for the server's close frame, not for the client
        hidden = ("type", "event", "close_code") if name == "session_ended" else ("type", "event")
        message: dict[str, object] = {"type": "event", "event": name, "ts": time.time()}
        message.update((key, value) for key, value in item.items() if key not in hidden)
        try:
            return json.dumps(message, allow_nan=False)
        except (TypeError, ValueError):
            self.calls.count("events_dropped")
            log.exception("backend event is not JSON", extra={"session": session_id, "event": name})
            return None

    async def _error(self, ws: trio_websocket.WebSocketConnection, code: str, text: str) -> None:
        self.calls.count(code)
        await self._send(ws, error_object(code, text))

    async def _send(
        self, ws: trio_websocket.WebSocketConnection, message: Mapping[str, object]
    ) -> None:
        await self._send_text(ws, json.dumps(message))

    async def _send_text(self, ws: trio_websocket.WebSocketConnection, text: str) -> None:
        """Send, or raise :class:`Gone`; a client that does not read within ``send_timeout``
        is treated as gone (its socket is closed by the connection's teardown)."""
        try:
            with trio.fail_after(self.limits.send_timeout):
                await ws.send_message(text)
        except trio_websocket.ConnectionClosed:
            raise Gone("websocket closed") from None
        except trio.TooSlowError:
            self.calls.count("stalled")
            log.info("websocket client stopped reading")
            raise Gone("client is not reading") from None
