"""One greedy client cannot deny a node to everyone else (issue #15, fair admission).

A node as users run it (direct mode, echo agent, access tokens). From 127.0.0.1, another
process, holding a valid token of its own, fires WHIP POSTs at 1,000 a second for a few seconds,
then opens 1,100 WebSockets, leaves them idle and goes on POSTing. Meanwhile a real aiortc client
from 127.0.0.2 (another source address: the whole of 127/8 is loopback), with a token of another
subject, gets its answer during the first flood and hears its speech echoed through the second.
The flood is refused with 429s (``rate_limited``, ``half_open_limit``, then ``source_limit``),
counted, and gets no more than its half-open share of sessions.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sessions.audio import speech
from tests.helpers import make_token
from tests.interop.conftest import RunningNode
from tests.peers import AiortcCall, loopback_ice  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("loopback_ice")]

IDLE_SOCKETS = 1_100
FLOOD_SECONDS = 8.0
POSTS_PER_SECOND = 1_000

#: the attacker (tests/interop/flood_client.py), as a process of its own
FLOOD = Path(__file__).with_name("flood_client.py")


@functools.cache
def utterance() -> bytes:
    return speech.speak("one two three four five six", rate=190)


def whip_from(url: str, source: str, offer: str, token: str) -> tuple[int, str]:
    """A WHIP POST whose connection comes from ``source`` (one of this host's addresses)."""
    host, _, rest = url.removeprefix("http://").partition("/")
    name, _, port = host.partition(":")
    connection = http.client.HTTPConnection(name, int(port), timeout=15, source_address=(source, 0))
    try:
        headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {token}"}
        connection.request("POST", "/" + rest, body=offer.encode(), headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_a_flood_from_one_source_leaves_another_client_talking(
    running_node: RunningNode, tmp_path: Path
) -> None:
    sent = utterance()
    certs = Path(running_node.node.config.cluster.certs)
    port = running_node.node.addresses["whip"].split(":")[2].split("/")[0]

    async def scenario() -> dict[str, Any]:
        offer_file = tmp_path / "offer.sdp"
        probe = AiortcCall(sent)
        offer_file.write_text(await probe.offer())  # the attacker's offers: real SDP
        await probe.close()
        attacker = make_token(certs, subject="greedy")
        flood = subprocess.Popen(  # noqa: ASYNC220 - started once, waited for in a thread
            [
                sys.executable, str(FLOOD), "127.0.0.1", port, attacker, str(FLOOD_SECONDS),
                str(POSTS_PER_SECOND), str(IDLE_SOCKETS), str(offer_file),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        call = AiortcCall(sent)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(1.5)  # the POSTs are flying
            status, answer = await asyncio.to_thread(
                whip_from,
                running_node.whip,
                "127.0.0.2",
                await call.offer(),
                make_token(certs, subject="real-user"),
            )
            assert status == 201, (status, answer[:300])
            await call.answer(answer)
            start = loop.time()
            await asyncio.sleep(len(sent) / 96_000 + 2.0)
            heard = call.pcm_between(start, math.inf)
            score, _ = speech.correlation(sent, heard, len(heard) // 2 - 1)
            out, _ = await asyncio.to_thread(flood.communicate, timeout=120)
        finally:
            await call.close()
            if flood.poll() is None:
                flood.kill()
        return {"score": score, "flood": json.loads(out)}

    result = asyncio.run(scenario())
    flood = result["flood"]
    print(json.dumps(result))  # figures for README (pytest -s)
    assert result["score"] > 0.6, result
    # the POSTs: paced (10 at once, then 5 a second) and no more half-open than its share (8:
    # nothing of the flood connects ICE), the rest 429
    posts = flood["posts"]
    assert posts["per_second"] > 300, posts  # the machine did flood
    assert 1 <= posts["statuses"].get("201", 0) <= 8, posts
    assert posts["codes"].get("rate_limited", 0) + posts["codes"].get("half_open_limit", 0) > 500
    # idle sockets: the source's share of connections was held, the rest refused with 429
    # before the request, and so was every POST while they were held
    assert flood["ws"].get("101", 0) <= 32 and flood["ws"].get("429", 0) > 1_000, flood
    held = flood["held_posts"]
    assert held["codes"].get("source_limit", 0) == sum(held["statuses"].values()) > 500, held
    counters = running_node.node.counters_source()  # type: ignore[misc]
    assert counters["signaling_source_limit"] > 1_500, counters
    assert counters["signaling_rate_limited"] > 0, counters
