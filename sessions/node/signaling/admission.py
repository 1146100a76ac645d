"""Who may open a session here: access tokens, and what each subject may hold (issue #15).

A :class:`Gate` is the signaling server's door. In ``token`` mode an offer (a WHIP POST, or a
WebSocket offer) needs a valid access token (sessions/node/tokens.py): ``Authorization: Bearer``,
or ``?token=`` in the URL for browsers, or a ``token`` field in the WebSocket offer. Refusals carry
the codes ``token_missing``, ``token_invalid``, ``token_expired`` (HTTP 401) and
``token_forbidden`` (403: another agent, or the subject's ``max_sessions`` reached). A WHIP
DELETE needs a token too, of the subject that opened the session when this node knows it.
Re-attaching with a session's secret needs none: the secret is the credential.

``open`` mode admits anyone; it exists only as an explicit setting (``node.auth = "open"``).
"""

from __future__ import annotations

import logging
import time
from typing import Literal, final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sessions.node.settings import NodeSetup
from sessions.node.signaling.messages import Refusal
from sessions.node.tokens import Grant, TokenRefused, TokenVerifier, mint_token

__all__ = ["DEMO_TOKEN_TTL", "Gate", "node_gate", "refusal_status"]

log = logging.getLogger("parley.signaling")

#: seconds a demo page's token is valid (enough to open a call; a call outlives its token)
DEMO_TOKEN_TTL = 300.0
#: the subject of sessions opened on an open node
OPEN_SUBJECT = "anonymous"


def refusal_status(code: str) -> int:
    """The HTTP status of a token refusal: 403 for a valid token that does not allow what was
    asked, 401 for a token that is missing or not valid (RFC 6750 §3.1)."""
    return 403 if code == "token_forbidden" else 401


@final
class Gate:
    """Checks a request's token and keeps what each subject holds on this node."""

    def __init__(
        self,
        mode: Literal["token", "open"],
        *,
        verifier: TokenVerifier | None = None,
        agent: str | None = None,
        demo_signer: tuple[str, Ed25519PrivateKey] | None = None,
    ) -> None:
        if mode == "token" and verifier is None:
            raise ValueError("a token gate needs the token keys")
        self.mode = mode
        self.verifier = verifier
        #: the node's agent: a token naming another is refused
        self.agent = agent
        self.demo_signer = demo_signer
        #: session id → subject, for the sessions opened here and still live
        self._subjects: dict[str, str] = {}
        #: subject → sessions opened here and live (or being opened)
        self._held: dict[str, int] = {}

    @classmethod
    def open(cls) -> Gate:
        """A gate that admits anyone (``node.auth = "open"``)."""
        return cls("open")

    def check(self, token: str | None) -> Grant:
        """The grant of ``token``; raises :class:`TokenRefused`."""
        if self.verifier is None:
            return Grant(subject=OPEN_SUBJECT, expires=float("inf"))
        grant = self.verifier.verify(token)
        if grant.agent is not None and self.agent is not None and grant.agent != self.agent:
            raise TokenRefused(
                "token_forbidden", f"the token allows agent {grant.agent!r}, not {self.agent!r}"
            )
        return grant

    def reserve(self, token: str | None) -> Grant | Refusal:
        """Check ``token`` and take one of its subject's session slots (give it back with
        :meth:`opened` or :meth:`release`); a refusal comes back as the error to send."""
        try:
            grant = self.check(token)
        except TokenRefused as exc:
            return Refusal(refusal_status(exc.code), exc.code, exc.message)
        held = self._held.get(grant.subject, 0)
        if grant.max_sessions is not None and held >= grant.max_sessions:
            return Refusal(
                403,
                "token_forbidden",
                f"the token allows {grant.max_sessions} sessions at once on a node",
            )
        self._held[grant.subject] = held + 1
        return grant

    def opened(self, session_id: str, grant: Grant) -> None:
        """The reserved slot is the live session ``session_id`` now."""
        self._subjects[session_id] = grant.subject

    def release(self, grant: Grant) -> None:
        """Give back a slot whose session was not opened."""
        self._drop(grant.subject)

    def closed(self, session_id: str) -> None:
        """``session_id`` is no longer this node's (ended, moved): its slot is free."""
        subject = self._subjects.pop(session_id, None)
        if subject is not None:
            self._drop(subject)

    def _drop(self, subject: str) -> None:
        left = self._held.get(subject, 0) - 1
        if left > 0:
            self._held[subject] = left
        else:
            self._held.pop(subject, None)

    def may_end(self, session_id: str, token: str | None) -> Refusal | None:
        """Whether ``token`` may end ``session_id`` (with its secret, checked elsewhere): a valid
        token, of the session's subject if it was opened here."""
        if self.verifier is None:
            return None
        try:
            grant = self.verifier.verify(token)
        except TokenRefused as exc:
            return Refusal(refusal_status(exc.code), exc.code, exc.message)
        subject = self._subjects.get(session_id)
        if subject is not None and subject != grant.subject:
            return Refusal(403, "token_forbidden", "the session was opened by another subject")
        return None

    def demo_token(self) -> tuple[str, float] | None:
        """A short-lived token for the demo page and its expiry, or None if this node does not
        mint them."""
        if self.demo_signer is None:
            return None
        kid, key = self.demo_signer
        token = mint_token(key, kid, subject="demo-page", ttl=DEMO_TOKEN_TTL, max_sessions=4)
        return token, time.time() + DEMO_TOKEN_TTL


def node_gate(config: NodeSetup) -> Gate:
    """The gate ``config`` asks for. Raises the cluster's SettingsError when token mode has no
    token keys to check with: a node that could admit no one should not start."""
    node = config.node
    if node.auth == "open":
        log.warning("node.auth = open: anyone who reaches this node may open sessions")
        return Gate.open()
    verifier = TokenVerifier(config.cluster.token_keys())
    signer = None
    if node.demo_tokens:
        signer = config.cluster.token_signer()
        if signer is None:
            log.warning("node.demo_tokens is set but cluster.certs has no private token key")
    log.info("sessions need access tokens", extra={"keys": len(verifier.keys)})
    return Gate("token", verifier=verifier, agent=node.agent, demo_signer=signer)
