"""A move's target keeps what the source forwards before it registered the session."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from relay.tunnel import frames
from sessions.node import relayed
from sessions.node.relayed import RelayedMedia


class FakeTunnel:
    class peer:
        ident = "relay-1"


def media() -> RelayedMedia:
    none: Any = None
    return RelayedMedia("node-2", none, b"k" * 32, lambda: None, lambda session: None)


def from_client(session: str, payload: bytes) -> bytes:
    return frames.encode_from_client(session, ("192.0.2.1", 5000), payload)


async def test_datagrams_before_registration_go_first_into_the_new_inbox(
    autojump_clock: trio.testing.MockClock,
) -> None:
    path, tunnel = media(), FakeTunnel()
    for i in range(3):
        path.datagram_received(tunnel, from_client("s1", b"early-%d" % i))  # type: ignore[arg-type]
    assert path.counters["early"] == 3 and path.counters["unknown_session"] == 0
    port = path.register("s1", "ufrag")
    path.datagram_received(tunnel, from_client("s1", b"direct"))  # type: ignore[arg-type]
    got = [port.inbox.receive_nowait()[0] for _ in range(4)]
    assert got == [b"early-0", b"early-1", b"early-2", b"direct"]
    assert port.inbox.statistics().current_buffer_used == 0


async def test_early_datagrams_are_bounded_and_expire(
    autojump_clock: trio.testing.MockClock,
) -> None:
    path, tunnel = media(), FakeTunnel()
    for i in range(relayed.EARLY_PER_SESSION + 5):
        path.datagram_received(tunnel, from_client("s1", b"%d" % i))  # type: ignore[arg-type]
    assert path.counters["early_dropped"] == 5
    for n in range(relayed.EARLY_SESSIONS + 2):
        path.datagram_received(tunnel, from_client(f"t{n}", b"x"))  # type: ignore[arg-type]
    assert path.counters["unknown_session"] == 3  # s1 and 63 others fill it
    await trio.sleep(relayed.EARLY_FOR + 0.1)
    path.datagram_received(tunnel, from_client("late", b"x"))  # type: ignore[arg-type]
    assert path.counters["early_dropped"] == 5 + relayed.EARLY_PER_SESSION + 63
    port = path.register("s1", "ufrag")
    assert port.inbox.statistics().current_buffer_used == 0  # expired, not fed
