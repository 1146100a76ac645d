"""The plain-HTTP routes of the signaling port: WHIP sessions, health, static pages.

WHIP-style (RFC 9725 shape): ``POST /v1/session`` with an ``application/sdp`` offer answers
``201 Created`` with the SDP answer and ``Location: /v1/session/<id>/<secret>``, the session URL
(RFC 9725 §4.2). ``DELETE`` on that URL ends the session, on any node, wherever the session lives
now: 200, or 403 ``forbidden`` for a wrong secret, 404 ``unknown_session``. The id alone is
public (it is in the ufrag of every STUN check): ``DELETE /v1/session/<id>`` is always 403.
Both need an access token in token mode (:mod:`.admission`): 401 ``token_missing``,
``token_invalid``, ``token_expired``, 403 ``token_forbidden``. ``GET /v1/demo-token`` gives a
loopback client a short-lived token (``{"token", "expires"}``) where the node mints them for its
demo page, 404 elsewhere. ``GET /healthz`` answers ``{"ok": true}``; pages are served as given.
Errors raise :class:`HttpError`, which the server turns into the JSON error response.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import final

import h11
import trio

from sessions.node.signaling.backend import BackendCalls
from sessions.node.signaling.http import (
    HttpConnection,
    HttpError,
    header,
    is_loopback,
    request_token,
)
from sessions.node.signaling.limits import SETUP_TIMEOUT
from sessions.node.signaling.messages import (
    SESSION_PATH,
    Redirect,
    Refusal,
    SessionHandle,
    is_control_token,
)

__all__ = ["DEMO_TOKEN_PATH", "HEALTH_PATH", "HttpRoutes"]

_SESSION_PREFIX = SESSION_PATH + "/"
HEALTH_PATH = "/healthz"
DEMO_TOKEN_PATH = "/v1/demo-token"
#: RFC 6750 §3: a 401 names the scheme the client should use
_BEARER = [("WWW-Authenticate", 'Bearer realm="parley"')]


def _refused(refusal: Refusal) -> HttpError:
    headers = list(_BEARER) if refusal.status == 401 else []
    if refusal.retry_after is not None:
        # RFC 6585 §4: a 429 may say how long to wait before asking again
        headers.append(("Retry-After", str(refusal.retry_after)))
    return HttpError(refusal.status, refusal.code, refusal.message, headers)


@final
class HttpRoutes:
    """Answers one HTTP request that is not a WebSocket upgrade."""

    def __init__(self, calls: BackendCalls, pages: Mapping[str, tuple[str, bytes]]) -> None:
        self.calls = calls
        #: path → (content type, content)
        self.pages = dict(pages)
        for path in self.pages:
            if not path.startswith("/") or path in (SESSION_PATH, HEALTH_PATH, DEMO_TOKEN_PATH):
                raise ValueError(f"page path {path!r} is not a free absolute path")
            if path.startswith(_SESSION_PREFIX):
                raise ValueError(f"page path {path!r} is under {SESSION_PATH}")

    async def route(
        self,
        connection: HttpConnection,
        request: h11.Request,
        body: bytes,
        remote: str,
        watchers: trio.Nursery,
        source: str,
    ) -> None:
        """Answer ``request`` from ``remote`` (counted as ``source``, sessions/node/signaling/
        limits.py); ``watchers`` runs a task per WHIP session until it ends."""
        method = request.method.decode("ascii", "replace")
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        head_only = method == "HEAD"
        if path == SESSION_PATH:
            allow = [("Allow", "GET, POST, OPTIONS")]
            if method == "POST":
                await self._whip_post(connection, request, body, remote, watchers, source)
            elif method == "OPTIONS":
                await connection.respond(204, headers=[*allow, ("Accept-Post", "application/sdp")])
            elif method in ("GET", "HEAD"):
                raise HttpError(
                    426,
                    "upgrade_required",
                    f"GET {SESSION_PATH} is the WebSocket endpoint",
                    [("Upgrade", "websocket")],
                )
            else:
                raise HttpError(405, "method_not_allowed", f"{method} not allowed here", allow)
        elif path.startswith(_SESSION_PREFIX):
            # /v1/session/<id>/<secret>, or /v1/session/<id> (which no one may delete)
            session_id, _, secret = path[len(_SESSION_PREFIX) :].partition("/")
            allow = [("Allow", "DELETE, OPTIONS")]
            if not session_id or "/" in secret:
                raise HttpError(404, "not_found", "no such resource")
            if method == "DELETE":
                await self._whip_delete(connection, request, session_id, secret, remote)
            elif method == "OPTIONS":
                await connection.respond(204, headers=allow)
            else:
                # PATCH included: an ICE-lite node takes no trickled candidates (RFC 9725 §4.3)
                raise HttpError(405, "method_not_allowed", f"{method} not allowed here", allow)
        elif path == DEMO_TOKEN_PATH:
            await self._demo_token(connection, method)
        elif path == HEALTH_PATH or path in self.pages:
            if method not in ("GET", "HEAD"):
                raise HttpError(
                    405,
                    "method_not_allowed",
                    f"{method} not allowed here",
                    [("Allow", "GET, HEAD")],
                )
            if path == HEALTH_PATH:
                content_type, content = "application/json", b'{"ok": true}'
            else:
                content_type, content = self.pages[path]
            await connection.respond(
                200,
                body=content,
                headers=[("Content-Type", content_type), ("Cache-Control", "no-store")],
                head_only=head_only,
            )
        else:
            raise HttpError(404, "not_found", "no such resource")

    async def _whip_post(
        self,
        connection: HttpConnection,
        request: h11.Request,
        body: bytes,
        remote: str,
        watchers: trio.Nursery,
        source: str,
    ) -> None:
        content_type = header(request, b"content-type") or b""
        media_type = content_type.split(b";", 1)[0].strip().lower()
        if media_type != b"application/sdp":
            raise HttpError(
                415,
                "unsupported_media_type",
                "the offer must be sent as application/sdp",
                [("Accept-Post", "application/sdp")],
            )
        try:
            offer = body.decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(400, "bad_sdp", "the offer is not UTF-8") from None
        if not offer.strip():
            raise HttpError(400, "bad_sdp", "the offer is empty")
        handle = await self.calls.open_session(
            offer,
            "http",
            remote,
            request_token(request),
            source,
            self.calls.region_of(request, remote),
        )
        if isinstance(handle, Refusal):
            raise _refused(handle)
        if isinstance(handle, Redirect):
            # RFC 9110 §15.4.8: the client sends the same POST, offer and token, to the node of
            # its region
            raise HttpError(
                307,
                "placed_in_region",
                f"a node of your region answers this offer: {handle.node}",
                [("Location", "http" + handle.url.removeprefix("ws"))],
            )
        session_id = handle.session_id
        watchers.start_soon(self._watch_http_session, handle)
        try:
            await connection.respond(
                201,
                body=handle.answer_sdp.encode(),
                headers=[
                    ("Content-Type", "application/sdp"),
                    # the session URL carries the secret: whoever holds it controls the session
                    ("Location", f"{_SESSION_PREFIX}{session_id}/{handle.secret}"),
                    ("Cache-Control", "no-store"),
                ],
            )
        except BaseException:
            # nobody can reach a session whose answer never left: end it now
            await self.calls.close_session(session_id, "answer not delivered")
            raise

    async def _whip_delete(
        self,
        connection: HttpConnection,
        request: h11.Request,
        session_id: str,
        secret: str,
        remote: str,
    ) -> None:
        # issue #15: the id is public, only the secret is a handle on the session. Asked
        # without it, the answer does not tell whether the session exists.
        if not secret or not is_control_token(secret):
            raise HttpError(403, "forbidden", "ending a session takes its session URL")
        if not is_control_token(session_id):
            raise HttpError(404, "unknown_session", "no such session")
        # RFC 9725 §4.2: the session URL is used with the token that created the session
        denied = self.calls.gate.may_end(session_id, request_token(request))
        if denied is not None:
            raise _refused(denied)
        refusal = await self.calls.end_session_by_secret(session_id, secret, remote)
        if refusal is not None:
            raise HttpError(refusal.status, refusal.code, refusal.message)
        await connection.respond(200)

    async def _watch_http_session(self, handle: SessionHandle) -> None:
        """HTTP sessions have no event channel: drop their events until the backend closes it
        (the session ended, moved to another node, or a WebSocket attached to it). A session
        whose ICE has not connected by its setup deadline is ended (issue #15)."""
        session_id = handle.session_id
        attached_elsewhere = False
        try:
            async with handle.events:
                while True:
                    with trio.move_on_at(self.calls.setup_deadline(session_id)) as setup:
                        try:
                            item = await handle.events.receive()
                        except trio.EndOfChannel:
                            break
                    if setup.cancelled_caught:
                        self.calls.setup_timed_out(session_id)
                        await self.calls.close_session(session_id, SETUP_TIMEOUT)
                        break
                    name = item.get("event")
                    self.calls.session_event(session_id, name)
                    attached_elsewhere = name == "session_attached_elsewhere"
        finally:
            self.calls.session_gone(session_id, attached_elsewhere=attached_elsewhere)

    async def _demo_token(self, connection: HttpConnection, method: str) -> None:
        """A token for the demo page this node serves: loopback clients only, and only where
        the node mints them (``node.demo_tokens``); 404 otherwise, as if there were no route."""
        if method != "GET":
            raise HttpError(
                405, "method_not_allowed", f"{method} not allowed here", [("Allow", "GET")]
            )
        minted = self.calls.gate.demo_token() if is_loopback(connection.stream) else None
        if minted is None:
            raise HttpError(404, "not_found", "no such resource")
        token, expires = minted
        self.calls.count("demo_tokens")
        await connection.respond(
            200,
            body=json.dumps({"token": token, "expires": expires}).encode(),
            headers=[("Content-Type", "application/json"), ("Cache-Control", "no-store")],
        )
