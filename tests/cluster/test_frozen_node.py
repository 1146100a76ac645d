"""A node frozen (SIGSTOP) past its lease loses its sessions to another node and, when it wakes,
sends nothing for them — judged from outside: the owners in etcd, the relay's counters, the
nodes' media ledgers, and what the aiortc clients hear."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aioice.ice
import pytest

from ops.etcdserver import free_port
from sessions.audio import speech
from sessions.node.ledger import check_ledgers, read_ledgers
from tests.ops.test_processes import wait_for
from tests.ops.test_up import Up
from tests.peers import AiortcCall

pytestmark = pytest.mark.slow

SESSIONS = 4
TTL = 2


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Up]:
    monkeypatch.setenv("PARLEY_NODE_AGENT", "echo")
    monkeypatch.setenv("PARLEY_RELAY_AUDIT", "1")
    monkeypatch.setenv("PARLEY_NODE_LEDGER_DIR", str(tmp_path / "ledger"))
    up = Up(tmp_path / "data", port=free_port(), nodes=2, relays=1, lease_ttl=TTL)
    try:
        up.wait_for_line("parley is up")
        yield up
    finally:
        up.close()


def owners(up: Up) -> dict[str, tuple[str, int]]:
    return {s["id"]: (str(s["owner"]), int(s["epoch"])) for s in up.status()["sessions"]}


def relay_counters(up: Up) -> dict[str, int]:
    totals: dict[str, int] = {}
    for relay in up.status()["relays"]:
        for name, value in (relay.get("counters") or {}).items():
            totals[name] = totals.get(name, 0) + int(value)
    return totals


def test_a_node_frozen_past_its_lease_loses_its_sessions_and_sends_nothing_when_it_wakes(
    cluster: Up, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    pages = cluster.pages()
    pcm = speech.speak("one two three four five six seven eight nine ten")
    result: dict[str, Any] = {}

    async def talk() -> None:
        calls: list[AiortcCall] = []
        sessions: list[str] = []
        token = cluster.token()
        for _ in range(SESSIONS):
            call = AiortcCall(pcm, pause=0.2)
            request = urllib.request.Request(
                pages["node-1"] + "v1/session",
                data=(await call.offer()).encode(),
                method="POST",
                headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {token}"},
            )
            response = await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
            sessions.append(response.headers["Location"].split("/")[3])
            await call.answer(response.read().decode())
            calls.append(call)
        await asyncio.sleep(4.0)
        before = await asyncio.to_thread(owners, cluster)
        assert all(before[s][0] == "node-1" for s in sessions), before
        pid = int(next(n["pid"] for n in cluster.status()["nodes"] if n["id"] == "node-1"))
        loop = asyncio.get_running_loop()
        os.kill(pid, signal.SIGSTOP)
        frozen = loop.time()
        try:
            await asyncio.to_thread(
                wait_for,
                lambda: all(owners(cluster).get(s, ("", 0))[0] == "node-2" for s in sessions),
                TTL + 10,
                "node-2 to adopt every session",
            )
            result["adopted_after_s"] = loop.time() - frozen
            fenced_before = (await asyncio.to_thread(relay_counters, cluster)).get("fenced", 0)
        finally:
            os.kill(pid, signal.SIGCONT)
        woke = loop.time()
        await asyncio.sleep(4.0)  # node-1 runs again: it must not speak for the sessions
        result["fenced"] = (await asyncio.to_thread(relay_counters, cluster)).get(
            "fenced", 0
        ) - fenced_before
        result["counters"] = await asyncio.to_thread(relay_counters, cluster)
        after = await asyncio.to_thread(owners, cluster)
        result["owners_after"] = [after.get(s) for s in sessions]
        gaps = []
        for call in calls:
            heard = [at for at, _ in call.received if at >= frozen]
            gaps.append(
                max(b - a for a, b in itertools.pairwise(heard)) if len(heard) > 1 else None
            )
            result.setdefault("heard_after_wake", []).append(
                sum(1 for at, _ in call.received if at >= woke)
            )
        result["gaps_s"] = gaps
        for call in calls:
            await call.close()

    asyncio.run(talk())
    cluster.close()  # every node has stopped and written its final ledger lines
    result["ledger"] = check_ledgers(read_ledgers(tmp_path / "ledger"))
    print(json.dumps(result, default=str))
    # The sessions live on node-2, every client hears its echo again, and node-1, awake,
    # sent nothing for them: nothing fenced at the relay, no overlap in the ledgers.
    assert all(owner is not None and owner[0] == "node-2" for owner in result["owners_after"])
    assert all(n > 100 for n in result["heard_after_wake"]), result
    assert all(g is not None and g < TTL + 6 for g in result["gaps_s"]), result
    assert result["fenced"] == 0, result
    assert result["ledger"] == [], result["ledger"]
    assert result["counters"].get("srtp_audited", 0) > 0, result["counters"]
    assert result["counters"].get("srtp_index_reused", 0) == 0, result["counters"]
    assert result["counters"].get("srtcp_index_reused", 0) == 0, result["counters"]
