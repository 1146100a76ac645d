"""A whole Parley cluster, as separate processes, serving real WebRTC clients through its relays.

Run by ``test_relay_cluster.py`` in a fresh network and PID namespace (only ``lo`` up)::

    unshare --net --pid --fork --kill-child --mount-proc -- \
        python cluster_scenario.py OUTFILE [CLIENTS]

1. ``parley up`` (a child process) starts etcd, 2 relays and 3 nodes (each its own process; the
   nodes in relay mode, with no client-facing UDP port) with the immediate echo agent.
2. CLIENTS aiortc peers (default 20) offer through the nodes' WHIP endpoints, round robin, and
   speak espeak-ng speech; one headless Chromium opens a node's demo page and talks too. Every
   answer's candidates must be the relays' public ports only.
3. After a few seconds each aiortc peer's received audio is correlated with what it said, and
   ``parley status`` must show sessions on every node and traffic through the relays.
4. ``relay-1`` is SIGKILLed. ``parley up`` restarts it; the peers' next consent checks (STUN,
   every ~5 s) re-admit their addresses on it, and every peer must again hear its echo.
   Chromium's inbound packet count is sampled across the kill too.

The outcome goes to OUTFILE as JSON, also when something fails (``error`` says what).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import aioice.ice
import trio

from ops.bench.common import ADMISSION
from ops.status import gather_status
from relay.settings import ClusterSettings
from sessions.audio import speech
from storage.etcd import EtcdUnavailable, open_etcd
from storage.keys import Keyspace
from tests.helpers import make_token
from tests.interop.chromium_scenario import (
    browser_page,
    isolate_network,
    speech_wav,
)
from tests.peers import AiortcCall

ETCD_PORT = 23790
#: `parley up`'s etcd takes only clients with a certificate of the cluster CA (up.etcd_tls)
ETCD = f"https://127.0.0.1:{ETCD_PORT}"
#: where the scenario's `parley up` keeps its certificates (main sets it with :func:`use_certs`)
_UP: dict[str, Path] = {}


def use_certs(directory: Path) -> None:
    """Read etcd (:func:`status`, the operator's commands) with the operator certificate in
    ``directory``, the certificate directory of the scenario's `parley up`."""
    _UP["certs"] = directory


def up_certs() -> Path:
    return _UP["certs"]


RELAY_PORTS = (3478, 3479)
PREFIX = "/parley"
SPEECH = "one two three four five six"
#: seconds each call talks before its echo is judged
LISTEN = 6.0
#: after the relay kill: its restart and the peers' next consent check (every 4-6 s)
RECOVER = 10.0
#: the flood: datagrams per second to each relay, for how long
FLOOD_RATE = 10_000
FLOOD_SECONDS = 3.0
#: seconds the peers have to set their calls up
SETUP = 20.0
#: processes the aiortc peers are spread over
PEER_PROCESSES = 4


class ScenarioError(Exception):
    pass


def whip(url: str, offer: str, token: str) -> tuple[int, str, str]:
    """POST ``offer`` with the access token ``token``: (status, Location, answer)."""
    headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, data=offer.encode(), method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.headers.get("Location", ""), response.read().decode()


def status() -> dict[str, Any]:
    """What ``parley status --json`` shows, read from etcd.

    This observer shares two saturated cores with everything it watches, and opens a fresh
    gRPC channel each time: its reads get a long timeout and a few tries when the channel's
    handshake times out (the daemons' own etcd traffic is what the test judges)."""

    async def read() -> dict[str, Any]:
        tls = ClusterSettings(etcd=ETCD, certs=str(up_certs())).etcd_tls("operator")
        for attempt in range(4):
            try:
                async with open_etcd(ETCD, rpc_timeout=10.0, tls=tls) as etcd:
                    return await gather_status(etcd, Keyspace(PREFIX))
            except EtcdUnavailable:
                if attempt == 3:
                    raise
                await trio.sleep(0.2)
        raise AssertionError("unreachable")

    return trio.run(read)


def kernel_udp() -> dict[str, Any]:
    """This namespace's UDP counters from the kernel: the ``Udp:`` line of /proc/net/snmp and
    every socket's drop count by local port (a full receive buffer shows here, not in ours)."""
    snmp = Path("/proc/net/snmp").read_text().splitlines()
    names, values = (line.split()[1:] for line in snmp if line.startswith("Udp:"))
    drops: dict[int, int] = {}
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        port = int(fields[1].rsplit(":", 1)[1], 16)
        drops[port] = drops.get(port, 0) + int(fields[-1])
    return {"udp": dict(zip(names, map(int, values), strict=True)), "socket_drops": drops}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) each process in this PID namespace has used, by a short
    name (``relay-1``, ``node-2``, ``etcd``, ``chromium``, ``python``...), summed over names."""
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        words = [a.decode(errors="replace") for a in argv if a]
        name = next((w for w in words if w.startswith(("relay-", "node-"))), None)
        if name is None:
            name = stat.split("(", 1)[1].split(")", 1)[0]
            if "peer" in " ".join(words) or "multiprocessing" in " ".join(words):
                name = "peers"
        used[name] = used.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    # and the whole machine's (all cores): idle, softirq (packets) and steal (the hypervisor)
    machine = Path("/proc/stat").read_text().split()
    for name, field in (("(idle)", 4), ("(softirq)", 7), ("(steal)", 8)):
        used[name] = int(machine[field]) / tick
    return used


def wait_for_cluster(up: subprocess.Popen[bytes], within: float = 60.0) -> dict[str, Any]:
    """Until 3 nodes and 2 relays are registered and every relay has a tunnel from every node."""
    deadline = time.monotonic() + within
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise ScenarioError(f"parley up exited with {up.returncode}")
        try:
            last = status()
        except Exception:  # etcd not up yet
            time.sleep(0.3)
            continue
        nodes = {n["id"] for n in last["nodes"]}
        tunnels = [set(r.get("tunnels", [])) for r in last["relays"]]
        if len(nodes) == 3 and len(tunnels) == 2 and all(t == nodes for t in tunnels):
            return last
        time.sleep(0.3)
    raise ScenarioError(f"the cluster did not come up within {within:.0f} s: {last}")


def candidates_of(answer: str) -> list[tuple[str, int]]:
    found = []
    for line in answer.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            found.append((parts[4], int(parts[5])))
    return found


async def peers(
    whips: list[str], offset: int, count: int, plan: dict[str, float], token: str
) -> dict[str, Any]:
    """``count`` aiortc peers, offering round robin from ``offset``; their echo correlations.

    ``plan`` holds wall-clock times shared with the other peer processes: the calls are up by
    ``talk``; the echo is judged in [talk + 2, kill) and again in [recover, end).
    """
    sent = speech.speak(SPEECH, rate=190)
    calls = [AiortcCall(sent, pause=0.3) for _ in range(count)]
    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {"answer_candidates": [], "sessions": []}

    def local(at: float) -> float:  # a wall-clock time on this loop's clock
        return loop.time() + (at - time.time())

    async def until(at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.time()))

    def window(call: AiortcCall, start: float, end: float) -> bytes:
        return call.pcm_between(local(start), local(end))

    try:
        for index, call in enumerate(calls):
            offer = await call.offer()
            url = whips[(offset + index) % len(whips)]
            code, location, answer = await asyncio.to_thread(whip, url, offer, token)
            if code != 201:
                raise ScenarioError(f"WHIP answered {code}")
            out["answer_candidates"].append(candidates_of(answer))
            out["sessions"].append(location.split("/")[3])
            await call.answer(answer)
        if time.time() > plan["talk"]:
            raise ScenarioError("the calls took too long to set up")
        await until(plan["kill"])
        before = [window(c, plan["talk"] + 2.0, plan["flood"]) for c in calls]
        await until(plan["end"])
        after = [window(c, plan["recover"], plan["end"]) for c in calls]
    finally:
        await asyncio.gather(*(c.close() for c in calls), return_exceptions=True)
    # Judged once the calls are over, so that the pure-Python correlation takes no CPU from
    # the live audio.
    out["correlation_before"] = [best_chunk(sent, pcm) for pcm in before]
    out["correlation_after"] = [best_chunk(sent, pcm) for pcm in after]
    out["heard_before"] = [round(len(pcm) / 96_000, 2) for pcm in before]
    out["heard_after"] = [round(len(pcm) / 96_000, 2) for pcm in after]
    return out


def best_chunk(sent: bytes, heard: bytes) -> float:
    """The best correlation of a 1 s chunk of what a peer heard with what it said.

    Two cores hold the whole cluster, 20 peers and a browser in this test, so a peer's audio
    has the odd gap (a frame its own jitter buffer dropped late), and one gap misaligns a long
    waveform comparison. A whole second of the heard audio matching the speech still shows
    that the peer hears its own words back, through relays and nodes.
    """
    chunk = 96_000  # 1 s of 48 kHz s16
    scores = [
        speech.correlation(sent, heard[at : at + chunk], len(sent) // 2)[0]
        for at in range(0, len(heard) - chunk + 1, chunk // 2)
    ]
    return round(max(scores, default=0.0), 3)


def own_session() -> None:
    """Run this process in a session of its own, as ``parley up`` runs each daemon.

    With the kernel's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``, on in
    many distributions' kernels) CPU is shared fairly between sessions first, then between the
    processes of a session. ``parley up`` starts every relay, node and etcd in its own session,
    so if the peers shared the scenario's one, twenty peers would get the share of one daemon
    and fall seconds behind the audio they hear."""
    with contextlib.suppress(OSError):
        os.setsid()


def flood(go: Any, seconds: float) -> None:
    """Random UDP and forged connectivity checks at both relays, FLOOD_RATE each, from many
    source ports, for ``seconds`` once ``go`` (a multiprocessing Event) is set. Half the
    datagrams are random bytes; half are well-formed STUN Binding requests whose ufrag looks
    like a hint but carries a MAC under the wrong secret.

    The process is started well before: a spawned Python takes seconds to import on a loaded
    machine, and a flood that started late would still be running when relay-1 is killed.
    """
    own_session()  # a flood that is starved of CPU would not be the flood it says it is
    import random
    import socket

    from relay.tunnel.hint import mint_ufrag
    from sessions.webrtc import stun

    rng = random.Random(7)
    forged = [
        stun.encode(
            stun.binding_request(
                rng.randbytes(12),
                username=f"{mint_ufrag('floodsession' + str(i), 'node-1', bytes(32))}:x",
                priority=1,
                controlling=True,
                tie_breaker=1,
            )
        )
        for i in range(64)
    ]
    noise = [rng.randbytes(rng.randrange(1, 1200)) for _ in range(64)]
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(32)]
    for sock in socks:
        sock.setblocking(False)
    batch = 100
    interval = batch / FLOOD_RATE
    go.wait()
    end = time.monotonic() + seconds
    next_at = time.monotonic()
    sent = 0
    while time.monotonic() < end:
        for i in range(batch):
            data = forged[i % 64] if i % 2 else noise[i % 64]
            for port in RELAY_PORTS:
                with contextlib.suppress(BlockingIOError):
                    socks[(sent + i) % len(socks)].sendto(data, ("127.0.0.1", port))
        sent += batch
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    for sock in socks:
        sock.close()


def peer_process(args: tuple[list[str], int, int, dict[str, float], str]) -> dict[str, Any]:
    """One process of peers (one asyncio loop per process: 20 peers in one would starve)."""
    own_session()
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]  # type: ignore[assignment]
    whips, offset, count, plan, token = args
    try:
        return asyncio.run(peers(whips, offset, count, plan, token))
    except Exception:
        return {"error": traceback.format_exc()}


async def chromium_call(
    page_url: str, work: Path, result: dict[str, Any], done: threading.Event
) -> None:
    wav = work / "speech.wav"
    speech_wav(wav)
    samples: list[tuple[float, int, float]] = []
    result["chromium_samples"] = samples
    async with browser_page(page_url, work, wav, result) as cdp:
        await cdp.evaluate("window.parleyStart()", await_promise=True)
        started = time.monotonic()
        result["chromium_started"] = started
        while not done.is_set():
            page = await cdp.evaluate("({state: window.parleyState, stats: window.parleyStats})")
            stats = (page or {}).get("stats") or {}
            samples.append(
                (
                    round(time.monotonic() - started, 2),
                    int(stats.get("packetsReceived") or 0),
                    float(stats.get("audioLevel") or 0.0),
                )
            )
            await trio.sleep(0.5)


def main(outfile: Path, clients: int) -> None:
    result: dict[str, Any] = {"clients": clients}
    up: subprocess.Popen[bytes] | None = None
    work = Path(tempfile.mkdtemp(prefix="parley-cluster-"))
    use_certs(work / "up" / "certs")
    try:
        result["interfaces_up"] = isolate_network()
        # aioice gathers no loopback candidates by default; here loopback is all there is.
        env = {**os.environ, "PARLEY_NODE_AGENT": "echo", "PARLEY_CONFIG": "/dev/null"}
        # twenty calls offer at once from one loopback address: relays are tested here, not a
        # node's pacing of one source (tests/sessions/test_admission_limits.py)
        env.update(ADMISSION)
        env.pop("PARLEY_CLUSTER_CERTS", None)
        up_log = work / "up.log"
        with open(up_log, "wb") as log:
            up = subprocess.Popen(
                [
                    sys.executable, "-m", "ops.cli", "up",
                    "--data-dir", str(work / "up"),
                    "--etcd-port", str(ETCD_PORT),
                    "--nodes", "3",
                    "--relays", "2",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2], env=env, start_new_session=True,
            )  # fmt: skip
        result["up_log"] = str(up_log)
        first = wait_for_cluster(up)
        result["relays_up"] = first["relays"]
        whips = sorted(str(n["addresses"]["whip"]) for n in first["nodes"])
        result["whips"] = whips
        nodes_pages = sorted(
            "http://" + str(n["signaling"]).removeprefix("ws://").split("/", 1)[0] + "/"
            for n in first["nodes"]
        )

        now = time.time()
        plan = {"talk": now + SETUP, "flood": now + SETUP + LISTEN}
        plan["kill"] = plan["flood"] + FLOOD_SECONDS + 2.5
        plan["recover"] = plan["kill"] + RECOVER
        plan["end"] = plan["recover"] + LISTEN - 2.0
        done = threading.Event()
        errors: list[str] = []

        def browser() -> None:
            try:
                trio.run(chromium_call, nodes_pages[0], work, result, done)
            except Exception:
                errors.append("chromium: " + traceback.format_exc())

        thread = threading.Thread(target=browser)
        thread.start()
        shares = [
            clients // PEER_PROCESSES + (i < clients % PEER_PROCESSES)
            for i in range(PEER_PROCESSES)
        ]
        token = make_token(work / "up" / "certs", subject="cluster-scenario")
        jobs = [(whips, sum(shares[:i]), n, plan, token) for i, n in enumerate(shares) if n]
        context = multiprocessing.get_context("spawn")
        try:
            with context.Pool(len(jobs)) as pool:
                pending = pool.map_async(peer_process, jobs)
                go = context.Event()
                # daemon: if anything fails before ``go``, the flooder must not hold the exit
                flooder = context.Process(target=flood, args=(go, FLOOD_SECONDS), daemon=True)
                flooder.start()
                time.sleep(max(0.0, plan["flood"] - 0.3 - time.time()))
                result["status_before"] = status()
                result["kernel_before"] = kernel_udp()
                result["cpu_before"] = cpu_seconds()
                time.sleep(max(0.0, plan["flood"] - time.time()))
                go.set()
                flooder.join(FLOOD_SECONDS + 10)
                result["flood_late_s"] = round(time.time() - plan["flood"] - FLOOD_SECONDS, 2)
                # Nodes publish session stats every 2 s: wait for a publication after the flood.
                time.sleep(max(0.0, plan["kill"] - 0.3 - time.time()))
                result["status_flooded"] = status()
                result["kernel_flooded"] = kernel_udp()
                result["cpu_flooded"] = cpu_seconds()
                relay = next(r for r in result["status_flooded"]["relays"] if r["id"] == "relay-1")
                time.sleep(max(0.0, plan["kill"] - time.time()))
                result["killed_relay_pid"] = relay["pid"]
                result["killed_at"] = time.monotonic()
                os.kill(int(relay["pid"]), signal.SIGKILL)
                # Well before the peers hang up at "end": a slow read must not see them gone.
                time.sleep(max(0.0, plan["end"] - 1.5 - time.time()))
                result["status_after"] = status()
                outcomes = pending.get(timeout=SETUP + 60)
        finally:
            done.set()
            thread.join(30)
        keys = ("answer_candidates", "sessions", "correlation_before", "correlation_after")
        for key in (*keys, "heard_before", "heard_after"):
            result[key] = [x for o in outcomes for x in o.get(key, [])]
        errors += [o["error"] for o in outcomes if "error" in o]
        result["errors"] = errors
        result["ok"] = not errors
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    finally:
        if up is not None and up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
        result["up_exit"] = up.returncode if up is not None else None
        logs = work / "up" / "logs"
        if logs.is_dir():
            result["log_tails"] = {
                p.name: p.read_text(errors="replace")[-1500:] for p in sorted(logs.glob("*.log"))
            }
        outfile.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    from tests.programs import record_from_env

    record_from_env()  # the programs this scenario starts count for tests/programs.py too
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 20)
