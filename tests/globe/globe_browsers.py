"""Headless Chromium in every region of the simulated globe: one browser process, one tab per
region, each calling its own region's node with a token that names its region.

Chromium picks its host candidate's address itself: every tab sends from 127.0.0.1, each from a
socket (a port) of its own. So each tab is put in its region by its **flow**: before the tab
applies the answer (no ICE check leaves before that), :data:`GATE` holds
``setRemoteDescription`` until gathering is complete and hands the tab's host candidates out;
the scenario places each ``(address, port)`` in the tab's region on the WAN emulator
(:meth:`ops.wan.Wan.place`) and then lets the tab go on. Every datagram of that tab, its checks
and its media, to any relay's front, then takes its region's delays; an unplaced flow would be
dropped (the scenario runs the emulator without a ``default_region``).

Each tab's selected candidate pair and ``currentRoundTripTime`` are sampled from ``getStats()``
every second; once the aiortc calls are over, the relay the tab of :data:`KILL_REGION` uses is
SIGKILLed (nothing restarts it) and every tab is sampled on: those that used it must move to
another relay's candidate and keep receiving.
"""

from __future__ import annotations

import contextlib
import ipaddress
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from ops.bench.globe import REGIONS, Globe, front_region
from tests.interop.chromium_scenario import (
    Cdp,
    ScenarioError,
    chromium_binary,
    chromium_command,
    devtools_port,
    eventually,
    page_websocket,
    speech_wav,
    start_chromium,
    stop_process_group,
)

#: the region whose tab's relay is killed once the calls are over
KILL_REGION = 3
#: seconds every tab is sampled for after the relay was killed
AFTER_KILL = 14.0
#: seconds the tabs talk at least before the kill (besides waiting for the aiortc calls)
TALK_AT_LEAST = 8.0
#: three tabs of one browser: none of them may be throttled as a background tab
BACKGROUND_FLAGS = (
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
)

LOADED = "document.readyState === 'complete' && typeof window.parleyStart === 'function'"
#: holds the tab's setRemoteDescription (the answer, and with it the first check) until the
#: scenario has placed its host candidates: ``window.parleyGlobeHeld`` shows them ([address,
#: port, protocol]) and the answer once gathering is complete; ``window.parleyGlobeRelease()``
#: lets this call's answer through (a call hung up while held is never released)
GATE = """(() => {
  const apply = RTCPeerConnection.prototype.setRemoteDescription;
  const gathered = (pc) => new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") done();
    });
  });
  RTCPeerConnection.prototype.setRemoteDescription = async function (description) {
    await gathered(this);
    let release;
    const released = new Promise((done) => { release = done; });
    window.parleyGlobeRelease = () => { release(); return true; };
    window.parleyGlobeHeld = {
      local: this.localDescription.sdp.split(/\\r?\\n/)
        .filter((line) => line.startsWith("a=candidate:"))
        .map((line) => line.split(" "))
        .map((f) => [f[4], Number(f[5]), f[2].toLowerCase()]),
      answer: description.sdp,
    };
    await released;
    return apply.call(this, description);
  };
  return true;
})()"""
#: how often the scenario calls again from the ``ap`` tab, with steering off, while every tab's
#: answer happens to list its own region's relay first (1 run in 27): a new session is a new
#: rotation, and the off run is there to show a browser offered another region first
REDIALS = 5

#: the tab's selected candidate pair (RTCTransportStats.selectedCandidatePairId), its round
#: trip, the answer it was given and the audio packets it received
PAIR_REPORT = """(async () => {
  const pc = window.parleyPeer && window.parleyPeer();
  if (!pc) return null;
  const stats = await pc.getStats();
  const byId = {};
  let transport = null, received = 0;
  stats.forEach((r) => {
    byId[r.id] = r;
    if (r.type === "transport") transport = r;
    if (r.type === "inbound-rtp" && r.kind === "audio") received = r.packetsReceived;
  });
  const pair = transport && byId[transport.selectedCandidatePairId];
  const remote = pair && byId[pair.remoteCandidateId];
  const local = pair && byId[pair.localCandidateId];
  return {
    remote: remote ? [remote.address, remote.port] : null,
    local: local ? [local.address, local.port] : null,
    rtt: pair && pair.currentRoundTripTime !== undefined ? pair.currentRoundTripTime : null,
    state: pair ? pair.state : null,
    nominated: pair ? pair.nominated : null,
    received: received,
    answer: pc.remoteDescription ? pc.remoteDescription.sdp : "",
  };
})()"""


def candidates_of(answer: str) -> list[tuple[str, int]]:
    return [
        (line.split()[4], int(line.split()[5]))
        for line in answer.splitlines()
        if line.startswith("a=candidate:")
    ]


def new_tab(port: int, url: str) -> None:
    """Open ``url`` in another tab (headless Chromium takes one URL on its command line)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?{url}", method="PUT")
    with urllib.request.urlopen(request, timeout=10):
        pass


@contextlib.asynccontextmanager
async def browser_tabs(urls: list[str], work: Path, wav: Path) -> AsyncIterator[list[Cdp]]:
    """One Chromium (fake microphone playing ``wav``) with a tab per URL, each loaded and ready
    for ``parleyStart()``; stopped on the way out."""
    profile = work / "chromium-profile"
    command = chromium_command(chromium_binary(), profile, wav, urls[0])
    command[-1:-1] = BACKGROUND_FLAGS
    chromium = await trio.to_thread.run_sync(start_chromium, command, work / "chromium.log")
    try:
        port = await devtools_port(profile, chromium)
        for url in urls[1:]:
            await trio.to_thread.run_sync(new_tab, port, url)
        async with contextlib.AsyncExitStack() as stack:
            tabs = []
            for url in urls:
                target = await page_websocket(port, url)
                ws = await stack.enter_async_context(
                    trio_websocket.open_websocket_url(target, max_message_size=16 << 20)
                )
                cdp = Cdp(ws)
                if not await eventually(lambda cdp=cdp: cdp.evaluate(LOADED), within=20):
                    raise ScenarioError(f"{url} did not load (or has no parleyStart) within 20 s")
                tabs.append(cdp)
            yield tabs
    finally:
        stop_process_group(chromium)


async def dial(cdp: Cdp, region: int) -> dict[str, Any]:
    """Start the tab's call and wait until its answer is held (:data:`GATE`): what it gathered
    and the answer's candidates."""
    await cdp.evaluate("window.parleyGlobeHeld = undefined; (window.parleyStart(), true)")
    held = "window.parleyGlobeHeld !== undefined || !!window.parleyState.error"
    if not await eventually(lambda: cdp.evaluate(held), within=20):
        raise ScenarioError(f"{REGIONS[region]}: no answer to apply within 20 s")
    error = await cdp.evaluate("window.parleyState.error")
    if error:
        raise ScenarioError(f"{REGIONS[region]}: {error}")
    got: dict[str, Any] = await cdp.evaluate("window.parleyGlobeHeld")
    return {"gathered": got["local"], "candidates": candidates_of(got["answer"])}


def place(globe: Globe, region: int, out: dict[str, Any]) -> None:
    """Place the tab's IPv4 UDP host candidates in ``region`` on the emulator."""
    flows: list[tuple[str, int]] = []
    for address, port, protocol in out["gathered"]:
        with contextlib.suppress(ValueError):  # mDNS names and IPv6 reach no front
            if protocol == "udp" and ipaddress.ip_address(address).version == 4:
                flows.append((address, int(port)))
    if not flows:
        raise ScenarioError(f"{REGIONS[region]}: no IPv4 host candidate: {out['gathered']}")
    for flow in flows:
        globe.wan.place(flow, region)
    out["flows"] = flows


def leads_abroad(out: dict[str, Any]) -> bool:
    return bool(out["candidates"]) and front_region(out["candidates"][0]) != out["region"]


async def sample(cdp: Cdp, out: dict[str, Any], phase: str, started: float) -> None:
    report = await cdp.evaluate(PAIR_REPORT, await_promise=True) or {
        "page": await cdp.evaluate("window.parleyState")
    }
    answer = report.pop("answer", "")
    if answer:
        out["applied"] = candidates_of(answer)
    report.update(phase=phase, at=round(time.monotonic() - started, 2))
    out["samples"].append(report)


async def call_from_every_region(
    globe: Globe, work: Path, calls_done: threading.Event, result: dict[str, Any]
) -> None:
    wav = work / "speech.wav"
    speech_wav(wav)
    regions = sorted(REGIONS)
    tabs: list[dict[str, Any]] = [{"region": r, "samples": []} for r in regions]
    result["browsers"] = tabs
    urls = [
        f"{globe.pages[r]}?token={globe.token(r, f'globe-chromium-{REGIONS[r]}')}" for r in regions
    ]
    async with browser_tabs(urls, work, wav) as cdps:
        for cdp, out in zip(cdps, tabs, strict=True):
            await cdp.evaluate(GATE)
            out.update(await dial(cdp, out["region"]))
        again, again_out = cdps[regions.index(KILL_REGION)], tabs[regions.index(KILL_REGION)]
        result["redials"] = 0
        while (
            not globe.params.steering
            and not any(map(leads_abroad, tabs))
            and result["redials"] < REDIALS
        ):
            result["redials"] += 1
            await again.evaluate("window.parleyHangUp()")  # held: no check ever left
            again_out.update(await dial(again, KILL_REGION))
        for cdp, out in zip(cdps, tabs, strict=True):
            place(globe, out["region"], out)
            await cdp.evaluate("window.parleyGlobeRelease()")
        started = time.monotonic()

        async def sample_all(phase: str) -> None:
            for cdp, out in zip(cdps, tabs, strict=True):
                await sample(cdp, out, phase, started)

        while not calls_done.is_set() or time.monotonic() - started < TALK_AT_LEAST:
            await sample_all("talk")
            await trio.sleep(1.0)
        await sample_all("talk")
        for out in tabs:
            last = out["samples"][-1]
            out["relay_region"] = front_region(last["remote"]) if last.get("remote") else None
        used = tabs[regions.index(KILL_REGION)]["relay_region"]
        if used is not None:
            result["killed"] = f"relay-{REGIONS[used]}"
            globe.kill(result["killed"])
            killed_at = time.monotonic()
            while time.monotonic() - killed_at < AFTER_KILL:
                await trio.sleep(1.0)
                await sample_all("after_kill")
    for out in tabs:
        # the region the emulator took each of the tab's flows for, at every front it reached
        out["mapped"] = [
            [list(front), region]
            for flow in out["flows"]
            for front, region in globe.wan.mapped(flow).items()
        ]


def browsers(globe: Globe, calls_done: threading.Event) -> dict[str, Any]:
    """``run_globe``'s ``during``: the tabs, beside the aiortc calls."""
    out: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="parley-globe-chromium-"))
    try:
        trio.run(call_from_every_region, globe, work, calls_done, out)
    except Exception:
        out["error"] = traceback.format_exc()
        log = work / "chromium.log"
        if log.is_file():
            out["chromium_log_tail"] = log.read_text(errors="replace")[-3000:]
    return out
