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

One headless Chromium calls from every region too, a tab per region (``globe_browsers.py``):
each tab sends from 127.0.0.1, and the emulator puts each tab's flow (its host candidate's
port) in the tab's region before its first check. Each tab's selected pair and
``currentRoundTripTime`` come from ``getStats()``. Once the aiortc calls are over, the relay the
``ap`` tab uses is SIGKILLed and not restarted: every tab that used it must move to another
relay's candidate and keep receiving, and the others must not notice.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ops.bench.globe import REGIONS, RTTS, front_region
from tests.globe.globe_browsers import KILL_REGION, REDIALS
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


def browsers_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    during: dict[str, Any] = result["during"]
    assert "error" not in during, during
    browsers: list[dict[str, Any]] = during["browsers"]
    assert sorted(b["region"] for b in browsers) == sorted(REGIONS), browsers
    return browsers


def talking(browser: dict[str, Any]) -> dict[str, Any]:
    """The tab's last sample before the kill, with its selected pair."""
    samples = [s for s in browser["samples"] if s["phase"] == "talk" and s.get("remote")]
    assert samples, browser
    return samples[-1]


def pair_rtt_ms(browser: dict[str, Any], phase: str) -> float:
    """The median ``currentRoundTripTime`` (ms) of the phase's samples on its last pair: one
    sample may catch a stall of the saturated machine (two cores, three browsers' tabs)."""
    samples = [s for s in browser["samples"] if s["phase"] == phase and s.get("remote")]
    last = samples[-1]["remote"]
    rtts = [1000 * s["rtt"] for s in samples if s["remote"] == last and s["rtt"] is not None]
    assert rtts, browser
    return float(statistics.median(rtts))


def check_rtt_ms(client: int, relay: int, node: int) -> float:
    """What a connectivity check crosses: client ↔ relay, then the tunnel relay ↔ node."""

    def rtt(a: int, b: int) -> float:
        return 1000 * RTTS[(min(a, b), max(a, b))]

    return rtt(client, relay) + rtt(relay, node)


def test_a_browser_in_every_region_is_placed_there_by_its_flow(globe: Any) -> None:
    """Every tab sends from 127.0.0.1; the emulator took each tab's flow for the tab's region
    at every front it reached, and nothing reached a front from a flow nobody placed."""
    _, result = globe
    for browser in browsers_of(result):
        region = browser["region"]
        assert browser["flows"] and {f[0] for f in browser["flows"]} == {"127.0.0.1"}, browser
        mapped = browser["mapped"]
        assert mapped and {r for _, r in mapped} == {region}, browser
        last = talking(browser)
        assert tuple(last["remote"]) in {tuple(front) for front, _ in mapped}, browser
        # the pair's local side is peer-reflexive: the address the node saw, which is the
        # emulator's mapping for a sender of the tab's region (127.2.<region>.x)
        assert last["local"][0].startswith(f"127.2.{region}."), browser
    assert result["wan_counters"].get("unknown_region", 0) == 0, result["wan_counters"]


def test_chromium_reports_its_pair_and_its_round_trip(globe: Any) -> None:
    steering, result = globe
    browsers = browsers_of(result)
    fronts = {tuple(f[0]) for f in result["fronts"].values()}
    for browser in browsers:
        region = browser["region"]
        last = talking(browser)
        used = front_region(last["remote"])
        rtt = pair_rtt_ms(browser, "talk")
        print(
            f"steering {steering}: browser {REGIONS[region]} offered "
            f"{[REGIONS[front_region(c) or 0] for c in browser['candidates']]}, "
            f"uses relay-{REGIONS[used or 0]}, pair rtt p50 {rtt:.0f} ms"
        )
        assert last["received"] > 100, browser  # it hears the echo
        assert used is not None and used == browser["relay_region"], browser
        assert browser["applied"] == browser["candidates"], browser  # the answer it was held on
        # currentRoundTripTime is the checks' round trip: the first hop plus the tunnel to the
        # node of the browser's own region; the emulator's matrix predicts it
        expected = check_rtt_ms(region, used, region)
        assert expected - 2 <= rtt <= expected + 40, (expected, browser)
        if steering == "off":
            # every relay is offered, rotated per session, and the browser nominates by
            # priority: it uses the answer's first candidate, whatever its region
            assert {tuple(c) for c in browser["candidates"]} == fronts, browser
            assert tuple(last["remote"]) == tuple(browser["candidates"][0]), browser
        else:
            # steered: its own region's relay, first and used; the first hop is the local one
            # (10 ms: the pair's round trip less the 10 ms tunnel), not 60-150 ms
            assert front_region(browser["candidates"][0]) == region, browser
            assert used == region, browser
            assert rtt <= check_rtt_ms(region, region, region) + 40, browser
    if steering == "off":
        # the difference steering makes: unsteered, some browser talks through another
        # region's relay (the scenario redials the ap tab while no answer leads abroad)
        assert result["during"]["redials"] <= REDIALS, result["during"]
        abroad = [b for b in browsers if b["relay_region"] != b["region"]]
        assert abroad, browsers
        for browser in abroad:
            assert pair_rtt_ms(browser, "talk") >= check_rtt_ms(1, 2, 1) - 2, browser


def test_chromium_moves_to_a_fallback_relay_when_its_relay_is_killed(globe: Any) -> None:
    _, result = globe
    browsers = browsers_of(result)
    killed = next(b["relay_region"] for b in browsers if b["region"] == KILL_REGION)
    assert result["during"]["killed"] == f"relay-{REGIONS[killed]}", result["during"]
    moved = []
    for browser in browsers:
        before = talking(browser)
        after = [s for s in browser["samples"] if s["phase"] == "after_kill"]
        assert after and after[-1].get("remote"), browser
        # the echo flows on (through another relay for those whose relay was killed)
        assert after[-1]["received"] > before["received"] + 100, browser
        if browser["relay_region"] != killed:
            assert after[-1]["remote"] == before["remote"], browser  # not disturbed
            continue
        moved.append(browser["region"])
        now = front_region(after[-1]["remote"])
        assert now is not None and now != killed, browser
        assert tuple(after[-1]["remote"]) in {tuple(c) for c in browser["candidates"]}, browser
        expected = check_rtt_ms(browser["region"], now, browser["region"])
        assert expected - 2 <= pair_rtt_ms(browser, "after_kill") <= expected + 40, browser
    assert KILL_REGION in moved, browsers
