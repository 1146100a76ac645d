"""An etcd stall is not a node death: ten talking sessions under ``parley up`` (real etcd, relay
and nodes, each its own process, aiortc clients) ride out etcd frozen (SIGSTOP) for 3 s and then
for 10 s, judged from outside.

The nodes' lease is 5 s with a 3 s safety margin, so that both ways out of a stall happen for
certain: a 3 s freeze always passes a node's safety deadline (2 s after its last acknowledged
keepalive) but never reaches etcd's expiry (5 s after it), so the nodes hold their sessions and
then go on with them at the same epochs; a 10 s freeze always expires the leases, so every
session is adopted from its checkpoint (by either node) at a new epoch. Either way each client
hears its echo again, sent one offer and stayed connected.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aioice.ice
import pytest

from ops.etcdserver import free_port
from sessions.audio import speech
from tests.ops.test_processes import wait_for
from tests.ops.test_up import Up
from tests.peers import AiortcCall

pytestmark = pytest.mark.slow

SESSIONS = 10
TTL, MARGIN = 5, 3.0


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Up]:
    monkeypatch.setenv("PARLEY_NODE_AGENT", "echo")
    monkeypatch.setenv("PARLEY_NODE_LEASE_MARGIN", str(MARGIN))
    up = Up(tmp_path / "data", port=free_port(), nodes=2, relays=1, lease_ttl=TTL)
    try:
        up.wait_for_line("parley is up")
        yield up
    finally:
        up.close()


def owners(up: Up) -> dict[str, tuple[str, int]]:
    return {s["id"]: (str(s["owner"]), int(s["epoch"])) for s in up.status()["sessions"]}


def etcd_pid(up: Up) -> int:
    return int(re.findall(r"^etcd\s+\S+\s+pid (\d+)", up.text, re.MULTILINE)[-1])


def heard_again(call: AiortcCall, since: float) -> float | None:
    """Seconds from ``since`` to the first echoed frame after the longest silence that began
    after it (None: the client heard nothing after ``since``)."""
    arrivals = [at for at, _ in call.received if at >= since]
    if len(arrivals) < 2:
        return None
    _, after = max(itertools.pairwise(arrivals), key=lambda pair: pair[1] - pair[0])
    return after - since


def test_sessions_ride_out_etcd_frozen_for_3_and_for_10_seconds(
    cluster: Up, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    pages = cluster.pages()
    pcm = speech.speak("one two three four five six seven eight nine ten")
    result: dict[str, Any] = {}

    async def talk() -> None:
        calls: list[AiortcCall] = []
        states: list[list[str]] = []
        sessions: list[str] = []
        token = cluster.token()
        for i in range(SESSIONS):
            call = AiortcCall(pcm, pause=0.2)
            seen: list[str] = []
            call.pc.on(
                "iceconnectionstatechange",
                lambda c=call, s=seen: s.append(c.pc.iceConnectionState),
            )
            request = urllib.request.Request(
                pages[f"node-{i % 2 + 1}"] + "v1/session",
                data=(await call.offer()).encode(),
                method="POST",
                headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {token}"},
            )
            response = await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
            sessions.append(response.headers["Location"].split("/")[3])
            await call.answer(response.read().decode())
            calls.append(call)
            states.append(seen)
        loop = asyncio.get_running_loop()
        await asyncio.sleep(4.0)  # every session connected, echoing, checkpointed
        start = await asyncio.to_thread(owners, cluster)
        assert set(sessions) <= set(start), (sessions, start)
        pid = etcd_pid(cluster)

        async def freeze(seconds: float) -> float:
            os.kill(pid, signal.SIGSTOP)
            frozen = loop.time()
            try:
                await asyncio.sleep(seconds)
            finally:
                os.kill(pid, signal.SIGCONT)
            return frozen

        # 1. 3 s: past every node's safety deadline, short of etcd's expiry.
        frozen = await freeze(3.0)
        await asyncio.sleep(5.0)
        after_short = await asyncio.to_thread(owners, cluster)
        result["short"] = {
            "heard_again_s": [heard_again(c, frozen) for c in calls],
            "same_epochs": all(after_short.get(s) == start[s] for s in sessions),
        }

        # 2. 10 s: the leases expire; the sessions are adopted from their checkpoints.
        frozen = await freeze(10.0)
        thawed = time.monotonic()
        await asyncio.to_thread(
            wait_for,
            lambda: all(
                (o := owners(cluster).get(s)) is not None and o[1] > after_short[s][1]
                for s in sessions
            ),
            TTL + 15,
            "every session adopted at a new epoch",
        )
        result["adopted_after_thaw_s"] = time.monotonic() - thawed
        await asyncio.sleep(4.0)
        result["long"] = {"heard_again_s": [heard_again(c, frozen) for c in calls]}
        end = await asyncio.to_thread(owners, cluster)
        result["owners_end"] = sorted(owner for owner, _ in end.values())
        result["states"] = [list(seen) for seen in states]  # before our own close
        for call in calls:
            await call.close()

    asyncio.run(talk())
    print(json.dumps({k: v for k, v in result.items() if k != "states"}))  # figures for README
    logs = "".join(p.read_text() for p in (tmp_path / "data" / "logs").glob("node-*.log"))
    # Nobody renegotiated: ICE never left checking/connected/completed.
    for seen in result["states"]:
        assert set(seen) <= {"checking", "connected", "completed"}, seen
    # The short freeze: held and resumed by the same owners at the same epochs; each client
    # hears its echo again within a second or so of the thaw.
    assert result["short"]["same_epochs"], result
    assert "lease stalled" in logs and "lease recovered" in logs
    assert all(h is not None and h < 3.0 + 1.5 for h in result["short"]["heard_again_s"]), result
    # The long one: adopted, and heard again within the TTL and a few seconds of the thaw.
    assert all(h is not None and h < 10.0 + 6.0 for h in result["long"]["heard_again_s"]), result
