"""``parley up``: the embedded default cluster on one machine.

Starts a local etcd (data under ``<data_dir>/etcd``; with ``up.etcd_members`` 3 or 5, a cluster
of that many members under ``<data_dir>/etcd-1``, ``etcd-2``, ...), ``up.relays`` relays (the
cluster's public UDP ports, 127.0.0.1:``up.relay_port`` and up) and ``up.nodes`` node daemons as
child processes, restarts any that dies (each etcd member included, on its own data and ports),
prints what runs where, and on Ctrl-C or SIGTERM stops the nodes (SIGTERM, so they release what
they own), then the relays, then etcd. Nodes and relays get every member's endpoint.

One ``parley up`` per data directory: it holds an exclusive lock on ``<data_dir>/up.lock`` (which
names its pid) for as long as it runs, and a second one refuses to start. Every child dies with it,
even when it is SIGKILLed (ops/children.py). Each node keeps its signaling port across restarts
(``up.signaling_port`` and up, or ports chosen once at start), so the printed demo URLs stay true,
and its ops port (``up.ops_port``: relays first, then nodes; GET /metrics for Prometheus), so a
scrape configuration written from what it prints stays true too. It also serves the ops page
(``ops/opsview.py``: live plots of the whole cluster, read from etcd) on ``up.opsview_listen``
(127.0.0.1:8770 by default) and prints its URL after the demo pages'.

With relays, the nodes take media only through them (``node.media = "relay"``). The cluster CA,
the hint secret and every member's certificate are made under ``<data_dir>/certs`` on first use
(``parley certs``), unless ``cluster.certs`` names another directory.

etcd takes only clients with a certificate of that CA (``up.etcd_tls``, on by default): its
endpoints are ``https://``, every relay and node presents its own member certificate, and
``parley up`` itself (like ``parley status``) the operator's, ``parley-cli``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, final

import attrs
import trio

from ops import children
from ops.certs import (
    init_cluster,
    issue_etcd_server,
    issue_operator,
    write_cluster_key,
    write_token_key,
)
from ops.config import Config
from ops.etcdserver import EtcdCluster, EtcdServer, EtcdServerError, EtcdServerTLS, free_port
from ops.opsview import OpsView, parse_listen
from ops.status import format_status, gather_status
from relay.settings import (
    CLUSTER_KEY_FILE,
    ETCD_SERVER_CERT,
    OPERATOR_CERT,
    TOKEN_KEYS_DIR,
    ClusterSettings,
)
from relay.tunnel.certs import issue_files
from storage.etcd import EtcdError, EtcdTLS, open_etcd
from storage.keys import Keyspace

log = logging.getLogger("parley.up")


@final
@attrs.define
class Child:
    """One supervised child process."""

    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    #: settings given to this child on top of our own environment
    env: dict[str, str] = attrs.field(factory=dict)
    #: where Prometheus scrapes it (its ops port, the same across restarts)
    metrics: str = ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


def free_port_check(port: int, host: str = "127.0.0.1") -> None:
    """Raise OSError if nobody may listen on ``host:port`` now."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the node's listener
        probe.bind((host, port))


class AlreadyRunning(Exception):
    """Another ``parley up`` holds the data directory."""


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[IO[str]]:
    """Hold ``<data_dir>/up.lock`` exclusively (it names our pid) while the block runs.

    The kernel drops the lock when the process ends, however it ends, so a stale file never
    blocks the next run. Raises :class:`AlreadyRunning` naming the holder's pid.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "up.lock"
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise AlreadyRunning(
                f"another `parley up` (pid {holder}) is running with data directory {data_dir}; "
                "stop it first, or use another --data-dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield lock


@final
class LocalCluster:
    """etcd plus node processes, supervised from one Trio task."""

    def __init__(self, config: Config, *, stdout: Any = None) -> None:
        self.config = config
        self.data_dir = Path(config.up.data_dir).resolve()
        self.certs = Path(config.cluster.certs or self.data_dir / "certs").resolve()
        self.etcd = EtcdCluster(
            self.data_dir,
            config.up.etcd_members,
            client_port=config.up.etcd_client_port,
            peer_port=config.up.etcd_peer_port,
            log_dir=self.data_dir / "logs",
            die_with_us=True,
            tls=EtcdServerTLS.in_dir(self.certs) if config.up.etcd_tls else None,
        )
        #: every member's client endpoint, ``host:port,...`` (``https://host:port,...``: TLS)
        self.endpoint = self.etcd.endpoint
        #: the cluster as our children and the operator's commands reach it
        self.cluster = attrs.evolve(config.cluster, etcd=self.endpoint, certs=str(self.certs))
        self._operator_tls: EtcdTLS | None = None
        self.etcd_restarts = 0
        ops = config.up.ops_port
        #: relay-1's, relay-2's, ..., then node-1's, ... ops ports (GET /metrics)
        self.ops_ports = [
            ops + i if ops else free_port() for i in range(config.up.relays + config.up.nodes)
        ]
        self.relays = [self._relay_child(i + 1) for i in range(config.up.relays)]
        base = config.up.signaling_port
        self.signaling_ports = [base + i if base else free_port() for i in range(config.up.nodes)]
        self.nodes = [self._node_child(i + 1) for i in range(config.up.nodes)]
        self.children = self.relays + self.nodes
        self.out = stdout or sys.stdout
        self._stopping = False
        self.ready = trio.Event()
        #: where the ops page is served (up.opsview_listen), once it is
        self.opsview_url = ""

    def _argv(self, command: str, name: str, ops_port: int) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "ops.cli",
            command,
            "--id",
            name,
            "--etcd",
            self.endpoint,
            "--prefix",
            self.config.cluster.prefix,
            # A child of `parley up` stops when `parley up` is gone, even if it was killed.
            "--parent-pid",
            str(os.getpid()),
            # its own ops port (GET /metrics), kept across restarts
            "--ops-listen",
            f"127.0.0.1:{ops_port}",
        ]
        if self.config.log.json:
            argv.append("--log-json")
        return argv

    def _relay_child(self, index: int) -> Child:
        name = f"relay-{index}"
        listen = f"127.0.0.1:{self.config.up.relay_port + index - 1}"
        ops = self.ops_ports[index - 1]
        argv = [*self._argv("relay", name, ops), "--certs", str(self.certs), "--listen", listen]
        return Child(name, argv, self.data_dir / "logs" / f"{name}.log", metrics=_metrics(ops))

    def _node_child(self, index: int) -> Child:
        name = f"node-{index}"
        ops = self.ops_ports[self.config.up.relays + index - 1]
        argv = [
            *self._argv("node", name, ops),
            "--lease-ttl",
            str(self.config.node.lease_ttl),
            # the same port after a restart: the demo URL printed at start stays true
            "--signaling-port",
            str(self.signaling_ports[index - 1]),
            # every node verifies access tokens with the cluster's token keys
            "--certs",
            str(self.certs),
        ]
        if self.relays:
            argv += ["--media", "relay"]
        env = {
            # the demo page gets a short-lived token from the node that serves it (loopback only)
            "PARLEY_NODE_DEMO_TOKENS": "true",
        }
        if self.config.up.ledger:
            # every node writes which SRTP indexes it decrypted: `parley chaos` judges them
            env["PARLEY_NODE_LEDGER_DIR"] = str(self.data_dir / "ledger")
        log_path = self.data_dir / "logs" / f"{name}.log"
        return Child(name, argv, log_path, env=env, metrics=_metrics(ops))

    def _make_certs(self) -> None:
        """The CA and hint secret if missing, and a certificate for every member."""
        if not (self.certs / "ca.pem").exists():
            init_cluster(self.certs)
            self.say(
                f"certs    made a cluster CA, hint secret, cluster key and etcd's certificates "
                f"in {self.certs}"
            )
        if not (self.certs / f"{ETCD_SERVER_CERT}.pem").exists():  # ... and from before TLS
            issue_etcd_server(self.certs)
            self.say(f"certs    made etcd's certificate in {self.certs}")
        if not (self.certs / f"{OPERATOR_CERT}.pem").exists():
            issue_operator(self.certs)
            self.say(
                f"certs    made the operator's etcd certificate ({OPERATOR_CERT}) in {self.certs}"
            )
        if not (self.certs / CLUSTER_KEY_FILE).exists():  # a data dir from before moves
            write_cluster_key(self.certs)
        if not any((self.certs / TOKEN_KEYS_DIR).glob("*.key")):  # ... and from before tokens
            write_token_key(self.certs)
            self.say(f"certs    made an access-token key in {self.certs / TOKEN_KEYS_DIR}")
        for child in self.children:
            role, _, _ = child.name.rpartition("-")
            if not (self.certs / f"{child.name}.pem").exists():
                issue_files(self.certs, "relay" if role == "relay" else "node", child.name)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    async def run(
        self, *, task_status: trio.TaskStatus[LocalCluster] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(data_dir_lock(self.data_dir))
            except AlreadyRunning as exc:
                raise SystemExit(f"parley up: {exc}") from None
            self._check_ports()
            await self._run(task_status)

    def _check_ports(self) -> None:
        """Refuse at once, not with nodes that restart forever, when a signaling or ops port is
        taken."""
        for port in self.signaling_ports:
            try:
                free_port_check(port)
            except OSError as exc:
                raise SystemExit(
                    f"parley up: signaling port 127.0.0.1:{port} is busy ({exc.strerror}); "
                    "set up.signaling_port (--signaling-port; 0: any free ports)"
                ) from None
        for port in self.ops_ports if self.config.up.ops_port else ():
            try:
                free_port_check(port)
            except OSError as exc:
                raise SystemExit(
                    f"parley up: ops port 127.0.0.1:{port} is busy ({exc.strerror}); "
                    "set up.ops_port (--ops-port; 0: any free ports)"
                ) from None

    async def _run(self, task_status: trio.TaskStatus[LocalCluster]) -> None:
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        await trio.to_thread.run_sync(self._make_certs)
        try:
            # Forked from this (the loop's) thread, so that etcd dies with us (ops/children.py).
            self.etcd.spawn()
            await trio.to_thread.run_sync(self.etcd.wait_healthy, 20.0)
        except EtcdServerError as exc:
            await trio.to_thread.run_sync(self.etcd.stop)
            raise SystemExit(f"parley up: {exc}") from None
        for member in self.etcd.members:
            label = self._label(member)
            self.say(f"{label:<8} {member.endpoint}  pid {member.pid}  data {member.data_dir}")
        if self.etcd.tls is not None:
            self.say(f"{'':<8} TLS: only clients with a certificate of {self.certs / 'ca.pem'}")
        try:
            async with trio.open_nursery() as nursery:
                for member in self.etcd.members:
                    nursery.start_soon(self._supervise_etcd, member)
                for child in self.children:
                    await nursery.start(self._supervise, child)
                    self.say(
                        f"{child.name:<8} pid {child.pid}  log {child.log_path}  "
                        f"metrics {child.metrics}"
                    )
                await self._wait_registered()
                await nursery.start(self._serve_opsview)
                self.ready.set()
                task_status.started(self)
                nursery.start_soon(self._stop_on_signal, nursery.cancel_scope)
                await self.print_status()
                self.say(
                    f"\nparley is up. `{self.status_command()}` shows the cluster; Ctrl-C stops it."
                )
        finally:
            with trio.CancelScope(shield=True):
                await self._stop_in_order()
            self.say("parley stopped.")

    async def _serve_opsview(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The ops page (ops/opsview.py) on ``up.opsview_listen``, reading our etcd as the
        operator; a busy address costs the page (with a word why), never the cluster."""
        listen = self.config.up.opsview_listen
        if not listen:
            task_status.started()
            return
        host, port = parse_listen(listen)
        started = False
        try:
            async with (
                open_etcd(self.endpoint, tls=self.operator_tls()) as etcd,
                trio.open_nursery() as nursery,
            ):
                view = OpsView(etcd, Keyspace(self.config.cluster.prefix))
                try:
                    await nursery.start(view.run, host, port)
                except OSError as exc:
                    self.say(
                        f"ops page: cannot serve on {listen} ({exc.strerror or exc}); set "
                        "up.opsview_listen (--opsview-listen; port 0: any free, '': none)"
                    )
                    return
                self.opsview_url = view.url
                started = True
                task_status.started()
        except* Exception as group:
            # the page is for a person watching: its failure must not stop the cluster
            log.error("ops page stopped", exc_info=group)
            self.say(f"ops page stopped: {group.exceptions[0]!r}")
            self.opsview_url = ""
        finally:
            if not started:
                task_status.started()

    def _label(self, member: EtcdServer) -> str:
        """``etcd`` alone, ``etcd-1``, ``etcd-2``... in a cluster (as their data directories)."""
        return member.data_dir.name

    async def _start_member(self, member: EtcdServer) -> None:
        # Forked from this (the loop's) thread, so that etcd dies with us (ops/children.py).
        member.spawn()
        await trio.to_thread.run_sync(member.wait_healthy, 20.0)

    async def _supervise_etcd(self, member: EtcdServer) -> None:
        """Restart an etcd member on its data and ports when it exits; the nodes' and relays'
        leases and watches survive an etcd restart (storage/etcd.py, storage/lease.py), and with
        several members they carry on through the others meanwhile."""
        label = self._label(member)
        backoff = 0.5
        while True:
            process = member.process
            if process is None:
                return
            code = await children.wait(process)
            if self._stopping:
                return
            self.etcd_restarts += 1
            self.say(
                f"{label} exited with {code}; restarting it on the same data in {backoff:.1f}s "
                f"({member.log_file})"
            )
            await trio.sleep(backoff)
            try:
                await self._start_member(member)
            except EtcdServerError as exc:
                self.say(f"{label} did not come back: {exc}")
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            self.say(f"{label:<8} {member.endpoint}  pid {member.pid}  restarted")

    async def _supervise(self, child: Child, *, task_status: trio.TaskStatus[None]) -> None:
        backoff = 0.5
        first = True
        while True:
            # Forked from this (the loop's) thread: the child gets SIGTERM from the kernel if
            # `parley up` dies, even by SIGKILL (ops/children.py). Opening a local log file
            # here blocks no longer than the fork itself does.
            with open(child.log_path, "ab") as log_file:  # noqa: ASYNC230
                child.process = children.spawn(
                    child.argv, stdout=log_file, stderr=log_file, env={**os.environ, **child.env}
                )
            started = trio.current_time()
            if first:
                task_status.started()
                first = False
            code = await children.wait(child.process)
            if self._stopping:
                return
            child.restarts += 1
            # a child that ran a while before it exited starts over from the short wait
            backoff = 0.5 if trio.current_time() - started > 30.0 else backoff
            self.say(
                f"{child.name} exited with {code}; restarting in {backoff:.1f}s ({child.log_path})"
            )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            if child in self.nodes:
                index = self.nodes.index(child)
                url = f"http://127.0.0.1:{self.signaling_ports[index]}/"
                self.say(f"{child.name} restarted; its demo page is still {url}")

    def status_command(self) -> str:
        """The `parley status` that reaches this cluster from here (flags where the defaults
        would not find it)."""
        words = ["parley status"]
        if self.endpoint != ClusterSettings().etcd:
            words += ["--etcd", self.endpoint]
        if self.certs != Path(".parley/certs").resolve():
            words += ["--certs", str(self.certs)]
        if self.config.cluster.prefix != ClusterSettings().prefix:
            words += ["--prefix", self.config.cluster.prefix]
        return " ".join(words)

    def operator_tls(self) -> EtcdTLS | None:
        """What `parley up` presents to its etcd: the operator's certificate (None: plain)."""
        if self._operator_tls is None:
            self._operator_tls = self.cluster.etcd_tls("operator")
        return self._operator_tls

    async def _wait_registered(self) -> None:
        wanted = {c.name for c in self.children}
        keys = Keyspace(self.config.cluster.prefix)
        async with open_etcd(self.endpoint, tls=self.operator_tls()) as etcd:
            with trio.move_on_after(30):
                while True:
                    try:
                        status = await gather_status(etcd, keys)
                    except EtcdError:
                        status = {"nodes": [], "relays": []}
                    members = status["nodes"] + status["relays"]
                    # A relay with workers (relay.workers) registers as relay-1.w0, relay-1.w1...
                    registered = {m.get("identity") or m.get("id") for m in members}
                    # ... and up means ready for calls: in relay mode a node answers an offer
                    # only once it has a tunnel to a relay (else 503 no_relay)
                    nodes = {c.name for c in self.nodes}
                    tunnelled = all(
                        nodes <= set(relay.get("tunnels") or []) for relay in status["relays"]
                    )
                    if wanted <= registered and tunnelled:
                        return
                    await trio.sleep(0.2)
        self.say(
            "warning: not every relay and node registered, or not every node tunnelled to every"
            " relay, within 30 s; see the logs above"
        )

    async def print_status(self) -> None:
        async with open_etcd(self.endpoint, tls=self.operator_tls()) as etcd:
            status = await gather_status(etcd, Keyspace(self.config.cluster.prefix))
        self.say("")
        self.say(format_status(status))
        pages = demo_pages(status)
        if pages:
            self.say("\ndemo: open a node's page in a browser, click Talk, speak, then pause")
            for node_id, url in pages:
                self.say(f"  {node_id:<8} {url}")
        if self.opsview_url:
            self.say(f"\nops page: {self.opsview_url}  (live plots of the whole cluster)")

    async def _stop_on_signal(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.say(f"\n{signal.Signals(signum).name}: stopping")
                scope.cancel()
                return

    async def _stop_in_order(self) -> None:
        """Nodes first (each releases its sessions and deregisters, which needs etcd and lets
        the relays see the sessions go), then the relays, then etcd."""
        self._stopping = True
        for kind, group in (("nodes", self.nodes), ("relays", self.relays)):
            running = [c for c in group if c.process is not None and c.process.poll() is None]
            if running:
                self.say(f"stopping {kind}: {', '.join(c.name for c in running)}")
                await self._stop_children(running)
        pids = [str(m.pid) for m in self.etcd.members if m.process is not None]
        if pids:
            self.say(f"stopping etcd (pid{'s' if len(pids) > 1 else ''} {', '.join(pids)})")
        await trio.to_thread.run_sync(self.etcd.stop)

    async def _stop_children(self, running: list[Child], grace: float = 15.0) -> None:
        for child in running:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            for child in running:
                assert child.process is not None
                await children.wait(child.process)
        for child in running:
            assert child.process is not None
            if child.process.poll() is None:
                self.say(f"{child.name} did not stop within {grace:.0f}s; killing it")
                child.process.kill()
                await children.wait(child.process)

    def describe(self) -> dict[str, Any]:
        return {
            "etcd": {
                "endpoint": self.endpoint,
                "members": [
                    {"endpoint": m.endpoint, "pid": m.process and m.pid, "data": str(m.data_dir)}
                    for m in self.etcd.members
                ],
            },
            "opsview": self.opsview_url,
            "relays": [
                {"id": c.name, "pid": c.pid, "log": str(c.log_path), "metrics": c.metrics}
                for c in self.relays
            ],
            "nodes": [
                {"id": c.name, "pid": c.pid, "log": str(c.log_path), "metrics": c.metrics}
                for c in self.nodes
            ],
        }


def _metrics(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


def page_url(signaling: str) -> str | None:
    """The page a node serves beside its signaling: ``ws://H:P/v1/session`` → ``http://H:P/``
    (``wss`` → ``https``); ``None`` for anything else."""
    for scheme, web in (("ws://", "http://"), ("wss://", "https://")):
        if signaling.startswith(scheme):
            authority = signaling.removeprefix(scheme).split("/", 1)[0]
            return f"{web}{authority}/" if authority else None
    return None


def demo_pages(status: dict[str, Any]) -> list[tuple[str, str]]:
    """(node id, demo page URL) for every node in ``status`` (as :func:`gather_status` returns
    it) that publishes a signaling address."""
    pages = []
    for node in status.get("nodes", []):
        addresses = node.get("addresses") or {}
        url = page_url(str(addresses.get("signaling") or ""))
        if url is not None:
            pages.append((str(node.get("id")), url))
    return pages


def run_up(config: Config) -> int:
    cluster = LocalCluster(config)
    try:
        trio.run(cluster.run)
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130
    return 0
