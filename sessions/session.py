"""The session actor: Trio glue around one sans-I/O :class:`Transceiver`.

It owns the session's crypto and audio state. Datagrams arrive in its inbox (from the node's media
port today, from relay tunnels later), timers come from the core, and what the core wants sent
goes out through the packet path in one batch per wake-up.

Checkpoints: when the core asks (``CheckpointDue``), the actor takes a snapshot, hands it to the
node's checkpoint store, and only then confirms it to the core (SRTP refuses to send past an
unconfirmed reservation, so an index is never used twice). If the actor crashes, its supervisor
restarts it from the last stored snapshot, not from zero: the client notices nothing but a gap.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, final

import trio

from actors import Actor
from sessions.agents import Agent, EchoAgent, RunningAgent
from sessions.ports import SessionPort
from sessions.snapshot import SessionSnapshot
from sessions.transceiver import (
    CheckpointDue,
    ClientEvent,
    DtlsConnected,
    IceConnected,
    MediaStarted,
    SessionClosed,
    SessionFailed,
    Transceiver,
)
from sessions.turns import TurnConfig
from sessions.webrtc.certs import Certificate

log = logging.getLogger("parley.session")

#: events are plain JSON-ready dicts; the signaling layer forwards them to the client
EventSink = Callable[[dict[str, Any]], None]


def _is_rtp(data: bytes) -> bool:
    """SRTP media, as opposed to SRTCP (RFC 7983 first byte, RFC 5761 payload type range)."""
    return len(data) > 1 and 128 <= data[0] <= 191 and not 192 <= data[1] <= 223


@final
class SessionActor(Actor):
    """One voice session. Built by a factory the node gives its session supervisor."""

    mailbox_size = 16

    def __init__(
        self,
        session_id: str,
        *,
        port: SessionPort,
        certificate: Certificate,
        core: Transceiver | None,
        restore_from: Callable[[], SessionSnapshot | None],
        store: Callable[[SessionSnapshot], None],
        events: EventSink,
        on_end: Callable[[str, str], None],
        agent: Agent | None = None,
        make_agent: Callable[[], Agent] = EchoAgent,
        turn_config: TurnConfig | None = None,
    ) -> None:
        super().__init__(session_id)
        self.session_id = session_id
        self.port = port
        self.certificate = certificate
        self._core = core
        self._restore_from = restore_from
        self._store = store
        self._events = events
        self._on_end = on_end
        self._agent = agent
        self._make_agent = make_agent
        self._turn_config = turn_config
        self.restored = False

    @property
    def core(self) -> Transceiver:
        assert self._core is not None
        return self._core

    async def on_start(self) -> None:
        now = trio.current_time()
        if self._core is None:
            snapshot = self._restore_from()
            if snapshot is None:
                # It crashed before its first checkpoint (before DTLS completed): there is no
                # state to continue, so the session ends instead of restarting forever.
                self._end("crashed before its first checkpoint", "internal")
                self.stop()
                return
            self._agent = self._make_agent()
            self._core = Transceiver.restore(
                snapshot,
                certificate=self.certificate,
                now=now,
                agent=self._agent,
                turn_config=self._turn_config,
            )
            self.restored = True
            stale = self._shed_backlog()
            log.info(
                "session restored from snapshot",
                extra={"session": self.session_id, "stale_rtp_dropped": stale},
            )
        self.nursery.start_soon(self._media_loop)
        # Agents with a connection of their own (the WebSocket bridge) run it beside the media.
        if isinstance(self._agent, RunningAgent):
            await self.nursery.start(self._agent.run)

    def _shed_backlog(self, keep: int = 3) -> int:
        """Drop the client audio that queued up while the actor was down, but its newest.

        A fresh jitter buffer fed a burst of stale RTP raises its delay to the maximum and then
        takes seconds to shed it one packet at a time; playing the gap as a gap is better.
        STUN and RTCP are kept. Returns how many RTP datagrams were dropped.
        """
        backlog: list[tuple[bytes, tuple[str, int]]] = []
        while True:
            try:
                backlog.append(self.port.inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        media = [i for i, (data, _) in enumerate(backlog) if _is_rtp(data)]
        drop = set(media[:-keep]) if len(media) > keep else set()
        for i, item in enumerate(backlog):
            if i not in drop:
                self.port.inbox_send.send_nowait(item)
        return len(drop)

    async def receive(self, message: object) -> object:
        if message == "stats":
            return self.core.stats()
        if message == "close":
            self.core.close(trio.current_time())
            self._flush()
            return True
        raise ValueError(f"unknown message {message!r}")

    async def _media_loop(self) -> None:
        core = self.core
        inbox = self.port.inbox
        while True:
            timer = core.get_timer()
            with trio.move_on_at(math.inf if timer is None else timer):
                try:
                    data, addr = await inbox.receive()
                except trio.EndOfChannel:
                    self._end("media path closed", "closed")
                    return
                core.receive(data, addr, trio.current_time())
                # Take whatever else is already queued before sending: one flush per batch.
                for _ in range(64):
                    try:
                        data, addr = inbox.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    core.receive(data, addr, trio.current_time())
            now = trio.current_time()
            timer = core.get_timer()
            if timer is not None and now >= timer:
                core.handle_timer(now)
            self._flush()
            if self._handle_events():
                return

    def _flush(self) -> None:
        send = self.port.send
        out = self.core.datagrams_to_send()
        for data, addr in out:
            send(data, addr)
        if out:
            self.port.flush()

    def _handle_events(self) -> bool:
        """Act on the core's events; True once the session is over."""
        core = self.core
        while (event := core.next_event()) is not None:
            match event:
                case CheckpointDue():
                    snapshot = core.snapshot(trio.current_time())
                    self._store(snapshot)
                    core.confirm(snapshot)
                case IceConnected(addr=addr):
                    self._emit("ice_connected", address=f"{addr[0]}:{addr[1]}")
                case DtlsConnected(profile=profile):
                    self._emit("dtls_connected", profile=str(profile))
                case MediaStarted():
                    self._emit("media_started")
                case ClientEvent(name=name, at=at, fields=fields):
                    # The core's clock is Trio's; the client wants wall-clock time.
                    wall = time.time() - (trio.current_time() - at)
                    self._emit(name, at=round(wall, 3), **fields)
                case SessionFailed(reason=reason, code=code):
                    self._end(reason, code)
                    return True
                case SessionClosed(reason=reason):
                    self._end(reason, "closed")
                    return True
        return False

    def _emit(self, name: str, **fields: Any) -> None:
        self._events({"type": "event", "event": name, "ts": time.time(), **fields})

    def _end(self, reason: str, code: str) -> None:
        log.info("session over", extra={"session": self.session_id, "reason": reason, "code": code})
        self._emit("session_ended", reason=reason, code=code)
        self._on_end(self.session_id, reason)
