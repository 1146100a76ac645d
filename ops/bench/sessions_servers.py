"""The servers ops/bench/sessions.py measures, each in processes of its own: a parley cluster
(``parley up --nodes 1 --relays 1``: a relay, its QUIC tunnel, a node), a parley node in direct
mode, and the aiortc echo server (``python -m ops.bench.sessions serve-aiortc``)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final, final

from ops.bench.common import ADMISSION
from ops.certs import write_token_key
from ops.children import spawn
from ops.etcdserver import EtcdServer, free_port
from ops.tokens import create_token
from relay.settings import OPERATOR_CERT, TOKEN_KEYS_DIR, ClusterSettings

__all__ = [
    "AiortcServer",
    "ClusterServer",
    "ParleyServer",
    "Server",
    "http",
    "loopback_ice",
    "pin",
    "serve_aiortc",
]

PREFIX: Final = "/parley-bench"
NODE_ID: Final = "bench"
SESSION_PATH: Final = "/v1/session"
HTTP_TIMEOUT: Final = 10.0


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


# --- HTTP, just enough -------------------------------------------------------------------------


async def http(
    method: str,
    url: str,
    body: bytes = b"",
    *,
    content_type: str = "application/sdp",
    token: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on its own connection, without leaving the event loop; ``token``:
    an access token, sent as ``Authorization: Bearer``; ``tls``: for an https URL."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    async with asyncio.timeout(HTTP_TIMEOUT):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port, ssl=tls)
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


#: extra settings for both parley sides (``--tick-ms``, ``--relay-hold-ms``), PARLEY_* environment
#: variables
NODE_SETTINGS: dict[str, str] = {}


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


async def etcd_get(endpoint: str, key: str, tls: ssl.SSLContext | None = None) -> list[bytes]:
    """The values of ``key`` (none or one) through etcd's JSON gateway at ``endpoint``."""
    body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
    status, _, data = await http(
        "POST", f"{endpoint}/v3/kv/range", body, content_type="application/json", tls=tls
    )
    if status != 200:
        raise RuntimeError(f"etcd answered {status}")
    kvs = json.loads(data).get("kvs", [])
    return [base64.b64decode(kv.get("value", "")) for kv in kvs]


def _late_stats(values: list[bytes]) -> dict[str, tuple[int, int]]:
    """Per session (late ticks, ticks) from a node's published stats (``PREFIX/stats/ID``)."""
    if not values:
        return {}
    out = {}
    for session, stats in json.loads(values[0]).items():
        if isinstance(stats, dict):
            out[session] = (int(stats["late_frames"]), int(stats["pacer"]["ticks"]))
    return out


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
        # Its own session: Ctrl-C reaches the bench, which stops us in order; and SIGTERM if
        # the bench dies without stopping us (killed), from the kernel (ops/children.py).
        self.process = spawn(
            self.command(), cwd=self.workdir, env=self.env(), stdout=self._log, stderr=self._log
        )
        pin(self.process.pid, self.server_cpus)
        _wait_port(self.port, self.process, self.log, 30.0)

    def pids(self) -> set[int]:
        """The server's processes."""
        return set() if self.process is None else {self.process.pid}

    @property
    def relay_pid(self) -> int | None:
        """The relay on the media path, if there is one (its CPU is reported beside)."""
        return None

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
        env.update(NODE_SETTINGS)
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
        return await etcd_get(f"http://{self.etcd.endpoint}", key)

    async def ready(self) -> None:
        # The node listens before it holds a lease; it takes sessions once registered.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if await self._etcd_get(f"{PREFIX}/nodes/{NODE_ID}"):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"parley node did not register; {_tail(self.log)}")

    async def late_stats(self) -> dict[str, tuple[int, int]] | None:
        return _late_stats(await self._etcd_get(f"{PREFIX}/stats/{NODE_ID}"))

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


@final
class ClusterServer(Server):
    """``parley up --nodes 1 --relays 1``: the clients' UDP reaches the node through a real relay
    and its QUIC tunnel, as deployed. Only the node is the server under test (pinned to the
    server core, its CPU is "server CPU"); ``parley up``, its etcd and the relay share the
    clients' cores, and the relay's CPU is reported beside (it is on every packet's path)."""

    name = "cluster"
    prefix: Final = "/parley"
    node_id: Final = "node-1"
    relay_id: Final = "relay-1"

    def __init__(self, workdir: Path, server_cpus: set[int], client_cpus: set[int]) -> None:
        super().__init__(workdir, server_cpus, client_cpus)
        self.data = workdir / "up"
        self.certs = self.data / "certs"
        self.etcd_port = free_port()
        self.etcd = f"https://127.0.0.1:{self.etcd_port}"
        self._node: int | None = None
        self._relay: int | None = None
        self._tls: ssl.SSLContext | None = None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "ops.cli", "up",
            "--data-dir", str(self.data),
            "--etcd-port", str(self.etcd_port),
            "--nodes", "1",
            "--relays", "1",
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(
            PARLEY_CONFIG="/dev/null",
            PARLEY_NODE_AGENT="echo",  # the immediate echo, as the other sides
            PARLEY_UP_RELAY_PORT=str(free_port()),
            PARLEY_UP_ETCD_PEER_PORT=str(free_port()),
            PARLEY_UP_SIGNALING_PORT=str(self.port),  # node-1's signaling: our url
            PARLEY_UP_OPSVIEW_LISTEN="",  # no ops page
            PARLEY_UP_LEDGER="false",  # no media ledger: a deployed node writes none
        )
        env.update(ADMISSION)
        env.update(NODE_SETTINGS)
        return env

    @property
    def pid(self) -> int:
        assert self._node is not None, "not started"
        return self._node

    @property
    def relay_pid(self) -> int | None:
        return self._relay

    def pids(self) -> set[int]:
        found = {p for p in (self._node, self._relay) if p is not None}
        return found | ({self.process.pid} if self.process is not None else set())

    def start(self) -> None:
        self._log = open(self.log, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = spawn(  # as Server.start: dies with the bench
            self.command(), cwd=self.workdir, env=self.env(), stdout=self._log, stderr=self._log
        )
        # `parley up`, and so etcd and the relay it starts, run beside the clients ...
        pin(self.process.pid, self.client_cpus)
        _wait_port(self.port, self.process, self.log, 60.0)
        self._node = _child_of(self.process.pid, "node")
        self._relay = _child_of(self.process.pid, "relay")
        # ... and the node alone on the server core
        pin(self._node, self.server_cpus)
        certs = ClusterSettings(certs=str(self.certs))
        self.token = create_token(certs, subject="bench", ttl=86400)
        # `parley up`'s etcd takes clients with a certificate of the cluster's CA only
        self._tls = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        self._tls.load_cert_chain(
            self.certs / f"{OPERATOR_CERT}.pem", self.certs / f"{OPERATOR_CERT}.key"
        )

    async def _get(self, key: str) -> list[bytes]:
        return await etcd_get(self.etcd, f"{self.prefix}/{key}", self._tls)

    async def ready(self) -> None:
        # The node takes sessions once registered, and the relay forwards them once its
        # tunnel to the node is up.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, RuntimeError, TimeoutError, ValueError):
                relay = await self._get(f"relays/{self.relay_id}")
                tunnels = json.loads(relay[0]).get("tunnels", []) if relay else []
                if await self._get(f"nodes/{self.node_id}") and self.node_id in tunnels:
                    return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the cluster did not come up; {_tail(self.log)}")

    async def late_stats(self) -> dict[str, tuple[int, int]] | None:
        return _late_stats(await self._get(f"stats/{self.node_id}"))

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # it stops its children in order
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def _child_of(parent: int, command: str, wait: float = 30.0) -> int:
    """The pid of ``python -m ops.cli COMMAND ...`` among ``parent``'s descendants."""
    deadline = time.monotonic() + wait
    while True:
        children: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    with open(f"/proc/{name}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(name))
        todo = list(children.get(parent, []))
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                if argv[1:4] == [b"-m", b"ops.cli", command.encode()]:
                    return pid
        if time.monotonic() > deadline:
            raise RuntimeError(f"no `ops.cli {command}` under pid {parent}")
        time.sleep(0.1)


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
