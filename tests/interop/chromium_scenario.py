"""An unmodified headless Chromium holds a voice session with a Parley node, on loopback only.

Run by ``test_chromium.py`` in a fresh network namespace (and PID namespace, so that nothing it
starts outlives it)::

    unshare --net --pid --fork --kill-child --mount-proc -- \
        python chromium_scenario.py OUTFILE [echo|demo]

Inside it brings ``lo`` up (and refuses to go on if any other interface is up), writes a speech
WAV with espeak-ng (Chromium's fake microphone plays it in a loop), starts a local etcd and a node
(in-process, on this Trio loop), and opens the node's own page
(``sessions/node/pages/echo.html``) at the signaling address the node published in etcd. Over the
DevTools protocol it calls
``parleyStart()``, then:

* ``echo`` (the default): the node runs the immediate echo agent; it polls ``window.parleyStats``
  until the echo of the fake microphone comes back;
* ``demo``: the node runs its default agent (turn-echo) and the WAV is the speech followed by
  :data:`DEMO_SILENCE` of digital silence, so that every loop of it is one user turn. It polls
  the page (``window.parleyLog``, ``window.parleyCollectStats()``) until the page has seen
  ``speech_started`` → ``speech_stopped`` → ``agent_started`` and what comes after it
  (``agent_finished``, or the next loop's ``speech_started``/``agent_interrupted``), and the
  reply was heard: inbound ``audioLevel`` above 0 in a sample taken after ``agent_started``.

Then it reads the node's own stats of the session, hangs up and checks that the node ended the
session. The outcome goes to OUTFILE as JSON, also when something fails (``error`` says what).
Chromium, the node and etcd are stopped on every exit, each within a bound.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio
import trio_websocket

from ops.config import ClusterConfig, Config, NodeConfig
from ops.etcdserver import EtcdServer
from ops.status import gather_status
from sessions.node.daemon import Node
from sessions.node.frontend import run_frontend
from storage.etcd import open_etcd
from storage.keys import Keyspace

PREFIX = "/parley-chromium"
SPEECH = "one two three four five. Parley echoes what you say, six seven eight nine ten."
#: the demo's user turn; the WAV loops, so the user says it again every few seconds
DEMO_SPEECH = "Hello Parley. This is a test of turn taking."
#: digital silence after the demo's speech (seconds): long enough to end the turn
DEMO_SILENCE = 1.5
#: how long the demo's events and reply may take to show up in the page
DEMO_TIMEOUT = 40.0
MODES = ("echo", "demo")
#: how long the echo may take to show up in the browser's stats
MEDIA_TIMEOUT = 30.0
#: everything after etcd is up: node start, browser start, the call, the hang-up
SCENARIO_TIMEOUT = 60.0
MIN_PACKETS = 50
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


#: the browser's side of ICE: every local candidate and candidate pair (shows what it used)
ICE_REPORT = """(async () => {
  const pc = window.parleyPeer && window.parleyPeer();
  if (!pc) return null;
  const out = {local: [], remote: [], pairs: []};
  (await pc.getStats()).forEach((r) => {
    if (r.type === "local-candidate" || r.type === "remote-candidate") {
      out[r.type === "local-candidate" ? "local" : "remote"].push(
        {id: r.id, address: r.address, port: r.port, protocol: r.protocol, type: r.candidateType});
    } else if (r.type === "candidate-pair") {
      out.pairs.push({local: r.localCandidateId, remote: r.remoteCandidateId, state: r.state,
        nominated: r.nominated, packetsSent: r.packetsSent, packetsReceived: r.packetsReceived});
    }
  });
  return out;
})()"""


class ScenarioError(Exception):
    """A step of the scenario failed; the message says which."""


def chromium_binary() -> str:
    found = os.environ.get("PARLEY_CHROMIUM") or shutil.which("chromium")
    if not found:
        raise ScenarioError("chromium not found: install chromium (apt-get install chromium)")
    return found


def interface_flags(sock: socket.socket, name: str) -> int:
    request = struct.pack("16sH22x", name.encode(), 0)  # struct ifreq: name, flags, padding
    return int(struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1])


def isolate_network() -> list[str]:
    """Bring ``lo`` up (``ip link set lo up`` without iproute2) and return the interfaces that
    are up: only ``lo``, or we refuse to go on.

    A fresh namespace holds ``lo``, down, and at most the kernel's fallback tunnel devices, down
    and without addresses; a namespace where anything else is up is not ours.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        up = [n for _, n in socket.if_nameindex() if interface_flags(sock, n) & IFF_UP]
        if up:
            raise ScenarioError(f"not in a fresh network namespace: {up} already up")
        flags = interface_flags(sock, "lo") | IFF_UP
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags))
        return [n for _, n in socket.if_nameindex() if interface_flags(sock, n) & IFF_UP]


def speech_wav(path: Path, mode: str = "echo") -> None:
    """The fake microphone's WAV: espeak-ng speech (``demo``: then :data:`DEMO_SILENCE`)."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise ScenarioError("espeak-ng not found: install espeak-ng")
    text = DEMO_SPEECH if mode == "demo" else SPEECH
    subprocess.run([espeak, "-s", "160", "-w", str(path), text], check=True, timeout=30)
    if mode == "demo":
        with wave.open(str(path), "rb") as spoken:
            params = spoken.getparams()
            pcm = spoken.readframes(spoken.getnframes())
        silence = bytes(round(DEMO_SILENCE * params.framerate) * params.sampwidth)
        with wave.open(str(path), "wb") as out:
            out.setnchannels(params.nchannels)
            out.setsampwidth(params.sampwidth)
            out.setframerate(params.framerate)
            out.writeframes(pcm + silence * params.nchannels)


def chromium_command(binary: str, profile: Path, wav: Path, url: str) -> list[str]:
    return [
        binary,
        "--headless=new",
        "--no-sandbox",  # we run as root; the namespace is our isolation
        "--disable-gpu",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--allow-loopback-in-peer-connection",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--no-first-run",
        "--no-default-browser-check",
        "--password-store=basic",
        "--enable-logging=stderr",
        f"--user-data-dir={profile}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        url,
    ]


def stop_process_group(process: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM the process's whole group (Chromium's helpers too), SIGKILL after ``grace``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader is gone; helpers may linger
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        return


def start_chromium(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as log_file:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as a whole
        )


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


class Cdp:
    """The smallest DevTools protocol client: one page target, one call at a time."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self._id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        call_id = self._id
        await self.ws.send_message(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.get_message())
            if message.get("id") != call_id:
                continue  # an event (we enable no domain, so rare) or a stale reply
            if "error" in message:
                raise ScenarioError(f"{method}: {message['error']}")
            result: dict[str, Any] = message["result"]
            return result

    async def evaluate(self, expression: str, *, await_promise: bool = False) -> Any:
        result = await self.call(
            "Runtime.evaluate",
            expression=expression,
            awaitPromise=await_promise,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise ScenarioError(f"{expression}: {text}")
        return result["result"].get("value")


async def eventually(
    check: Callable[[], Awaitable[Any]], *, within: float, interval: float = 0.05
) -> bool:
    """Poll ``check`` until it is true (True) or ``within`` seconds pass (False)."""
    with trio.move_on_after(within):
        while True:
            if await check():
                return True
            await trio.sleep(interval)
    return False


async def devtools_port(profile: Path, chromium: subprocess.Popen[bytes]) -> int:
    """The port Chromium chose for ``--remote-debugging-port=0`` (it writes it to its profile)."""
    marker = profile / "DevToolsActivePort"
    with trio.move_on_after(20):
        while True:
            if chromium.poll() is not None:
                raise ScenarioError(f"chromium exited with {chromium.returncode} at start")
            try:
                first = marker.read_text().splitlines()[0]
            except (OSError, IndexError):
                first = ""
            if first.isdigit():
                return int(first)
            await trio.sleep(0.05)
    raise ScenarioError("chromium wrote no DevToolsActivePort within 20 s")


async def page_websocket(port: int, url: str) -> str:
    """The DevTools WebSocket of the tab that shows ``url``."""
    with trio.move_on_after(20):
        while True:
            targets = await trio.to_thread.run_sync(http_json, f"http://127.0.0.1:{port}/json/list")
            for target in targets:
                if target.get("type") == "page" and target.get("url", "").startswith(url):
                    return str(target["webSocketDebuggerUrl"])
            await trio.sleep(0.1)
    raise ScenarioError(f"no DevTools page target for {url} within 20 s")


async def published_signaling(etcd_endpoint: str) -> str:
    """What ``parley status --json`` shows as the node's signaling address."""
    async with open_etcd(etcd_endpoint) as etcd:
        status = await gather_status(etcd, Keyspace(PREFIX))
    (entry,) = status["nodes"]
    return str(entry["addresses"]["signaling"])


async def call_from_browser(
    node: Node, etcd_endpoint: str, work: Path, wav: Path, mode: str, result: dict[str, Any]
) -> None:
    signaling = await published_signaling(etcd_endpoint)
    result["signaling"] = signaling
    if not signaling.startswith("ws://127.0.0.1:"):
        raise ScenarioError(f"unexpected signaling address {signaling}")
    page_url = "http://" + signaling.removeprefix("ws://").split("/", 1)[0] + "/"
    result["page_url"] = page_url

    async with browser_page(page_url, work, wav, result) as cdp:
        result["start"] = await cdp.evaluate("window.parleyStart()", await_promise=True)
        if mode == "demo":
            await wait_for_turns(cdp, node, result)
        else:
            await wait_for_echo(cdp, node, result)
        await hang_up(cdp, node, result)


@contextlib.asynccontextmanager
async def browser_page(
    page_url: str, work: Path, wav: Path, result: dict[str, Any]
) -> AsyncIterator[Cdp]:
    """Chromium (fake microphone playing ``wav``) showing Parley's page at ``page_url``, loaded
    and ready for ``parleyStart()``; stopped on the way out. Notes go into ``result``."""
    profile = work / "chromium-profile"
    browser_log = work / "chromium.log"
    result["chromium_log"] = str(browser_log)
    command = chromium_command(chromium_binary(), profile, wav, page_url)
    started = time.monotonic()
    chromium = await trio.to_thread.run_sync(start_chromium, command, browser_log)
    try:
        port = await devtools_port(profile, chromium)
        target = await page_websocket(port, page_url)
        async with trio_websocket.open_websocket_url(target, max_message_size=16 << 20) as ws:
            cdp = Cdp(ws)
            loaded = (
                "document.readyState === 'complete' && typeof window.parleyStart === 'function'"
            )
            if not await eventually(lambda: cdp.evaluate(loaded), within=20):
                raise ScenarioError("the page did not load (or has no parleyStart) within 20 s")
            result["browser_ready_s"] = round(time.monotonic() - started, 2)
            yield cdp
    finally:
        stop_process_group(chromium)
        result["chromium_exit"] = chromium.returncode


async def wait_for_echo(cdp: Cdp, node: Node, result: dict[str, Any]) -> None:
    """Poll the page until the echo plays, then read the node's side of the same session."""
    started = time.monotonic()
    deadline = trio.current_time() + MEDIA_TIMEOUT
    max_level = 0.0
    page: dict[str, Any] = {}
    while True:
        page = await cdp.evaluate(
            "({state: window.parleyState, stats: window.parleyStats, events: window.parleyEvents})"
        )
        stats = page.get("stats") or {}
        max_level = max(max_level, float(stats.get("audioLevel") or 0.0))
        if page["state"].get("error"):
            break
        if stats.get("packetsReceived", 0) > MIN_PACKETS and max_level > 0:
            break
        if trio.current_time() > deadline:
            result["media_timed_out"] = True
            break
        await trio.sleep(0.25)
    result["echo_s"] = round(time.monotonic() - started, 2)
    result["ice"] = await cdp.evaluate(ICE_REPORT, await_promise=True)
    result["page"] = page
    result["max_audio_level"] = max_level
    result["node_sessions"] = sorted(node.sessions)
    if node.stats_source is not None:
        result["node_stats"] = await node.stats_source()


#: one poll of the demo page: a fresh stats sample and everything it logged
DEMO_POLL = """(async () => ({
  state: window.parleyState,
  sample: await window.parleyCollectStats(),
  log: window.parleyLog,
  events: window.parleyEvents,
}))()"""


def turn_sequence(names: list[str]) -> list[int] | None:
    """Indexes of ``speech_started`` → ``speech_stopped`` → ``agent_started`` → what follows
    the reply (``agent_finished``, the next ``speech_started`` or ``agent_interrupted``), the
    first such run in ``names``; ``None`` until the page has seen all four."""
    wanted: list[tuple[str, ...]] = [
        ("speech_started",),
        ("speech_stopped",),
        ("agent_started",),
        ("agent_finished", "speech_started", "agent_interrupted"),
    ]
    found: list[int] = []
    for index, name in enumerate(names):
        if name in wanted[len(found)]:
            found.append(index)
            if len(found) == len(wanted):
                return found
    return None


async def wait_for_turns(cdp: Cdp, node: Node, result: dict[str, Any]) -> None:
    """Poll the demo page until a whole turn went round and its reply was heard."""
    started = time.monotonic()
    deadline = trio.current_time() + DEMO_TIMEOUT
    samples: list[dict[str, Any]] = []
    page: dict[str, Any] = {}
    level_after = level_before = 0.0
    while True:
        page = await cdp.evaluate(DEMO_POLL, await_promise=True)
        log: list[dict[str, Any]] = page.get("log") or []
        sample = page.get("sample") or {}
        if sample:
            samples.append(
                {k: sample.get(k) for k in ("ms", "at", "voice", "audioLevel", "micLevel")}
            )
        replies = [e["wall"] for e in log if e["event"] == "agent_started"]
        level = float(sample.get("audioLevel") or 0.0)
        if replies and sample.get("at", 0) > replies[0]:
            level_after = max(level_after, level)
        elif not replies:
            level_before = max(level_before, level)
        if page["state"].get("error"):
            break
        if turn_sequence([e["event"] for e in log]) is not None and level_after > 0:
            break
        if trio.current_time() > deadline:
            result["media_timed_out"] = True
            break
        await trio.sleep(0.2)
    result["turns_s"] = round(time.monotonic() - started, 2)
    result["ice"] = await cdp.evaluate(ICE_REPORT, await_promise=True)
    result["page"] = {"state": page.get("state"), "events": page.get("events"), "log": log}
    result["samples"] = samples
    result["level_after_agent_started"] = level_after
    result["level_before_agent_started"] = level_before
    result["figures"] = turn_figures(log)
    result["node_sessions"] = sorted(node.sessions)
    if node.stats_source is not None:
        result["node_stats"] = await node.stats_source()


def turn_figures(log: list[dict[str, Any]]) -> dict[str, list[float]]:
    """The node's own timing, from the ``at`` of its events (one clock, the node's):
    end of turn (last voiced frame) → reply, and first voiced frame → ``agent_interrupted``."""
    gaps: list[float] = []
    reactions: list[float] = []
    stopped_at: float | None = None
    started_at: float | None = None
    for entry in log:
        name, at = entry["event"], entry.get("at")
        if not isinstance(at, (int, float)):
            continue
        if name == "speech_stopped":
            stopped_at = at
        elif name == "agent_started" and stopped_at is not None:
            gaps.append(round(at - stopped_at, 3))
            stopped_at = None
        elif name == "speech_started":
            started_at = at
        elif name == "agent_interrupted" and started_at is not None:
            reactions.append(round(at - started_at, 3))
    return {"end_of_turn_to_reply_s": gaps, "voice_to_interrupted_s": reactions}


async def hang_up(cdp: Cdp, node: Node, result: dict[str, Any]) -> None:
    """Hang up in the page: closing its socket must end the session on the node."""
    await cdp.evaluate("window.parleyHangUp()")

    async def ended() -> bool:
        return not node.sessions

    await eventually(ended, within=10)
    result["node_sessions_after_hangup"] = sorted(node.sessions)


async def scenario(
    etcd_endpoint: str, work: Path, wav: Path, mode: str, result: dict[str, Any]
) -> None:
    # The demo runs the node's default agent (turn-echo), the echo test the immediate echo.
    # The page gets its access token from the node, as on `parley up` (node.demo_tokens).
    from tests.helpers import token_keys  # run as a script: tests/ is on the path only now

    node_config = NodeConfig(id="chromium-node", lease_ttl=3, demo_tokens=True)
    if mode == "echo":
        node_config = attrs.evolve(node_config, agent="echo")
    certs = str(token_keys(work / "certs"))
    cluster = ClusterConfig(etcd=etcd_endpoint, prefix=PREFIX, certs=certs)
    config = Config(cluster=cluster, node=node_config)
    result["agent"] = config.node.agent
    node = Node(config, frontend=run_frontend)
    # The test's timeout sends SIGTERM: fail the scenario so that every finally runs.
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as guard:
            guard.start_soon(fail_on_signal, signals)
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run)
                try:
                    with trio.fail_after(SCENARIO_TIMEOUT):
                        await call_from_browser(node, etcd_endpoint, work, wav, mode, result)
                finally:
                    node.request_stop()
                    # A graceful stop is quick; never let it hold the scenario.
                    nursery.cancel_scope.deadline = trio.current_time() + 10
            guard.cancel_scope.cancel()


async def fail_on_signal(signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        raise ScenarioError(f"stopped by {signal.Signals(signum).name}")


def describe(exc: BaseException) -> str:
    """One line per leaf exception (Trio nurseries wrap errors in groups)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] not in MODES):
        print(f"usage: {argv[0]} OUTFILE [{'|'.join(MODES)}]", file=sys.stderr)
        return 2
    outfile = Path(argv[1])
    mode = argv[2] if len(argv) == 3 else "echo"
    # The test stops us with SIGTERM on its timeout (Trio's run takes it over, see scenario):
    # unwind so that every finally runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result: dict[str, Any] = {"completed": False, "mode": mode}
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="parley-chromium-") as tmp:
            work = Path(tmp)
            try:
                result["interfaces_up"] = isolate_network()
                wav = work / "speech.wav"
                speech_wav(wav, mode)
                with EtcdServer(work / "etcd") as etcd:
                    trio.run(scenario, etcd.endpoint, work, wav, mode, result)
                result["completed"] = True
            finally:
                log = Path(result.get("chromium_log", work / "none"))
                if not result["completed"] and log.is_file():
                    result["chromium_log_tail"] = log.read_text(errors="replace")[-4000:]
    except BaseException as exc:
        result["error"] = describe(exc)
        result["traceback"] = traceback.format_exc()[-4000:]
        if not isinstance(exc, Exception):
            raise
    finally:
        result["total_s"] = round(time.monotonic() - started, 2)
        outfile.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result["completed"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.programs import record_from_env

    record_from_env()  # the programs this scenario starts count for tests/programs.py too
    sys.exit(main(sys.argv))
