"""A simulated globe: three regions 10 ms across and 60-150 ms apart (ops/wan.py, user space:
this kernel has no netem), a relay and a node in each, etcd in one, aiortc clients in every
region calling their own region's node. Which relay does each client use, and what does it cost?

``globe_scenario.py`` runs it in a private network and PID namespace, once with steering off
(today's behaviour) and once with ``node.steering`` on.

What is true today, and asserted for "off": every answer lists every relay, rotated per session
(so a client's own region's relay is often not the first, highest-priority candidate). aiortc
nominates the first pair whose check succeeds (aioice's regular nomination), and a check goes
client → relay → tunnel → node and back, so a client calling its own region's node gets its
answer first through its own region's relay: aiortc clients mostly end up local even today.
A browser nominates by priority, which is what steering changes (see the README).

One headless Chromium calls from region 3 too (it sends from 127.0.0.1, which the emulator
takes for region 3): its selected pair and ``currentRoundTripTime`` come from ``getStats()``.
Once the aiortc calls are over, the relay Chromium uses is SIGKILLed and not restarted: the
browser must move to another relay's candidate and keep receiving.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ops.bench.globe import REGIONS, RTTS, front_region
from tests.interop.test_chromium import UNSHARE, namespace_problem, tail

pytestmark = pytest.mark.slow

SCENARIO = Path(__file__).with_name("globe_scenario.py")
CLIENTS_PER_REGION = 2
TIMEOUT = 200.0
LOCAL_RTT_MS = 1000 * RTTS[(1, 1)]
#: the other engineer's setting; the steered case is expected to fail until it exists
#: an echo round trip (client → relay → tunnel → node's echo agent and back, no client jitter
#: buffer) is at least the two network legs; measured: 60-70 ms p50 for local clients (legs
#: 20 ms, the rest the node's jitter buffer and pacing). The echo agent keeps up to 25 frames
#: (500 ms) queued and cannot shrink a standing queue: after a stall of the node (the machine is
#: saturated while Chromium starts) one client measured 620 ms. This bounds that.
ECHO_RTT_MAX_MS = 1000.0
#: clients per region that nominate by priority, as browsers do (besides CLIENTS_PER_REGION)
PRIORITY_CLIENTS = 1


def run_scenario(work: Path, steering: str) -> dict[str, Any]:
    problem = namespace_problem()
    if problem is not None:
        pytest.fail(f"the globe scenario needs network namespaces: {problem}")
    outfile, log = work / "outcome.json", work / "scenario.log"
    argv = [
        sys.executable,
        str(SCENARIO),
        str(outfile),
        steering,
        str(CLIENTS_PER_REGION),
        "chromium",
    ]
    with open(log, "wb") as output:
        try:
            subprocess.run(
                [*UNSHARE, *argv],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"the globe scenario took over {TIMEOUT:.0f} s\n{tail(log)}")
    if not outfile.is_file():
        pytest.fail(f"the globe scenario wrote no outcome\n{tail(log)}")
    result: dict[str, Any] = json.loads(outfile.read_text())
    assert "error" not in result, json.dumps(result, indent=1)[-8000:]
    assert not result["errors"], result["errors"]
    return result


@pytest.fixture(scope="module", params=["off", "on"])
def globe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    steering: str = request.param
    return steering, run_scenario(tmp_path_factory.mktemp(f"globe-{steering}"), steering)


def test_every_client_talks_through_a_relay_and_hears_its_echo(globe: Any) -> None:
    _, result = globe
    clients = result["clients"]
    assert len(clients) == (CLIENTS_PER_REGION + PRIORITY_CLIENTS) * len(REGIONS)
    fronts = {tuple(address) for r in result["fronts"].values() for address in r[:1]}
    for client in clients:
        assert client["selected"] is not None and tuple(client["selected"]) in fronts, client
        # the first hop is the matrix's round trip for the pair used
        used = front_region(client["selected"])
        rtt = 1000 * RTTS[(min(client["region"], used), max(client["region"], used))]
        assert client["first_hop_rtt_ms"] == rtt, client
        # the echo came back, and no faster than the two network legs it crossed
        trips = client["echo_rtt_ms"]
        assert len(trips) >= 3, client
        assert 2 * LOCAL_RTT_MS <= client["echo_rtt_p50_ms"] <= ECHO_RTT_MAX_MS, client
    # the WAN emulator kept its schedule (ms it added to the configured delays)
    assert result["wan_lateness"]["n"] > 1000
    assert result["wan_lateness"]["p50_ms"] < 2.0, result["wan_lateness"]


def test_todays_answers_list_every_relay_rotated(globe: Any) -> None:
    steering, result = globe
    if steering == "on":
        pytest.skip("today's behaviour: steering off")
    fronts = {tuple(r[0]) for r in result["fronts"].values()}
    firsts = set()
    for client in result["clients"]:
        assert {tuple(c) for c in client["candidates"]} == fronts, client
        firsts.add(tuple(client["candidates"][0]))
    # rotated per session: consecutive sessions on one node put different relays first, so
    # some client's highest-priority candidate is another region's relay
    assert any(front_region(c["candidates"][0]) != c["region"] for c in result["clients"]), result[
        "clients"
    ]
    assert len(firsts) > 1, firsts
    # aiortc nominates the first pair to answer: mostly its own region's relay (see above)
    first = [c for c in result["clients"] if c["nomination"] == "first"]
    assert sum(c["local"] for c in first) >= len(first) * 2 // 3, first
    # a client that nominates by priority uses the answer's first candidate, wherever it is
    for client in result["clients"]:
        if client["nomination"] == "priority":
            assert client["selected"] == client["candidates"][0], client


def test_steered_clients_use_their_own_regions_relay(
    globe: Any, request: pytest.FixtureRequest
) -> None:
    """The steered assertions (issue #19): the answer puts the client's region's relay first,
    with at most two other relays as fallbacks; every client's selected pair is its own region's
    relay and its first hop is the local round trip."""
    steering, result = globe
    if steering == "off":
        pytest.skip("steering on only")
    for client in result["clients"]:
        candidates = client["candidates"]
        assert front_region(candidates[0]) == client["region"], client
        assert 1 <= len(candidates) <= 3, client
        assert client["relay_region"] == client["region"], client
        assert client["first_hop_rtt_ms"] == LOCAL_RTT_MS, client


def chromium_of(result: dict[str, Any]) -> dict[str, Any]:
    browser: dict[str, Any] = result["during"]
    assert "error" not in browser, browser
    return browser


def check_rtt_ms(client: int, relay: int, node: int) -> float:
    """What a connectivity check crosses: client ↔ relay, then the tunnel relay ↔ node."""

    def rtt(a: int, b: int) -> float:
        return 1000 * RTTS[(min(a, b), max(a, b))]

    return rtt(client, relay) + rtt(relay, node)


def test_chromium_reports_its_pair_and_its_round_trip(
    globe: Any, request: pytest.FixtureRequest
) -> None:
    steering, result = globe
    browser = chromium_of(result)
    region = browser["region"]
    talking = [s for s in browser["samples"] if s["phase"] == "talk" and s.get("remote")]
    assert talking, browser
    last = talking[-1]
    assert last["received"] > 100, browser  # it hears the echo
    used = front_region(last["remote"])
    assert used is not None and used == browser["relay_region"], browser
    # currentRoundTripTime is the checks' round trip: the first hop plus the tunnel to the
    # node of the browser's own region; the emulator's matrix predicts it
    expected = check_rtt_ms(region, used, region)
    assert expected - 2 <= 1000 * last["rtt"] <= expected + 40, (expected, last)
    if steering == "off":
        # today every relay is offered, rotated per session, and the browser nominates by
        # priority: it uses the answer's first candidate, whatever its region
        assert {tuple(c) for c in browser["candidates"]} == {
            tuple(f[0]) for f in result["fronts"].values()
        }, browser
        assert tuple(last["remote"]) == tuple(browser["candidates"][0]), browser
    else:
        # steered: its own region's relay, first and used; the first hop is the local one
        assert front_region(browser["candidates"][0]) == region, browser
        assert used == region, browser
        assert 1000 * last["rtt"] <= check_rtt_ms(region, region, region) + 40, browser


def test_chromium_moves_to_a_fallback_relay_when_its_relay_is_killed(globe: Any) -> None:
    _, result = globe
    browser = chromium_of(result)
    killed = browser["relay_region"]
    assert browser["killed"] == f"relay-{REGIONS[killed]}", browser
    before = [s for s in browser["samples"] if s["phase"] == "talk"]
    after = [s for s in browser["samples"] if s["phase"] == "after_kill"]
    assert after and after[-1].get("remote"), browser
    # another relay's candidate carries the call now, and the echo flows again through it
    assert front_region(after[-1]["remote"]) != killed, browser
    assert after[-1]["received"] > before[-1]["received"] + 100, browser
