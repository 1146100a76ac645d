"""Fixtures shared by every suite: a real etcd on a free loopback port."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ops.etcdserver import EtcdServer
from storage.etcd import Etcd, open_etcd
from storage.keys import Keyspace
from tests.programs import AUDIT_ENV, bootstrap_packages, have_dpkg, record_to, unprovided

# Every program the run starts, here and in the scenario scripts (they inherit the variable),
# is checked at the end against what README's test command installs (tests/programs.py).
_fd, _PROGRAMS = tempfile.mkstemp(prefix="parley-programs-")
os.close(_fd)
os.environ[AUDIT_ENV] = _PROGRAMS
record_to(_PROGRAMS)
_unprovided: list[str] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    try:
        programs = Path(_PROGRAMS).read_text().split()
    finally:
        Path(_PROGRAMS).unlink(missing_ok=True)
    if not have_dpkg():
        return
    _unprovided.extend(unprovided(programs, bootstrap_packages("test")))
    if _unprovided:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _unprovided:
        terminalreporter.section("programs the tests started that bootstrap.sh does not install")
        for line in _unprovided:
            terminalreporter.line(line, red=True)
        terminalreporter.line("add their Debian package to ops/bootstrap.sh (test_packages)")


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """Debian's etcd, started for this test with its own data dir and ports; stopped after."""
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def etcd(etcd_server: EtcdServer) -> AsyncIterator[Etcd]:
    async with open_etcd(etcd_server.endpoint, rpc_timeout=2.0) as client:
        yield client


@pytest.fixture
def keys() -> Keyspace:
    return Keyspace("/parley-test")
