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
        Recorder.log.append((f"{message} {self.name}", time.monotonic()))
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

    async def hold_sessions(self, sessions: list[str], reason: str) -> None:
        assert self.node is not None
        for session in sessions:
            await self.node.registry.lookup(session).ask(("stall",), timeout=1)
        self.told.extend((session, "held") for session in sessions)

    async def release_sessions(self, sessions: list[str]) -> None:
        assert self.node is not None
        for session in sessions:
            await self.node.registry.lookup(session).ask(("unstall",), timeout=1)
        self.told.extend((session, "released") for session in sessions)

    async def sessions_lost(self, sessions: list[str], code: str, reason: str) -> None:
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


async def test_a_frozen_etcd_holds_the_sessions_before_the_lease_could_expire_then_they_go(
    etcd_server: EtcdServer, etcd: Etcd, keys: Keyspace
) -> None:
    ttl = 3
    clients = Clients()
    node = Node(make_config(etcd_server, lease_ttl=ttl), node_id="n1", frontend=clients.serve)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        epoch = await node.host_session("s1", lambda: Recorder("s1"))
        lease = node.lease
        assert lease is not None and node.epoch_of("s1") == epoch
        etcd_server.freeze()
        offset = time.monotonic() - trio.current_time()
        try:
            with trio.fail_after(ttl):
                await lease.stalled.wait()
            # From the safety deadline on, nothing may be sent for the session (the media path
            # asks epoch_of per datagram), and its actor is held, not stopped.
            assert node.epoch_of("s1") is None
            await eventually(_value(clients.told), lambda told: told == [("s1", "held")])
            held = [t for entry, t in Recorder.log if entry == "('stall',) s1"]
            assert held and held[0] < lease.confirmed_at + offset + ttl
            assert not Recorder.stopped.is_set()
            await trio.sleep(ttl + 0.5)  # etcd's clock runs on: the lease expires in there
        finally:
            etcd_server.thaw()
        # etcd answers: the lease is gone, so the sessions go (to be adopted elsewhere).
        with trio.fail_after(5):
            await Recorder.stopped.wait()
        await eventually(
            _value(clients.told), lambda told: told == [("s1", "held"), ("s1", "lease_lost")]
        )
        assert lease.lost.is_set()
        # The node comes back with a new lease, registered and owning nothing.
        owners, members = Owners(etcd, keys), Members(etcd, keys)
        await eventually(lambda: members.node("n1"), lambda m: m.lease != lease.id)
        assert node.sessions == {}
        other, _ = await etcd.lease_grant(10)
        await owners.claim("s1", "n2", other)  # etcd deleted the owner key with the lease
        node.request_stop()


async def test_a_short_etcd_freeze_holds_the_sessions_and_they_go_on_at_the_same_epoch(
    etcd_server: EtcdServer, etcd: Etcd, keys: Keyspace
) -> None:
    # Safety deadline 1.5 s after the last acknowledged keepalive, etcd's expiry 3 s after it.
    clients = Clients()
    config = make_config(etcd_server, lease_ttl=3, lease_margin=1.5)
    node = Node(config, node_id="n1", frontend=clients.serve)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        epoch = await node.host_session("s1", lambda: Recorder("s1"))
        lease = node.lease
        assert lease is not None
        recovered = lease.recovered
        await trio.sleep_until(lease.confirmed_at + 0.05)  # just after a keepalive
        etcd_server.freeze()
        try:
            with trio.fail_after(3):
                await lease.stalled.wait()
            assert node.epoch_of("s1") is None
            await trio.sleep(max(0.0, lease.confirmed_at + 2.6 - trio.current_time()))
        finally:
            etcd_server.thaw()
        with trio.fail_after(3):
            await recovered.wait()
        await eventually(
            _value(clients.told), lambda told: told == [("s1", "held"), ("s1", "released")]
        )
        assert node.lease is lease and not lease.lost.is_set()
        assert node.epoch_of("s1") == epoch  # the same owner, the same epoch
        owner = await Owners(etcd, keys).owner_of("s1")
        assert owner is not None and (owner.node, owner.epoch) == ("n1", epoch)
        assert not Recorder.stopped.is_set()
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


async def test_room_for_a_session_moving_in_leaves_the_places_offers_hold(
    etcd_server: EtcdServer,
) -> None:
    """A node at capacity but for the places its signaling has reserved for offers being
    answered has no room for a session moving in or adopted (issue #15: capacity is never
    exceeded by any path)."""
    config = make_config(etcd_server, capacity=2)
    node = Node(config, node_id="n1", frontend=Clients().serve)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await node.host_session("s1", lambda: Recorder("s1"))
        assert node.has_room()
        node.places_reserved = lambda: 1  # one offer being answered
        assert not node.has_room()
        node.places_reserved = lambda: 0
        assert node.has_room()
        node.request_stop()


async def test_a_busy_node_has_no_room_until_its_load_falls(etcd_server: EtcdServer) -> None:
    """node.max_load: a node whose event loop is that busy takes no session moving in or
    adopted (and signaling refuses offers: tests/sessions/test_admission_limits.py); 0 turns
    the limit off."""
    node = Node(make_config(etcd_server, max_load=0.5), node_id="n1", frontend=Clients().serve)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        assert node.has_room() and not node.busy()
        node.loop_load.value = 0.5
        assert node.busy() and not node.has_room()
        node.loop_load.value = 0.49
        assert node.has_room()
        # sampled from the start (sessions/node/load.py, tests/sessions/test_load.py)
        assert node.loop_load._last is not None
        node.request_stop()
    unlimited = Node(make_config(etcd_server, max_load=0.0), node_id="n2")
    unlimited.loop_load.value = 1.0
    assert not unlimited.busy() and unlimited.has_room()


async def test_a_node_publishes_big_stats_less_often_and_never_above_etcd_s_limit(
    etcd_server: EtcdServer, etcd: Etcd, keys: Keyspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sessions.node import daemon

    monkeypatch.setattr(daemon, "STATS_INTERVAL", 0.05)
    monkeypatch.setattr(daemon, "STATS_BYTES_PER_SECOND", 100_000)
    members = Members(etcd, keys)
    asked = {"small": 0, "big": 0}

    def source(kind: str, sessions: int) -> Callable[[], Awaitable[dict[str, dict[str, object]]]]:
        async def stats() -> dict[str, dict[str, object]]:
            asked[kind] += 1
            return {f"s{i:05}": {"packets": i, "note": "x" * 900} for i in range(sessions)}

        return stats

    for kind, sessions in (("small", 2), ("big", 50)):  # about 2 KB and 46 KB a publish
        node = Node(make_config(etcd_server), node_id=f"n-{kind}")
        node.stats_source = source(kind, sessions)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            await trio.sleep(1.5)
            node.request_stop()
    # every 50 ms while small; about every 0.46 s (46 KB at 100 KB/s) once big
    assert asked["small"] >= 15 and 2 <= asked["big"] <= 5, asked
    # and a value that would pass etcd's request limit is cut to fit, the rest counted
    lease, _ = await etcd.lease_grant(10)
    stats = {f"s{i:05}": {"note": "y" * 1000} for i in range(3000)}  # about 3 MB
    size = await members.publish_stats("n-huge", stats, lease)
    published = await members.session_stats()
    assert size <= 512 * 1024 and 400 < len(published) < 520
    assert all(key.startswith("s") for key in published)  # the count is not a session
