"""Run a local single-member etcd: the embedded default of ``parley up`` and the test fixture.

It is Debian's ``etcd`` binary (package ``etcd-server``) on loopback ports, with its data in a
directory we own, so it can be stopped, frozen (SIGSTOP) and restarted on the same ports and data.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, final

from ops.children import spawn


class EtcdServerError(RuntimeError):
    """The local etcd could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
    """A local etcd process on ``host:client_port`` with its data under ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        log_file: Path | None = None,
        die_with_us: bool = False,
    ) -> None:
        #: SIGTERM to etcd when this process dies, even by SIGKILL (ops/children.py); then only
        #: start it from a thread that lives as long as etcd should (Trio's loop thread, not
        #: one of its worker threads, which retire when idle)
        self.die_with_us = die_with_us
        self.data_dir = Path(data_dir)
        self.host = host
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.log_file = log_file or self.data_dir.parent / f"{self.data_dir.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise EtcdServerError("etcd is not running")
        return self.process.pid

    def command(self) -> list[str]:
        client_url = f"http://{self.host}:{self.client_port}"
        peer_url = f"http://{self.host}:{self.peer_port}"
        return [
            find_etcd_binary(),
            "--name",
            "parley",
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            f"parley={peer_url}",
            "--initial-cluster-state",
            "new",
            # Session churn grows etcd's history without bound unless it is compacted (29 -> 160 MB
            # over 2,700 short sessions, measured): keep five minutes of it.
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "5m",
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
        url = f"http://{self.host}:{self.client_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
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

    def stop(self, *, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)  # a frozen etcd cannot act on SIGTERM
            process.terminate()
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

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
