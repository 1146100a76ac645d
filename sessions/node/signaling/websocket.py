"""WebSocket signaling sessions: one session per socket, its events forwarded as they come.

``ws://HOST:PORT/v1/session``, JSON text messages::

    client → {"type": "offer", "sdp": "...", "token": "<access token, optional>"}
    node   → {"type": "answer", "sdp": "...", "session": "<id>", "secret": "<secret>"}
    client → {"type": "attach", "session": "<id>", "secret": "<secret>"}
    node   → {"type": "attached", "session": "<id>"}
    node   → {"type": "redirect", "node": "<name>", "url": "ws://.../v1/session", "reason": ...}
    client → {"type": "ping"}                 node → {"type": "pong"}
    client → {"type": "bye"}                  node ends the session, closes the socket (1000)
    node   → {"type": "event", "event": "<name>", "ts": <unix seconds>, ...fields}
    node   → {"type": "error", "code": "<machine-readable>", "message": "<human>"}

An offer needs an access token where the node asks for them (:mod:`.admission`): the upgrade's
``Authorization: Bearer`` or ``?token=``, or the offer's own ``token`` (which wins). Without one
the offer gets an error (``token_missing``, ``token_invalid``, ``token_expired``,
``token_forbidden``), or one of the admission limits (``rate_limited``, ``half_open_limit``,
``node_over_capacity``, with ``retry_after`` seconds where waiting helps), and the socket stays
open. An offer from a client of another region than the node's may instead be answered
``redirect`` with ``"reason": "region"`` (sessions/node/regions.py): a node of the client's
region has room; send the same offer there (the socket closes with 1000). An attach needs no
token: the secret is enough.
A socket's first session comes from an offer, or from an attach: a new socket (to any node) takes
over a live session with the secret the answer carried. The secret travels only in the answer, on
the client's own socket: never in the SDP, never in the ufrag, never in a log. An attach is
answered ``attached`` (then the session's events flow), ``redirect`` (another node owns the
session: attach there; the socket closes with 1000), or an error: ``forbidden`` for a wrong secret,
``unknown_session`` when no such session is live, ``session_recovering`` when its node died and
it is about to be resumed from its checkpoint (try again shortly), ``bad_message`` for a
malformed attach. A
session has at most one socket: attaching again hands it to the new socket, and the old one gets
``session_attached_elsewhere`` and closes with 4003.

The socket is the session's life line: closing it (or losing it) ends the session, whether it
offered or attached. Every way the node ends a session sends a final ``session_ended`` event with
a ``code`` and a ``reason`` before the socket closes: the backend's own, or ``{"code": "ended"}``
if it sent none; ours, ``{"code": "setup_timeout"}``, for a session whose ICE has not connected
within ``setup_within`` of its answer (:mod:`.limits`). The close frame carries 1000, or the
``close_code`` the backend's ``session_ended`` asked for (1001 for a node going away, ...). A
session that moves to another node does not end: its socket gets ``session_moved`` (with the
``node`` and the ``url`` to attach to) and closes with 4001 (or 4000, the node going away), which
both mean "re-attach". A bad message gets an error reply and the connection carries on.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import time
from collections.abc import Mapping
from typing import Final, final

import attrs
import h11
import trio
import trio_websocket

from sessions.node.signaling.backend import BackendCalls
from sessions.node.signaling.http import HttpError, ReplayStream, header
from sessions.node.signaling.limits import SETUP_TIMEOUT
from sessions.node.signaling.messages import (
    ATTACHED_ELSEWHERE,
    REATTACH,
    SESSION_PATH,
    ClientMessageError,
    Gone,
    Redirect,
    Refusal,
    SessionHandle,
    SignalingLimits,
    error_object,
    parse_client_message,
)
from sessions.webrtc.errors import StateTransitionError

__all__ = ["ENDED_CODE", "ENDED_REASON", "TRANSITIONS", "SocketPhase", "WebSocketSessions"]

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


def _close_code(value: object, session_id: str, default: int = _NORMAL_CLOSURE) -> int:
    """The close code an event asks for; ``default`` if none, or none we may send."""
    if value is None:
        return default
    # bool is an int to Python, not a close code to anyone
    if isinstance(value, int) and not isinstance(value, bool) and _may_send(value):
        return value
    log.error("backend asked for a close code we cannot send", extra={"session": session_id})
    return default


#: backend events after which the session lives on, but no longer through this socket
_HANDOVER_EVENTS = frozenset({"session_moved", "session_attached_elsewhere"})


class SocketPhase(enum.Enum):
    """What a WebSocket connection is to its session."""

    #: no session yet: an offer or an attach may come
    WAITING = "waiting"
    #: the session's socket: its events flow here, and closing the socket ends the session
    LIVE = "live"
    #: the session is over: the client said bye or left (and we closed it), or the node ended it
    ENDED = "ended"
    #: the session lives on elsewhere (moved, or another socket attached): the socket lets go of
    #: it without ending it
    HANDED_OVER = "handed_over"


# The transition table (h11-style): from each phase, the phases it may move to, and why.
#
#   WAITING -> LIVE         an answer to an offer, or ``attached``, was the reply
#   LIVE    -> ENDED        the client said bye or its socket closed (we call close_session,
#                           unless the backend had already let go of this socket), or the
#                           backend closed the session's events (it ended on the node)
#   LIVE    -> HANDED_OVER  the backend sent session_moved or session_attached_elsewhere
#   ENDED, HANDED_OVER      final: the connection closes
#
# A socket that closes while WAITING (no session, a redirect) changes no phase.
TRANSITIONS: Final[Mapping[SocketPhase, frozenset[SocketPhase]]] = {
    SocketPhase.WAITING: frozenset({SocketPhase.LIVE}),
    SocketPhase.LIVE: frozenset({SocketPhase.ENDED, SocketPhase.HANDED_OVER}),
    SocketPhase.ENDED: frozenset(),
    SocketPhase.HANDED_OVER: frozenset(),
}


@attrs.define(eq=False)  # identity: the server keeps the live ones in a set
class _SessionState:
    """One WebSocket connection's session, shared by its reader and its event forwarder."""

    remote: str
    #: the access token of the upgrade request, if any
    token: str | None = None
    #: what the client's address counts under (sessions/node/signaling/limits.py)
    source: str = ""
    #: the client's region as the trusted header of the upgrade named it (None: not known)
    region: str | None = None
    handle: SessionHandle | None = None
    phase: SocketPhase = SocketPhase.WAITING
    #: the backend's own session_ended was forwarded: no final one of ours
    ended_sent: bool = False
    #: the code of the close frame we send (a backend's session_ended may change it)
    close_code: int = _NORMAL_CLOSURE
    #: the session went to another socket of this node, which holds its slots from now on
    attached_elsewhere: bool = False

    def set_phase(self, new: SocketPhase) -> None:
        """The one place the phase changes, along an edge of :data:`TRANSITIONS` only."""
        if new not in TRANSITIONS[self.phase]:
            raise StateTransitionError(
                f"signaling socket cannot go from {self.phase.name} to {new.name}"
            )
        self.phase = new


@final
class WebSocketSessions:
    """Serves WebSocket connections handed over by the HTTP layer, one session each."""

    def __init__(self, calls: BackendCalls, limits: SignalingLimits) -> None:
        self.calls = calls
        self.limits = limits
        self._live: set[_SessionState] = set()
        self._gone = trio.Event()

    async def wind_down(self) -> None:
        """Return once no connection that had a session is still being served (its last
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

    async def serve(
        self,
        stream: trio.SocketStream,
        head: bytes,
        remote: str,
        token: str | None,
        source: str,
        region: str | None = None,
    ) -> None:
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
            state = _SessionState(remote, token, source, region)
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
            handle = state.handle
            if handle is not None:
                self.calls.session_gone(
                    handle.session_id, attached_elsewhere=state.attached_elsewhere
                )
                # the backend closes a socket's events when it lets go of it (the session ended,
                # moved, or another socket attached): then the session is no longer ours to end
                let_go = handle.events.statistics().open_send_channels == 0
                handle.events.close()
                if state.phase is SocketPhase.LIVE:
                    state.set_phase(SocketPhase.ENDED)
                    if not let_go:
                        await self.calls.close_session(handle.session_id, "signaling closed")

    async def _receive(
        self, ws: trio_websocket.WebSocketConnection, state: _SessionState, tasks: trio.Nursery
    ) -> None:
        offer_deadline = trio.current_time() + self.limits.offer_timeout
        try:
            while True:
                message: str | bytes | None = None
                waiting = state.phase is SocketPhase.WAITING
                with trio.move_on_at(offer_deadline if waiting else math.inf):
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
            if state.phase is SocketPhase.LIVE:
                assert state.handle is not None
                state.set_phase(SocketPhase.ENDED)  # before the await: no session_ended of ours
                await self.calls.close_session(state.handle.session_id, "bye")
            return False
        # an offer or an attach (parse_client_message admits nothing else)
        if state.phase is not SocketPhase.WAITING:
            await self._error(ws, "bad_message", "one session per connection")
            return True
        if kind == "attach":
            return await self._attach(ws, state, tasks, parsed)
        sdp = parsed["sdp"]
        assert isinstance(sdp, str)
        token = parsed.get("token")
        outcome = await self.calls.open_session(
            sdp,
            "websocket",
            state.remote,
            token if isinstance(token, str) else state.token,
            state.source,
            state.region,
        )
        if isinstance(outcome, Refusal):
            await self._error(ws, outcome.code, outcome.message, outcome.retry_after)
            return True
        if isinstance(outcome, Redirect):
            redirect = {"type": "redirect", "node": outcome.node, "url": outcome.url}
            await self._send(ws, {**redirect, "reason": outcome.reason})
            return False  # closes with 1000: the client offers there
        answer = {
            "type": "answer",
            "sdp": outcome.answer_sdp,
            "session": outcome.session_id,
            # the one message that carries the secret: on the client's own socket
            "secret": outcome.secret,
        }
        await self._begin(ws, state, tasks, outcome, answer)
        return True

    async def _attach(
        self,
        ws: trio_websocket.WebSocketConnection,
        state: _SessionState,
        tasks: trio.Nursery,
        attach: Mapping[str, object],
    ) -> bool:
        """Take over a live session with its secret; False when the connection is to close."""
        session_id, secret = attach["session"], attach["secret"]
        assert isinstance(session_id, str) and isinstance(secret, str)
        outcome = await self.calls.attach_session(session_id, secret, state.remote)
        if isinstance(outcome, Refusal):
            await self._error(ws, outcome.code, outcome.message)
            return True
        if isinstance(outcome, Redirect):
            await self._send(ws, {"type": "redirect", "node": outcome.node, "url": outcome.url})
            return False  # closes with 1000: the client goes to the owner
        await self._begin(ws, state, tasks, outcome, {"type": "attached", "session": session_id})
        return True

    async def _begin(
        self,
        ws: trio_websocket.WebSocketConnection,
        state: _SessionState,
        tasks: trio.Nursery,
        handle: SessionHandle,
        reply: Mapping[str, object],
    ) -> None:
        """Make ``handle`` this socket's session, send ``reply``, then forward its events."""
        state.handle = handle
        state.set_phase(SocketPhase.LIVE)
        await self._send(ws, reply)
        tasks.start_soon(self._forward_events, ws, state, handle, tasks.cancel_scope)

    async def _forward_events(
        self,
        ws: trio_websocket.WebSocketConnection,
        state: _SessionState,
        handle: SessionHandle,
        connection_scope: trio.CancelScope,
    ) -> None:
        """Forward the session's events until it ends or is handed over; then end the
        connection too."""
        try:
            async with handle.events:
                while True:
                    # a session whose ICE has not connected is ended at its setup deadline
                    with trio.move_on_at(self.calls.setup_deadline(handle.session_id)) as setup:
                        try:
                            item = await handle.events.receive()
                        except trio.EndOfChannel:
                            break
                    if setup.cancelled_caught:
                        await self._setup_timed_out(ws, state, handle.session_id)
                        return
                    name = item.get("event") if isinstance(item, Mapping) else None
                    self.calls.session_event(handle.session_id, name)
                    text = self._event_text(item, handle.session_id)
                    if text is None:
                        continue
                    if name == "session_ended":
                        state.ended_sent = True
                        state.close_code = _close_code(item.get("close_code"), handle.session_id)
                    elif name in _HANDOVER_EVENTS and state.phase is SocketPhase.LIVE:
                        # before the send: a client closing meanwhile must not end the session
                        state.set_phase(SocketPhase.HANDED_OVER)
                        state.attached_elsewhere = name == "session_attached_elsewhere"
                        state.close_code = (
                            _close_code(item.get("close_code"), handle.session_id, REATTACH)
                            if name == "session_moved"
                            else ATTACHED_ELSEWHERE
                        )
                    await self._send_text(ws, text)
                    self.calls.count("events_forwarded")
                    if state.phase is SocketPhase.HANDED_OVER:
                        await self._hand_over(ws, state, handle.session_id, str(name))
                        return
            # the backend closed the channel: the session is over on the node's side
            if state.phase is not SocketPhase.LIVE:
                return  # the client said bye: it needs no session_ended
            state.set_phase(SocketPhase.ENDED)
            log.info("session ended by the node", extra={"session": handle.session_id})
            if not state.ended_sent:
                # issue #11: a session never ends without a reason the client can read
                state.ended_sent = True
                await self._send(ws, _session_ended(ENDED_CODE, ENDED_REASON))
            with trio.move_on_after(self.limits.close_timeout):
                await ws.aclose(state.close_code, "session ended")
        except Gone:
            return
        finally:
            # the session ended, or the client cannot be written to: either way, we are done
            connection_scope.cancel()

    async def _setup_timed_out(
        self, ws: trio_websocket.WebSocketConnection, state: _SessionState, session_id: str
    ) -> None:
        """The session's ICE did not connect in time (issue #15): the client hears
        ``setup_timeout``, the session ends, and its half-open slot is free."""
        if state.phase is not SocketPhase.LIVE:
            return  # ending already (the client said bye): nothing to time out
        reason = self.calls.setup_timed_out(session_id)
        state.set_phase(SocketPhase.ENDED)  # before the awaits: the socket's end is ours
        state.ended_sent = True
        ended = _session_ended(SETUP_TIMEOUT, reason)
        try:
            await self._send(ws, ended)
        finally:
            await self.calls.close_session(session_id, SETUP_TIMEOUT)
        with trio.move_on_after(self.limits.close_timeout):
            await ws.aclose(state.close_code, "setup timeout")

    async def _hand_over(
        self,
        ws: trio_websocket.WebSocketConnection,
        state: _SessionState,
        session_id: str,
        event: str,
    ) -> None:
        """The session lives on elsewhere: close this socket, leaving the session alone."""
        self.calls.count("sessions_handed_over")
        log.info(
            "session handed over",
            extra={"session": session_id, "event": event, "close_code": state.close_code},
        )
        with trio.move_on_after(self.limits.close_timeout):
            await ws.aclose(state.close_code, event)

    def _event_text(self, item: Mapping[str, object], session_id: str) -> str | None:
        name = item.get("event") if isinstance(item, Mapping) else None
        if not isinstance(name, str):
            self.calls.count("events_dropped")
            log.error("backend event without a name dropped", extra={"session": session_id})
            return None
        # close_code is for the server's close frame, not for the client
        closing = name == "session_ended" or name in _HANDOVER_EVENTS
        hidden = ("type", "event", "close_code") if closing else ("type", "event")
        message: dict[str, object] = {"type": "event", "event": name, "ts": time.time()}
        message.update((key, value) for key, value in item.items() if key not in hidden)
        try:
            return json.dumps(message, allow_nan=False)
        except (TypeError, ValueError):
            self.calls.count("events_dropped")
            log.exception("backend event is not JSON", extra={"session": session_id, "event": name})
            return None

    async def _error(
        self,
        ws: trio_websocket.WebSocketConnection,
        code: str,
        text: str,
        retry_after: int | None = None,
    ) -> None:
        self.calls.count(code)
        await self._send(ws, error_object(code, text, retry_after))

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


def _session_ended(code: str, reason: str) -> dict[str, object]:
    """The ``session_ended`` event the socket itself sends, stamped now."""
    return {
        "type": "event",
        "event": "session_ended",
        "ts": time.time(),
        "code": code,
        "reason": reason,
    }
