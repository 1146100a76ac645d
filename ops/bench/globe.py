"""A simulated globe on one machine: three regions, a relay and a node in each, etcd in one, the
WAN between them emulated in user space (ops/wan.py), aiortc clients in every region.

Layout (region r = 1, 2, 3; names in :data:`REGIONS`):

* clients of region r send from ``127.0.r.50`` (:func:`ops.wan.host_address`); node r's QUIC
  tunnels leave from ``127.0.r.10``;
* relay r binds ``127.3.r.1`` (public port and tunnel) and advertises its emulator fronts:
  ``127.1.r.1:PORT`` to clients (``relay.advertise``) and ``127.1.r.2:PORT`` to nodes
  (``relay.tunnel_advertise``), so every client's media and every relay↔node tunnel crosses the
  emulated WAN with the round-trip time of :data:`RTTS` between the two ends' regions;
* etcd (TCP) and signaling (HTTP) are on plain loopback: only the media path is delayed.

Every relay and node gets its region (``relay.region``, ``node.region``) and the run's
``node.steering``; the clients carry their region in the access token (a ``region`` claim) and
in :data:`REGION_HEADER`, which the nodes trust (``node.region_header``).

Used by ``tests/globe/globe_scenario.py`` (in a private network namespace) and by
``ops/bench/regions.py``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Final

import attrs
import trio

from ops.bench.common import ADMISSION
from ops.certs import init_cluster
from ops.etcdserver import EtcdServer, free_port
from ops.status import gather_status
from ops.tokens import create_token
from ops.wan import Front, Matrix, Wan, host_address
from relay.settings import ClusterSettings
from relay.tunnel.certs import issue_files
from storage.etcd import open_etcd
from storage.keys import Keyspace

__all__ = [
    "REGIONS",
    "REGION_HEADER",
    "RTTS",
    "Globe",
    "GlobeParams",
    "front_region",
    "run_globe",
]

ROOT: Final = Path(__file__).resolve().parents[2]
#: region number → the name daemons and clients are given
REGIONS: Final = {1: "eu", 2: "us", 3: "ap"}
#: round-trip times between regions, seconds: 10 ms inside one, 60-150 ms between
RTTS: Final = {
    (1, 1): 0.010,
    (2, 2): 0.010,
    (3, 3): 0.010,
    (1, 2): 0.060,
    (2, 3): 0.100,
    (1, 3): 0.150,
}
#: the header a load balancer or CDN in front of signaling would set with the client's region
REGION_HEADER: Final = "X-Parley-Client-Region"
PREFIX: Final = "/parley-globe"
#: the region whose machine runs etcd (not emulated: TCP does not cross the emulator)
ETCD_REGION: Final = 1
READY_WITHIN: Final = 60.0
#: how long ``during`` may go on after the calls are over
DURING_WITHIN: Final = 60.0


def front_region(address: tuple[str, int] | str) -> int | None:
    """The region of an emulator front (``127.1.r.n``), e.g. a selected pair's remote address."""
    host = address if isinstance(address, str) else address[0]
    parts = host.split(".")
    if len(parts) == 4 and parts[:2] == ["127", "1"] and parts[2].isdigit():
        return int(parts[2])
    return None


@attrs.frozen
class GlobeParams:
    clients_per_region: int = 2
    #: more clients per region that nominate by priority, as browsers do (ops/bench/globe_calls.py)
    priority_clients: int = 0
    #: seconds each call talks once set up (the echo is measured over it)
    talk: float = 8.0
    #: node.steering for every node (passed only where the setting exists)
    steering: bool = False
    seed: int = 0


def _udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Globe:
    """etcd, the WAN emulator, a relay and a node per region; ``with Globe(work, params):``."""

    def __init__(
        self, work: Path, params: GlobeParams, *, default_region: int | None = None
    ) -> None:
        self.work = work
        self.params = params
        self.certs = work / "certs"
        self.logs = work / "logs"
        self.matrix = Matrix.of_rtts(RTTS)
        self.wan = Wan(self.matrix, seed=params.seed, default_region=default_region, realtime=True)
        self.etcd: EtcdServer | None = None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []
        #: relay region → its client front and tunnel front
        self.fronts: dict[int, tuple[Front, Front]] = {}
        #: node region → its WHIP URL, and its demo page
        self.whips: dict[int, str] = {}
        self.pages: dict[int, str] = {}

    @property
    def endpoint(self) -> str:
        assert self.etcd is not None
        return self.etcd.endpoint

    def __enter__(self) -> Globe:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def token(self, region: int, subject: str) -> str:
        return create_token(
            ClusterSettings(certs=str(self.certs)), subject=subject, region=REGIONS[region]
        )

    def _start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        init_cluster(self.certs)
        for region in REGIONS:
            issue_files(self.certs, "relay", f"relay-{REGIONS[region]}")
            issue_files(self.certs, "node", f"node-{REGIONS[region]}")
        self.etcd = EtcdServer(
            self.work / "etcd", host=host_address(ETCD_REGION, 2), die_with_us=True
        )
        self.etcd.start()
        self.wan.start()
        for region, name in REGIONS.items():
            inside = f"127.3.{region}.1"
            public, tunnel = _udp_port(inside), _udp_port(inside)
            media = self.wan.add_front(region, (inside, public), index=1)
            tunnel_front = self.wan.add_front(region, (inside, tunnel), index=2)
            self.fronts[region] = (media, tunnel_front)
            env = {
                "PARLEY_RELAY_LISTEN": f"{inside}:{public}",
                "PARLEY_RELAY_ADVERTISE": "{}:{}".format(*media.address),
                "PARLEY_RELAY_TUNNEL_HOST": inside,
                "PARLEY_RELAY_TUNNEL_PORT": str(tunnel),
                "PARLEY_RELAY_TUNNEL_ADVERTISE": "{}:{}".format(*tunnel_front.address),
            }
            env["PARLEY_RELAY_REGION"] = name
            self._spawn(f"relay-{name}", ["relay", "--id", f"relay-{name}"], env)
        for region, name in REGIONS.items():
            port = free_port()
            env = {"PARLEY_NODE_TUNNEL_HOST": host_address(region, 10), "PARLEY_NODE_AGENT": "echo"}
            env.update(ADMISSION)
            env["PARLEY_NODE_REGION"] = name
            env["PARLEY_NODE_STEERING"] = "true" if self.params.steering else "false"
            env["PARLEY_NODE_REGION_HEADER"] = REGION_HEADER
            argv = ["node", "--id", f"node-{name}", "--media", "relay"]
            self._spawn(f"node-{name}", [*argv, "--signaling-port", str(port)], env)
            self.whips[region] = f"http://127.0.0.1:{port}/v1/session"
            self.pages[region] = f"http://127.0.0.1:{port}/"
        self.wait_ready()

    def _spawn(self, name: str, argv: list[str], extra: dict[str, str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
        env.update(
            PARLEY_CONFIG="/dev/null",
            PARLEY_CLUSTER_ETCD=self.endpoint,
            PARLEY_CLUSTER_PREFIX=PREFIX,
            PARLEY_CLUSTER_CERTS=str(self.certs),
            **extra,
        )
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self._files.append(log)
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", *argv, "--parent-pid", str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )

    def status(self) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            async with open_etcd(self.endpoint, rpc_timeout=10.0) as etcd:
                return await gather_status(etcd, Keyspace(PREFIX))

        return trio.run(read)

    def wait_ready(self) -> dict[str, Any]:
        """Until every relay is registered at its tunnel front with a tunnel from every node."""
        deadline = time.monotonic() + READY_WITHIN
        last: dict[str, Any] = {}
        want_nodes = {f"node-{n}" for n in REGIONS.values()}
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    code = process.returncode
                    raise RuntimeError(f"{name} exited with {code}: {self.tail(name)}")
            with contextlib.suppress(Exception):
                last = self.status()
                relays = last["relays"]
                if len(relays) == len(REGIONS) and all(
                    set(r.get("tunnels", [])) == want_nodes for r in relays
                ):
                    return last
            time.sleep(0.3)
        raise RuntimeError(f"the globe did not come up within {READY_WITHIN:.0f} s: {last}")

    def tail(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.is_file() else ""

    def kill(self, name: str) -> None:
        """SIGKILL one daemon (``relay-eu``...)."""
        self.processes[name].send_signal(signal.SIGKILL)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        for log in self._files:
            log.close()
        self.wan.stop()
        if self.etcd is not None:
            self.etcd.stop()


def run_globe(
    work: Path,
    params: GlobeParams,
    during: Callable[[Globe, threading.Event], dict[str, Any]] | None = None,
    *,
    default_region: int | None = None,
) -> dict[str, Any]:
    """Start a globe, call it from every region at once (a process per region), and return
    what each client saw with the emulator's own figures.

    ``during`` runs in a thread beside the calls (a browser, a relay kill): it is given the
    globe and an event set when the region's calls are over, and what it returns is the
    result's ``during``. ``default_region``: the region of senders outside every region's
    range (a browser that sends from 127.0.0.1); ``during`` may instead place such senders
    one flow at a time (``globe.wan.place``), as tests/globe/globe_browsers.py does."""
    from ops.bench.globe_calls import region_process

    with Globe(work, params, default_region=default_region) as globe:
        calls_done = threading.Event()
        extra: dict[str, Any] = {}

        def beside() -> None:
            assert during is not None
            try:
                extra.update(during(globe, calls_done))
            except Exception:
                extra["error"] = traceback.format_exc()

        thread = threading.Thread(target=beside, daemon=True)
        if during is not None:
            thread.start()
        start = time.time() + 3.0  # the region processes take a moment to import aiortc
        jobs = [
            (
                region,
                globe.whips[region],
                globe.token(region, f"globe-{REGIONS[region]}"),
                params.clients_per_region,
                start,
                params.talk,
                params.priority_clients,
            )
            for region in REGIONS
        ]
        context = multiprocessing.get_context("spawn")
        with context.Pool(len(jobs)) as pool:
            outcomes = pool.map(region_process, jobs, chunksize=1)
        calls_done.set()
        if during is not None:
            thread.join(DURING_WITHIN)
            if thread.is_alive():
                extra.setdefault("error", f"still running after {DURING_WITHIN:.0f} s")
        status = globe.status()
        result: dict[str, Any] = {
            "steering": params.steering,
            "regions": REGIONS,
            "fronts": {r: [f.address for f in fronts] for r, fronts in globe.fronts.items()},
            "wan_lateness": globe.wan.lateness(),
            "wan_realtime": globe.wan.realtime_applied,
            "wan_counters": dict(globe.wan.counters),
            "relays": {r["id"]: r.get("counters", {}) for r in status["relays"]},
            "errors": [o["error"] for o in outcomes if "error" in o],
            "clients": [c for o in outcomes for c in o.get("clients", [])],
            "during": dict(extra),
        }
    for client in result["clients"]:
        used = client.get("relay_region")
        client["first_hop_rtt_ms"] = (
            round(1000 * globe.matrix.rtt(client["region"], used), 1) if used else None
        )
        client["local"] = used == client["region"]
    return result


@contextlib.contextmanager
def scratch(prefix: str = "parley-globe-") -> Iterator[Path]:
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
