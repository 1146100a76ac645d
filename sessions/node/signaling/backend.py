"""The backend as both transports call it: opening, attaching to and closing sessions, bounded,
counted, logged.

WHIP routes and WebSocket sessions share one :class:`BackendCalls` (and through it the server's
counters), so a session is opened and closed the same way whichever transport carried its offer.
Session secrets pass through here and are never logged.
"""

from __future__ import annotations

import hmac
import logging
from typing import Literal, final

import attrs
import trio

from sessions.node.signaling.admission import Gate
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


@final
@attrs.define
class BackendCalls:
    """``backend`` behind ``limits`` and ``gate``, counting into ``counters`` (the server's,
    shared)."""

    backend: SessionBackend
    limits: SignalingLimits
    counters: dict[str, int]
    gate: Gate

    def count(self, name: str) -> None:
        """One more ``name``; error codes count under their own name."""
        self.counters[name] = self.counters.get(name, 0) + 1

    async def open_session(
        self,
        offer: str,
        transport: Literal["websocket", "http"],
        remote: str,
        token: str | None,
    ) -> SessionHandle | Refusal:
        """Check ``token`` at the gate, then ask the backend; a refusal comes back as the error
        to send (status for HTTP). The session holds its subject's slot until
        :meth:`session_gone`."""
        log.debug("offer received", extra={"remote": remote, "transport": transport, "sdp": offer})
        grant = self.gate.reserve(token)
        if isinstance(grant, Refusal):
            log.info("offer refused", extra={"remote": remote, "code": grant.code})
            return grant
        try:
            outcome = await self._open(offer, transport, remote)
        except BaseException:
            self.gate.release(grant)
            raise
        if isinstance(outcome, SessionHandle):
            self.gate.opened(outcome.session_id, grant)
            log.info(
                "session admitted",
                extra={"session": outcome.session_id, "subject": grant.subject, "room": grant.room},
            )
        else:
            self.gate.release(grant)
        return outcome

    def session_gone(self, session_id: str) -> None:
        """The session is no longer served here (ended, moved): its subject's slot is free."""
        self.gate.closed(session_id)

    async def _open(
        self, offer: str, transport: Literal["websocket", "http"], remote: str
    ) -> SessionHandle | Refusal:
        try:
            handle = await self.backend.open_session(offer, transport=transport)
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
