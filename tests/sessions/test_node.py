"""The node daemon in-process, against a real etcd: hosting, draining, and losing its lease."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable

import attrs
import pytest
import trio

from actors import Actor
from ops.config import ClusterConfig, Config, NodeConfig
from ops.etcdserver import EtcdServer
from sessions.node.daemon import Node, NodeRefused
from storage.etcd import Etcd
from storage.keys import Keyspace
from storage.members import Members
from storage.ownership import AlreadyOwned, Owners
from tests.helpers import eventually


class Recorder(Actor):
    """Stands in for a session actor: remembers when it started and stopped."""

    log: list[tuple[str, float]] = []
    stopped: trio.Event = trio.Event()

    async def on_start(self) -> None:
        Recorder.log.append((f"start {self.name}", time.monotonic()))

    async def receive(self, message: object) -> object:
        return message

    async def on_stop(self) -> None:
        Recorder.log.append((f"stop {self.name}", time.monotonic()))
        Recorder.stopped.set()


@pytest.fixture(autouse=True)
def _fresh_log() -> None:
    Recorder.log = []
    Recorder.stopped = trio.Event()


@attrs.define
class Clients:
    """Stands in for the node's signaling: records what the node tells its clients."""

    told: list[tuple[str, str]] = attrs.Factory(list)
    node: Node | None = None
    wound_down: bool = False

    async def stop_session(self, session: str, code: str, reason: str) -> None:
        self.told.append((session, code))
        assert self.node is not None
        await self.node.end_session(session)

    def sessions_lost(self, sessions: list[str], code: str, reason: str) -> None:
        self.told.extend((session, code) for session in sessions)

    async def wind_down(self) -> None:
        self.wound_down = True

    async def serve(self, node: Node, *, task_status: trio.TaskStatus[Clients]) -> None:
        self.node = node
        task_status.started(self)
        await trio.sleep_forever()


def make_config(server: EtcdServer, **node: object) -> Config:
    return Config(
        cluster=ClusterConfig(etcd=server.endpoint, prefix="/parley-test"),
        node=attrs.evolve(NodeConfig(lease_ttl=3), **node),
    )


async def test_node_hosts_sessions_and_releases_everything_on_stop(
    etcd_server: EtcdServer, etcd: Etcd, keys: Keyspace
) -> None:
    node = Node(make_config(etcd_server, capacity=2), node_id="n1")
    owners, members = Owners(etcd, keys), Members(etcd, keys)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        registered = await members.node("n1")
        assert registered is not None and registered.info.state == "active"
        epoch = await node.host_session("s1", lambda: Recorder("s1"))
        await node.host_session("s2", lambda: Recorder("s2"))
        owner = await owners.owner_of("s1")
        assert owner is not None and (owner.node, owner.epoch) == ("n1", epoch)
        assert node.registry.lookup("s1") is not None
        with pytest.raises(NodeRefused) as full:
            await node.host_session("s3", lambda: Recorder("s3"))
        assert full.value.code == "node_over_capacity"
        # Another node cannot take a session this one owns.
        lease, _ = await etcd.lease_grant(10)
        with pytest.raises(AlreadyOwned):
            await owners.claim("s1", "n2", lease)
        # The registration follows the load.
        assert await eventually(lambda: members.node("n1"), lambda m: m.info.sessions == 2)
        node.request_stop()
    assert [entry for entry, _ in Recorder.log] == ["start s1", "start s2", "stop s2", "stop s1"]
    assert await owners.owner_of("s1") is None and await owners.owner_of("s2") is None
    assert await members.node("n1") is None
    assert node.lease is None


async def test_draining_node_refuses_new_sessions(etcd_server: EtcdServer) -> None:
    node = Node(make_config(etcd_server), node_id="n1")
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        node.state = "draining"
        with pytest.raises(NodeRefused) as refused:
            await node.host_session("s1", lambda: Recorder("s1"))
        assert refused.value.code == "node_draining"
        node.request_stop()


async def test_node_stops_its_sessions_before_a_frozen_etcd_could_expire_its_lease(
    etcd_server: EtcdServer, etcd: Etcd, keys: Keyspace
) -> None:
    ttl = 3
    clients = Clients()
    node = Node(make_config(etcd_server, lease_ttl=ttl), node_id="n1", frontend=clients.serve)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await node.host_session("s1", lambda: Recorder("s1"))
        lease = node.lease
        assert lease is not None
        etcd_server.freeze()
        try:
            with trio.fail_after(ttl + 2):
                await Recorder.stopped.wait()
            # The client is told, not left with silence.
            await eventually(_value(clients.told), lambda told: told == [("s1", "lease_lost")])
            offset = time.monotonic() - trio.current_time()
            stops = [t for entry, t in Recorder.log if entry == "stop s1"]
            assert stops[0] < lease.confirmed_at + offset + ttl
            assert lease.lost.is_set()
            await trio.sleep(1.0)
        finally:
            etcd_server.thaw()
        # The node comes back with a new lease, registered and owning nothing.
        owners, members = Owners(etcd, keys), Members(etcd, keys)
        await eventually(lambda: members.node("n1"), lambda m: m.lease != lease.id)
        assert node.sessions == {}
        other, _ = await etcd.lease_grant(10)
        with trio.fail_after(ttl + 5):
            while True:
                try:
                    await owners.claim("s1", "n2", other)
                    break
                except AlreadyOwned:
                    await trio.sleep(0.05)
        assert time.monotonic() > stops[0]
        node.request_stop()


def _value(items: list[tuple[str, str]]) -> Callable[[], Awaitable[list[tuple[str, str]]]]:
    async def probe() -> list[tuple[str, str]]:
        return items

    return probe


async def test_a_stopping_node_tells_each_client_why_in_reverse_order(
    etcd_server: EtcdServer,
) -> None:
    clients = Clients()
    node = Node(make_config(etcd_server), node_id="n1", frontend=clients.serve)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        for name in ("s1", "s2"):
            await node.host_session(name, functools.partial(Recorder, name))
        node.request_stop()
    assert clients.told == [("s2", "node_stopping"), ("s1", "node_stopping")]
    assert clients.wound_down and node.sessions == {}


def test_rendezvous_rank_is_the_same_everywhere_and_spreads_orphans() -> None:
    from collections import Counter

    from sessions.node.failover import rank

    nodes = ["n1", "n2", "n3"]
    assert rank("s1", nodes) == rank("s1", list(reversed(nodes)))  # every node agrees
    firsts = Counter(rank(f"session{i}", nodes)[0] for i in range(600))
    assert set(firsts) == set(nodes) and min(firsts.values()) > 150  # about a third each
    # A node leaving moves only its own first choices.
    moved = sum(
        rank(f"session{i}", nodes)[0] != rank(f"session{i}", ["n1", "n2"])[0]
        for i in range(600)
        if rank(f"session{i}", nodes)[0] != "n3"
    )
    assert moved == 0
