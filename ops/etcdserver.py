"""Run a local etcd: one member (the embedded default of ``parley up`` and the test fixture) or a
cluster of several members on loopback.

It is Debian's ``etcd`` binary (package ``etcd-server``) on loopback ports, with its data in
directories we own, so each member can be stopped, killed, frozen (SIGSTOP) and restarted on the
same ports and data. :class:`EtcdServer` is one member; :class:`EtcdCluster` is N of them that know
each other (``--initial-cluster``). A single-member cluster is exactly one :class:`EtcdServer`
with today's name, data directory and ports.

Given an :class:`EtcdServerTLS` (``parley up`` gives one by default), a member takes only clients
that present a certificate of the cluster CA (``--client-cert-auth``), on ``https://`` client
URLs, and its members talk to each other the same way (``--peer-client-cert-auth``). Without it
(the tests' fixture) etcd is plain http on loopback.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final, final

import attrs

from ops.children import spawn
from relay.settings import ETCD_SERVER_CERT
from storage.etcdtls import HTTPS, EtcdTLS

if TYPE_CHECKING:  # storage.etcd loads etcd3 and gRPC: only where a status is asked for
    from storage.etcd import MemberStatus

#: Raft timing of a cluster of several local members, in milliseconds. Loopback has no network
#: delay to absorb; what delays a heartbeat here is a member not being scheduled (a busy two-core
#: machine running nodes, relays and browsers) and the WAL's fsync. A 100 ms heartbeat leaves room
#: for such stalls, and an election timeout of ten heartbeats (etcd's guidance) keeps those stalls
#: from starting needless elections, while a dead or frozen leader is replaced in about 1-2 s
#: (the election timeout, randomised up to twice that by raft, plus one vote round). It also sets
#: etcd's shortest lease TTL (1.5 election timeouts: 2 s), which our 2 s minimum TTL respects.
HEARTBEAT_MS = 100
ELECTION_MS = 1000

#: The member counts ``parley up`` offers: odd, so that a majority survives a member's loss.
MEMBER_COUNTS = (1, 3, 5)

#: etcd's space quota (``--quota-backend-bytes``): 1 GiB. A session costs a few kilobytes of
#: live keys; what grows is history, which auto-compaction keeps to five minutes.
QUOTA_BYTES = 1 << 30


class EtcdServerError(RuntimeError):
    """The local etcd could not be started."""


@final
@attrs.frozen
class EtcdServerTLS:
    """The files of an etcd with client-certificate TLS: the CA it trusts (and its own
    certificate chains to), and its own certificate and key, which must carry serverAuth for
    its clients and clientAuth for its peers and its gateway (ops/certs.py issues such)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, certs: Path) -> EtcdServerTLS:
        """``ca.pem`` and ``etcd-server.pem`` / ``.key`` in a cluster certificate directory."""
        certs = Path(certs)
        return cls(
            certs / "ca.pem", certs / f"{ETCD_SERVER_CERT}.pem", certs / f"{ETCD_SERVER_CERT}.key"
        )

    def client(self) -> EtcdTLS:
        """The member's own certificate as a client's (it has clientAuth): what our health
        and status probes present."""
        return EtcdTLS(self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes())

    def ssl_context(self) -> ssl.SSLContext:
        """An HTTPS client context that checks etcd's certificate and presents this one."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context

    def flags(self) -> list[str]:
        """etcd's flags for TLS on its client and peer URLs, client certificates required."""
        files = ["--cert-file", str(self.cert), "--key-file", str(self.key)]
        peer = ["--peer-cert-file", str(self.cert), "--peer-key-file", str(self.key)]
        return [
            *files,
            "--client-cert-auth",
            "--trusted-ca-file",
            str(self.ca),
            *peer,
            "--peer-client-cert-auth",
            "--peer-trusted-ca-file",
            str(self.ca),
        ]


#: ports :func:`free_port` gave out lately. Callers ask for several before binding any (an
#: etcd's client and peer ports, every child of ``parley up``), and the kernel may offer a port
#: again as soon as the socket that found it is closed: a CI run once started an etcd whose
#: client and peer URLs had the same port, and it failed to bind its own second listener.
_GIVEN: deque[int] = deque(maxlen=1024)
#: fresh ports tried before giving up (the kernel repeating itself this often means trouble)
_PORT_TRIES: Final = 64


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``, and not given out by this function
    lately in this process."""
    for _ in range(_PORT_TRIES):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.append(port)
            return port
    raise OSError(f"no free port on {host} that was not just given out ({_PORT_TRIES} tries)")


def find_etcd_binary() -> str:
    """Path of the etcd server binary, or a clear error naming the package to install."""
    found = os.environ.get("PARLEY_ETCD_BIN") or shutil.which("etcd")
    for candidate in (found, "/usr/bin/etcd", "/usr/sbin/etcd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise EtcdServerError(
        "etcd server binary not found: install Debian's etcd-server (apt-get install etcd-server) "
        "or set PARLEY_ETCD_BIN"
    )


@final
class EtcdServer:
    """A local etcd process on ``host:client_port`` with its data under ``data_dir``.

    Alone (the default) it is a single-member cluster named ``parley``. As a member of an
    :class:`EtcdCluster` it gets its own ``name``, the cluster's ``initial_cluster`` list (only
    read when the data directory is new), a cluster token and the cluster's raft timing.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        log_file: Path | None = None,
        die_with_us: bool = False,
        name: str = "parley",
        initial_cluster: str | None = None,
        cluster_flags: Sequence[str] = (),
        tls: EtcdServerTLS | None = None,
    ) -> None:
        #: client-certificate TLS on the client and peer URLs (None: plain http)
        self.tls = tls
        self._client_tls: EtcdTLS | None = None
        self._ssl: ssl.SSLContext | None = None
        #: SIGTERM to etcd when this process dies, even by SIGKILL (ops/children.py); then only
        #: start it from a thread that lives as long as etcd should (Trio's loop thread, not
        #: one of its worker threads, which retire when idle)
        self.die_with_us = die_with_us
        self.data_dir = Path(data_dir)
        self.host = host
        self.name = name
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.cluster_flags = list(cluster_flags)
        self.log_file = log_file or self.data_dir.parent / f"{self.data_dir.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def endpoint(self) -> str:
        """The client endpoint as ``cluster.etcd`` takes it: ``host:port`` when plain,
        ``https://host:port`` with TLS."""
        address = f"{self.host}:{self.client_port}"
        return HTTPS + address if self.tls is not None else address

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.peer_port}"

    def client_tls(self) -> EtcdTLS | None:
        """What our own probes present to this member (None when it is plain)."""
        if self.tls is not None and self._client_tls is None:
            self._client_tls = self.tls.client()
        return self._client_tls

    @property
    def pid(self) -> int:
        if self.process is None:
            raise EtcdServerError("etcd is not running")
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        client_url = self.client_url
        return [
            find_etcd_binary(),
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            self.initial_cluster,
            "--initial-cluster-state",
            "new",
            *self.cluster_flags,
            *(self.tls.flags() if self.tls is not None else ()),
            # Session churn grows etcd's history without bound unless it is compacted (29 -> 160 MB
            # over 2,700 short sessions, measured): keep five minutes of it.
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "5m",
            # ... and a space quota well below the disk: past it etcd refuses writes (an alarm)
            # instead of filling the disk; compaction and defragmentation bring it back.
            "--quota-backend-bytes",
            str(QUOTA_BYTES),
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]

    def start(self, *, wait: float = 20.0) -> None:
        """Start etcd and wait until it answers /health."""
        self.spawn()
        self.wait_healthy(wait)

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start etcd without waiting for it."""
        if self.process is not None and self.process.poll() is None:
            return self.process
        if self._log is not None:
            self._log.close()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_file, "ab")  # noqa: SIM115 - lives as long as the process
        # Its own session: Ctrl-C in a terminal reaches us, and we stop etcd last, in order.
        if self.die_with_us:
            self.process = spawn(self.command(), stdout=self._log, stderr=self._log)
        else:
            self.process = subprocess.Popen(
                self.command(),
                stdout=self._log,
                stderr=self._log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self.process

    def healthy(self) -> bool:
        """etcd answers /health with true: it runs and its cluster has a leader."""
        url = f"{self.client_url}/health"
        if self.tls is not None and self._ssl is None:
            self._ssl = self.tls.ssl_context()
        context = self._ssl
        try:
            with urllib.request.urlopen(url, timeout=0.5, context=context) as response:
                return b"true" in response.read()
        except (OSError, urllib.error.URLError):
            return False

    def wait_healthy(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise EtcdServerError(
                    f"etcd exited with {self.process.returncode}; see {self.log_file}"
                )
            if self.healthy():
                return
            time.sleep(0.05)
        raise EtcdServerError(f"etcd did not become healthy in {wait}s; see {self.log_file}")

    def status(self, timeout: float = 1.0) -> MemberStatus:
        """This member's raft view (its id, the leader it follows, term, revision) over gRPC.

        Raises ``storage.etcd.EtcdError`` when the member does not answer within ``timeout``."""
        from storage.etcd import read_member_status

        return read_member_status(self.endpoint, timeout=timeout, tls=self.client_tls())

    def terminate(self) -> None:
        """SIGTERM without waiting (:meth:`stop` waits)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)  # a frozen etcd cannot act on SIGTERM
            self.process.terminate()

    def stop(self, *, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        self.terminate()
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.stop()

    def restart(self, *, wait: float = 20.0) -> None:
        """Stop, then start again on the same data and ports."""
        self.stop()
        self.start(wait=wait)

    def freeze(self) -> None:
        """SIGSTOP: the process keeps its sockets (connections succeed) but answers nothing."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@final
class EtcdCluster:
    """``size`` local etcd members under ``base_dir`` that form one cluster.

    One member keeps the single-server layout (data in ``<base_dir>/etcd``, client port
    ``client_port``). Several live in ``<base_dir>/etcd-1``, ``etcd-2``, ..., member *i* on
    ``client_port + i - 1`` and ``peer_port + i - 1`` (free ports when those are 0 or None, chosen
    once, so a member restarts on its own ports). The member count is recorded beside the data
    (``<base_dir>/etcd-members``): a later start with another count would join members that were
    made for different clusters, so it is refused.
    """

    def __init__(
        self,
        base_dir: Path,
        size: int = 1,
        *,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        log_dir: Path | None = None,
        die_with_us: bool = False,
        tls: EtcdServerTLS | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self.base_dir = Path(base_dir)
        self.size = size
        self.tls = tls
        #: member ids by member index, learned from their statuses (stable for a data directory),
        #: so a leader that stopped answering can still be named
        self._ids: dict[int, int] = {}
        self.members: list[EtcdServer]
        if size == 1:
            log_file = log_dir / "etcd.log" if log_dir is not None else None
            self.members = [
                EtcdServer(
                    self.base_dir / "etcd",
                    host=host,
                    client_port=client_port,
                    peer_port=peer_port,
                    log_file=log_file,
                    die_with_us=die_with_us,
                    tls=tls,
                )
            ]
            return

        def port(base: int | None, index: int) -> int:
            return base + index if base else free_port(host)

        names = [f"parley-{i + 1}" for i in range(size)]
        peers = [port(peer_port, i) for i in range(size)]
        scheme = "https" if tls is not None else "http"
        initial = ",".join(f"{n}={scheme}://{host}:{p}" for n, p in zip(names, peers, strict=True))
        # A token of its own per data directory: members of two local clusters never join up.
        token = hashlib.sha256(str(self.base_dir.resolve()).encode()).hexdigest()[:16]
        flags = [
            "--initial-cluster-token",
            f"parley-{token}",
            "--heartbeat-interval",
            str(HEARTBEAT_MS),
            "--election-timeout",
            str(ELECTION_MS),
            # A member that comes back (restarted, thawed) asks before it campaigns, so it
            # cannot depose a healthy leader with a higher term.
            "--pre-vote",
        ]
        self.members = [
            EtcdServer(
                self.base_dir / f"etcd-{i + 1}",
                host=host,
                client_port=port(client_port, i),
                peer_port=peers[i],
                log_file=(log_dir or self.base_dir) / f"etcd-{i + 1}.log",
                die_with_us=die_with_us,
                name=names[i],
                initial_cluster=initial,
                cluster_flags=flags,
                tls=tls,
            )
            for i in range(size)
        ]

    @property
    def endpoints(self) -> list[str]:
        """Every member's client endpoint, in member order."""
        return [m.endpoint for m in self.members]

    @property
    def endpoint(self) -> str:
        """The client endpoints as ``cluster.etcd`` takes them: ``host:port,host:port,...``."""
        return ",".join(self.endpoints)

    def _check_layout(self) -> None:
        """Refuse members made for another cluster: another count, or peers that spoke another
        scheme (members keep their peers' URLs in their data, so a cluster made plain cannot
        turn to TLS, nor back, without being made again)."""
        if self.size == 1:
            return
        record = self.base_dir / "etcd-members"
        scheme = "https" if self.tls is not None else "http"
        if record.exists():
            recorded, *rest = record.read_text().split() or [""]
            if recorded != str(self.size):
                raise EtcdServerError(
                    f"{self.base_dir} holds a {recorded}-member etcd, not {self.size}: use "
                    f"--etcd-members {recorded}, or remove {self.base_dir}/etcd-* for a new one"
                )
            made = rest[0] if rest else "http"  # records from before TLS name no scheme
            if made != scheme:
                setting = "true" if made == "https" else "false"
                raise EtcdServerError(
                    f"{self.base_dir} holds an etcd cluster whose members talk {made}, not "
                    f"{scheme}: set up.etcd_tls = {setting}, or remove {self.base_dir}/etcd-* "
                    "for a new one"
                )
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(f"{self.size} {scheme}\n")

    def spawn(self) -> None:
        """Start every member that is not running, without waiting."""
        self._check_layout()
        for member in self.members:
            member.spawn()

    def wait_healthy(self, wait: float) -> None:
        """Wait until every member answers /health (a new cluster needs a majority to form)."""
        deadline = time.monotonic() + wait
        for member in self.members:
            member.wait_healthy(max(0.0, deadline - time.monotonic()))

    def start(self, *, wait: float = 30.0) -> None:
        self.spawn()
        try:
            self.wait_healthy(wait)
        except EtcdServerError:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every member, one after the other: a leader that is stopped hands its leadership
        to a live member first, which waits out a timeout if that member is stopping too."""
        for member in self.members:
            member.stop()

    def statuses(self, timeout: float = 1.0) -> list[MemberStatus | None]:
        """Each member's status, or None for one that is down or did not answer in time."""
        from storage.etcd import EtcdError

        found: list[MemberStatus | None] = []
        for index, member in enumerate(self.members):
            try:
                status = member.status(timeout) if member.running else None
            except EtcdError:
                status = None
            if status is not None:
                self._ids[index] = status.member_id
            found.append(status)
        return found

    def leader(self, timeout: float = 1.0) -> EtcdServer | None:
        """The member that a majority of the cluster names as its leader (it may itself be frozen
        and not know it is deposed yet); None during an election or when too few answer."""
        votes = Counter(
            s.leader_id for s in self.statuses(timeout) if s is not None and s.leader_id
        )
        if not votes:
            return None
        leader_id, count = votes.most_common(1)[0]
        if count <= self.size // 2:
            return None
        for index, member_id in self._ids.items():
            if member_id == leader_id:
                return self.members[index]
        return None

    def wait_leader(self, within: float = 10.0) -> EtcdServer:
        """Wait until the cluster has a leader and return it."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader is not None:
                return leader
            time.sleep(0.05)
        raise EtcdServerError(f"no etcd leader within {within}s")

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
