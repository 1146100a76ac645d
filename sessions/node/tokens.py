"""Access tokens: who may open a session on a node (issue #15).

A token is a JWT (RFC 7519) signed with Ed25519 (``EdDSA``, RFC 8037) by a key of the cluster's
``token-keys/`` directory (``parley certs init`` makes the first, ``parley token rotate`` the
next). Nodes hold only the public halves, several while keys rotate; the ``kid`` header names the
key that signed. Claims:

* ``sub``: who the token is for (per-subject limits and logs use it);
* ``exp`` and ``iat``: when it stops being valid, and when it was made;
* ``agent`` (optional): the only agent the token may talk to;
* ``room`` (optional): carried into the node's logs; the node has no rooms (yet) to check;
* ``max_sessions`` (optional): sessions of this subject a node runs at once;
* ``region`` (optional): where the client is (``eu-west``), as the token's issuer knows it:
  nodes offer it that region's relays first and place it on a node there (issue #19).

:class:`TokenVerifier` turns a token into a :class:`Grant` or raises :class:`TokenRefused` with
the client's error code; :func:`mint_token` makes one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Final, final

import attrs
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from relay.settings import SettingsError, check_region

__all__ = [
    "ALGORITHM",
    "TOKEN_CODES",
    "Grant",
    "TokenRefused",
    "TokenVerifier",
    "mint_token",
]

#: the one signature algorithm tokens use (a token naming another is invalid)
ALGORITHM: Final = "EdDSA"
#: the error codes a token refusal carries
TOKEN_CODES: Final = frozenset(
    {"token_missing", "token_invalid", "token_expired", "token_forbidden"}
)
#: clock skew forgiven between whoever minted a token and the node
LEEWAY = 5.0
#: the longest a subject may be (it goes into logs and counters' keys)
MAX_SUBJECT = 128


class TokenRefused(Exception):
    """A token that does not admit the request; ``code`` is one of :data:`TOKEN_CODES`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@final
@attrs.frozen
class Grant:
    """What a valid token allows."""

    subject: str
    #: unix seconds
    expires: float
    agent: str | None = None
    room: str | None = None
    max_sessions: int | None = None
    #: where the client is, as the token's issuer knows it
    region: str | None = None


def _optional_str(claims: Mapping[str, object], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise TokenRefused("token_invalid", f"claim {name!r} must be a non-empty string")
    return value


@final
@attrs.frozen
class TokenVerifier:
    """Checks tokens against the cluster's public token keys, by ``kid``."""

    keys: Mapping[str, Ed25519PublicKey]
    leeway: float = LEEWAY

    def verify(self, token: str | None, *, now: float | None = None) -> Grant:
        """The grant of ``token``; raises :class:`TokenRefused` (``token_missing``,
        ``token_invalid``, ``token_expired``)."""
        if not token:
            raise TokenRefused("token_missing", "this node needs an access token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRefused("token_invalid", "the token is not a JWT") from None
        kid = header.get("kid")
        key = self.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise TokenRefused("token_invalid", "the token is signed by a key this node lacks")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                leeway=self.leeway,
                options={"require": ["sub", "exp", "iat"], "verify_iat": False},
            )
            if now is not None and claims["exp"] + self.leeway < now:
                raise jwt.ExpiredSignatureError
        except jwt.ExpiredSignatureError:
            raise TokenRefused("token_expired", "the token has expired") from None
        except jwt.PyJWTError:
            # the library's message may quote the token: say only that it is not valid
            raise TokenRefused("token_invalid", "the token is not valid") from None
        return _grant(claims)


def _grant(claims: Mapping[str, object]) -> Grant:
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject or len(subject) > MAX_SUBJECT:
        raise TokenRefused("token_invalid", f"claim 'sub' must be 1 to {MAX_SUBJECT} characters")
    limit = claims.get("max_sessions")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise TokenRefused("token_invalid", "claim 'max_sessions' must be a positive integer")
    expires = claims["exp"]
    assert isinstance(expires, int | float)  # PyJWT checked it is a number
    region = _optional_str(claims, "region")
    if region is not None:
        try:
            check_region(region)
        except SettingsError:
            raise TokenRefused("token_invalid", "claim 'region' is not a region name") from None
    return Grant(
        subject=subject,
        expires=float(expires),
        agent=_optional_str(claims, "agent"),
        room=_optional_str(claims, "room"),
        max_sessions=limit,
        region=region,
    )


def mint_token(
    key: Ed25519PrivateKey,
    kid: str,
    *,
    subject: str,
    ttl: float = 3600.0,
    agent: str | None = None,
    room: str | None = None,
    max_sessions: int | None = None,
    region: str | None = None,
    now: float | None = None,
) -> str:
    """A token for ``subject``, valid ``ttl`` seconds from ``now``, signed with ``key``."""
    if not subject or len(subject) > MAX_SUBJECT:
        raise ValueError(f"a subject is 1 to {MAX_SUBJECT} characters")
    if ttl <= 0:
        raise ValueError("a token's ttl must be positive")
    if max_sessions is not None and max_sessions < 1:
        raise ValueError("max_sessions must be positive")
    issued = time.time() if now is None else now
    claims: dict[str, object] = {"sub": subject, "iat": int(issued), "exp": int(issued + ttl)}
    if agent:
        claims["agent"] = agent
    if room:
        claims["room"] = room
    if max_sessions is not None:
        claims["max_sessions"] = max_sessions
    if region:
        claims["region"] = check_region(region, "region")
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": kid})
