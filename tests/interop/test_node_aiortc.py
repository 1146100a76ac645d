"""A node as users run it: aiortc calls it through signaling, hears its speech echoed, and the
session survives its actor crashing (restarted from the last checkpoint, not from zero)."""

from __future__ import annotations

import asyncio
import functools
import math
import urllib.error
import urllib.request
from typing import Any

import pytest

from ops.etcdserver import EtcdServer
from sessions.audio import speech
from tests.helpers import run_status
from tests.interop.conftest import RunningNode, whip_delete, whip_post
from tests.peers import AiortcCall, loopback_ice  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("loopback_ice")]


def bearer_of(node: RunningNode) -> dict[str, str]:
    return {"Authorization": f"Bearer {node.access_token}"}


def delete_status(url: str, headers: dict[str, str]) -> int:
    """The HTTP status a DELETE of ``url`` gets."""
    request = urllib.request.Request(url, method="DELETE", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@functools.cache
def utterance() -> bytes:
    return speech.speak("one two three four five six", rate=190)


def test_aiortc_through_signaling_echo_stats_crash_restart_and_delete(
    running_node: RunningNode, etcd_server: EtcdServer
) -> None:
    sent = utterance()
    node = running_node.node

    async def scenario() -> dict[str, Any]:
        call = AiortcCall(sent)
        loop = asyncio.get_running_loop()
        try:
            offer = await call.offer()
            status, location, answer = await asyncio.to_thread(
                whip_post, running_node.whip, offer, running_node.access_token
            )
            assert status == 201 and location.startswith("/v1/session/")
            session = location.split("/")[3]
            await call.answer(answer)
            start = loop.time()
            await asyncio.sleep(len(sent) / 96_000 + 1.5)
            before, _ = speech.correlation(sent, call.pcm_between(start, math.inf), 48_000)

            # A stranger who saw the session id (it is in the ufrag of every STUN check) tries
            # to hang the call up: no token, a wrong secret, the id alone. Nothing ends it.
            base = running_node.whip.split("/v1/")[0]
            attacks = {
                "no token": (f"{location}", {}),
                "wrong secret": (f"/v1/session/{session}/x{'0' * 42}", bearer_of(running_node)),
                "id alone": (f"/v1/session/{session}", bearer_of(running_node)),
            }
            refused = {
                name: await asyncio.to_thread(delete_status, base + path, headers)
                for name, (path, headers) in attacks.items()
            }
            assert session in node.sessions, refused

            # The actor crashes (an unknown message is a local bug: let it crash); its
            # supervisor restarts it from the last checkpoint and the call goes on.
            ref = node.registry.lookup(session)
            await asyncio.to_thread(running_node.call, ref.tell, "crash, please")
            # Judge the echo once the restored jitter buffer has settled.
            settled = loop.time() + 1.0
            await asyncio.sleep(1.0 + len(sent) / 96_000 + 1.5)
            heard = call.pcm_between(settled, math.inf)
            after, _ = speech.correlation(sent, heard, len(heard) // 2 - 1)
            status_json = await asyncio.to_thread(run_status, etcd_server.endpoint, "/parley-test")
            deleted = await asyncio.to_thread(
                whip_delete, running_node.whip, location, running_node.access_token
            )
            return {
                "refused": refused,
                "session": session,
                "before": before,
                "after": after,
                "status": status_json,
                "deleted": deleted,
            }
        finally:
            await call.close()

    result = asyncio.run(scenario())
    assert result["refused"] == {"no token": 401, "wrong secret": 403, "id alone": 403}, result
    assert result["before"] > 0.6, result["before"]
    assert result["after"] > 0.6, result["after"]
    (entry,) = result["status"]["sessions"]
    assert entry["id"] == result["session"] and entry["owner"] == "n1"
    stats = entry["stats"]
    assert stats is not None and stats["packets_in"] > 50 and stats["packets_out"] > 50
    assert stats["state"] == "connected"
    (node_entry,) = result["status"]["nodes"]
    assert node_entry["signaling"].startswith("ws://127.0.0.1:")
    assert result["deleted"] == 200
    assert node.sessions == {}
    assert not run_status(etcd_server.endpoint, "/parley-test")["sessions"]
