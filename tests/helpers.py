"""Small helpers shared by the suites."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
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


def run_status(endpoint: str, prefix: str = "/parley") -> dict[str, Any]:
    """What `parley status --json` prints, run as a separate process."""
    out = subprocess.run(
        [*PARLEY, "status", "--json", "--etcd", endpoint, "--prefix", prefix],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    status: dict[str, Any] = json.loads(out.stdout)
    return status
