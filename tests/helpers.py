"""Small helpers shared by the suites."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")


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
