"""Nothing ends silently (issue #15): when a node's etcd lease is revoked behind its back (an
operator's mistake, or anyone who could write to etcd), the node stops its sessions at once, and
each client hears ``session_ended`` with the code ``lease_lost`` before its socket closes."""

from __future__ import annotations

import asyncio
import functools
import time

import pytest

from ops.etcdserver import EtcdServer
from sessions.audio import speech
from storage.etcd import open_etcd
from tests.interop.conftest import RunningNode, open_websocket_session
from tests.peers import AiortcCall, loopback_ice  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("loopback_ice")]


@functools.cache
def utterance() -> bytes:
    return speech.speak("one two three", rate=190)


def test_a_lease_revoked_from_outside_ends_the_session_with_a_reason(
    running_node: RunningNode, etcd_server: EtcdServer
) -> None:
    async def revoke(lease_id: int) -> None:
        async with open_etcd(etcd_server.endpoint) as etcd:
            await etcd.lease_revoke(lease_id)

    async def scenario() -> list[dict[str, object]]:
        call = AiortcCall(utterance())
        try:
            offer = await call.offer()
            client = await asyncio.to_thread(open_websocket_session, running_node, offer)
            await call.answer(client.answer)
            deadline = time.monotonic() + 10
            while not any(e["event"] == "media_started" for e in client.events):
                assert time.monotonic() < deadline, client.events
                await asyncio.sleep(0.1)
            lease = running_node.node.lease
            assert lease is not None
            await asyncio.to_thread(running_node.call, revoke, lease.id)
            deadline = time.monotonic() + 10
            while not any(e["event"] == "session_ended" for e in client.events):
                assert time.monotonic() < deadline, client.events
                await asyncio.sleep(0.1)
            return client.events
        finally:
            await call.close()

    events = asyncio.run(scenario())
    (ended,) = [e for e in events if e["event"] == "session_ended"]
    assert ended["code"] == "lease_lost", ended
    assert running_node.node.sessions == {}
