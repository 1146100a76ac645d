"""The simulated globe (ops/bench/globe.py) as one scenario, in a private network and PID
namespace (only ``lo`` up)::

    unshare --net --pid --fork --kill-child --mount-proc -- \
        python globe_scenario.py OUTFILE STEERING CLIENTS_PER_REGION [chromium]

STEERING is ``on`` or ``off`` (``node.steering``, passed to the nodes where the setting exists).
etcd, the WAN emulator, a relay and a node per region start; every region's aiortc clients call
their own region's node at once, beep for a few seconds and time their echo (two that nominate
as aioice does, the first pair to answer, and one by priority, as browsers do).

With ``chromium``, a headless Chromium in region :data:`CHROMIUM_REGION` calls that region's
node from its demo page beside them. Chromium picks its host candidate's address itself (it
sends from 127.0.0.1 here), so the emulator takes 127.0.0.1 for that region
(``default_region``). Its selected candidate pair and ``currentRoundTripTime`` are sampled from
``getStats()``; once the aiortc calls are over, the relay it uses is SIGKILLed (nothing
restarts it) and the browser must carry on through another relay's candidate.

What every client was offered, the pair it uses and its round trips go to OUTFILE as JSON, also
when something fails (``error`` says what).
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio

from ops.bench.globe import REGIONS, Globe, GlobeParams, front_region, run_globe
from tests.interop.chromium_scenario import browser_page, isolate_network, speech_wav

TALK = 6.0
#: more clients per region that nominate by priority, as a browser does
PRIORITY_CLIENTS = 1
CHROMIUM_REGION = 3
#: seconds the browser's pair is sampled for after the relay it used was killed
AFTER_KILL = 14.0

#: the browser's selected candidate pair (RTCTransportStats.selectedCandidatePairId), its
#: round trip, the answer it was given and the audio packets it received
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


async def chromium_call(
    globe: Globe, work: Path, calls_done: threading.Event, out: dict[str, Any]
) -> None:
    wav = work / "speech.wav"
    speech_wav(wav)
    samples: list[dict[str, Any]] = []
    out["samples"] = samples
    token = globe.token(CHROMIUM_REGION, "globe-chromium")
    page = f"{globe.pages[CHROMIUM_REGION]}?token={token}"
    async with browser_page(page, work, wav, out) as cdp:
        await cdp.evaluate("window.parleyStart()", await_promise=True)
        started = time.monotonic()

        async def sample(phase: str) -> dict[str, Any]:
            report = await cdp.evaluate(PAIR_REPORT, await_promise=True) or {
                "page": await cdp.evaluate("window.parleyState")
            }
            answer = report.pop("answer", "")
            if answer and "candidates" not in out:
                out["candidates"] = candidates_of(answer)
            report.update(phase=phase, at=round(time.monotonic() - started, 2))
            samples.append(report)
            return report

        while not calls_done.is_set() or time.monotonic() - started < 8.0:
            await sample("talk")
            await trio.sleep(1.0)
        used = front_region(samples[-1]["remote"]) if samples[-1].get("remote") else None
        out["relay_region"] = used
        if used is None:
            return
        out["killed"] = f"relay-{REGIONS[used]}"
        globe.kill(out["killed"])
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < AFTER_KILL:
            await trio.sleep(1.0)
            await sample("after_kill")


def browser(globe: Globe, calls_done: threading.Event) -> dict[str, Any]:
    out: dict[str, Any] = {"region": CHROMIUM_REGION}
    work = Path(tempfile.mkdtemp(prefix="parley-globe-chromium-"))
    try:
        trio.run(chromium_call, globe, work, calls_done, out)
    except Exception:
        out["error"] = traceback.format_exc()
    return out


def main(outfile: Path, steering: bool, clients: int, chromium: bool) -> None:
    result: dict[str, Any] = {}
    try:
        result["interfaces_up"] = isolate_network()
        work = Path(tempfile.mkdtemp(prefix="parley-globe-"))
        params = GlobeParams(
            clients_per_region=clients,
            talk=TALK,
            steering=steering,
            priority_clients=PRIORITY_CLIENTS,
        )
        if chromium:
            result.update(run_globe(work, params, browser, default_region=CHROMIUM_REGION))
        else:
            result.update(run_globe(work, params))
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    finally:
        outfile.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    from tests.programs import record_from_env

    record_from_env()  # the programs this scenario starts count for tests/programs.py too
    main(Path(sys.argv[1]), sys.argv[2] == "on", int(sys.argv[3]), sys.argv[4:] == ["chromium"])
