"""What a relay costs per packet and how much latency it adds, beside a bare UDP forwarder
measured in the same run on the same machine.

    python -m ops.bench.relay [--sessions 1,100,1000] [--seconds 3] [--workers 1] [--quick]
                              [--json]

Two forwarding paths are measured with the same load generator, the same 160-byte payloads
(the size of a 20 ms Opus frame in RTP) and the same number of simulated sessions (one client
UDP socket each, so each session is its own source address):

* **parley**: the real relay packet path. A :class:`~relay.edge.RelayEdge` on a public UDP port
  on 127.0.0.1, whose route table says node ``bench-node`` owns every session
  (``RouteTable.apply(OwnershipChange(...))``, as the etcd watch would), and a real QUIC tunnel
  (relay/tunnel/quic.py, mutual TLS with a cluster CA made for the run): the relay's server
  :class:`~relay.tunnel.quic.TunnelEndpoint`, whose handler hands datagrams to ``edge.from_node`` as
  relay/daemon.py does. The far side is an *echo node*: a client endpoint in another process
  that answers every ``FromClient`` frame with a ``ToClient`` frame (the session's epoch, the
  same payload). Each session opens with a STUN binding request whose server ufrag carries a
  hint minted for ``bench-node`` (relay/tunnel/hint.py), so the relay admits its address
  exactly as in production; the flood limits (``Limits``) are raised so that they do not shape
  the load.
* **baseline**: a bare Trio UDP forwarder (waits for readability once, then drains the socket
  without blocking, like the edge) that prepends the client's address (6 bytes) to each datagram
  it sends to the echo node over one plain UDP socket, and strips it from the echo to know where
  to send it back: the least a single-port forwarder in front of one upstream must do. No STUN,
  no hints, no route table, no framing beyond that, no crypto. Its echo node is a plain Python
  loop that sends every datagram straight back.

Processes: the relay (or the forwarder) runs alone in its own process, pinned to one core; its
echo node and the load generator (this process) are pinned to the other core(s). With one CPU
nothing is pinned and everything shares it. All four servers start once and stay up; for each
session count the parley path and then the baseline run back to back, so both see the same
machine state. With ``--workers N`` the parley relay is N processes on one public port
(SO_REUSEPORT, as ``relay.workers``), worker 0 on the relay's core and the others on the other
cores; the echo node keeps a tunnel to each, and their CPU and packets are added up.

Per session count and path, two load shapes:

1. **Throughput**: a closed loop keeping a window of datagrams in flight (sessions take turns)
   for ``--seconds``. The warm-up before it tries windows of 16, 64 and 256 and keeps the one
   that made the most round trips (``--window`` fixes it instead): the two paths queue
   differently, and a window that suits one starves or floods the other. Reported: client→node
   datagrams per second (counted by the relay: datagrams it put into the tunnel, or on the
   upstream socket), round trips per second (echoes the clients got back), the relay's CPU (its
   own ``time.process_time()``, read at the window's edges) as a fraction of a core, and
   *packets per relay core*: datagrams the relay forwarded in either direction per CPU second it
   used. When the relay is not saturated (its busy fraction is below 1.0: the echo node and the
   load generator share a core and can be the bound) that figure is its per-packet cost turned
   into a rate, not a rate it was seen doing.
2. **Latency**: each session sends 50 datagrams per second, paced like Opus, with the total
   capped at ``--latency-cap`` so that the path is measured unsaturated. Every datagram carries
   its send time; the round-trip time runs from just before ``send`` to the kernel's receive
   timestamp (``SO_TIMESTAMPNS``), so the load generator's own scheduling delays after arrival do
   not count. p50 and p99 of it are reported for both paths, and their difference: the latency
   the parley path adds over a bare forwarder (both include the echo node and loopback). The
   relay's CPU at that paced rate is reported too.
3. **Latency, the echo node on a grid** (``--node-tick-ms``, 20 by default; 0 leaves it out):
   the same paced load, but both echo nodes send their echoes at the points of a 20 ms grid,
   all that is due at a point at once, as a node's media grid sends its sessions' frames
   (``node.media_tick_ms``). This is the shape of what a relay gets from a node in
   production: the node's frames for a relay come in bursts, several to a QUIC packet, where
   phase 2's echo node answers each datagram as it comes, one QUIC packet each. The round
   trips include the wait for the grid (up to a tick, on both paths alike).

Caveats:

* Loopback has no loss and no propagation delay: latency is pure processing, wake-ups and
  queueing. At one session (50 pps) every hop wakes an idle CPU, which costs more than the
  forwarding (more so in a VM), so both paths show a higher p50 there than at 100 sessions.
  With one session, p99 rests on 150 samples (3 s), with ``--quick`` on fewer.
* Per-packet cost is far from linear in load. Under full load each wake-up drains a batch and
  the tunnel packs several queued DATAGRAM frames into one QUIC packet per flush; paced, nearly
  every datagram pays for its own wake-ups, Trio scheduler passes, aioquic packet build, timers
  and ACKs. So "packets per relay core" is a ceiling for a saturated relay, and the paced CPU
  column is the other end; a real relay sits between them.
* The echo node costs about as much per packet as the relay (it decrypts and encrypts QUIC too)
  and shares a core with the load generator, so the parley round-trip rate is usually bounded by
  that core, not the relay's: read the relay's busy fraction beside it.
* The machine may be shared: ``other`` is the CPU other processes used during a row's windows
  (from ``/proc/stat``, steal included); a row where it is high is noisy, p99 most. A row
  during which others used more than a quarter of a core is measured once more, while the run
  is within its time budget, and the quieter of the two is kept (marked ``*``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Final, final

import attrs
import trio

from ops.bench.common import CLK_TCK, percentile, process_cpu, split_cores
from ops.bench.relay_servers import HOST, NODE_ID, RELAY_ID, SECRET, serve
from relay.settings import RelaySettings
from relay.tunnel.certs import Credentials, make_ca
from relay.tunnel.hint import mint_ufrag
from relay.tunnel.quic import MAX_HOLD
from sessions.webrtc import stun

__all__ = ["BenchResult", "Figures", "Params", "main", "measure", "render"]

Address = tuple[str, int]

PAYLOAD_SIZE: Final = 160
#: Opus packets per second per session in the latency phase (one per 20 ms frame)
SESSION_PPS: Final = 50.0
#: seconds a child may take to start, or to answer a control line
CHILD_TIMEOUT: Final = 20.0
#: the longest grid ``--node-tick-ms`` takes: the longest ``node.media_tick_ms``
MAX_NODE_TICK_MS: Final = 20.0
#: seconds to wait for every session's first datagram to come back
ADMIT_TIMEOUT: Final = 10.0
#: seconds without an echo after which the closed loop counts its window as lost and refills it
STALL: Final = 0.05
#: seconds the latency phase waits for the last echoes after it stopped sending
GRACE: Final = 0.2
#: CPU (cores) other processes may use during a row before it is measured again
BUSY: Final = 0.25
#: relay CPU (cores per worker) below which the throughput phase did not load the relay fully:
#: the echo node or the load generator bounded the closed loop, and the row's cost per packet
#: is that of a relay at partial load (smaller batches), not at full load
SATURATED: Final = 0.9
#: windows the warm-up tries; the throughput phase uses the one that made the most round trips
WINDOWS: Final = (16, 64, 256)
# Linux: kernel receive timestamps as a timespec (SO_TIMESTAMPNS == SCM_TIMESTAMPNS); not all
# Pythons name it.
SO_TIMESTAMPNS: Final = 35
_TIMESPEC: Final = struct.Struct("@qq")
# The latency phase's payload: 0x80 (RTP-looking, so the relay does not read it as STUN), then
# the phase's tag, a sequence number and the send time.
_STAMP: Final = struct.Struct("!IIQ")
_STAMP_AT: Final = 4
CONFIGS: Final = ("parley", "baseline")


# --- results ---------------------------------------------------------------------------------


@final
@attrs.frozen
class Params:
    sessions: tuple[int, ...] = (1, 100, 1000)
    seconds: float = 3.0
    """each measured window (throughput, then latency)"""
    warmup: float = 0.9
    """load before the throughput window; it also picks the window if none is given"""
    window: int | None = None
    """datagrams in flight in the throughput phase (None: the best of WINDOWS)"""
    latency_cap: float = 2000.0
    """most datagrams per second, over all sessions, in the latency phase"""
    budget: float = 55.0
    """a row measured while the machine was busy is run again only if the whole run is then
    still expected to end within this many seconds"""
    workers: int = 1
    """parley relay processes sharing the public port (SO_REUSEPORT), as ``relay.workers``"""
    hold_ms: float = RelaySettings().tunnel_hold_ms
    """how long the parley relay's tunnel may hold client datagrams, as
    ``relay.tunnel_hold_ms``"""
    node_tick_ms: float = 20.0
    """a second paced phase: both echo nodes send their echoes at the points of a grid of this
    period, as a node's media grid (``node.media_tick_ms``) sends its sessions' frames, every
    echo due at a point in one flush (0: no such phase)"""

    def latency_rate(self, sessions: int) -> float:
        return min(SESSION_PPS * sessions, self.latency_cap)


@final
@attrs.frozen
class Figures:
    """One path at one session count."""

    config: str
    sessions: int
    # -- throughput phase
    window: int
    """datagrams kept in flight"""
    seconds: float
    sent: int
    """datagrams the clients sent in the window"""
    round_trips: int
    """echoes the clients got back in the window"""
    to_node: int
    """client datagrams the relay sent on towards the node, in the window"""
    to_client: int
    """node datagrams the relay sent on to clients, in the window"""
    relay_cpu: float
    """relay CPU seconds in the window"""
    stalls: int
    """times the closed loop waited STALL seconds for an echo and refilled its window"""
    others: float
    """CPU seconds per second that processes other than the relay, its echo node and the load
    generator used in the window: this machine may be shared"""
    # -- latency phase
    latency_rate: float
    latency_sent: int
    latency_received: int
    p50: float
    p99: float
    latency_relay_cpu: float
    """relay CPU seconds in the latency window"""
    latency_others: float
    # -- latency phase with the echo node on a grid (Params.node_tick_ms)
    grid_sent: int = 0
    grid_received: int = 0
    grid_p50: float = math.nan
    grid_p99: float = math.nan
    grid_relay_cpu: float = 0.0
    """relay CPU seconds in the grid phase's window"""
    grid_others: float = 0.0
    worker_share: float = 1.0
    """the busiest relay worker's share of the client datagrams (1.0 with one worker)"""
    attempts: int = 1
    """times the row was measured; a row run while others were busy is run once more (within
    the time budget) and the quieter run kept"""

    @property
    def busy(self) -> float:
        """The most CPU other processes used in either window."""
        return max(self.others, self.latency_others, self.grid_others)

    @property
    def to_node_pps(self) -> float:
        return self.to_node / self.seconds

    @property
    def round_trip_pps(self) -> float:
        return self.round_trips / self.seconds

    @property
    def relay_busy(self) -> float:
        """The relay's CPU seconds per second in the throughput window (1.0: a core)."""
        return self.relay_cpu / self.seconds

    @property
    def cpu_per_packet(self) -> float:
        """Relay CPU seconds per datagram forwarded, either direction (throughput phase)."""
        forwarded = self.to_node + self.to_client
        return self.relay_cpu / forwarded if forwarded and self.relay_cpu > 0 else math.nan

    @property
    def packets_per_core(self) -> float:
        """Datagrams (either direction) one relay core forwards per second at this cost."""
        return 1.0 / self.cpu_per_packet if self.cpu_per_packet > 0 else math.nan

    @property
    def latency_cpu_per_packet(self) -> float:
        forwarded = 2 * self.latency_received
        return self.latency_relay_cpu / forwarded if forwarded else math.nan

    @property
    def grid_cpu_per_packet(self) -> float:
        forwarded = 2 * self.grid_received
        return self.grid_relay_cpu / forwarded if forwarded else math.nan


@final
@attrs.frozen
class BenchResult:
    machine: dict[str, object]
    params: Params
    rows: list[Figures]
    elapsed: float

    def row(self, config: str, sessions: int) -> Figures | None:
        for figures in self.rows:
            if figures.config == config and figures.sessions == sessions:
                return figures
        return None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; derived figures included, NaN as None."""
        rows = []
        for figures in self.rows:
            row = attrs.asdict(figures)
            for name in (
                "to_node_pps",
                "round_trip_pps",
                "relay_busy",
                "cpu_per_packet",
                "packets_per_core",
                "latency_cpu_per_packet",
                "grid_cpu_per_packet",
                "busy",
            ):
                row[name] = getattr(figures, name)
            rows.append({k: _json_number(v) for k, v in row.items()})
        added = []
        for n in self.params.sessions:
            ours, theirs = self.row("parley", n), self.row("baseline", n)
            if ours is not None and theirs is not None:
                added.append(
                    {
                        "sessions": n,
                        "p50": _json_number(ours.p50 - theirs.p50),
                        "p99": _json_number(ours.p99 - theirs.p99),
                    }
                )
        return {
            "machine": self.machine,
            "params": attrs.asdict(self.params),
            "rows": rows,
            "added_latency": added,
            "elapsed": self.elapsed,
        }


def _json_number(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# --- the parent side -------------------------------------------------------------------------


@final
class _Child:
    """A server process driven by JSON lines on its stdin and stdout."""

    def __init__(self, role: str, cpus: set[int]) -> None:
        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ops.bench.relay", role],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=root,
            env=env,
        )
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(self.proc.pid, cpus)
        self._buffer = b""

    def configure(self, config: dict[str, Any]) -> None:
        """The first line a child reads (it may come while the child is still importing)."""
        self._send(config)

    @property
    def _stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def _send(self, message: dict[str, Any]) -> None:
        self._stdin.write(json.dumps(message).encode() + b"\n")
        self._stdin.flush()

    def read(self, timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"{self.role}: no answer within {timeout} s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"{self.role} exited with {self.proc.wait()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        self._send(message)
        return self.read()

    def stats(self) -> dict[str, Any]:
        return self.ask({"cmd": "stats"})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@final
class _Clients:
    """N client sockets (one per session), all connected to the relay's public port."""

    def __init__(self, sessions: int, relay: Address) -> None:
        self.socks: list[socket.socket] = []
        self.epoll = select.epoll()
        self.by_fd: dict[int, int] = {}
        self.stamps = True
        try:
            for index in range(sessions):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.socks.append(sock)
                sock.bind((HOST, 0))
                sock.connect(relay)
                sock.setblocking(False)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                except OSError:
                    self.stamps = False
                self.by_fd[sock.fileno()] = index
                self.epoll.register(sock.fileno(), select.EPOLLIN)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.epoll.close()
        for sock in self.socks:
            sock.close()

    def _drain(self, timeout: float) -> list[int]:
        """Indexes of sessions that got a datagram (one entry per datagram)."""
        got = []
        for fd, _ in self.epoll.poll(timeout):
            index = self.by_fd[fd]
            sock = self.socks[index]
            while True:
                try:
                    sock.recv(2048)
                except (BlockingIOError, InterruptedError, ConnectionRefusedError):
                    break
                got.append(index)
        return got

    def admit(self, first: Sequence[bytes], timeout: float = ADMIT_TIMEOUT) -> int:
        """Send each session's first datagram until its echo comes back; how many did."""
        pending = set(range(len(self.socks)))
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            burst = set(sorted(pending)[:200])  # bounded, then collect
            for index in burst:
                with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                    self.socks[index].send(first[index])
            until = time.monotonic() + 0.2  # then send the unanswered again
            while burst and (left := until - time.monotonic()) > 0:
                got = self._drain(left)
                burst.difference_update(got)
                pending.difference_update(got)
        self.settle()
        return len(self.socks) - len(pending)

    def settle(self, quiet: float = 0.05, most: float = 3.0) -> None:
        """Read and discard until nothing arrived for ``quiet`` seconds (at most ``most``)."""
        deadline = time.monotonic() + most
        while self._drain(quiet) and time.monotonic() < deadline:
            pass

    def closed_loop(self, seconds: float, window: int) -> tuple[int, int, int]:
        """Keep ``window`` datagrams in flight for ``seconds``; (sent, received, stalls)."""
        payload = b"\x80" + bytes(PAYLOAD_SIZE - 1)
        socks, by_fd, poll = self.socks, self.by_fd, self.epoll.poll
        count = len(socks)
        sent = received = stalls = inflight = turn = 0
        clock = time.perf_counter
        end = clock() + seconds
        while True:
            while inflight < window:
                try:
                    socks[turn].send(payload)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                turn += 1
                if turn == count:
                    turn = 0
                inflight += 1
                sent += 1
            if clock() >= end:
                break
            events = poll(STALL)
            if not events:
                stalls += 1  # lost somewhere: start the window afresh
                inflight = 0
                continue
            for fd, _ in events:
                recv = socks[by_fd[fd]].recv
                while True:
                    try:
                        recv(2048)
                    except (BlockingIOError, InterruptedError, ConnectionRefusedError):
                        break
                    received += 1
                    inflight -= 1
            inflight = max(inflight, 0)
        return sent, received, stalls

    def paced(self, seconds: float, rate: float, tag: int) -> tuple[int, list[float]]:
        """Send ``rate`` datagrams a second, sessions in turn; (sent, round-trip times).

        Each datagram carries ``tag``, its sequence number and its send time; echoes without
        this phase's tag (late ones from an earlier phase) are not counted.
        """
        template = bytearray(PAYLOAD_SIZE)
        template[0] = 0x80
        socks, poll = self.socks, self.epoll.poll
        count = len(socks)
        ancillary = socket.CMSG_SPACE(_TIMESPEC.size)
        rtts: list[float] = []
        interval = 1.0 / rate
        clock = time.perf_counter
        start = clock()
        end = start + seconds
        due = start
        sent = 0
        while True:
            now = clock()
            if now >= end:
                break
            while due <= now:
                _STAMP.pack_into(template, _STAMP_AT, tag, sent, time.time_ns())
                with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                    socks[sent % count].send(template)
                sent += 1
                due = start + sent * interval
            self._receive_stamped(poll(max(due - clock(), 0.0)), ancillary, tag, rtts)
        stop = clock() + GRACE
        while len(rtts) < sent and (left := stop - clock()) > 0:
            self._receive_stamped(poll(left), ancillary, tag, rtts)
        return sent, rtts

    def _receive_stamped(
        self, events: list[tuple[int, int]], ancillary: int, tag: int, rtts: list[float]
    ) -> None:
        for fd, _ in events:
            sock = self.socks[self.by_fd[fd]]
            while True:
                try:
                    data, cmsgs, _, _ = sock.recvmsg(2048, ancillary)
                except (BlockingIOError, InterruptedError, ConnectionRefusedError):
                    break
                if len(data) != PAYLOAD_SIZE:
                    continue
                echoed_tag, _, sent_at = _STAMP.unpack_from(data, _STAMP_AT)
                if echoed_tag != tag:
                    continue
                arrived = 0
                for level, kind, value in cmsgs:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = _TIMESPEC.unpack_from(value)
                        arrived = sec * 1_000_000_000 + nsec
                rtts.append(((arrived or time.time_ns()) - sent_at) / 1e9)


def _check(ufrag: str) -> bytes:
    """A client's first connectivity check (RFC 8445 §7.2.2 USERNAME), hinted ufrag first."""
    request = stun.binding_request(
        os.urandom(12), username=f"{ufrag}:bnch", priority=1, controlling=True, tie_breaker=1
    )
    return stun.encode(request, integrity_key=b"bench-password-bench", fingerprint=True)


@final
class _Workers:
    """The parley relay's worker processes, asked and counted as one relay."""

    def __init__(self, children: list[_Child]) -> None:
        self.children = children

    @property
    def pids(self) -> list[int]:
        return [child.proc.pid for child in self.children]

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """Ask every worker; the first one's answer."""
        answers = [child.ask(message) for child in self.children]
        return answers[0]

    def stats(self) -> dict[str, Any]:
        """CPU and packets of all workers together; ``tunnel`` once every one has the node's."""
        each = [child.stats() for child in self.children]
        total: dict[str, Any] = {key: sum(s[key] for s in each) for key in ("cpu", "up", "down")}
        total["tunnel"] = all(s["tunnel"] for s in each)
        total["workers_up"] = [s["up"] for s in each]
        return total


@final
@attrs.define
class _Servers:
    """The relay and echo node of each path."""

    relays: dict[str, _Child | _Workers] = attrs.Factory(dict)
    nodes: dict[str, _Child] = attrs.Factory(dict)
    public: dict[str, Address] = attrs.Factory(dict)


def _start(
    relay_cpus: set[int],
    other_cpus: set[int],
    stack: contextlib.ExitStack,
    workers: int,
    hold_ms: float,
) -> _Servers:
    servers = _Servers()
    ca_pem, ca_key_pem = make_ca("Parley bench CA")
    relay_creds = Credentials.issued(ca_pem, ca_key_pem, "relay", RELAY_ID)
    node_creds = Credentials.issued(ca_pem, ca_key_pem, "node", NODE_ID)

    def pems(creds: Credentials) -> dict[str, str]:
        return {
            "ca_pem": creds.ca_pem.decode(),
            "cert_pem": creds.cert_pem.decode(),
            "key_pem": creds.key_pem.decode(),
        }

    # All four start at once, so that their imports overlap; each reads its configuration
    # when it is ready, and some configurations need another child's port.
    # Worker 0 on the relay's core; more workers on the other cores (shared with the echo
    # node and the load generator: this machine may not have a core for each).
    cores = [relay_cpus, *({cpu} for cpu in sorted(other_cpus))] if relay_cpus else [set()]
    children = [_Child("serve-parley-relay", cores[index % len(cores)]) for index in range(workers)]
    for child in children:
        stack.callback(child.close)
    parley_relay = _Workers(children)
    parley_node = _Child("serve-parley-node", other_cpus)
    stack.callback(parley_node.close)
    bare_relay = _Child("serve-bare-relay", relay_cpus)
    stack.callback(bare_relay.close)
    bare_node = _Child("serve-bare-node", other_cpus)
    stack.callback(bare_node.close)
    reuse_port = workers > 1
    relay_config = {**pems(relay_creds), "hold_ms": hold_ms}
    children[0].configure({**relay_config, "port": 0, "reuse_port": reuse_port})
    bare_node.configure({})
    ready = children[0].read()
    tunnels = [ready["tunnel"]]
    for child in children[1:]:  # the first one's public port, shared
        child.configure({**relay_config, "port": ready["public"][1], "reuse_port": True})
        tunnels.append(child.read()["tunnel"])
    parley_node.configure({**pems(node_creds), "relays": tunnels})
    bare_relay.configure({"node": bare_node.read()["port"]})
    servers.relays = {"parley": parley_relay, "baseline": bare_relay}
    servers.nodes = {"parley": parley_node, "baseline": bare_node}
    servers.public["parley"] = (ready["public"][0], ready["public"][1])
    public = bare_relay.read()["public"]
    servers.public["baseline"] = (public[0], public[1])
    parley_node.read()
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not parley_relay.stats()["tunnel"]:  # the node has its tunnel; wait for the relay's
        if time.monotonic() > deadline:
            raise RuntimeError("the relay never saw the echo node's tunnel")
        time.sleep(0.01)
    return servers


def _machine_cpu() -> float:
    """CPU seconds every process has used, over all CPUs (steal included: a VM's neighbours)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


@final
@attrs.frozen
class _Mark:
    """A point in time: the relay's own CPU, and how much CPU everyone else had used."""

    at: float
    relay: dict[str, Any]
    others: float

    @classmethod
    def take(cls, relay: _Child | _Workers, node: _Child) -> _Mark:
        stats = relay.stats()
        times = os.times()
        pids = relay.pids if isinstance(relay, _Workers) else [relay.proc.pid]
        ours = sum(map(process_cpu, [*pids, node.proc.pid])) + times.user + times.system
        return cls(time.perf_counter(), stats, _machine_cpu() - ours)

    def worker_share(self, start: _Mark) -> float:
        each = [
            b - a
            for a, b in zip(
                start.relay.get("workers_up", [0]), self.relay.get("workers_up", [1]), strict=True
            )
        ]
        return max(each) / sum(each) if sum(each) > 0 else 1.0

    def cpu_since(self, start: _Mark) -> float:
        return float(self.relay["cpu"] - start.relay["cpu"])

    def others_since(self, start: _Mark) -> float:
        """Others' CPU seconds per second between the marks."""
        return max(self.others - start.others, 0.0) / max(self.at - start.at, 1e-9)


def _best_window(clients: _Clients, seconds: float) -> int:
    """The window of WINDOWS that made the most round trips, each tried ``seconds``."""
    if seconds <= 0:
        return WINDOWS[len(WINDOWS) // 2]
    rates = {}
    for window in WINDOWS:
        clients.settle(quiet=0.02)
        rates[window] = clients.closed_loop(seconds, window)[1]
    return max(WINDOWS, key=lambda window: rates[window])


def _run(config: str, sessions: int, run: int, servers: _Servers, params: Params) -> Figures:
    relay, node = servers.relays[config], servers.nodes[config]
    ids = [f"s{run:03d}{index:016d}" for index in range(sessions)]  # 20 characters, like real ids
    routes = [[session, run * 1_000_000 + index + 1] for index, session in enumerate(ids)]
    node.ask({"cmd": "routes", "sessions": routes})
    relay.ask({"cmd": "routes", "sessions": routes})
    clients = _Clients(sessions, servers.public[config])
    try:
        if config == "parley":
            first = [_check(mint_ufrag(session, NODE_ID, SECRET)) for session in ids]
        else:
            first = [b"\x80hello" for _ in ids]
        admitted = clients.admit(first)
        if admitted != sessions:
            raise RuntimeError(f"{config}: only {admitted} of {sessions} sessions got an echo")
        if params.window is None:
            window = _best_window(clients, params.warmup / len(WINDOWS))
        else:
            window = params.window
            clients.closed_loop(params.warmup, window)
        clients.settle()
        before = _Mark.take(relay, node)
        started = time.perf_counter()
        sent, received, stalls = clients.closed_loop(params.seconds, window)
        seconds = time.perf_counter() - started
        after = _Mark.take(relay, node)
        clients.settle()
        rate = params.latency_rate(sessions)
        quiet = _Mark.take(relay, node)
        latency_sent, rtts = clients.paced(params.seconds, rate, tag=2 * run + 1)
        done = _Mark.take(relay, node)
        grid_sent, grid_cpu, grid_others = 0, 0.0, 0.0
        grid_rtts: list[float] = []
        if params.node_tick_ms > 0:
            node.ask({"cmd": "tick", "seconds": params.node_tick_ms / 1000})
            clients.settle()
            start = _Mark.take(relay, node)
            grid_sent, grid_rtts = clients.paced(params.seconds, rate, tag=2 * run + 2)
            end = _Mark.take(relay, node)
            node.ask({"cmd": "tick", "seconds": 0.0})
            grid_cpu, grid_others = end.cpu_since(start), end.others_since(start)
    finally:
        clients.close()
    return Figures(
        config=config,
        sessions=sessions,
        window=window,
        seconds=seconds,
        sent=sent,
        round_trips=received,
        to_node=after.relay["up"] - before.relay["up"],
        to_client=after.relay["down"] - before.relay["down"],
        relay_cpu=after.cpu_since(before),
        worker_share=after.worker_share(before),
        stalls=stalls,
        others=after.others_since(before),
        latency_rate=rate,
        latency_sent=latency_sent,
        latency_received=len(rtts),
        p50=percentile(rtts, 50),
        p99=percentile(rtts, 99),
        latency_relay_cpu=done.cpu_since(quiet),
        latency_others=done.others_since(quiet),
        grid_sent=grid_sent,
        grid_received=len(grid_rtts),
        grid_p50=percentile(grid_rtts, 50),
        grid_p99=percentile(grid_rtts, 99),
        grid_relay_cpu=grid_cpu,
        grid_others=grid_others,
    )


def _raise_fd_limit(needed: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        limit = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def machine() -> dict[str, object]:
    import aioquic

    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "trio": trio.__version__,
        "aioquic": aioquic.__version__,
        "kernel": platform.release(),
    }


def measure(params: Params) -> BenchResult:
    """Start the servers, run every session count on both paths, stop the servers."""
    started = time.perf_counter()
    _raise_fd_limit(max(params.sessions) + 256)
    rows: list[Figures] = []
    info = machine()
    with split_cores() as (relay_cpus, other_cpus), contextlib.ExitStack() as stack:
        info["pinned"] = bool(relay_cpus)
        servers = _start(relay_cpus, other_cpus, stack, params.workers, params.hold_ms)
        gc.collect()
        gc.disable()  # keep the load generator's collector out of the windows
        try:
            runs = itertools.count()
            left = len(params.sessions) * len(CONFIGS)
            for sessions in params.sessions:
                for config in CONFIGS:
                    began = time.perf_counter()
                    row = _run(config, sessions, next(runs), servers, params)
                    took = time.perf_counter() - began
                    left -= 1
                    # Again only if it and the rows still to come (guessed as long) fit.
                    projected = time.perf_counter() - started + took * (1 + left)
                    if row.busy > BUSY and projected < params.budget:
                        again = _run(config, sessions, next(runs), servers, params)
                        row = min(row, again, key=lambda f: f.busy)
                        row = attrs.evolve(row, attempts=2)
                    rows.append(row)
        finally:
            gc.enable()
    return BenchResult(info, params, rows, time.perf_counter() - started)


# --- output ----------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return "-" if not math.isfinite(seconds) else f"{seconds * 1000:.3f}"


def _count(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:,.0f}"


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs > 0 else math.nan


def render(result: BenchResult) -> str:
    m, p = result.machine, result.params
    window = "the best of " + "/".join(map(str, WINDOWS)) if p.window is None else str(p.window)
    lines = [
        f"machine: nproc {m['nproc']}, {m['cpu_model']}, python {m['python']}, "
        f"trio {m['trio']}, aioquic {m['aioquic']}, linux {m['kernel']}",
        f"parley relay: relay.tunnel_hold_ms {p.hold_ms:g}",
        (
            "relay pinned to one core; its echo node and the load generator to the other(s)"
            if p.workers == 1
            else f"{p.workers} relay workers on one public port (SO_REUSEPORT), worker 0 pinned"
            " to one core and the others to the other cores, which they share with the echo"
            " node and the load generator; cpu and pkts/core: all workers together"
        )
        if m["pinned"]
        else "one cpu: relay, echo node and load generator share it (nothing pinned)",
        f"{PAYLOAD_SIZE}-byte payloads, one client socket per session, loopback. throughput:"
        f" {window} datagrams in flight for {p.seconds:g} s; latency: {SESSION_PPS:g} pps per"
        f" session (at most {p.latency_cap:g} in all) for {p.seconds:g} s",
        "c->n: client datagrams the relay forwarded to the node per second; rt: round trips per"
        " second; cpu: relay CPU seconds per second; pkts/core: datagrams forwarded (either"
        " direction) per relay CPU second at full load; paced: the latency phase's rate (round"
        " trips per second) and the relay's CPU at it; p50/p99: round-trip time through relay"
        " and echo node at that paced rate, ms; other: CPU (cores) that other processes on the"
        " machine used, the most of the row's two windows",
        "",
    ]
    header = (
        f"{'':<18}{'-- throughput (closed loop) -----------------':<45}"
        f"{'-- latency (paced) -------------':<32}"
    )
    columns = (
        f"{'config':<9}{'sessions':>9}{'win':>5}{'c->n pps':>10}{'rt pps':>9}{'cpu':>6}"
        f"{'pkts/core':>11}{'paced':>10}{'cpu':>6}{'p50 ms':>8}{'p99 ms':>8}{'other':>7}"
    )
    lines += [header, columns, "-" * len(columns)]
    notes = []
    for f in result.rows:
        lines.append(
            f"{f.config:<9}{f.sessions:>9,}{f.window:>5}{_count(f.to_node_pps):>10}"
            f"{_count(f.round_trip_pps):>9}{f.relay_busy:>6.2f}"
            f"{_count(f.packets_per_core):>11}{f.latency_rate:>10,.0f}"
            f"{f.latency_relay_cpu / p.seconds:>6.2f}"
            f"{_ms(f.p50):>8}{_ms(f.p99):>8}{f.busy:>7.2f}{'*' if f.attempts > 1 else ''}"
        )
        if p.workers > 1 and f.config == "parley":
            notes.append(
                f"parley x {f.sessions}: the busiest of {p.workers} workers forwarded"
                f" {f.worker_share:.0%} of the client datagrams"
            )
        lost = f.latency_sent - f.latency_received
        if lost or f.stalls:
            notes.append(
                f"{f.config} x {f.sessions}: {lost} of {f.latency_sent} paced datagrams lost;"
                f" throughput loop stalled {f.stalls} times ({STALL * 1000:.0f} ms each)"
            )
    lines.append("")
    for n in p.sessions:
        ours, theirs = result.row("parley", n), result.row("baseline", n)
        if ours is None or theirs is None:
            continue
        loaded = _ratio(ours.cpu_per_packet, theirs.cpu_per_packet)
        paced = _ratio(ours.latency_cpu_per_packet, theirs.latency_cpu_per_packet)
        bound = ""
        if ours.relay_busy < SATURATED * p.workers:
            bound = (
                f" (at full load the relay used {ours.relay_busy:.2f} of"
                f" {'a core' if p.workers == 1 else f'{p.workers} cores'}: the echo node and the"
                " load generator, not the relay, bounded the loop)"
            )
        lines.append(
            f"{n:>5,} sessions: the parley path adds {_ms(ours.p50 - theirs.p50)} ms at p50"
            f" and {_ms(ours.p99 - theirs.p99)} ms at p99; its relay CPU per packet is"
            f" {loaded:.1f}x the bare forwarder's at full load, {paced:.1f}x paced{bound}"
        )
    if p.node_tick_ms > 0:
        lines += ["", *_render_grid(result)]
    busy = max((f.busy for f in result.rows), default=0.0)
    if any(f.attempts > 1 for f in result.rows):
        notes.append("*: measured twice (the first run had a busy machine); the quieter run kept")
    if busy > BUSY:
        notes.append(
            f"other processes used up to {busy:.2f} cores during the windows: figures are noisy"
        )
    lines += notes
    lines.append(f"total {result.elapsed:.1f} s")
    return "\n".join(lines)


def _render_grid(result: BenchResult) -> list[str]:
    """Phase 3: the paced load with both echo nodes sending on a grid, as a node does."""
    p = result.params
    lines = [
        f"paced, the echo nodes sending on a {p.node_tick_ms:g} ms grid as a node does (round"
        " trips include the wait for the grid point):",
        f"{'sessions':>8}{'paced':>8}{'parley cpu':>12}{'bare cpu':>10}{'ratio':>7}"
        f"{'parley p50/p99 ms':>20}{'bare p50/p99 ms':>18}",
    ]
    for n in p.sessions:
        ours, theirs = result.row("parley", n), result.row("baseline", n)
        if ours is None or theirs is None:
            continue
        ratio = _ratio(ours.grid_cpu_per_packet, theirs.grid_cpu_per_packet)
        lines.append(
            f"{n:>8,}{ours.latency_rate:>8,.0f}{ours.grid_relay_cpu / p.seconds:>12.2f}"
            f"{theirs.grid_relay_cpu / p.seconds:>10.2f}{ratio:>6.1f}x"
            f"{_ms(ours.grid_p50) + ' / ' + _ms(ours.grid_p99):>20}"
            f"{_ms(theirs.grid_p50) + ' / ' + _ms(theirs.grid_p99):>18}"
        )
        lost = ours.grid_sent - ours.grid_received + theirs.grid_sent - theirs.grid_received
        if lost:
            lines.append(f"{'':>8}{lost} of the phase's datagrams lost")
    return lines


def _sessions(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of session counts: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("session counts must be positive")
    return values


def main(argv: Sequence[str] | None = None) -> BenchResult:
    """Command line entry point; prints the table (or JSON) and returns the figures."""
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.relay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sessions", type=_sessions, help="session counts, comma-separated (default 1,100,1000)"
    )
    parser.add_argument(
        "--seconds", type=float, help="each measured window (default 3; --quick 0.75)"
    )
    parser.add_argument("--warmup", type=float, help="seconds of load before a window")
    parser.add_argument(
        "--window", type=int, help="datagrams in flight (default: the best of 16, 64, 256)"
    )
    parser.add_argument(
        "--latency-cap",
        type=float,
        default=2000.0,
        help="most datagrams per second in all in the latency phase (2000)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="parley relay workers on one port (default 1)"
    )
    parser.add_argument(
        "--hold-ms",
        type=float,
        default=RelaySettings().tunnel_hold_ms,
        help="the parley relay's relay.tunnel_hold_ms (default: the relay's default)",
    )
    parser.add_argument(
        "--node-tick-ms",
        type=float,
        default=20.0,
        help="the echo nodes' grid in a second paced phase, as node.media_tick_ms (20; 0: none)",
    )
    parser.add_argument("--quick", action="store_true", help="short windows, under 20 s")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    quick = args.quick
    params = Params(
        sessions=args.sessions or (1, 100, 1000),
        seconds=args.seconds if args.seconds is not None else (0.75 if quick else 3.0),
        warmup=args.warmup if args.warmup is not None else (0.3 if quick else 0.9),
        window=args.window,
        latency_cap=args.latency_cap,
        budget=14.0 if quick else 55.0,
        workers=args.workers,
        hold_ms=args.hold_ms,
        node_tick_ms=args.node_tick_ms,
    )
    bad_window = params.window is not None and params.window < 1
    if params.seconds <= 0 or params.warmup < 0 or bad_window or params.latency_cap <= 0:
        parser.error("--seconds and --latency-cap must be > 0, --warmup >= 0, --window >= 1")
    if params.workers < 1:
        parser.error("--workers must be at least 1")
    if not 0 <= params.hold_ms <= MAX_HOLD * 1000:
        parser.error(f"--hold-ms must be between 0 and {MAX_HOLD * 1000:g}")
    if not 0 <= params.node_tick_ms <= MAX_NODE_TICK_MS:
        parser.error(f"--node-tick-ms must be between 0 and {MAX_NODE_TICK_MS:g}")
    result = measure(params)
    print(json.dumps(result.as_dict(), indent=2) if args.json else render(result))
    return result


if __name__ == "__main__":
    try:
        if sys.argv[1:2] and sys.argv[1].startswith("serve-"):
            serve(sys.argv[1])
        else:
            main()
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # the parent went away
        sys.exit(1)
