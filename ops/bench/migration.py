"""What a client notices when its live session moves between nodes, beside a full reconnect.

    python -m ops.bench.migration [--moves 50] [--clients 4] [--reconnects 20] [--drain 50]
                                  [--json]

A real cluster as users run it: ``parley up`` (etcd, one relay, three nodes in relay mode, each
its own process) with the immediate echo agent (``node.agent = "echo"``), on free local ports.
The clients are aiortc peers in this process playing espeak-ng speech (pre-encoded Opus paced
like a microphone, ops/bench/sessions.py); each echoed RTP packet is timestamped by the kernel as
it reaches the client's socket (``SIOCGSTAMP``), with its sequence number and RTP timestamp
(both in the clear, RFC 3711 §3.1), so that a busy client does not make a move look long.

Three phases, one after the other:

1. **Moves.** ``--clients`` sessions on node-2 talk; ``--moves`` times, one of them (round
   robin) is moved to the other of node-2 and node-3 with :func:`ops.moving.migrate`, the code
   ``parley migrate`` runs (called here rather than as a process, so that an interpreter
   starting on the same cores does not add its own stalls to the audio), with
   :data:`MOVE_SPACING` seconds between moves. Per move, at the moved client, in the window from
   the request to :data:`SETTLE` seconds after the command returned: the longest gap between two
   echoed packets, the packets lost (sequence numbers that never came), and how the echo's delay
   (arrival minus RTP timestamp, a second each side of the gap) moved across it; the same
   longest gap at the clients that did not move is the control (what the machine's own jitter
   gives in the same window). The nodes log each move's blackout (from the quiesce on the old
   node to the restored session running on the new one); those are read from their logs.
2. **Reconnects**, the alternative a client has without live migration: a new
   ``RTCPeerConnection`` and a new offer to the other node, from the moment the client decides
   to reconnect to the first echoed RTP packet of the new session (ICE, DTLS and a new stream);
   the old session is then ended.
3. **Drain.** ``--drain`` sessions on node-1 talk; ``parley drain node-1 --json`` (a process, as
   an operator runs it) moves them all to node-2 and node-3. Its own time (request to empty)
   and per client, the longest echo gap and the packets lost across the drain.

Aim (issue #13): a move is inaudible — no lost packet, an echo gap within one 20 ms frame beyond
the frame spacing (40 ms) at p99 — and a 50-session drain within 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final, final

import attrs
import trio

from ops import moving
from ops.bench.arrivals import stamp_rtp_arrivals
from ops.bench.common import ADMISSION, percentile
from ops.bench.sessions import _speech_track, http, loopback_ice, machine, speech_packets
from ops.children import spawn
from ops.etcdserver import free_port
from ops.status import gather_status
from ops.tokens import create_token
from relay.settings import ClusterSettings, SettingsError
from storage.etcd import EtcdTLS, EtcdUnavailable, open_etcd
from storage.keys import Keyspace

__all__ = [
    "BenchResult",
    "DrainFigures",
    "MoveFigures",
    "main",
    "measure",
    "render",
    "scratch_cluster",
]

PREFIX: Final = "/parley"
CLOCK_RATE: Final = 48_000
#: seconds between two moves (each client's moves are ``clients`` times this apart)
MOVE_SPACING: Final = 0.6
#: seconds after a move's command returned that still belong to its window
SETTLE: Final = 0.4
#: seconds the calls talk before anything is measured
WARMUP: Final = 1.5
CONNECT_TIMEOUT: Final = 15.0
#: sessions set up at the same time
SETUP_CONCURRENCY: Final = 4
#: offers a client makes while the node answers 429 (too many from this source: it paces them)
ADMISSION_TRIES: Final = 30
_MOVED_IN: Final = re.compile(r"session moved in .*?session=(\S+).*?blackout_ms=([\d.]+)")


# --- results ---------------------------------------------------------------------------------


@final
@attrs.frozen
class Gap:
    """The echo at one client over a window: its longest gap and what came across it."""

    longest: float
    """seconds between the two echoed packets furthest apart (20 ms when nothing happened)"""
    lost: int
    """sequence numbers in the window that never came"""
    delay_step: float | None
    """how the echo's delay (arrival minus RTP timestamp) moved across the longest gap,
    medians of a second each side, seconds: ~0 when timestamps keep pace with real time"""
    packets: int


@final
@attrs.frozen
class MoveFigures:
    session: str
    source: str
    target: str
    code: int
    """``parley migrate``'s exit status (0 moved)"""
    moved: bool
    """whether etcd shows the session on ``target`` afterwards"""
    seconds: float
    """the command, from its start to the move's end"""
    gap: Gap
    control: float | None
    """the longest gap at the clients that did not move, in the same window, seconds"""


@final
@attrs.frozen
class DrainFigures:
    sessions: int
    code: int
    seconds: float | None
    """the command's own time from the request to an empty node"""
    wall: float
    """the command as a process, interpreter start included"""
    moved: int
    failed: int
    gaps: list[Gap]
    node_blackouts: list[float]
    loop_lag: dict[str, int]
    """each node's worst event-loop delay so far (ms, its own counter): a saturated node
    learns of a move's steps late"""


@final
@attrs.frozen
class BenchResult:
    machine: dict[str, object]
    params: dict[str, object]
    moves: list[MoveFigures]
    move_blackouts: list[float]
    """what the nodes logged for the moves, seconds"""
    reconnects: list[float]
    """seconds from deciding to reconnect to the new session's first echoed RTP"""
    failed_reconnects: int
    drain: DrainFigures | None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = attrs.asdict(self)
        out["summary"] = summary(self)
        return out


def summary(result: BenchResult) -> dict[str, Any]:
    """The headline figures (milliseconds), for the table and for JSON."""
    moved = [m for m in result.moves if m.moved]
    gaps = [1000 * m.gap.longest for m in moved]
    controls = [1000 * m.control for m in moved if m.control is not None]
    steps = [abs(1000 * m.gap.delay_step) for m in moved if m.gap.delay_step is not None]
    out: dict[str, Any] = {
        "moves": len(result.moves),
        "moved": len(moved),
        "commands_failed": sum(1 for m in result.moves if m.code != 0),
        "move_gap_ms": _spread(gaps),
        "control_gap_ms": _spread(controls),
        "move_lost": _spread([m.gap.lost for m in moved]),
        "move_lost_total": sum(m.gap.lost for m in moved),
        "move_delay_step_ms": _spread(steps),
        "move_blackout_ms": _spread([1000 * b for b in result.move_blackouts]),
        "migrate_command_ms": _spread([1000 * m.seconds for m in result.moves]),
        "reconnect_ms": _spread([1000 * r for r in result.reconnects]),
        "failed_reconnects": result.failed_reconnects,
    }
    drain = result.drain
    if drain is not None:
        out["drain"] = {
            "sessions": drain.sessions,
            "code": drain.code,
            "seconds": drain.seconds,
            "wall": drain.wall,
            "moved": drain.moved,
            "failed": drain.failed,
            "gap_ms": _spread([1000 * g.longest for g in drain.gaps]),
            "lost": _spread([g.lost for g in drain.gaps]),
            "lost_total": sum(g.lost for g in drain.gaps),
            "blackout_ms": _spread([1000 * b for b in drain.node_blackouts]),
            "loop_lag_worst_ms": drain.loop_lag,
        }
    return out


def _spread(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 1),
        "p99": round(percentile(values, 99), 1),
        "max": round(max(values), 1),
    }


# --- clients ---------------------------------------------------------------------------------


@final
class EchoCall:
    """One aiortc client: sends speech and records every echoed RTP packet as it reaches the
    client's socket: (kernel arrival time on the ``time.monotonic()`` clock, sequence number,
    RTP timestamp). Nothing is decoded: the echo is judged by its packets."""

    def __init__(self, packets: list[bytes], token: str | None = None) -> None:
        import aiortc

        #: the access token its POST and DELETE carry
        self.token = token
        from aiortc.rtp import RtpPacket

        self.pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
        #: the speech it sends (``track.mute()`` stops it)
        self.track = _speech_track(packets)
        self.pc.addTrack(self.track)
        self.arrivals: list[tuple[float, int, int]] = []
        self.first_rtp: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.location: str | None = None
        self.session = ""
        (transceiver,) = self.pc.getTransceivers()

        async def ignore(packet: RtpPacket, arrival_time_ms: int) -> None:
            return None  # no jitter buffer, no decoder: the clients must not cap the bench

        transceiver.receiver._handle_rtp_packet = ignore  # type: ignore[method-assign]

    async def connect(self, url: str) -> None:
        """Offer, apply the answer, and wait for the first echoed RTP packet."""
        import aiortc

        await self.pc.setLocalDescription(await self.pc.createOffer())
        assert self.pc.localDescription is not None
        self._stamp_arrivals()
        offer = self.pc.localDescription.sdp.encode()
        for _ in range(ADMISSION_TRIES):
            status, headers, answer = await http("POST", url, offer, token=self.token)
            if status != 429:
                break
            # a fair node paces one source's offers: come back when it says (issue #15)
            await asyncio.sleep(float(headers.get("retry-after") or 1))
        if status != 201:
            raise RuntimeError(f"POST answered {status}: {answer[:200]!r}")
        self.location = headers.get("location")
        # Location: /v1/session/<id>/<secret>
        self.session = (self.location or "").split("/v1/session/", 1)[-1].split("/", 1)[0]
        await self.pc.setRemoteDescription(aiortc.RTCSessionDescription(answer.decode(), "answer"))
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await self.first_rtp

    def _stamp_arrivals(self) -> None:
        (transceiver,) = self.pc.getTransceivers()

        def record(at: float, data: bytes) -> None:
            self.arrivals.append((at, int.from_bytes(data[2:4]), int.from_bytes(data[4:8])))
            if not self.first_rtp.done():
                self.first_rtp.set_result(at)

        stamp_rtp_arrivals(transceiver.receiver.transport.transport._connection, record)

    async def close(self, base_url: str) -> None:
        if self.location is not None:
            parts = urllib.parse.urlsplit(base_url)
            with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                await http(
                    "DELETE", f"{parts.scheme}://{parts.netloc}{self.location}", token=self.token
                )
            self.location = None
        with contextlib.suppress(Exception):
            await self.pc.close()


def echo_gap(arrivals: Sequence[tuple[float, int, int]], start: float, end: float) -> Gap:
    """The longest gap between echoed packets in [start, end), what was lost and how the echo's
    delay moved across that gap (sequence numbers extended over wraps, RFC 3711 §3.3.1)."""
    extended: list[tuple[float, int, int]] = []
    highest = -1
    for at, seq, stamp in arrivals:
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
    inside = [p for p in extended if start <= p[0] < end]
    if len(inside) < 2:
        return Gap(0.0, 0, None, len(inside))
    longest, a, b = max((y[0] - x[0], x, y) for x, y in itertools.pairwise(inside))
    seen = {p[1] for p in inside}
    lost = max(seen) - min(seen) + 1 - len(seen)

    def delay(lo: float, hi: float) -> float | None:
        offsets = [
            at - ((stamp - a[2] + (1 << 31)) % (1 << 32) - (1 << 31)) / CLOCK_RATE
            for at, _, stamp in extended
            if lo <= at < hi
        ]
        return statistics.median(offsets) if offsets else None

    before, after = delay(a[0] - 1.0, a[0] + 1e-6), delay(b[0], b[0] + 1.0)
    step = None if before is None or after is None else after - before
    return Gap(longest, lost, step, len(inside))


# --- the cluster -----------------------------------------------------------------------------


@final
class Cluster:
    """``parley up`` with 3 nodes and one relay on free local ports, in a scratch directory."""

    def __init__(self, workdir: Path, *, settings: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        #: extra ``PARLEY_*`` settings for ``parley up`` and its children (ops/bench/failover.py)
        self.settings = dict(settings or {})
        self.etcd_port = free_port()
        #: `parley up`'s etcd takes clients with a certificate of its CA only (up.etcd_tls)
        self.endpoint = f"https://127.0.0.1:{self.etcd_port}"
        self.certs = workdir / "up" / "certs"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.whip: dict[str, str] = {}
        #: an access token for its clients, once it is up
        self.token: str | None = None

    def start(self) -> None:
        root = Path(__file__).resolve().parents[2]
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PARLEY_") or k == "PARLEY_ETCD_BIN"
        }
        env.update(
            PYTHONPATH=os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p),
            PARLEY_CONFIG="/dev/null",
            PARLEY_NODE_AGENT="echo",
            PARLEY_UP_RELAY_PORT=str(free_port()),
            PARLEY_UP_ETCD_PEER_PORT=str(free_port()),
            PARLEY_UP_SIGNALING_PORT="0",
        )
        env.update(ADMISSION)
        env.update(self.settings)
        self._log = open(self.workdir / "up.log", "ab")  # noqa: SIM115 - lives with the process
        # Its own session (Ctrl-C reaches the bench, which stops it in order), and SIGTERM from
        # the kernel if the bench dies without stopping it (ops/children.py).
        self.process = spawn(
            [
                sys.executable, "-m", "ops.cli", "up",
                "--data-dir", str(self.workdir / "up"),
                "--etcd-port", str(self.etcd_port),
                "--nodes", "3",
                "--relays", "1",
            ],
            cwd=self.workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        """``parley status --json``, read from etcd (blocking: run it in a thread)."""

        async def read() -> dict[str, Any]:
            async with open_etcd(self.endpoint, rpc_timeout=10.0, tls=self.etcd_tls()) as etcd:
                return await gather_status(etcd, Keyspace(PREFIX))

        return trio.run(read)

    def etcd_tls(self) -> EtcdTLS | None:
        """The operator's certificate, which `parley up` makes (until then etcd is not up)."""
        try:
            return ClusterSettings(etcd=self.endpoint, certs=str(self.certs)).etcd_tls("operator")
        except SettingsError as exc:
            raise EtcdUnavailable(f"no operator certificate yet: {exc}") from None

    def owners(self) -> dict[str, str]:
        return {s["id"]: s["owner"] for s in self.status()["sessions"]}

    def wait_ready(self, within: float = 60.0) -> None:
        """Until 3 nodes are active and the relay has a tunnel from each."""
        deadline = time.monotonic() + within
        last: Any = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"parley up exited with {self.process.returncode}")
            try:
                last = self.status()
            except (EtcdUnavailable, OSError):
                time.sleep(0.3)
                continue
            nodes = {n["id"]: n for n in last["nodes"] if n["state"] == "active"}
            tunnels = [set(r.get("tunnels", [])) for r in last["relays"]]
            if len(nodes) == 3 and tunnels and all(t == set(nodes) for t in tunnels):
                self.whip = {i: str(n["addresses"]["whip"]) for i, n in nodes.items()}
                # `parley up` made the cluster's token key beside its certificates
                certs = ClusterSettings(certs=str(self.certs))
                self.token = create_token(certs, subject="bench", ttl=86400)
                return
            time.sleep(0.3)
        raise RuntimeError(f"the cluster did not come up within {within:.0f} s: {last}")

    def moved_in(self) -> list[tuple[str, float]]:
        """Every (session, blackout seconds) the nodes logged as moved in, oldest first."""
        found: list[tuple[str, float]] = []
        for path in sorted((self.workdir / "up" / "logs").glob("node-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                match = _MOVED_IN.search(line)
                if match:
                    found.append((match[1], float(match[2]) / 1000))
        return found

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


# --- the phases ------------------------------------------------------------------------------


@final
@attrs.frozen
class Params:
    moves: int
    clients: int
    reconnects: int
    drain: int


async def _connect_all(
    url: str, packets: list[bytes], count: int, token: str | None
) -> list[EchoCall]:
    calls: list[EchoCall] = []
    limit = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def one() -> None:
        async with limit:
            call = EchoCall(packets, token)
            calls.append(call)
            await call.connect(url)

    await asyncio.gather(*(one() for _ in range(count)))
    return calls


def _migrate(cluster: Cluster, session: str, target: str) -> tuple[int, float]:
    """What ``parley migrate SESSION --to TARGET`` does, in this thread (a Trio run)."""
    started = time.monotonic()
    endpoint, tls = cluster.endpoint, cluster.etcd_tls()
    code = trio.run(
        lambda: moving.migrate(
            endpoint,
            PREFIX,
            session,
            target,
            within=15.0,
            as_json=True,
            out=io.StringIO(),
            tls=tls,
        )
    )
    return code, time.monotonic() - started


async def _moves_phase(
    cluster: Cluster, packets: list[bytes], params: Params
) -> tuple[list[MoveFigures], list[float]]:
    url = cluster.whip["node-2"]
    calls = await _connect_all(url, packets, params.clients, cluster.token)
    logged_before = len(await asyncio.to_thread(cluster.moved_in))
    try:
        await asyncio.sleep(WARMUP)
        where = {c.session: "node-2" for c in calls}
        windows: list[tuple[EchoCall, str, str, int, float, float, float]] = []
        for number in range(params.moves):
            call = calls[number % len(calls)]
            source = where[call.session]
            target = "node-3" if source == "node-2" else "node-2"
            start = time.monotonic()
            code, seconds = await asyncio.to_thread(_migrate, cluster, call.session, target)
            end = time.monotonic()
            if code != 0:  # the command's word is not the truth: etcd's owner record is
                where[call.session] = (await asyncio.to_thread(cluster.owners)).get(
                    call.session, source
                )
            else:
                where[call.session] = target
            windows.append((call, source, target, code, seconds, start, end))
            await asyncio.sleep(MOVE_SPACING)
        await asyncio.sleep(SETTLE + 1.0)  # the last window, and a second after it
        figures = []
        for call, source, target, code, seconds, start, end in windows:
            window = (start - 0.05, end + SETTLE)
            others = [echo_gap(c.arrivals, *window).longest for c in calls if c is not call]
            figures.append(
                MoveFigures(
                    session=call.session,
                    source=source,
                    target=target,
                    code=code,
                    moved=code == 0 or where.get(call.session) == target,
                    seconds=seconds,
                    gap=echo_gap(call.arrivals, *window),
                    control=max(others) if others else None,
                )
            )
        logged = (await asyncio.to_thread(cluster.moved_in))[logged_before:]
        return figures, [blackout for _, blackout in logged]
    finally:
        await asyncio.gather(*(c.close(url) for c in calls))


async def _reconnect_phase(
    cluster: Cluster, packets: list[bytes], params: Params
) -> tuple[list[float], int]:
    """A client on one node gives its session up for a new one on the other, repeatedly."""
    nodes = ["node-2", "node-3"]
    (current,) = await _connect_all(cluster.whip[nodes[0]], packets, 1, cluster.token)
    where = 0
    times: list[float] = []
    failed = 0
    try:
        await asyncio.sleep(WARMUP)
        for _ in range(params.reconnects):
            other = 1 - where
            started = time.monotonic()
            fresh = EchoCall(packets, cluster.token)
            try:
                await fresh.connect(cluster.whip[nodes[other]])
            except (RuntimeError, TimeoutError, OSError):
                failed += 1
                await fresh.close(cluster.whip[nodes[other]])
                continue
            times.append(fresh.first_rtp.result() - started)
            await current.close(cluster.whip[nodes[where]])
            current, where = fresh, other
            await asyncio.sleep(MOVE_SPACING)
    finally:
        await current.close(cluster.whip[nodes[where]])
    return times, failed


async def _drain_phase(cluster: Cluster, packets: list[bytes], params: Params) -> DrainFigures:
    url = cluster.whip["node-1"]
    calls = await _connect_all(url, packets, params.drain, cluster.token)
    logged_before = len(await asyncio.to_thread(cluster.moved_in))
    try:
        await asyncio.sleep(WARMUP)
        start = time.monotonic()
        done = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable, "-m", "ops.cli", "drain", "node-1",
                "--etcd", cluster.endpoint, "--certs", str(cluster.certs), "--prefix", PREFIX,
                "--json", "--timeout", "60",
            ],
            capture_output=True, text=True, timeout=90,
            env={**os.environ, "PARLEY_CONFIG": "/dev/null"}, check=False,
        )  # fmt: skip
        end = time.monotonic()
        await asyncio.sleep(SETTLE + 1.0)
        try:
            report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            report = {}
        logged = (await asyncio.to_thread(cluster.moved_in))[logged_before:]
        nodes = (await asyncio.to_thread(cluster.status))["nodes"]
        return DrainFigures(
            sessions=params.drain,
            code=done.returncode,
            seconds=report.get("seconds"),
            wall=end - start,
            moved=int(report.get("moved", 0)),
            failed=len(report.get("failed", [])),
            gaps=[echo_gap(c.arrivals, start - 0.05, end + SETTLE) for c in calls],
            node_blackouts=[blackout for _, blackout in logged],
            loop_lag={
                n["id"]: int((n.get("counters") or {}).get("loop_lag_worst_ms", -1)) for n in nodes
            },
        )
    finally:
        await asyncio.gather(*(c.close(url) for c in calls))


async def _run(cluster: Cluster, params: Params) -> BenchResult:
    packets = speech_packets()
    moves, blackouts = await _moves_phase(cluster, packets, params)
    reconnects, failed = await _reconnect_phase(cluster, packets, params)
    drain = await _drain_phase(cluster, packets, params) if params.drain else None
    info = machine()
    return BenchResult(
        machine=info,
        params=attrs.asdict(params),
        moves=moves,
        move_blackouts=blackouts,
        reconnects=reconnects,
        failed_reconnects=failed,
        drain=drain,
    )


@contextlib.contextmanager
def scratch_cluster(
    bench: str, *, keep: bool, settings: Mapping[str, str] | None = None
) -> Iterator[Cluster]:
    """A :class:`Cluster` up and ready in a scratch directory, stopped afterwards; ``keep``
    leaves the directory (its logs) behind. Loopback ICE for the bench's aiortc clients."""
    loopback_ice()
    tmp = Path(tempfile.mkdtemp(prefix=f"parley-bench-{bench}-"))
    cluster = Cluster(tmp, settings=settings)
    try:
        cluster.start()
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()
        if keep:
            print(f"cluster directory (kept): {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def measure(params: Params, *, keep: bool = False) -> BenchResult:
    """Run the phases; ``keep`` leaves the cluster's directory (its logs) behind."""
    with scratch_cluster("migration", keep=keep) as cluster:
        return asyncio.run(_run(cluster, params))


# --- the table -------------------------------------------------------------------------------


def render(result: BenchResult) -> str:
    m, p, s = result.machine, result.params, summary(result)
    lines = [
        f"machine: nproc {m['nproc']}, {m['cpu_model']}, python {m['python']}, "
        f"aiortc {m['aiortc']}, linux {m['kernel']}",
        "cluster: parley up (etcd, 1 relay, 3 nodes in relay mode, echo agent); clients: "
        "aiortc in this process, echoed RTP stamped by the kernel",
        f"params: {p['moves']} moves of {p['clients']} talking sessions between node-2 and "
        f"node-3 (ops.moving.migrate, what `parley migrate` runs, {MOVE_SPACING}s apart); "
        f"{p['reconnects']} reconnects; a drain of {p['drain']} sessions (`parley drain`)",
        "",
    ]
    rows: list[tuple[str, str, str, str, str]] = []

    def row(label: str, spread: dict[str, Any], unit: str = " ms") -> None:
        def cell(key: str) -> str:
            value = spread.get(key)
            return "-" if value is None else f"{value:g}{unit}"

        rows.append((label, cell("p50"), cell("p99"), cell("max"), str(spread.get("n", 0))))

    row("move: longest echo gap, moved client", s["move_gap_ms"])
    row("move: same window, clients not moved", s["control_gap_ms"])
    row("move: echo packets lost, moved client", s["move_lost"], "")
    row("move: echo delay step across the gap", s["move_delay_step_ms"])
    row("move: blackout the nodes logged", s["move_blackout_ms"])
    row("move: migrate, request to done", s["migrate_command_ms"])
    row("reconnect: new offer to first echo", s["reconnect_ms"])
    drain = s.get("drain")
    if drain is not None:
        row(f"drain {drain['sessions']}: longest echo gap/client", drain["gap_ms"])
        row(f"drain {drain['sessions']}: echo packets lost/client", drain["lost"], "")
        row(f"drain {drain['sessions']}: blackout the nodes logged", drain["blackout_ms"])
    head = ("figure", "p50", "p99", "max", "n")
    widths = [max(len(r[i]) for r in [*rows, head]) for i in range(5)]
    lines.append(
        f"{head[0]:<{widths[0]}}  "
        + "  ".join(f"{h:>{w}}" for h, w in zip(head[1:], widths[1:], strict=True))
    )
    for r in rows:
        lines.append(
            f"{r[0]:<{widths[0]}}  "
            + "  ".join(f"{c:>{w}}" for c, w in zip(r[1:], widths[1:], strict=True))
        )
    lines.append("")
    lines.append(
        f"moves: {s['moved']}/{s['moves']} moved, {s['commands_failed']} commands failed, "
        f"{s['move_lost_total']} echo packets lost in all; reconnects failed: "
        f"{s['failed_reconnects']}"
    )
    if drain is not None:
        seconds = "-" if drain["seconds"] is None else f"{drain['seconds']:.2f} s"
        lines.append(
            f"drain of {drain['sessions']} sessions: {seconds} (request to empty; "
            f"{drain['wall']:.2f} s as a process), exit {drain['code']}, moved {drain['moved']}, "
            f"failed {drain['failed']}, {drain['lost_total']} echo packets lost in all; "
            f"nodes' worst loop delay: "
            + ", ".join(f"{n} {ms} ms" for n, ms in sorted(drain["loop_lag_worst_ms"].items()))
        )
    lines.append(
        "gap: longest time between two echoed packets at the client in the move's window "
        "(20 ms is none); delay step: how arrival minus RTP timestamp moved across that gap "
        "(~0: timestamps kept pace with real time); blackout: quiesce on the old node to the "
        "session running on the new one, as the nodes log it; reconnect: a new "
        "RTCPeerConnection and offer to the other node until its first echoed RTP (the old "
        "session's audio is gone meanwhile). Aim: no lost packet, gap <= 40 ms at p99, "
        "a 50-session drain within 2 s"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> BenchResult:
    """Command line entry point; prints the table (or JSON) and returns the figures."""
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.migration",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--moves", type=int, default=50, help="moves measured (50)")
    parser.add_argument("--clients", type=int, default=4, help="sessions moved in turn (4)")
    parser.add_argument("--reconnects", type=int, default=20, help="reconnects measured (20)")
    parser.add_argument("--drain", type=int, default=50, help="sessions drained (50; 0: none)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--keep", action="store_true", help="keep the cluster's directory (its logs)"
    )
    args = parser.parse_args(argv)
    if args.moves < 1 or args.clients < 1 or args.reconnects < 0 or args.drain < 0:
        parser.error("--moves and --clients at least 1, --reconnects and --drain at least 0")
    result = measure(Params(args.moves, args.clients, args.reconnects, args.drain), keep=args.keep)
    print(json.dumps(result.as_dict(), indent=2) if args.json else render(result))
    return result


if __name__ == "__main__":
    main()
