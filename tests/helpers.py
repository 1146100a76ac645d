"""Small helpers shared by the suites."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

T = TypeVar("T")

#: the parley CLI of this checkout, as a user runs it
PARLEY = [sys.executable, "-m", "ops.cli"]


async def eventually(
    probe: Callable[[], Awaitable[T | None]], ok: Callable[[T], bool], *, within: float = 10
) -> T:
    """Poll ``probe`` until its result satisfies ``ok``: for state that lives in etcd or in
    another process, which no Trio event of ours can announce."""
    with trio.fail_after(within):
        while True:
            value = await probe()
            if value is not None and ok(value):
                return value
            await trio.sleep(0.05)


def run_status(endpoint: str, prefix: str = "/parley", certs: Path | None = None) -> dict[str, Any]:
    """What `parley status --json` prints, run as a separate process; ``certs``: the
    certificate directory whose operator certificate it presents to a TLS etcd (https://)."""
    flags = ["--certs", str(certs)] if certs is not None else []
    out = subprocess.run(
        [*PARLEY, "status", "--json", "--etcd", endpoint, "--prefix", prefix, *flags],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    status: dict[str, Any] = json.loads(out.stdout)
    return status


def token_keys(certs: Path) -> Path:
    """``certs`` with a token key pair in it (as `parley certs init` makes), made if missing."""
    from ops.certs import write_token_key
    from relay.settings import TOKEN_KEYS_DIR

    if not any((certs / TOKEN_KEYS_DIR).glob("*.key")):
        certs.mkdir(parents=True, exist_ok=True)
        write_token_key(certs)
    return certs


def make_token(certs: Path, **claims: Any) -> str:
    """An access token from the newest key in ``certs``, as `parley token create` makes one
    (keywords: subject, ttl, agent, room, max_sessions)."""
    from ops.tokens import create_token
    from relay.settings import ClusterSettings

    return create_token(ClusterSettings(certs=str(certs)), **claims)


def bearer(token: str) -> tuple[str, str]:
    """The request header that carries ``token`` (RFC 6750 §2.1)."""
    return ("Authorization", f"Bearer {token}")
