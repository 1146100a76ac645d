"""The routing hint in the server's ICE ufrag.

A relay listens on one public UDP port for every session. The first packet of a new client is a
STUN Binding request whose USERNAME is ``"<server ufrag>:<client ufrag>"`` (RFC 8445 §7.2.2), so
the node that answers the offer mints a server ufrag that tells the relay where the session
lives — before etcd's watch may have told it.

Layout (every character an ``ice-char``, RFC 8839 §5.4: ALPHA / DIGIT / "+" / "/")::

    "1" | session | "//" | node | nonce (8) | mac (16)

* ``"1"``: the format version.
* ``session``, ``node``: the ids, one character each for ``[A-Za-z0-9]``; the other id
  characters (storage/keys.py allows ``. _ ~ -``) are not ice-chars and are escaped: ``-`` is
  ``+``, and ``.`` ``_`` ``~`` are ``/d`` ``/u`` ``/t``. ``//`` ends the session id. This is a
  prefix-free code, so the ids read back unambiguously, and readable ids help debugging. They are
  not secret: the ufrag travels in the SDP and in clear STUN.
* ``nonce``: 48 random bits in base64 (standard alphabet, no padding). Two ufrags of one session
  differ, and the ufrag has far more than the 24 random bits RFC 8445 §5.3 asks for.
* ``mac``: HMAC-SHA256 (RFC 2104) under a cluster secret over a domain label and everything
  before it (version, ids, nonce), truncated to 96 bits (RFC 2104 §5: at least 80 bits and half
  the hash length), in base64.

A 20-character session id (sessions/node/host.py ``new_session_id``) and a node id of up to 17 plain
characters give a ufrag of at most 64 characters; ids whose encoded form would exceed RFC 8839's
256 are refused by :func:`mint_ufrag`.

:func:`read_hint` authenticates the ufrag (constant-time comparison) before it decodes the ids,
so the relay never looks up a forged or mutated hint; it returns ``None`` for anything it cannot
authenticate and never raises on remote input. It accepts several secrets, current first, so the
cluster secret can be rotated.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from typing import Final, Protocol, final

import attrs

from storage.keys import check_name

__all__ = [
    "MAX_UFRAG_LENGTH",
    "MIN_SECRET_LENGTH",
    "VERSION",
    "Hint",
    "RandomSource",
    "mint_ufrag",
    "read_hint",
]

#: First character of every hint ufrag; a new layout gets a new version.
VERSION: Final = "1"
#: RFC 8839 §5.4: ice-ufrag = 4*256ice-char.
MAX_UFRAG_LENGTH: Final = 256
#: Shorter cluster secrets are refused: the MAC is only as strong as its key.
MIN_SECRET_LENGTH: Final = 16

_NONCE_BYTES: Final = 6  # 48 bits -> 8 base64 characters, no padding
_MAC_BYTES: Final = 12  # 96 bits -> 16 base64 characters, no padding
_NONCE_CHARS: Final = _NONCE_BYTES * 4 // 3
_MAC_CHARS: Final = _MAC_BYTES * 4 // 3
_SEPARATOR: Final = "//"
# version, one-character session, separator, one-character node, nonce, mac
_MIN_UFRAG_LENGTH: Final = 1 + 1 + len(_SEPARATOR) + 1 + _NONCE_CHARS + _MAC_CHARS
# Keeps MACs of hints apart from anything else a cluster secret might ever authenticate.
_DOMAIN: Final = b"parley/relay/ufrag-hint\x00"

# RFC 8839 §5.4: ice-char = ALPHA / DIGIT / "+" / "/" (ASCII only: no str.isalnum here).
_ICE_CHARS: Final = re.compile(r"[A-Za-z0-9+/]+")

_ESCAPE: Final = {"-": "+", ".": "/d", "_": "/u", "~": "/t"}
_UNESCAPE: Final = {"d": ".", "u": "_", "t": "~"}


@final
@attrs.frozen
class Hint:
    """What an authenticated ufrag says: the session and the node that first owned it."""

    session: str
    node: str


class RandomSource(Protocol):
    """Where nonces come from; the :mod:`secrets` module is one."""

    def token_bytes(self, nbytes: int, /) -> bytes: ...


def _check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, bytes | bytearray):
        raise TypeError("a hint secret must be bytes")
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(f"a hint secret must be at least {MIN_SECRET_LENGTH} bytes")
    return bytes(secret)


def _secrets(secret: bytes | Sequence[bytes]) -> list[bytes]:
    if isinstance(secret, bytes | bytearray):
        return [_check_secret(secret)]
    return [_check_secret(s) for s in secret]


def _encode_id(name: str) -> str:
    return "".join(_ESCAPE.get(c, c) for c in name)


def _mac(secret: bytes, authenticated: str) -> bytes:
    """The MAC characters of a ufrag whose other characters are ``authenticated``."""
    digest = hmac.new(secret, _DOMAIN + authenticated.encode("ascii"), hashlib.sha256).digest()
    return base64.b64encode(digest[:_MAC_BYTES])


def mint_ufrag(session_id: str, node_id: str, secret: bytes, *, rng: RandomSource = secrets) -> str:
    """A fresh server ufrag for ``session_id``, first owned by ``node_id``.

    Raises ValueError for an invalid id (storage/keys.py ``check_name``), a secret shorter than
    :data:`MIN_SECRET_LENGTH` bytes, or ids too long to fit in :data:`MAX_UFRAG_LENGTH`.
    """
    check_name("session", session_id)
    check_name("node", node_id)
    key = _check_secret(secret)
    nonce = rng.token_bytes(_NONCE_BYTES)
    if len(nonce) != _NONCE_BYTES:
        raise ValueError(f"rng returned {len(nonce)} bytes, not {_NONCE_BYTES}")
    authenticated = (
        VERSION
        + _encode_id(session_id)
        + _SEPARATOR
        + _encode_id(node_id)
        + base64.b64encode(nonce).decode("ascii")
    )
    if len(authenticated) + _MAC_CHARS > MAX_UFRAG_LENGTH:
        raise ValueError(
            f"session and node ids too long for an ICE ufrag (RFC 8839 §5.4: at most "
            f"{MAX_UFRAG_LENGTH} characters): {session_id!r}, {node_id!r}"
        )
    return authenticated + _mac(key, authenticated).decode("ascii")


def _decode_ids(body: str) -> Hint | None:
    """Session and node from ``session // node``; None unless exactly that, with valid ids."""
    names: list[str] = []
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        i += 1
        if c == "+":
            out.append("-")
        elif c != "/":
            out.append(c)
        elif i == len(body):
            return None
        else:
            escaped = body[i]
            i += 1
            if escaped == "/" and not names:
                names.append("".join(out))
                out = []
            elif escaped in _UNESCAPE:
                out.append(_UNESCAPE[escaped])
            else:
                return None
    if len(names) != 1:
        return None
    names.append("".join(out))
    session, node = names
    try:
        check_name("session", session)
        check_name("node", node)
    except ValueError:
        return None
    return Hint(session=session, node=node)


def read_hint(ufrag: str, secret: bytes | Sequence[bytes]) -> Hint | None:
    """The hint in a server ufrag, or None if it is malformed or not authenticated.

    ``secret`` is the cluster secret, or several (current first) while one is being rotated.
    Never raises because of ``ufrag``; raises TypeError or ValueError only for bad secrets, a
    local configuration error.
    """
    keys = _secrets(secret)
    if (
        not isinstance(ufrag, str)
        or not _MIN_UFRAG_LENGTH <= len(ufrag) <= MAX_UFRAG_LENGTH
        or not _ICE_CHARS.fullmatch(ufrag)
        or ufrag[0] != VERSION
    ):
        return None
    authenticated, mac = ufrag[:-_MAC_CHARS], ufrag[-_MAC_CHARS:].encode("ascii")
    # Authenticate before reading anything else. Every secret is tried, so the time taken does
    # not depend on which one matched; each comparison is constant-time.
    valid = False
    for key in keys:
        valid |= hmac.compare_digest(_mac(key, authenticated), mac)
    if not valid:
        return None
    return _decode_ids(authenticated[1:-_NONCE_CHARS])
