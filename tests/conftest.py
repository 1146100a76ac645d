"""Fixtures shared by every suite: a real etcd on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ops.etcdserver import EtcdServer
from storage.etcd import Etcd, open_etcd
from storage.keys import Keyspace


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
