"""The backend as both transports call it: opening, attaching to and closing sessions, bounded,
counted, logged.

WHIP routes and WebSocket sessions share one :class:`BackendCalls` (and through it the server's
counters), so a session is opened and closed the same way whichever transport carried its offer.
Session secrets pass through here and are never logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Literal, final

import attrs
import h11
import trio

from relay.settings import SettingsError, check_region
from sessions.node.signaling.admission import Gate
from sessions.node.signaling.http import header
from sessions.node.signaling.limits import SETUP_TIMEOUT, Limiter
from sessions.node.signaling.messages import (
    CLIENT_CODES,
    Redirect,
    Refusal,
    SessionBackend,
    SessionHandle,
    SignalingLimits,
    SignalingRefused,
)
from sessions.webrtc.errors import SdpError

__all__ = ["BackendCalls"]

log = logging.getLogger("parley.signaling")

#: HTTP statuses of the refusals to control a session (RFC 9110 §15.5.4, §15.5.5); any other
#: refusal code is a 503
_CONTROL_STATUS = {"forbidden": 403, "unknown_session": 404}


#: events that say a session's ICE connected (or got further): it is no longer half-open
_CONNECTED_EVENTS = frozenset({"ice_connected", "dtls_connected", "media_started"})


def region_hint(value: bytes | None) -> str | None:
    """The client's region as a trusted header names it; None if absent or not a region name
    (a bad value is the load balancer's mistake: the session is served, unsteered by it)."""
    if not value:
        return None
    text = value.decode("latin-1").strip().lower()
    try:
        return check_region(text) or None
    except SettingsError:
        return None


@final
@attrs.define
class BackendCalls:
    """``backend`` behind ``limits``, ``gate`` and ``limiter``, counting into ``counters`` (the
    server's, shared)."""

    backend: SessionBackend
    limits: SignalingLimits
    counters: dict[str, int]
    gate: Gate
    limiter: Limiter
    #: where an offer from a client of a region goes instead (None: here); no placement if None
    placer: Callable[[str | None], Awaitable[Redirect | None]] | None = None
    #: the header (lower case) in which a trusted load balancer names the client's region
    region_header: bytes | None = None

    #: the region of a client's IP address (sessions/node/geoip.py); None: no database
    region_lookup: Callable[[str], str | None] | None = None

    def region_of(self, request: h11.Request, remote: str) -> str | None:
        """The client's region as the trusted header of ``request`` names it, else as the
        region database has ``remote``'s address (``HOST:PORT``); None: unknown."""
        if self.region_header is not None:
            named = region_hint(header(request, self.region_header))
            if named is not None:
                return named
        if self.region_lookup is None:
            return None
        host = remote[1 : remote.find("]")] if remote.startswith("[") else remote.rpartition(":")[0]
        return self.region_lookup(host)

    def count(self, name: str) -> None:
        """One more ``name``; error codes count under their own name."""
        self.counters[name] = self.counters.get(name, 0) + 1

    async def open_session(
        self,
        offer: str,
        transport: Literal["websocket", "http"],
        remote: str,
        token: str | None,
        source: str,
        region: str | None = None,
    ) -> SessionHandle | Refusal | Redirect:
        """Check the offer against ``source``'s rate, ``token`` at the gate, then the half-open
        and capacity limits, then ask the backend; a refusal comes back as the error to send
        (status for HTTP; it is counted when sent). The session holds its subject's slot until
        :meth:`session_gone`, and a half-open slot until its ICE connects.

        The client's region is the token's ``region`` claim, else ``region`` (the trusted
        header's); when :attr:`placer` says a node of that region should answer, the client is
        sent there (a :class:`Redirect`) and holds nothing here."""
        log.debug("offer received", extra={"remote": remote, "transport": transport, "sdp": offer})
        limited = self.limiter.offer(source, trio.current_time())
        if limited is not None:
            return self._refused(limited, remote)
        grant = self.gate.reserve(token)
        if isinstance(grant, Refusal):
            return self._refused(grant, remote)
        region = grant.region or region
        if self.placer is not None:
            try:
                placed = await self.placer(region)
            except BaseException:
                self.gate.release(grant)
                raise
            if placed is not None:
                self.gate.release(grant)
                self.count("placed_elsewhere")
                log.info(
                    "offer placed in its region",
                    extra={"remote": remote, "region": region, "node": placed.node},
                )
                return placed
        # on an open node everyone is the same subject: only sources count there
        subject = grant.subject if self.gate.mode == "token" else None
        # issue #15: the half-open slot and the node's place are taken here, before the first
        # await, so that concurrent offers cannot all pass a check meant for one of them
        setup = self.limiter.admit(source, subject, trio.current_time())
        if isinstance(setup, Refusal):
            self.gate.release(grant)
            return self._refused(setup, remote)
        try:
            outcome = await self._open(offer, transport, remote, region)
        except BaseException:
            self.gate.release(grant)
            self.limiter.cancel(setup)
            raise
        if isinstance(outcome, SessionHandle):
            self.gate.opened(outcome.session_id, grant)
            self.limiter.opened(setup, outcome.session_id, trio.current_time())
            log.info(
                "session admitted",
                extra={"session": outcome.session_id, "subject": grant.subject, "room": grant.room},
            )
        else:
            self.gate.release(grant)
            self.limiter.cancel(setup)
        return outcome

    def _refused(self, refusal: Refusal, remote: str) -> Refusal:
        log.info("offer refused", extra={"remote": remote, "code": refusal.code})
        return refusal

    def setup_deadline(self, session_id: str) -> float:
        """When ``session_id`` is to be ended if its ICE has not connected by then (Trio time;
        infinity when it is not half-open)."""
        return self.limiter.deadline(session_id)

    def session_event(self, session_id: str, name: object) -> None:
        """The backend sent ``session_id``'s client the event ``name``."""
        if name in _CONNECTED_EVENTS:
            self.limiter.connected(session_id)

    def setup_timed_out(self, session_id: str) -> str:
        """``session_id`` did not connect in time: counted, logged; the reason to end it with."""
        self.count(SETUP_TIMEOUT)
        self.limiter.gone(session_id)
        within = self.limits.setup_within
        log.info("session not connected in time", extra={"session": session_id, "within": within})
        return f"ICE did not connect within {within:g} s of the answer"

    def session_gone(self, session_id: str, *, attached_elsewhere: bool = False) -> None:
        """The session is no longer served through this socket or watcher: ended or moved, and
        its subject's slot is free; or ``attached_elsewhere``, another socket of this node has
        it now, and its slots stay with it."""
        if attached_elsewhere:
            return
        self.gate.closed(session_id)
        self.limiter.gone(session_id)

    async def _open(
        self, offer: str, transport: Literal["websocket", "http"], remote: str, region: str | None
    ) -> SessionHandle | Refusal:
        try:
            handle = await self.backend.open_session(offer, transport=transport, region=region)
        except SdpError as exc:
            self.count("refused")
            log.info("offer refused", extra={"remote": remote, "code": exc.code})
            log.debug("offer refused: %s", exc, extra={"remote": remote, "code": exc.code})
            return Refusal(400, exc.code, str(exc))
        except SignalingRefused as exc:
            self.count("refused")
            log.info("offer refused", extra={"remote": remote, "code": exc.code})
            status = 400 if exc.code in CLIENT_CODES else 503
            return Refusal(status, exc.code, exc.message)
        except Exception:
            log.exception("backend failed to open a session", extra={"remote": remote})
            return Refusal(500, "internal", "internal error")
        self.count("sessions_opened")
        log.info(
            "session opened",
            extra={"session": handle.session_id, "transport": transport, "remote": remote},
        )
        log.debug("answer sent", extra={"session": handle.session_id, "sdp": handle.answer_sdp})
        return handle

    async def close_session(self, session_id: str, reason: str) -> bool:
        """``backend.close_session``, shielded and bounded: it runs during teardown too."""
        closed = False
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.limits.close_session_timeout) as scope:
                try:
                    closed = await self.backend.close_session(session_id, reason)
                except Exception:
                    self.count("internal")
                    log.exception(
                        "backend failed to close a session", extra={"session": session_id}
                    )
                    return False
            if scope.cancelled_caught:
                log.warning("backend close_session timed out", extra={"session": session_id})
                return False
        if closed:
            self.count("sessions_closed")
        log.info("session closed", extra={"session": session_id, "reason": reason, "known": closed})
        return closed

    async def attach_session(
        self, session_id: str, secret: str, remote: str
    ) -> SessionHandle | Redirect | Refusal:
        """Ask the backend for the session's events on a new socket; a refusal comes back as
        the error to send. Wrong secrets and unknown sessions are counted (as refusals are)."""
        try:
            outcome = await self.backend.attach_session(session_id, secret)
        except SignalingRefused as exc:
            log.info(
                "attach refused", extra={"session": session_id, "remote": remote, "code": exc.code}
            )
            return Refusal(_CONTROL_STATUS.get(exc.code, 503), exc.code, exc.message)
        except Exception:
            log.exception("backend failed to attach a socket", extra={"session": session_id})
            return Refusal(500, "internal", "internal error")
        if isinstance(outcome, SessionHandle) and not (
            outcome.session_id == session_id and hmac.compare_digest(outcome.secret, secret)
        ):
            # a backend bug that would hand a session to whoever asked: refuse, fail closed
            outcome.events.close()
            log.error("backend attached a socket to another session or secret")
            return Refusal(500, "internal", "internal error")
        if isinstance(outcome, Redirect):
            self.count("redirects")
            log.info(
                "attach redirected",
                extra={"session": session_id, "remote": remote, "node": outcome.node},
            )
        else:
            self.count("attached")
            log.info("socket attached", extra={"session": session_id, "remote": remote})
        return outcome

    async def end_session_by_secret(
        self, session_id: str, secret: str, remote: str
    ) -> Refusal | None:
        """Ask the backend to end the session wherever it lives, within ``close_session_timeout``;
        None once it is ended, else the refusal to answer with."""
        ended = False
        with trio.move_on_after(self.limits.close_session_timeout) as scope:
            try:
                ended = await self.backend.end_session_by_secret(session_id, secret)
            except SignalingRefused as exc:
                log.info(
                    "session end refused",
                    extra={"session": session_id, "remote": remote, "code": exc.code},
                )
                return Refusal(_CONTROL_STATUS.get(exc.code, 503), exc.code, exc.message)
            except Exception:
                log.exception("backend failed to end a session", extra={"session": session_id})
                return Refusal(500, "internal", "internal error")
        if scope.cancelled_caught:
            log.warning("backend end_session_by_secret timed out", extra={"session": session_id})
            return Refusal(503, "timeout", "the session did not end in time")
        if not ended:
            return Refusal(404, "unknown_session", "no such session")
        self.count("sessions_closed")
        log.info("session ended by its secret", extra={"session": session_id, "remote": remote})
        return None
