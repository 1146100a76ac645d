"""How fast a node sets up voice sessions and how many echo sessions one of its cores holds,
beside an aiortc echo server measured in the same run on the same machine.

    python -m ops.bench.sessions [--sessions 80] [--setups 50] [--quick] [--json]

Two servers are measured one after the other, each in its own process so that its CPU time can
be read from ``/proc/PID/stat`` apart from everything else:

* **parley**: ``python -m ops.cli node`` with ``node.agent = "echo"`` (the immediate echo, not
  the default turn-echo) and a local etcd (:class:`EtcdServer`);
* **aiortc echo**: what a Python user would reach for, an asyncio process in this module
  (``serve-aiortc``) that answers each offer with a new ``RTCPeerConnection`` sending every
  received audio track straight back (``pc.addTrack(track)``: the lightest echo aiortc has, no
  ``MediaRelay``), over the same WHIP-style HTTP as the node (``POST /v1/session`` with the offer,
  ``201`` with the answer and a ``Location``, ``DELETE`` of that location ends the session).

The clients are aiortc peers in this process, playing espeak-ng speech (looped, with a 0.5 s
pause) paced like a microphone. With at least two CPUs the server is pinned to one core and this
process (and etcd) to the others, so "per core" holds and the clients cannot steal from the
server; the clients cost CPU too, and their CPU is reported beside the server's.

Figures:

1. **Setup time**, sessions set up one after the other, each closed (DELETE, then the peer
   connection) after its first decoded echo: from sending the POST to the answer, to the first
   echoed RTP packet reaching the client's receiver, and to the first frame aiortc decoded from
   the echo (its jitter buffer holds 4 frames first). Server CPU per setup is the server's CPU
   time over the whole phase divided by the sessions set up.
2. **CPU per active session**: N concurrent echo sessions streaming speech; after a warm-up, the
   server's CPU seconds per wall second over a window, divided by N.
3. **Sessions one core holds**: N ramps up (5, 10, 20, 40 ... up to ``--sessions``, calls
   added to those already up; always through N=10, for figure 2) until a step fails above the
   largest pass, then bisects twice between the largest pass and that failure. The largest N
   that passed is reported. Measured at the client, the same way for both servers, a step
   passes with

   * less than 1% bad echoed frames: *late* if it came more than 5 ms later after the
     previous echoed frame than their RTP timestamps are apart (more than 25 ms after it, for
     consecutive frames), *missing* if its RTP timestamp never came (both servers advance the
     timestamp 960 per 20 ms frame, and the clients send without gaps, silence included);
   * and an echo delay (arrival minus RTP timestamp) that moved by less than 20 ms over the
     window (median over sessions of its last second minus its first): a server that cannot
     keep up queues frames and lets the delay grow while their spacing stays regular (and
     shrink while it catches up).

   A step below the last one starts over with fresh calls, so no backlog is carried over. A
   step that fails narrowly is measured over a second window (a third if other processes used
   more than 20% of a core in both) and the best is kept: the machine may be shared, and the
   CPU every other process used is shown. Also shown: the echo's jitter (99th percentile of
   the delay above its least); for parley, the node's own late pacer ticks (``late_frames`` /
   ``pacer.ticks``, published to etcd every 2 s); the worst delay of the clients' event loop
   (their garbage collector is kept out of the windows with ``gc.freeze``).

   As a steadier second figure, the *CPU ceiling*: N / server CPU at the largest step under
   90% server CPU whose echo kept up (under 1% missing, delay moved under 20 ms), whatever its
   late frames: how many sessions a core would hold if CPU were the only limit.

Echoed packets are timestamped by the kernel as they reach the client's socket (``SIOCGSTAMP``),
so that a busy or descheduled client does not make a server look late. To keep the clients
from capping the experiment, they send pre-encoded Opus (aiortc's own encoder, run once at
start-up; aiortc sends a ``Packet`` unchanged) and, once a session's first echo was decoded,
stop feeding their receiver its jitter buffer and decoder (``--client-decode`` keeps decoding
every frame, as a real client would).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import fractions
import gc
import itertools
import json
import math
import os
import platform
import secrets
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import IO, Any, Final, final

import attrs

from ops.bench.common import ADMISSION, percentile, process_cpu, split_cores
from ops.certs import write_token_key
from ops.etcdserver import EtcdServer, free_port
from ops.tokens import create_token
from relay.settings import TOKEN_KEYS_DIR, ClusterSettings

__all__ = ["BenchResult", "ServerFigures", "StepFigures", "main", "measure", "render"]

FRAME: Final = 0.020
CLOCK_RATE: Final = 48_000
FRAME_TIMESTAMP: Final = 960
#: an echoed frame arriving later than this after its schedule is late
LATE_SLACK: Final = 0.005
#: a ramp step passes with fewer bad (late or missing) frames than this
BAD_LIMIT: Final = 0.01
#: ... and if the echo's delay moved less than this over the window (it grows when a server
#: falls behind, shrinks when it catches up)
DRIFT_LIMIT: Final = 0.020
PREFIX: Final = "/parley-bench"
NODE_ID: Final = "bench"
SESSION_PATH: Final = "/v1/session"
CONNECT_TIMEOUT: Final = 15.0
HTTP_TIMEOUT: Final = 10.0
#: Linux: the kernel's receive timestamp of the last datagram read from a socket (a timeval)
_SIOCGSTAMP: Final = 0x8906
_TIMEVAL: Final = struct.Struct("@ll")
CLOSE_TIMEOUT: Final = 15.0
#: sessions a ramp step sets up at the same time
SETUP_CONCURRENCY: Final = 4
#: the ramp goes on through this N whatever happens (CPU per session at N=5 and N=10)
MANDATORY_STEP: Final = 10
#: bisection steps after the first failure
REFINEMENTS: Final = 2
#: a server this busy (CPU seconds per second) is saturated
SATURATED: Final = 0.9
#: a failing step gets a third window if other processes used this much CPU in both others
BUSY_OTHERS: Final = 0.2
SPEECH_TEXT: Final = "one two three four five six seven eight nine ten"


# --- results ---------------------------------------------------------------------------------


@final
@attrs.frozen
class StepFigures:
    """One ramp step: ``sessions`` concurrent echo sessions over a measured window."""

    sessions: int
    window: float
    server_cpu: float
    """server CPU seconds per wall second (1.0 is one core busy)"""
    client_cpu: float
    """this process's CPU seconds per wall second, over its cores"""
    cpu_per_session: float
    frames: int
    """echoed frames expected in the window, over all sessions"""
    late: int
    """frames that came more than 5 ms later after the previous one than their timestamps say"""
    missing: int
    """frames whose RTP timestamp never came"""
    jitter: float
    """99th percentile of the echo's delay beyond its least in the window, seconds"""
    drift: float
    """growth of the echo's delay over the window (median over sessions), seconds"""
    server_late: float | None
    """parley only: late pacer ticks / ticks, from the node's own stats"""
    failed_setups: int
    attempts: int
    """windows measured; a failing step is measured once more and the better window kept"""
    others_cpu: float
    """CPU seconds per second used by every other process on the machine (etcd included):
    this machine may be shared"""
    client_lag: float
    """the clients' event loop: longest wake-up delay in the window, seconds"""

    @property
    def bad_fraction(self) -> float:
        return (self.late + self.missing) / self.frames if self.frames else 1.0

    @property
    def keeps_up(self) -> bool:
        """No failed setup, under 1% missing, and the echo delay did not move 20 ms."""
        return (
            self.failed_setups == 0
            and self.frames > 0
            and self.missing / self.frames < BAD_LIMIT
            and not abs(self.drift) >= DRIFT_LIMIT
        )

    @property
    def passed(self) -> bool:
        return self.keeps_up and self.bad_fraction < BAD_LIMIT

    @property
    def clear_failure(self) -> bool:
        """Failed by far: not worth another window."""
        return bool(self.failed_setups) or self.bad_fraction > 0.1 or abs(self.drift) > 0.1


@final
@attrs.frozen
class ServerFigures:
    """Everything measured about one server."""

    name: str
    setups: int
    failed_setups: int
    answer_times: list[float]
    rtp_times: list[float]
    frame_times: list[float]
    setup_cpu: float
    """server CPU seconds per session set up"""
    steps: list[StepFigures]
    capacity: int
    """largest ramp step that passed (0: none did)"""
    stopped_by: str

    def setup_percentile(self, which: str, q: float) -> float:
        return percentile(getattr(self, f"{which}_times"), q)

    def cpu_per_session_at(self, sessions: int) -> float | None:
        for step in self.steps:
            if step.sessions == sessions and step.frames:
                return step.cpu_per_session
        return None

    @property
    def cpu_ceiling(self) -> float:
        """Sessions a core would hold if CPU were the only limit: N / server CPU of the
        largest step below 90% server CPU whose echo kept up (missing and delay move in
        bounds, whatever the late frames)."""
        below = [
            s
            for s in self.steps
            if s.server_cpu < SATURATED and s.frames and s.keeps_up and s.server_cpu > 0
        ]
        if not below:
            return math.nan
        step = max(below, key=lambda s: s.sessions)
        return step.sessions / step.server_cpu


@final
@attrs.frozen
class BenchResult:
    machine: dict[str, object]
    params: dict[str, object]
    parley: ServerFigures
    aiortc: ServerFigures

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN, for a figure that could not be measured, becomes None)."""
        out = attrs.asdict(self)
        for side in (self.parley, self.aiortc):
            summary: dict[str, Any] = out[side.name]
            for which in ("answer", "rtp", "frame"):
                for q in (50, 99):
                    summary[f"{which}_p{q}"] = side.setup_percentile(which, q)
            summary["cpu_ceiling"] = side.cpu_ceiling
            for step, raw in zip(side.steps, summary["steps"], strict=True):
                raw["bad_fraction"] = step.bad_fraction
                raw["keeps_up"] = step.keeps_up
                raw["passed"] = step.passed
        cleaned: dict[str, Any] = _no_nan(out)
        return cleaned


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


# --- CPU and machine ---------------------------------------------------------------------------


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` to ``cpus`` (threads it starts later inherit the mask)."""
    if not cpus:
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus)


def machine() -> dict[str, object]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import aiortc

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "aiortc": aiortc.__version__,
    }


# --- HTTP, just enough -------------------------------------------------------------------------


async def http(
    method: str,
    url: str,
    body: bytes = b"",
    *,
    content_type: str = "application/sdp",
    token: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on its own connection, without leaving the event loop; ``token``:
    an access token, sent as ``Authorization: Bearer``."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    async with asyncio.timeout(HTTP_TIMEOUT):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            head = (
                f"{method} {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                + (f"Authorization: Bearer {token}\r\n" if token else "")
                + "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
            status, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
            if "content-length" in headers:
                data = await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                data = b""
                while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    data += (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read()
            return status, headers, data
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    first, *lines = head.decode("latin-1").split("\r\n")
    parts = first.split(" ", 2)
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


# --- servers under test ------------------------------------------------------------------------


def _repo_env() -> dict[str, str]:
    """The environment of a server process: this checkout importable, no stray PARLEY_*."""
    root = str(Path(__file__).resolve().parents[2])
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PARLEY_") or k == "PARLEY_ETCD_BIN"
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _wait_port(port: int, process: subprocess.Popen[bytes], log: Path, wait: float) -> None:
    import socket

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {_tail(log)}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port} within {wait}s; {_tail(log)}")


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "log tail:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"no log at {log}"


class Server:
    """A server under test in its own process, answering WHIP-style POSTs at :attr:`url`."""

    name = ""

    def __init__(self, workdir: Path, server_cpus: set[int], client_cpus: set[int]) -> None:
        self.workdir = workdir
        self.server_cpus = server_cpus
        self.client_cpus = client_cpus
        self.process: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.log = workdir / f"{self.name}.log"
        self._log: IO[bytes] | None = None
        #: the access token its clients send, where the server asks for one
        self.token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{SESSION_PATH}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return _repo_env()

    def start(self) -> None:
        self._log = open(self.log, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,  # Ctrl-C reaches the bench, which stops us in order
        )
        pin(self.process.pid, self.server_cpus)
        _wait_port(self.port, self.process, self.log, 30.0)

    def pids(self) -> set[int]:
        """The server's processes."""
        return set() if self.process is None else {self.process.pid}

    async def ready(self) -> None:
        """Wait until the server takes sessions (listening may come first)."""

    async def late_stats(self) -> dict[str, tuple[int, int]] | None:
        """Per session (late ticks, ticks) as the server counts them, if it does."""
        return None

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


@final
class ParleyServer(Server):
    name = "parley"

    def __init__(self, workdir: Path, server_cpus: set[int], client_cpus: set[int]) -> None:
        super().__init__(workdir, server_cpus, client_cpus)
        self.etcd = EtcdServer(workdir / "etcd")

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "ops.cli",
            "node",
            "--etcd",
            self.etcd.endpoint,
            "--prefix",
            PREFIX,
            "--id",
            NODE_ID,
            "--capacity",
            "10000",
            "--log-level",
            "warning",
            "--parent-pid",
            str(os.getpid()),
            "--certs",
            str(self.workdir / "certs"),
        ]

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PARLEY_NODE_SIGNALING_PORT"] = str(self.port)
        # The immediate echo, like the baseline's (the default, turn-echo, plays each turn
        # back once it ended: a different load, and no continuous stream to time).
        env["PARLEY_NODE_AGENT"] = "echo"
        # every client is on one loopback address, and capacity, not admission, is measured
        env.update(ADMISSION)
        return env

    def start(self) -> None:
        # the node admits sessions with an access token, as deployed (sessions/node/tokens.py)
        certs = self.workdir / "certs"
        if not any((certs / TOKEN_KEYS_DIR).glob("*.key")):
            certs.mkdir(parents=True, exist_ok=True)
            write_token_key(certs)
        self.token = create_token(ClusterSettings(certs=str(certs)), subject="bench", ttl=86400)
        self.etcd.start()
        pin(self.etcd.pid, self.client_cpus)  # etcd is not the server under test
        super().start()

    async def _etcd_get(self, key: str) -> list[bytes]:
        body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
        status, _, data = await http(
            "POST",
            f"http://{self.etcd.endpoint}/v3/kv/range",
            body,
            content_type="application/json",
        )
        if status != 200:
            raise RuntimeError(f"etcd answered {status}")
        kvs = json.loads(data).get("kvs", [])
        return [base64.b64decode(kv.get("value", "")) for kv in kvs]

    async def ready(self) -> None:
        # The node listens before it holds a lease; it takes sessions once registered.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if await self._etcd_get(f"{PREFIX}/nodes/{NODE_ID}"):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"parley node did not register; {_tail(self.log)}")

    async def late_stats(self) -> dict[str, tuple[int, int]] | None:
        values = await self._etcd_get(f"{PREFIX}/stats/{NODE_ID}")
        if not values:
            return {}
        out = {}
        for session, stats in json.loads(values[0]).items():
            if isinstance(stats, dict):
                out[session] = (int(stats["late_frames"]), int(stats["pacer"]["ticks"]))
        return out

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.etcd.stop()


@final
class AiortcServer(Server):
    name = "aiortc"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "ops.bench.sessions",
            "serve-aiortc",
            "--port",
            str(self.port),
            "--parent-pid",
            str(os.getpid()),
        ]


# --- the aiortc echo server ----------------------------------------------------------------------


def loopback_ice() -> None:
    """aioice never gathers loopback candidates; here it gathers only 127.0.0.1."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


async def _aiortc_echo_server(port: int, parent_pid: int | None) -> None:
    import aiortc
    from aiortc.mediastreams import MediaStreamTrack

    loopback_ice()
    sessions: dict[str, aiortc.RTCPeerConnection] = {}

    async def answer(offer: str) -> tuple[str, str]:
        pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
        session_id = secrets.token_hex(10)
        sessions[session_id] = pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                pc.addTrack(track)  # the echo: send what we receive

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and sessions.get(session_id) is pc:
                del sessions[session_id]
                await pc.close()

        await pc.setRemoteDescription(aiortc.RTCSessionDescription(offer, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        assert pc.localDescription is not None
        return session_id, pc.localDescription.sdp

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            first = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            method, path = first[0], first[1]
            _, headers = _parse_head(b"HTTP/1.1 0 -\r\n" + head.split(b"\r\n", 1)[1])
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
            status, extra, payload = 404, "", b""
            if method == "POST" and path == SESSION_PATH:
                session_id, sdp = await answer(body.decode())
                status, payload = 201, sdp.encode()
                extra = (
                    f"Location: {SESSION_PATH}/{session_id}\r\nContent-Type: application/sdp\r\n"
                )
            elif method == "DELETE" and path.startswith(SESSION_PATH + "/"):
                pc = sessions.pop(path.rsplit("/", 1)[1], None)
                if pc is not None:
                    await pc.close()
                    status = 200
            writer.write(
                f"HTTP/1.1 {status} -\r\n{extra}Content-Length: {len(payload)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            pass
        finally:
            writer.close()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await asyncio.start_server(handle, "127.0.0.1", port)

    async def watch_parent() -> None:
        while parent_pid is not None:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                stop.set()
                return
            await asyncio.sleep(0.5)

    watcher = asyncio.ensure_future(watch_parent())
    async with server:
        await stop.wait()
    watcher.cancel()
    for pc in list(sessions.values()):
        await pc.close()


def serve_aiortc(argv: Sequence[str] | None = None) -> None:
    """``python -m ops.bench.sessions serve-aiortc --port P``: the baseline server alone."""
    parser = argparse.ArgumentParser(prog="python -m ops.bench.sessions serve-aiortc")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    asyncio.run(_aiortc_echo_server(args.port, args.parent_pid))


# --- clients -------------------------------------------------------------------------------------


def speech_packets() -> list[bytes]:
    """espeak-ng speech plus 0.5 s of silence, as 20 ms Opus packets from aiortc's encoder."""
    import av
    from aiortc.codecs.opus import OpusEncoder

    from sessions.audio import speech

    pcm = speech.speak(SPEECH_TEXT, rate=190)
    frames = speech.frames(pcm) + [bytes(2 * FRAME_TIMESTAMP)] * round(0.5 / FRAME)
    encoder = OpusEncoder()
    packets: list[bytes] = []
    index = 0
    while len(packets) < len(frames):  # the encoder holds a little back at first
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_TIMESTAMP)
        frame.planes[0].update(frames[index % len(frames)])
        frame.sample_rate = CLOCK_RATE
        frame.pts = index * FRAME_TIMESTAMP
        frame.time_base = fractions.Fraction(1, CLOCK_RATE)
        payloads, _ = encoder.encode(frame)
        packets += payloads
        index += 1
    return packets[: len(frames)]


def _speech_track(packets: list[bytes]) -> Any:
    import av
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    time_base = fractions.Fraction(1, CLOCK_RATE)

    class SpeechTrack(MediaStreamTrack):
        """Loops speech (pre-encoded Opus packets) paced in real time like a microphone."""

        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self._index = 0
            self._start: float | None = None

        async def recv(self) -> av.Packet[Any]:
            if self.readyState != "live":
                raise MediaStreamError
            if self._start is None:
                self._start = time.monotonic()
            else:
                delay = self._start + self._index * FRAME - time.monotonic()
                await asyncio.sleep(max(0.0, delay))
            packet = av.Packet(packets[self._index % len(packets)])
            packet.pts = self._index * FRAME_TIMESTAMP
            packet.time_base = time_base
            self._index += 1
            return packet

    return SpeechTrack()


def _is_rtp(data: bytes) -> bool:
    """SRTP media, not SRTCP, STUN or DTLS (RFC 7983 first byte, RFC 5761 payload types)."""
    return len(data) >= 12 and 128 <= data[0] <= 191 and not 192 <= data[1] <= 223


@final
class Call:
    """One aiortc client session: sends speech, timestamps every echoed RTP packet.

    Echoed packets are timestamped by the kernel as they reach the client's socket
    (``SIOCGSTAMP`` after each read), so that a busy or descheduled client process does not
    make the server look late; the first one (setup time) as aiortc's receiver gets it.
    """

    def __init__(self, packets: list[bytes], *, decode_all: bool, token: str | None = None) -> None:
        self.token = token
        import aiortc
        from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
        from aiortc.rtp import RtpPacket

        self.pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
        self.pc.addTrack(_speech_track(packets))
        #: (arrival on the kernel's clock, as time.monotonic(); RTP timestamp) of every echo
        self.arrivals: list[tuple[float, int]] = []
        self.first_rtp: float | None = None
        self.first_frame = asyncio.get_running_loop().create_future()
        self.location: str | None = None
        self._decode = True
        self._reader: asyncio.Task[None] | None = None

        (transceiver,) = self.pc.getTransceivers()
        receiver = transceiver.receiver
        original = receiver._handle_rtp_packet

        async def on_rtp(packet: RtpPacket, arrival_time_ms: int) -> None:
            if self.first_rtp is None:
                self.first_rtp = time.monotonic()
            if self._decode:
                await original(packet, arrival_time_ms)

        receiver._handle_rtp_packet = on_rtp  # type: ignore[method-assign]

        async def read(track: MediaStreamTrack) -> None:
            with contextlib.suppress(MediaStreamError):
                await track.recv()
                if not self.first_frame.done():
                    self.first_frame.set_result(time.monotonic())
                if not decode_all:
                    self._decode = False
                    return
                while True:
                    await track.recv()

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._reader = asyncio.ensure_future(read(track))

    async def connect(self, url: str) -> tuple[float, float, float]:
        """POST the offer, apply the answer and wait for the first decoded echo.

        Returns seconds from sending the POST to the answer, to the first echoed RTP packet and
        to the first decoded frame.
        """
        await self.pc.setLocalDescription(await self.pc.createOffer())
        assert self.pc.localDescription is not None
        self._stamp_arrivals()
        offer = self.pc.localDescription.sdp.encode()
        start = time.monotonic()
        status, headers, answer = await http("POST", url, offer, token=self.token)
        answered = time.monotonic()
        if status != 201:
            raise RuntimeError(f"POST answered {status}: {answer[:200]!r}")
        self.location = headers.get("location")
        import aiortc

        await self.pc.setRemoteDescription(aiortc.RTCSessionDescription(answer.decode(), "answer"))
        async with asyncio.timeout(CONNECT_TIMEOUT):
            decoded: float = await self.first_frame
        assert self.first_rtp is not None
        return answered - start, self.first_rtp - start, decoded - start

    def _stamp_arrivals(self) -> None:
        """Record the kernel's arrival time of every RTP packet on our ICE sockets."""
        (transceiver,) = self.pc.getTransceivers()
        connection = transceiver.receiver.transport.transport._connection
        clock = time.time() - time.monotonic()  # SIOCGSTAMP reads CLOCK_REALTIME
        for protocol in connection._protocols:
            fd = protocol.transport.get_extra_info("socket").fileno()
            with contextlib.suppress(OSError):  # the first call turns stamping on (ENOENT)
                fcntl.ioctl(fd, _SIOCGSTAMP, bytes(_TIMEVAL.size))
            original = protocol.datagram_received

            def received(
                data: bytes | str,
                addr: tuple[Any, ...],
                fd: int = fd,
                original: Callable[[bytes | str, tuple[Any, ...]], None] = original,
            ) -> None:
                if isinstance(data, bytes) and _is_rtp(data):
                    try:
                        stamp = fcntl.ioctl(fd, _SIOCGSTAMP, bytes(_TIMEVAL.size))
                        sec, usec = _TIMEVAL.unpack(stamp)
                        at = sec + usec / 1e6 - clock
                    except OSError:
                        at = time.monotonic()
                    self.arrivals.append((at, int.from_bytes(data[4:8], "big")))
                original(data, addr)

            protocol.datagram_received = received  # type: ignore[method-assign]

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
        if self._reader is not None:
            self._reader.cancel()


@final
@attrs.frozen
class Lateness:
    frames: int
    late: int
    missing: int
    delays: list[float]
    """each frame's delay beyond the least of the window (arrival - timestamp), seconds"""
    drift: float
    """how much the echo's delay grew over the window (median of its last second minus its
    first), seconds"""


def lateness(arrivals: Sequence[tuple[float, int]], start: float, end: float) -> Lateness:
    """Late and missing echoed frames among ``arrivals`` in [start, end), and the echo's delay.

    Late: the frame came more than 5 ms after the previous one beyond the spacing their RTP
    timestamps give (20 ms for consecutive frames). Missing: its timestamp never came. The
    delay of a frame is its arrival minus its timestamp (on the clock of the first frame);
    it only varies (jitter) or grows (a server falling behind) from the least of the window.
    """
    window = [(at, ts) for at, ts in arrivals if start <= at < end]
    if not window:
        return Lateness(0, 0, 0, [], 0.0)
    origin = window[0][1]
    unwrapped: list[tuple[float, int]] = []
    for at, ts in window:
        delta = (ts - origin + (1 << 31)) % (1 << 32) - (1 << 31)
        unwrapped.append((at, delta))
    offsets = [at - delta / CLOCK_RATE for at, delta in unwrapped]
    base = min(offsets)
    seen = {delta // FRAME_TIMESTAMP for _, delta in unwrapped}
    first, last = min(seen), max(seen)
    frames = last - first + 1
    late = 0
    for (prev_at, prev_ts), (at, ts) in itertools.pairwise(unwrapped):
        if ts > prev_ts and at - prev_at > (ts - prev_ts) / CLOCK_RATE + LATE_SLACK:
            late += 1
    span = min(1.0, (end - start) / 4)
    head = [o for (at, _), o in zip(unwrapped, offsets, strict=True) if at < start + span]
    tail = [o for (at, _), o in zip(unwrapped, offsets, strict=True) if at >= end - span]
    drift = statistics.median(tail) - statistics.median(head) if head and tail else 0.0
    return Lateness(frames, late, frames - len(seen), [o - base for o in offsets], drift)


# --- the phases ----------------------------------------------------------------------------------


@final
@attrs.frozen
class Params:
    setups: int
    max_sessions: int
    warmup: float
    window: float
    decode_all: bool
    time_budget: float
    """seconds per server for the ramp; steps that would start later are skipped"""

    def steps(self) -> list[int]:
        steps = []
        n = 5
        while n < self.max_sessions:
            steps.append(n)
            n *= 2
        steps.append(self.max_sessions)
        return steps


async def _setup_phase(
    server: Server, packets: list[bytes], params: Params
) -> tuple[list[tuple[float, float, float]], int, float]:
    times: list[tuple[float, float, float]] = []
    failed = 0
    cpu_start = process_cpu(server.pid)
    for _ in range(params.setups):
        call = Call(packets, decode_all=params.decode_all, token=server.token)
        try:
            times.append(await call.connect(server.url))
        except (RuntimeError, TimeoutError, OSError):
            failed += 1
        finally:
            await call.close(server.url)
    cpu = process_cpu(server.pid) - cpu_start
    return times, failed, cpu / max(1, len(times))


async def _add_calls(
    server: Server, packets: list[bytes], calls: list[Call], count: int, params: Params
) -> int:
    """Set ``count`` more calls up (a few at a time); returns how many failed."""
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with gate:
            call = Call(packets, decode_all=params.decode_all, token=server.token)
            try:
                await call.connect(server.url)
            except (RuntimeError, TimeoutError, OSError):
                failed += 1
                await call.close(server.url)
            else:
                calls.append(call)

    await asyncio.gather(*(one() for _ in range(count)))
    return failed


class LoopLag:
    """Watches this process's event loop: how late its wake-ups come (the clients' health)."""

    def __init__(self, period: float = 0.010) -> None:
        self.period = period
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.period)
            self.worst = max(self.worst, time.monotonic() - before - self.period)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.ensure_future(self._watch())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


def all_process_cpu() -> dict[int, float]:
    """utime + stime of every process on the machine (kernel threads too), by pid."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                out[int(name)] = process_cpu(int(name))
    return out


def others_cpu(before: dict[int, float], after: dict[int, float], ours: set[int]) -> float:
    """CPU seconds other processes used between two :func:`all_process_cpu` (a lower bound:
    processes that ended in between are not seen)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items() if pid not in ours)


@final
@attrs.frozen
class _Sample:
    """CPU counters at one instant."""

    at: float
    server: float
    client: float

    @classmethod
    def take(cls, server: Server) -> _Sample:
        return cls(at=time.monotonic(), server=process_cpu(server.pid), client=own_cpu())


async def _window(
    server: Server, calls: list[Call], failed: int, params: Params, attempts: int
) -> StepFigures:
    for call in calls:
        call.arrivals.clear()
    before = await server.late_stats()
    ours = {os.getpid(), *server.pids()}
    machine_before = all_process_cpu()
    with LoopLag() as lag:
        first = _Sample.take(server)
        await asyncio.sleep(params.window)
        last = _Sample.take(server)
    others = others_cpu(machine_before, all_process_cpu(), ours)
    after = await server.late_stats()
    frames = late = missing = 0
    delays: list[float] = []
    drifts: list[float] = []
    for call in calls:
        result = lateness(call.arrivals, first.at, last.at)
        frames += result.frames
        late += result.late
        missing += result.missing
        delays += result.delays
        if result.frames:
            drifts.append(result.drift)
    server_late = None
    if before is not None and after is not None:
        late_ticks = ticks = 0
        for session, (late_now, ticks_now) in after.items():
            late_then, ticks_then = before.get(session, (0, 0))
            late_ticks += late_now - late_then
            ticks += ticks_now - ticks_then
        server_late = late_ticks / ticks if ticks else math.nan
    elapsed = last.at - first.at
    server_cpu = (last.server - first.server) / elapsed
    client_cpu = (last.client - first.client) / elapsed
    client_cores = len(server.client_cpus) or len(os.sched_getaffinity(0))
    n = len(calls)
    return StepFigures(
        sessions=n,
        window=elapsed,
        server_cpu=server_cpu,
        client_cpu=client_cpu / client_cores,
        cpu_per_session=server_cpu / n if n else math.nan,
        frames=frames,
        late=late,
        missing=missing,
        jitter=percentile(delays, 99),
        drift=statistics.median(drifts) if drifts else math.nan,
        server_late=server_late,
        failed_setups=failed,
        attempts=attempts,
        others_cpu=others / elapsed,
        client_lag=lag.worst,
    )


async def _measure_step(
    server: Server, calls: list[Call], failed: int, params: Params
) -> StepFigures:
    # The clients' garbage collector would stall every session at once: the objects of the
    # calls set up so far are frozen out of its way (gc.freeze) before the window.
    gc.collect()
    gc.freeze()
    try:
        await asyncio.sleep(params.warmup)
        windows = [await _window(server, calls, failed, params, 1)]
        # Another process on this shared machine may have got in the way: look once more,
        # and a third time if others were busy both times.
        while not (windows[-1].passed or windows[-1].clear_failure) and (
            len(windows) < 2
            or (len(windows) < 3 and min(w.others_cpu for w in windows) >= BUSY_OTHERS)
        ):
            windows.append(await _window(server, calls, failed, params, len(windows) + 1))
    finally:
        gc.unfreeze()
    best = min(windows, key=lambda w: (not w.passed, w.bad_fraction))
    return attrs.evolve(best, attempts=len(windows))


async def _close_all(server: Server, calls: list[Call]) -> None:
    """Close every call (bounded: a stuck peer connection does not hold the run up)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await asyncio.gather(*(call.close(server.url) for call in calls))


async def _ramp_phase(
    server: Server, packets: list[bytes], params: Params
) -> tuple[list[StepFigures], int, str]:
    """Steps up the ramp (always through N=10, for the CPU figures) until a step fails beyond
    the largest pass, then bisects between the largest pass and the smallest failure above
    it, :data:`REFINEMENTS` times at most. Returns the steps, the largest N that passed and
    why the ramp stopped."""
    calls: list[Call] = []
    steps: list[StepFigures] = []
    deadline = time.monotonic() + params.time_budget
    ramp = params.steps()
    refinements = 0
    stopped_by = "reached --sessions"

    def best_pass() -> int:
        return max((s.sessions for s in steps if s.passed), default=0)

    def first_fail_above(n: int) -> StepFigures | None:
        above = [s for s in steps if not s.passed and s.sessions > n]
        return min(above, key=lambda s: s.sessions, default=None)

    try:
        while True:
            fail = first_fail_above(best_pass())
            if ramp and (fail is None or ramp[0] <= MANDATORY_STEP):
                target = ramp.pop(0)
            elif fail is not None and refinements < REFINEMENTS:
                target = (best_pass() + fail.sessions) // 2
                if target <= best_pass():
                    break
                refinements += 1
            else:
                break
            if time.monotonic() > deadline:
                stopped_by = f"time budget ({params.time_budget:.0f}s) used up before N={target}"
                break
            if len(calls) > target:
                # Down: fresh calls, so that no backlog of the last step is carried over.
                await _close_all(server, calls)
                calls.clear()
            failed = await _add_calls(server, packets, calls, target - len(calls), params)
            steps.append(await _measure_step(server, calls, failed, params))
        fail = first_fail_above(best_pass())
        if fail is not None:
            stopped_by = _why(fail) + (f"; {stopped_by}" if "budget" in stopped_by else "")
    finally:
        await _close_all(server, calls)
    return steps, best_pass(), stopped_by


def _why(step: StepFigures) -> str:
    if step.failed_setups:
        cause = f"{step.failed_setups} failed setups"
    elif step.bad_fraction >= BAD_LIMIT:
        cause = f"{100 * step.bad_fraction:.1f}% bad frames"
    else:
        cause = f"echo delay moved {1000 * step.drift:+.0f} ms"
    if step.server_cpu >= SATURATED:
        return f"{cause} at N={step.sessions}; server core saturated"
    if step.client_cpu >= SATURATED:
        return f"{cause} at N={step.sessions}; client cores saturated first"
    return f"{cause} at N={step.sessions}; neither saturated"


async def _measure_server(server: Server, packets: list[bytes], params: Params) -> ServerFigures:
    await server.ready()
    times, failed, setup_cpu = await _setup_phase(server, packets, params)
    steps, capacity, stopped_by = await _ramp_phase(server, packets, params)
    return ServerFigures(
        name=server.name,
        setups=params.setups,
        failed_setups=failed,
        answer_times=[t[0] for t in times],
        rtp_times=[t[1] for t in times],
        frame_times=[t[2] for t in times],
        setup_cpu=setup_cpu,
        steps=steps,
        capacity=capacity,
        stopped_by=stopped_by,
    )


def _run_server(
    factory: Callable[[Path, set[int], set[int]], Server],
    workdir: Path,
    cores: tuple[set[int], set[int]],
    measure_it: Callable[[Server], Coroutine[Any, Any, ServerFigures]],
) -> ServerFigures:
    server = factory(workdir, *cores)
    terminated = False

    async def run() -> ServerFigures:
        # SIGTERM cancels the run like Ctrl-C does (asyncio.run's own SIGINT handling), so
        # that every call is closed on the way out; the server is stopped after.
        nonlocal terminated
        task = asyncio.current_task()
        assert task is not None

        def on_sigterm() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError):  # not the main thread: no handler
            loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        try:
            return await measure_it(server)
        finally:
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signal.SIGTERM)

    try:
        server.start()
        return asyncio.run(run())
    except asyncio.CancelledError:
        if terminated:
            raise KeyboardInterrupt from None
        raise
    finally:
        server.stop()


def measure(params: Params) -> BenchResult:
    """Measure parley, then the aiortc echo server, with the same clients and parameters."""
    loopback_ice()
    packets = speech_packets()
    about = machine()
    workdir = Path(tempfile.mkdtemp(prefix="parley-bench-"))
    try:
        with split_cores() as cores:

            async def measure_it(server: Server) -> ServerFigures:
                return await _measure_server(server, packets, params)

            parley = _run_server(ParleyServer, workdir, cores, measure_it)
            baseline = _run_server(AiortcServer, workdir, cores, measure_it)
            pinned = bool(cores[0])
            return BenchResult(
                machine={**about, "server_cores": sorted(cores[0]), "pinned": pinned},
                params=attrs.asdict(params),
                parley=parley,
                aiortc=baseline,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- output --------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{1000 * value:.1f} ms"


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or math.isnan(ours) or math.isnan(theirs) or not theirs:
        return "-"
    return f"{ours / theirs:.2f}x"


def render(result: BenchResult) -> str:
    m, p = result.machine, result.params
    parley, baseline = result.parley, result.aiortc
    header = [
        f"machine: nproc {m['nproc']}, {m['cpu_model']}, python {m['python']}, "
        f"aiortc {m['aiortc']}, linux {m['kernel']}",
        f"server pinned to cpu {m['server_cores']}, clients (this process) and etcd to the rest"
        if m["pinned"]
        else "one cpu: servers, clients and etcd share it (nothing pinned)",
        f"params: {p['setups']} sequential setups; ramp {Params(**p).steps()} sessions "  # type: ignore[arg-type]
        f"(max {p['max_sessions']}), warm-up {p['warmup']}s, window {p['window']}s; "
        f"clients decode {'every frame' if p['decode_all'] else 'the first frame only'}",
        "measured at the client the same way for both, a ramp step passes with < "
        f"{BAD_LIMIT:.0%} bad frames (late: came > {LATE_SLACK * 1000:.0f} ms later after the"
        " previous echoed frame than their RTP timestamps are apart; or missing) and an echo"
        f" delay that moved < {DRIFT_LIMIT * 1000:.0f} ms over the window",
        "ratio = parley / aiortc echo",
        "",
    ]
    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, ours: float | None, theirs: float | None, fmt: Callable[..., str]) -> None:
        rows.append((label, fmt(ours), fmt(theirs), _ratio(ours, theirs)))

    for which, label in (("answer", "answer"), ("rtp", "first echo RTP"), ("frame", "1st decoded")):
        for q in (50, 99):
            row(
                f"setup POST->{label} p{q}",
                parley.setup_percentile(which, q),
                baseline.setup_percentile(which, q),
                _ms,
            )
    rows.append(
        (
            "setups ok / tried",
            f"{parley.setups - parley.failed_setups}/{parley.setups}",
            f"{baseline.setups - baseline.failed_setups}/{baseline.setups}",
            "",
        )
    )
    row("server CPU per setup", parley.setup_cpu, baseline.setup_cpu, _ms)
    for n in sorted({s.sessions for s in parley.steps[:2] + baseline.steps[:2]}):
        row(
            f"server CPU/session @N={n} (/s)",
            parley.cpu_per_session_at(n),
            baseline.cpu_per_session_at(n),
            _ms,
        )
    rows.append(
        (
            f"sessions/core, bad < {BAD_LIMIT:.0%}",
            str(parley.capacity),
            str(baseline.capacity),
            _ratio(parley.capacity, baseline.capacity) if baseline.capacity else "-",
        )
    )
    rows.append(
        (
            "CPU ceiling, sessions/core",
            f"{parley.cpu_ceiling:.1f}",
            f"{baseline.cpu_ceiling:.1f}",
            _ratio(parley.cpu_ceiling, baseline.cpu_ceiling),
        )
    )
    widths = [
        max(len(r[i]) for r in [*rows, ("figure", "parley", "aiortc echo", "ratio")])
        for i in range(4)
    ]
    lines = list(header)
    lines.append(
        f"{'figure':<{widths[0]}}  {'parley':>{widths[1]}}  {'aiortc echo':>{widths[2]}}"
        f"  {'ratio':>{widths[3]}}"
    )
    for label, a, b, r in rows:
        lines.append(f"{label:<{widths[0]}}  {a:>{widths[1]}}  {b:>{widths[2]}}  {r:>{widths[3]}}")
    lines.append("")
    lines += _ramp_table(parley, baseline)
    lines.append(
        "bad = late + missing; jitter p99: of the echo delay above its least in the window;"
        " drift: how the echo delay moved over the window; node late: the node's own late pacer"
        " ticks; others: CPU of every other process on the machine (etcd included), 100% = one"
        " core; lag: the clients' worst event-loop delay. CPU ceiling: N / server CPU at the"
        " largest step under 90% CPU that kept up (< 1% missing, delay moved < 20 ms)"
    )
    return "\n".join(lines)


def _ramp_table(*sides: ServerFigures) -> list[str]:
    columns: list[tuple[str, Callable[[ServerFigures, StepFigures], str]]] = [
        ("ramp", lambda side, s: side.name),
        ("N", lambda side, s: str(s.sessions)),
        ("server CPU", lambda side, s: _pct(s.server_cpu)),
        ("client CPU", lambda side, s: _pct(s.client_cpu)),
        ("CPU/session", lambda side, s: _ms(s.cpu_per_session)),
        ("frames", lambda side, s: str(s.frames)),
        ("late", lambda side, s: str(s.late)),
        ("missing", lambda side, s: str(s.missing)),
        ("bad", lambda side, s: _pct(s.bad_fraction)),
        ("jitter p99", lambda side, s: _ms(s.jitter)),
        ("drift", lambda side, s: _ms(s.drift)),
        ("node late", lambda side, s: _pct(s.server_late)),
        ("others", lambda side, s: _pct(s.others_cpu)),
        ("lag", lambda side, s: _ms(s.client_lag)),
        (
            "",
            lambda side, s: (
                ("ok" if s.passed else "FAIL")
                + (f" (best of {s.attempts} windows)" if s.attempts > 1 else "")
                + (f" ({s.failed_setups} setups failed)" if s.failed_setups else "")
            ),
        ),
    ]
    cells = [[name for name, _ in columns]]
    cells += [[cell(side, s) for _, cell in columns] for side in sides for s in side.steps]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        "  ".join(
            c.ljust(w) if i in (0, len(columns) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]
    lines += [f"{side.name}: ramp stopped: {side.stopped_by}" for side in sides]
    return lines


def main(argv: Sequence[str] | None = None) -> BenchResult:
    """Command line entry point; prints the table (or JSON) and returns the figures."""
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.sessions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sessions", type=int, help="most concurrent sessions (default 80; --quick 10)"
    )
    parser.add_argument("--setups", type=int, help="sequential setups timed (default 50)")
    parser.add_argument("--warmup", type=float, help="seconds before a window (default 3)")
    parser.add_argument("--window", type=float, help="seconds measured a step (default 6)")
    parser.add_argument("--quick", action="store_true", help="small run, under a minute")
    parser.add_argument(
        "--client-decode", action="store_true", help="clients decode every echoed frame"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    quick = args.quick
    params = Params(
        setups=args.setups if args.setups is not None else (10 if quick else 50),
        max_sessions=args.sessions if args.sessions is not None else (10 if quick else 80),
        warmup=args.warmup if args.warmup is not None else (1.5 if quick else 3.0),
        window=args.window if args.window is not None else (3.0 if quick else 6.0),
        decode_all=args.client_decode,
        time_budget=25.0 if quick else 150.0,
    )
    if params.setups < 1 or params.max_sessions < 1 or params.window <= 0 or params.warmup < 0:
        parser.error("--setups and --sessions must be positive, --window > 0, --warmup >= 0")
    result = measure(params)
    print(json.dumps(result.as_dict(), indent=2) if args.json else render(result))
    return result


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["serve-aiortc"]:
            serve_aiortc(sys.argv[2:])
        else:
            main()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the servers were stopped on the way out
        sys.exit(130)
