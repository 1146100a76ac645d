"""``relay.tunnel_advertise``: a relay registers the tunnel address nodes dial, when it is not
the bound one (a NAT or the globe's WAN emulator in front of it). End to end, the simulated
globe (tests/globe) has every node dial its relays through the emulator this way."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from ops.etcdserver import EtcdServer
from relay.daemon import Relay
from storage.etcd import open_etcd
from storage.keys import Keyspace
from storage.members import Members
from tests.metrics_support import relay_credentials

pytestmark = pytest.mark.etcd

PREFIX = "/parley-tunnel-advertise"


@pytest.mark.parametrize("advertised", [("127.1.9.2", 4999), None])
async def test_the_registration_names_the_advertised_tunnel_address(
    etcd_server: EtcdServer, tmp_path: Path, advertised: tuple[str, int] | None
) -> None:
    credentials, secrets = relay_credentials(tmp_path, "r1")
    relay = Relay(
        "r1",
        etcd_endpoint=etcd_server.endpoint,
        prefix=PREFIX,
        credentials=credentials,
        secrets=secrets,
        listen=[("127.0.0.1", 0)],
        tunnel_advertise=advertised,
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            await nursery.start(relay.run)
        assert relay.endpoint is not None
        bound = relay.endpoint.address
        async with open_etcd(etcd_server.endpoint) as etcd:
            (record,) = await Members(etcd, Keyspace(PREFIX)).relays()
        nursery.cancel_scope.cancel()
    expected = advertised or bound
    assert tuple(record["tunnel"]) == tuple(expected), record
    assert relay.info().tunnel == expected
