"""Live migration, as separate processes: sessions move between nodes while clients talk.

Run by ``test_migration.py`` in a fresh network and PID namespace (only ``lo`` up)::

    unshare --net --pid --fork --kill-child --mount-proc -- \
        python migration_scenario.py OUTFILE [CLIENTS] [MIGRATIONS]

1. ``parley up`` starts etcd, 2 relays and 3 nodes with the immediate echo agent; the relays
   audit SRTP and SRTCP indexes (``PARLEY_RELAY_AUDIT=1``, relay/audit.py).
2. CLIENTS aiortc peers (default 10) offer through node-1's WHIP endpoint and one headless
   Chromium calls from node-1's demo page: every session lives on node-1. All speak espeak-ng
   speech. Each aiortc peer records every SRTP and SRTCP packet it decrypts (SSRC, sequence
   number, timestamp, arrival, and libsrtp's verdict), its ICE and DTLS state changes and the
   offers it made; Chromium is sampled through ``getStats()``.
3. ``parley drain node-1 --json`` moves every session to node-2 and node-3.
4. ``parley migrate`` moves one aiortc peer's session between node-2 and node-3 MIGRATIONS
   times (default 20) while it talks.
5. The node holding most sessions gets SIGTERM from us (under ``parley up``, as a deploy
   would): it drains itself to the other active node before it exits.

Between the steps every call talks for :data:`LISTEN` seconds; the echo is judged in each of
those windows afterwards, so that the correlation takes no CPU from live audio. The outcome goes
to OUTFILE as JSON, also when something fails (``error`` says what).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import aioice.ice
import trio

from ops.bench.common import ADMISSION
from sessions.audio import speech
from sessions.node.ledger import check_ledgers, read_ledgers
from tests.cluster.cluster_scenario import (
    ETCD,
    ETCD_PORT,
    SPEECH,
    ScenarioError,
    best_chunk,
    candidates_of,
    own_session,
    status,
    up_certs,
    use_certs,
    wait_for_cluster,
    whip,
)
from tests.helpers import make_token
from tests.interop.chromium_scenario import browser_page, isolate_network, speech_wav
from tests.peers import AiortcCall

ROOT = Path(__file__).resolve().parents[2]
#: seconds every call talks after each step before the next (its echo is judged in them)
LISTEN = 4.0
#: seconds the calls have to be set up and heard
SETUP = 30.0
#: processes the aiortc peers are spread over
PEER_PROCESSES = 2
#: the bound on each ``parley`` command we run
COMMAND_TIMEOUT = 30.0
#: how long a SIGTERMed node may take to hand its sessions over
SIGTERM_WITHIN = 20.0
#: the nodes' lease TTL: a SIGKILLed node's sessions are adopted about this long after
LEASE_TTL = 3
#: how long the sessions of a SIGKILLed node may take to be adopted
SIGKILL_WITHIN = LEASE_TTL + 12.0

#: One getStats() sample of the demo page's peer connection, and what the page logged. The
#: first call also starts recording the connection's ICE, DTLS and signaling state changes.
CHROMIUM_PROBE = """(async () => {
  const pc = window.parleyPeer && window.parleyPeer();
  if (!pc) return null;
  const rec = window.__migration || (window.__migration = {ice: [], connection: [], dtls: []});
  if (!rec.hooked) {
    rec.hooked = true;
    rec.ice.push([Date.now(), pc.iceConnectionState]);
    pc.addEventListener("iceconnectionstatechange",
      () => rec.ice.push([Date.now(), pc.iceConnectionState]));
    pc.addEventListener("connectionstatechange",
      () => rec.connection.push([Date.now(), pc.connectionState]));
    const dtls = pc.getReceivers()[0] && pc.getReceivers()[0].transport;
    if (dtls) {
      rec.dtls.push([Date.now(), dtls.state]);
      dtls.addEventListener("statechange", () => rec.dtls.push([Date.now(), dtls.state]));
    }
  }
  const out = {wall: Date.now() / 1000, ice: pc.iceConnectionState,
    connection: pc.connectionState, signaling: pc.signalingState};
  (await pc.getStats()).forEach((r) => {
    if (r.type === "transport") {
      Object.assign(out, {transport: r.id, pair: r.selectedCandidatePairId,
        pairChanges: r.selectedCandidatePairChanges, dtlsState: r.dtlsState,
        localCertificate: r.localCertificateId, remoteCertificate: r.remoteCertificateId,
        srtpCipher: r.srtpCipher, ufrag: r.iceLocalUsernameFragment});
    } else if (r.type === "inbound-rtp" && r.kind === "audio") {
      Object.assign(out, {received: r.packetsReceived, lost: r.packetsLost,
        discarded: r.packetsDiscarded, concealed: r.concealedSamples,
        samples: r.totalSamplesReceived, level: r.audioLevel, jitter: r.jitter,
        inboundTransport: r.transportId, ssrc: r.ssrc});
    } else if (r.type === "outbound-rtp" && r.kind === "audio") {
      out.sent = r.packetsSent;
    }
  });
  const s = window.parleyState;
  Object.assign(out, {session: s.session, reattached: s.reattached, error: s.error,
    offers: window.__offers || 0, restarts: window.__restarts || 0});
  return out;
})()"""

#: Installed before parleyStart(): counts the offers the page makes and ICE restarts it asks for.
CHROMIUM_COUNTERS = """(() => {
  const proto = RTCPeerConnection.prototype;
  const offer = proto.createOffer, restart = proto.restartIce;
  proto.createOffer = function (...args) {
    window.__offers = (window.__offers || 0) + 1;
    if (args[0] && args[0].iceRestart) window.__restarts = (window.__restarts || 0) + 1;
    return offer.apply(this, args);
  };
  proto.restartIce = function () {
    window.__restarts = (window.__restarts || 0) + 1;
    return restart.apply(this);
  };
  return true;
})()"""


# -- the aiortc peers --------------------------------------------------------------------------


class SrtpRecorder:
    """Stands in for an aiortc DTLS transport's inbound libsrtp session and records, for every
    packet, what the header says in the clear (RFC 3711 §3.1, §3.4) and whether libsrtp
    authenticated it: libsrtp refuses a repeated index (its replay list, §3.3.2), so a refusal
    is also how a repeat would show."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        #: (wall time, SSRC, sequence number, RTP timestamp, error or "")
        self.rtp: list[tuple[float, int, int, int, str]] = []
        #: (wall time, SSRC of the sender, error or "")
        self.rtcp: list[tuple[float, int, str]] = []

    def unprotect(self, data: bytes) -> bytes:
        seq, stamp, ssrc = (int.from_bytes(data[a:b]) for a, b in ((2, 4), (4, 8), (8, 12)))
        try:
            clear: bytes = self.inner.unprotect(data)
        except Exception as exc:
            self.rtp.append((time.time(), ssrc, seq, stamp, str(exc) or type(exc).__name__))
            raise
        self.rtp.append((time.time(), ssrc, seq, stamp, ""))
        return clear

    def unprotect_rtcp(self, data: bytes) -> bytes:
        ssrc = int.from_bytes(data[4:8])
        try:
            clear: bytes = self.inner.unprotect_rtcp(data)
        except Exception as exc:
            self.rtcp.append((time.time(), ssrc, str(exc) or type(exc).__name__))
            raise
        self.rtcp.append((time.time(), ssrc, ""))
        return clear

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class WatchedCall(AiortcCall):
    """An aiortc call that records what must not change while its session moves."""

    def __init__(self, pcm: bytes) -> None:
        super().__init__(pcm, pause=0.3)
        self.offers = 0
        self.ice: list[tuple[float, str]] = []
        self.connection: list[tuple[float, str]] = []
        self.dtls: list[tuple[float, str]] = []
        self.dtls_transports: set[int] = set()
        self.recorder: SrtpRecorder | None = None
        pc = self.pc
        create_offer = pc.createOffer

        async def counted_offer(*args: Any, **kwargs: Any) -> Any:
            self.offers += 1
            return await create_offer(*args, **kwargs)

        pc.createOffer = counted_offer  # type: ignore[method-assign]
        pc.on(
            "iceconnectionstatechange",
            lambda: self.ice.append((time.time(), pc.iceConnectionState)),
        )
        pc.on(
            "connectionstatechange",
            lambda: self.connection.append((time.time(), pc.connectionState)),
        )

    def watch_dtls(self) -> None:
        """Hook the DTLS transport (after setRemoteDescription made it)."""
        for transceiver in self.pc.getTransceivers():
            transport = transceiver.receiver.transport
            if transport is None or id(transport) in self.dtls_transports:
                continue
            self.dtls_transports.add(id(transport))
            self.dtls.append((time.time(), transport.state))

            def changed(transport: Any = transport) -> None:
                self.dtls.append((time.time(), transport.state))
                if transport.state == "connected" and self.recorder is None:
                    # The inbound libsrtp session exists from here on; wrap it before the
                    # first SRTP packet is read (this handler runs synchronously).
                    self.recorder = SrtpRecorder(transport._rx_srtp)
                    transport._rx_srtp = self.recorder

            transport.on("statechange", changed)

    def transports_now(self) -> set[int]:
        return {id(t.receiver.transport) for t in self.pc.getTransceivers() if t.receiver.transport}


async def peers(
    whip_url: str, token: str, count: int, inbox: Any, outbox: Any, index: int
) -> dict[str, Any]:
    """``count`` watched calls on node-1; report ready; wait for the marks; judge windows."""
    sent = speech.speak(SPEECH, rate=190)
    calls = [WatchedCall(sent) for _ in range(count)]
    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {"sessions": [], "answer_candidates": []}
    marks: dict[str, Any] = {}
    try:
        for call in calls:
            offer = await call.offer()
            code, location, answer = await asyncio.to_thread(whip, whip_url, offer, token)
            if code != 201:
                raise ScenarioError(f"WHIP answered {code}")
            # Location: /v1/session/<id>/<secret>
            out["sessions"].append(location.split("/v1/session/", 1)[1].split("/", 1)[0])
            out["answer_candidates"].append(candidates_of(answer))
            await call.answer(answer)
            call.watch_dtls()
        outbox.put({"ready": index, "sessions": out["sessions"]})
        marks = await asyncio.to_thread(inbox.get)  # the main process says when it is over
        out["transports_same"] = [
            c.transports_now() == c.dtls_transports and len(c.dtls_transports) == 1 for c in calls
        ]
    finally:
        await asyncio.gather(*(c.close() for c in calls), return_exceptions=True)
    # Judged once the calls are over, so that the correlation takes no CPU from live audio.
    offset = time.time() - loop.time()
    out["calls"] = [judge_call(call, sent, marks, offset) for call in calls]
    return out


def judge_call(
    call: WatchedCall, sent: bytes, marks: dict[str, Any], offset: float
) -> dict[str, Any]:
    """What one aiortc client saw, against the main process's marks (wall-clock times)."""

    def pcm(start: float, end: float) -> bytes:
        return call.pcm_between(start - offset, end - offset)

    windows: dict[str, dict[str, float]] = {}
    for name, (start, end) in marks["windows"].items():
        heard = pcm(start, end)
        windows[name] = {
            "correlation": best_chunk(sent, heard),
            "heard_s": round(len(heard) / 96_000, 2),
        }
    recorder = call.recorder
    rtp = recorder.rtp if recorder else []
    rtcp = recorder.rtcp if recorder else []
    ok = [(t, ssrc, seq, stamp) for t, ssrc, seq, stamp, error in rtp if not error]
    return {
        "offers": call.offers,
        "ice": call.ice,
        "connection": call.connection,
        "dtls": call.dtls,
        "dtls_transports": len(call.dtls_transports),
        "windows": windows,
        "srtp": srtp_report(ok, marks),
        "srtp_failures": [(round(t, 3), error) for t, _, _, _, error in rtp if error][:20],
        "srtp_failed": sum(1 for *_, error in rtp if error),
        "srtcp_ok": sum(1 for *_, error in rtcp if not error),
        "srtcp_failed": sum(1 for *_, error in rtcp if error),
        "srtcp_failures": [(round(t, 3), error) for t, _, error in rtcp if error][:20],
    }


def srtp_report(
    packets: list[tuple[float, int, int, int]], marks: dict[str, Any]
) -> dict[str, Any]:
    """The decrypted stream from the node: repeats, gaps and timing across the moves.

    Sequence numbers are extended over wraps in arrival order (as a receiver estimates the ROC,
    RFC 3711 §3.3.1); the stream is judged on (SSRC, extended sequence number).
    """
    ssrcs = sorted({ssrc for _, ssrc, _, _ in packets})
    extended: list[tuple[float, int, int]] = []  # (arrival, extended seq, timestamp)
    highest = -1
    for at, _, seq, stamp in packets:
        if highest < 0:
            index = seq
        else:
            roc, s_l = highest >> 16, highest & 0xFFFF
            if s_l < 1 << 15:
                v = roc - 1 if seq - s_l > 1 << 15 else roc
            else:
                v = roc + 1 if s_l - (1 << 15) > seq else roc
            index = max(v, 0) << 16 | seq
        highest = max(highest, index)
        extended.append((at, index, stamp))
    everything: dict[int, int] = {}
    for _, index, _ in extended:
        everything[index] = everything.get(index, 0) + 1
    planned_until = marks.get("planned_until", float("inf"))
    seen: dict[int, int] = {}
    for at, index, _ in extended:
        if at < planned_until:
            seen[index] = seen.get(index, 0) + 1
    repeated = sorted(i for i, n in seen.items() if n > 1)
    missing: list[int] = []
    if seen:
        low, high = min(seen), max(seen)
        missing = [i for i in range(low, high + 1) if i not in seen]

    def delay(start: float, end: float, reference: tuple[float, int, int]) -> float | None:
        """Median of arrival minus RTP timestamp (on ``reference``'s clock) in [start, end)."""
        offsets = [
            at - ((stamp - reference[2] + (1 << 31)) % (1 << 32) - (1 << 31)) / 48_000
            for at, _, stamp in extended
            if start <= at < end
        ]
        return statistics.median(offsets) if offsets else None

    def around(start: float, end: float) -> dict[str, Any]:
        """In [start, end): the longest arrival gap, the indexes missing around it, and how the
        echo's delay (arrival minus RTP timestamp) moved across it, medians of a second on
        each side: a stream whose timestamps keep pace with real time keeps its delay (the
        jitter buffer sees neither a gap nor a jump); one that went on at +960 would add
        the blackout to it."""
        inside = [p for p in extended if start <= p[0] < end]
        if len(inside) < 2:
            return {"packets": len(inside)}
        gap, a, b = max(((b[0] - a[0], a, b) for a, b in itertools.pairwise(inside)))
        lo, hi = min(p[1] for p in inside), max(p[1] for p in inside)
        before, after = delay(a[0] - 1.0, a[0] + 1e-6, a), delay(b[0], b[0] + 1.0, a)
        return {
            "packets": len(inside),
            "longest_gap_ms": round(gap * 1000, 1),
            "seq_step_at_gap": b[1] - a[1],
            "ts_step_at_gap": (b[2] - a[2]) % (1 << 32),
            "delay_step_ms": None
            if before is None or after is None
            else round((after - before) * 1000, 1),
            "missing": sum(1 for i in range(lo, hi + 1) if i not in seen),
        }

    moves = {name: around(start, end) for name, (start, end) in marks.get("moves", {}).items()}
    failovers = {
        name: around(start, end) for name, (start, end) in marks.get("failovers", {}).items()
    }
    return {
        "packets": len(extended),
        # the whole call, the crash failover included: an index never comes twice
        "repeated_ever": sum(1 for n in everything.values() if n > 1),
        "in_order_ever": all(b[1] > a[1] for a, b in itertools.pairwise(extended)),
        "failovers": failovers,
        "ssrcs": ssrcs,
        "repeated": len(repeated),
        "repeated_examples": repeated[:10],
        "missing": len(missing),
        "missing_examples": missing[:20],
        "in_order": all(
            b[1] > a[1] for a, b in itertools.pairwise(extended) if b[0] < planned_until
        ),
        "moves": moves,
    }


def peer_process(
    whip_url: str, token: str, count: int, inbox: Any, outbox: Any, index: int
) -> None:
    """One process of peers (one asyncio loop per process)."""
    own_session()
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    try:
        result = asyncio.run(peers(whip_url, token, count, inbox, outbox, index))
    except Exception:
        result = {"error": traceback.format_exc()}
    outbox.put({"result": index, **result})


# -- Chromium ----------------------------------------------------------------------------------


async def chromium_call(
    page_url: str, work: Path, result: dict[str, Any], done: threading.Event
) -> None:
    wav = work / "speech.wav"
    speech_wav(wav)
    samples: list[dict[str, Any]] = []
    result["chromium_samples"] = samples
    async with browser_page(page_url, work, wav, result) as cdp:
        await cdp.evaluate(CHROMIUM_COUNTERS)
        result["chromium_start"] = await cdp.evaluate("window.parleyStart()", await_promise=True)
        while not done.is_set():
            sample = await cdp.evaluate(CHROMIUM_PROBE, await_promise=True)
            if sample:
                samples.append(sample)
            await trio.sleep(0.5)
        result["chromium_states"] = await cdp.evaluate("window.__migration || null")
        result["chromium_events"] = await cdp.evaluate("window.parleyLog || null")


# -- the operator's side -----------------------------------------------------------------------


#: the `parley` command of this checkout
PARLEY_CLI = [sys.executable, "-m", "ops.cli"]


def parley(*args: str, timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
    """One ``parley`` command (a process, as an operator runs it): exit code, JSON, time."""
    started = time.time()
    done = subprocess.run(
        [*PARLEY_CLI, *args, "--etcd", ETCD, "--certs", str(up_certs()), "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PARLEY_CONFIG": "/dev/null"},
        check=False,
    )
    out: dict[str, Any] = {
        "args": list(args),
        "code": done.returncode,
        "started": started,
        "seconds": round(time.time() - started, 3),
    }
    try:
        out["json"] = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        out["stdout"] = done.stdout[-2000:]
    if done.returncode != 0:
        out["stderr"] = done.stderr[-2000:]
    return out


def owners() -> dict[str, str]:
    """session -> owning node, from etcd."""
    return {s["id"]: s["owner"] for s in status()["sessions"]}


def wait_until(check: Any, within: float, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def main(outfile: Path, clients: int, migrations: int) -> None:
    result: dict[str, Any] = {"clients": clients, "migrations_asked": migrations}
    up: subprocess.Popen[bytes] | None = None
    work = Path(tempfile.mkdtemp(prefix="parley-migration-"))
    use_certs(work / "up" / "certs")
    started = time.monotonic()
    try:
        result["interfaces_up"] = isolate_network()
        env = {
            **os.environ,
            "PARLEY_NODE_AGENT": "echo",
            "PARLEY_CONFIG": "/dev/null",
            "PARLEY_RELAY_AUDIT": "1",  # relay/audit.py: count SRTP/SRTCP indexes seen twice
            # sessions/node/ledger.py: what each node decrypted and protected, per epoch
            "PARLEY_NODE_LEDGER_DIR": str(work / "up" / "ledger"),
            # eleven calls offer to node-1 at once from one loopback address: what is tested
            # here is moves, not a node's pacing of one source (tests/sessions: admission)
            **ADMISSION,
        }
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
                    "--lease-ttl", str(LEASE_TTL),
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=ROOT, env=env, start_new_session=True,
            )  # fmt: skip
        first = wait_for_cluster(up)
        result["cluster_up_s"] = round(time.monotonic() - started, 2)
        node1 = next(n for n in first["nodes"] if n["id"] == "node-1")
        whip_url = str(node1["addresses"]["whip"])
        page_url = "http://" + str(node1["signaling"]).removeprefix("ws://").split("/", 1)[0] + "/"
        result["node_pids_before"] = {n["id"]: n["pid"] for n in first["nodes"]}
        run_calls(result, whip_url, page_url, clients, migrations, work, up)
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
        result["total_s"] = round(time.monotonic() - started, 2)
        result["ledger"] = judge_ledgers(
            work / "up" / "ledger", killed=(result.get("sigkill") or {}).get("node")
        )
        logs = work / "up" / "logs"
        if logs.is_dir():
            result["log_tails"] = {
                p.name: p.read_text(errors="replace")[-3000:] for p in sorted(logs.glob("*.log"))
            }
            result["moves_logged"] = moves_logged(logs)
        outfile.write_text(json.dumps(result, indent=2, default=str))
        shutil.rmtree(work, ignore_errors=True)  # what the test needs of it is in the outcome


def judge_ledgers(directory: Path, killed: str | None = None) -> dict[str, Any]:
    """The nodes' media ledgers, read after every node stopped: breaches of single ownership,
    and per session, how many epochs processed it and which client SRTP indexes inside the span
    they decrypted together no node decrypted (a hole: lost, or refused)."""
    if not directory.is_dir():
        return {"error": f"no ledger in {directory}"}
    segments = read_ledgers(directory)
    holes: dict[str, int] = {}
    epochs: dict[str, int] = {}
    detail: dict[str, list[list[Any]]] = {}
    for session in {s.session for s in segments}:
        mine = [s for s in segments if s.session == session]
        epochs[session] = len({s.epoch for s in mine})
        ranges = sorted((lo, hi, s.epoch) for s in mine for lo, hi in s.rtp_in)
        by_epoch = {(s.session, s.epoch): s.node for s in mine}
        # the epochs that adopted the session from the killed node, and their first range: a
        # crash restore keeps only the newest few datagrams that queued for it (the rest is
        # stale audio, session.py _shed_backlog), and what the client sent while the session
        # had no owner at all never reached a node; both are the failover's own loss
        adopted_first = {
            b
            for a, b in itertools.pairwise(ranges)
            if a[2] != b[2] and killed is not None and by_epoch.get((session, a[2])) == killed
        }
        holes[session] = 0
        for a, b in itertools.pairwise(ranges):
            if b[0] - a[1] - 1 > 0:
                if a[2] == b[2] and a in adopted_first:
                    where = "at the failover"
                elif a[2] == b[2]:
                    where = "within an epoch"
                elif by_epoch.get((session, a[2])) == killed:
                    where = "at the failover"  # what reached the dead node is gone with it
                else:
                    where = "between epochs"
                detail.setdefault(where, []).append([session[:6], a[1] + 1, b[0] - 1])
                if where != "at the failover":
                    holes[session] += b[0] - a[1] - 1
    return {
        "segments": len(segments),
        "violations": check_ledgers(segments),
        "epochs": epochs,
        "holes": holes,
        "hole_detail": {k: v[:40] for k, v in detail.items()},
        "not_final": sum(1 for s in segments if not s.final and s.node != killed),
    }


def moves_logged(logs: Path) -> list[dict[str, Any]]:
    """Every "session moved in" line the nodes logged (their blackout_ms)."""
    found: list[dict[str, Any]] = []
    for path in sorted(logs.glob("node-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if "session moved in" in line:
                found.append({"log": path.name, "line": line[-300:]})
    return found


def run_calls(
    result: dict[str, Any],
    whip_url: str,
    page_url: str,
    clients: int,
    migrations: int,
    work: Path,
    up: subprocess.Popen[bytes],
) -> None:
    done = threading.Event()
    errors: list[str] = []
    result["errors"] = errors

    def browser() -> None:
        try:
            trio.run(chromium_call, page_url, work, result, done)
        except Exception:
            errors.append("chromium: " + traceback.format_exc())

    thread = threading.Thread(target=browser)
    thread.start()
    context = multiprocessing.get_context("spawn")
    token = make_token(work / "up" / "certs", subject="migration-scenario")
    outbox = context.Queue()
    inboxes = []
    processes = []
    shares = [
        clients // PEER_PROCESSES + (i < clients % PEER_PROCESSES) for i in range(PEER_PROCESSES)
    ]
    try:
        for index, count in enumerate(shares):
            if not count:
                continue
            inbox = context.Queue()
            process = context.Process(
                target=peer_process,
                args=(whip_url, token, count, inbox, outbox, index),
                daemon=True,
            )
            process.start()
            inboxes.append(inbox)
            processes.append(process)
        marks: dict[str, Any] = {"windows": {}, "moves": {}}
        result["marks"] = marks
        try:
            sessions = set_up(result, outbox, len(processes), clients)
            steps(result, marks, sessions, migrations, up)
        finally:
            for inbox in inboxes:
                inbox.put(marks)
            done.set()
            thread.join(30)
        outcomes = []
        for _ in processes:
            try:
                outcomes.append(outbox.get(timeout=60))
            except queue.Empty:
                errors.append("a peer process did not report")
        result["calls"] = [
            c
            for o in sorted(outcomes, key=lambda o: o.get("result", 0))
            for c in o.get("calls", [])
        ]
        result["peer_sessions"] = [
            s
            for o in sorted(outcomes, key=lambda o: o.get("result", 0))
            for s in o.get("sessions", [])
        ]
        result["answer_candidates"] = [c for o in outcomes for c in o.get("answer_candidates", [])]
        result["transports_same"] = [x for o in outcomes for x in o.get("transports_same", [])]
        errors += [o["error"] for o in outcomes if "error" in o]
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()


def set_up(result: dict[str, Any], outbox: Any, processes: int, clients: int) -> list[str]:
    """Until every aiortc call and Chromium's have a session on node-1 and hear audio."""
    deadline = time.monotonic() + SETUP
    ready: dict[int, list[str]] = {}
    while len(ready) < processes:
        try:
            message = outbox.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise ScenarioError(f"the peers did not set up within {SETUP:.0f} s") from None
        if "error" in message:
            raise ScenarioError(f"a peer process failed: {message['error']}")
        ready[message["ready"]] = message["sessions"]
    sessions = [s for i in sorted(ready) for s in ready[i]]

    def browser_hears() -> bool:
        samples = result.get("chromium_samples") or []
        return bool(samples) and (samples[-1].get("received") or 0) > 50

    if not wait_until(browser_hears, max(1.0, deadline - time.monotonic())):
        raise ScenarioError(f"Chromium heard nothing within {SETUP:.0f} s")
    held = owners()
    result["owners_before"] = held
    on_node1 = [s for s, n in held.items() if n == "node-1"]
    if len(held) != clients + 1 or len(on_node1) != clients + 1:
        raise ScenarioError(f"expected {clients + 1} sessions on node-1: {held}")
    result["setup_s"] = round(SETUP - (deadline - time.monotonic()), 2)
    return sessions


def steps(
    result: dict[str, Any],
    marks: dict[str, Any],
    sessions: list[str],
    migrations: int,
    up: subprocess.Popen[bytes],
) -> None:
    windows, moves = marks["windows"], marks["moves"]
    # The calls' first second (Chromium starting, every peer's jitter buffer filling) is not
    # what is judged.
    time.sleep(1.0)
    talk = time.time()
    time.sleep(LISTEN)
    windows["before"] = (talk, time.time())

    # -- parley drain node-1 ---------------------------------------------------------------
    before = status()
    result["status_before"] = before
    drain = parley("drain", "node-1", "--timeout", "30")
    result["drain"] = drain
    drained = time.time()
    moves["drain"] = (drain["started"] - 0.2, drained + 0.5)
    result["status_drained"] = status()
    time.sleep(LISTEN)
    windows["after_drain"] = (drained + 0.5, time.time())

    # -- parley migrate, back and forth ----------------------------------------------------
    session = sessions[0]
    result["migrated_session"] = session
    runs: list[dict[str, Any]] = []
    result["migrations"] = runs
    held = owners()
    here = held.get(session, "?")
    for number in range(migrations):
        target = "node-3" if here == "node-2" else "node-2"
        run = parley("migrate", session, "--to", target, "--timeout", "15")
        runs.append(run)
        moves[f"migrate-{number}"] = (run["started"] - 0.1, time.time() + 0.3)
        # Where the session is now, as etcd says (not what the command said): a command that
        # failed is judged by the test, and the next move goes on from where the session is.
        here = owners().get(session, target) if run["code"] != 0 else target
        run["owner_after"] = here
    migrated = time.time()
    time.sleep(LISTEN)
    windows["after_migrations"] = (migrated + 0.5, time.time())

    # -- SIGTERM of a node holding sessions ------------------------------------------------
    now = status()
    result["status_migrated"] = now
    holding = {n["id"]: n for n in now["nodes"] if n["state"] == "active"}
    victim = max(holding.values(), key=lambda n: n["sessions"])
    result["sigterm"] = {"node": victim["id"], "pid": victim["pid"], "sessions": victim["sessions"]}
    signalled = time.time()
    os.kill(int(victim["pid"]), signal.SIGTERM)

    def handed_over() -> bool:
        held = owners()
        return len(held) == len(now["sessions"]) and victim["id"] not in held.values()

    ok = wait_until(handed_over, SIGTERM_WITHIN)
    left = time.time()
    result["sigterm"].update(handed_over=bool(ok), seconds=round(left - signalled, 2))
    moves["sigterm"] = (signalled - 0.1, left + 0.5)
    result["status_sigterm"] = status()
    time.sleep(LISTEN)
    windows["after_sigterm"] = (left + 0.5, time.time())
    result["status_end"] = status()

    # -- SIGKILL of a node holding sessions: crash failover from checkpoints ---------------
    # Judged apart from the planned moves above (marks["planned_until"]): a crash restore
    # jumps the sequence number past the dead owner's reservation, by design.
    # The SIGTERMed node is restarted by parley up; node-1 stays draining. The victim's
    # sessions need an active node to go to: wait for the restarted one.
    def restarted() -> bool:
        nodes = {n["id"]: n for n in status()["nodes"]}
        back = nodes.get(victim["id"])
        return back is not None and back["state"] == "active" and back["pid"] != victim["pid"]

    if not wait_until(restarted, 30.0):
        raise ScenarioError(f"{victim['id']} did not come back after its SIGTERM")
    result["status_end"] = status()
    marks["planned_until"] = time.time()
    holding = {n["id"]: n for n in result["status_end"]["nodes"] if n["state"] == "active"}
    # the node under Chromium's session: the page must ride out its node's death too
    browser = (result.get("chromium_start") or {}).get("session")
    chosen = next(
        (s["owner"] for s in result["status_end"]["sessions"] if s["id"] == browser), None
    )
    victim = holding.get(chosen) or max(holding.values(), key=lambda n: n["sessions"])
    epochs = {s["id"]: int(s["epoch"]) for s in result["status_end"]["sessions"]}
    on_victim = [s["id"] for s in result["status_end"]["sessions"] if s["owner"] == victim["id"]]
    result["sigkill"] = {"node": victim["id"], "pid": victim["pid"], "sessions": on_victim}
    killed = time.time()
    os.kill(int(victim["pid"]), signal.SIGKILL)

    def adopted() -> dict[str, list[Any]] | None:
        # By a live process: parley up restarts the victim at once, and the new process under
        # the same id (its own lease) may well be the one that adopts.
        now = status()
        live = {n["id"]: n["pid"] for n in now["nodes"] if n["state"] == "active"}
        owned = {s["id"]: s for s in now["sessions"]}
        after = {
            s: [owned[s]["owner"], live[owned[s]["owner"]], int(owned[s]["epoch"])]
            for s in on_victim
            if s in owned and owned[s]["owner"] in live
        }
        done = len(after) == len(on_victim) and all(
            pid != victim["pid"] and epoch > epochs[s] for s, (_, pid, epoch) in after.items()
        )
        return after if done else None

    owners_after = wait_until(adopted, SIGKILL_WITHIN)
    back = time.time()
    result["sigkill"].update(
        adopted=bool(owners_after), seconds=round(back - killed, 2), owners=owners_after
    )
    marks.setdefault("failovers", {})["sigkill"] = (killed - 0.1, back + 1.0)
    time.sleep(LISTEN)
    windows["after_sigkill"] = (back + 1.0, time.time())
    result["status_after_kill"] = status()


if __name__ == "__main__":
    from tests.programs import record_from_env

    record_from_env()  # the programs this scenario starts count for tests/programs.py too
    main(
        Path(sys.argv[1]),
        int(sys.argv[2]) if len(sys.argv) > 2 else 10,
        int(sys.argv[3]) if len(sys.argv) > 3 else 20,
    )
