"""A client's region from an operator's MaxMind-format database (issue #19): a small database
written in the test with mmdb-writer, read with MaxMind's reader, and offers over real sockets
whose peer address it maps."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from ops.config import ConfigError, load_config
from relay.settings import ClusterSettings
from sessions.node.geoip import RegionDatabase, parse_region_map
from sessions.node.signaling import Gate, SignalingServer
from sessions.node.tokens import TokenVerifier
from tests.helpers import PARLEY, bearer, make_token, token_keys
from tests.sessions.test_regions import Placer, RegionBackend
from tests.sessions.test_signaling import FAST, http


@pytest.fixture
def database(tmp_path: Path) -> Path:
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="Parley-Test")
    country = {"country": {"iso_code": "DE"}, "continent": {"code": "EU"}}
    writer.insert_network(IPSet(["127.0.0.0/24"]), country)
    writer.insert_network(IPSet(["127.0.1.0/24"]), {"continent": {"code": "NA"}})
    writer.insert_network(IPSet(["127.0.2.0/24"]), {"region": "ap-south"})
    writer.insert_network(IPSet(["127.0.3.0/24"]), {"country": {"iso_code": "BR"}})
    path = tmp_path / "regions.mmdb"
    writer.to_db_file(str(path))
    return path


def test_a_country_wins_over_its_continent_and_a_region_field_is_taken_as_it_is(
    database: Path,
) -> None:
    db = RegionDatabase(str(database), parse_region_map("DE=eu-central, EU=eu-west, NA=us-east"))
    assert db.lookup("127.0.0.9") == "eu-central"
    assert db.lookup("127.0.1.9") == "us-east"
    assert db.lookup("127.0.2.9") == "ap-south"
    assert db.lookup("127.0.3.9") is None  # BR is in no map
    assert db.lookup("10.1.2.3") is None  # not in the database
    assert db.lookup("not-an-address") is None
    assert db.counters == {"found": 3, "unmapped": 1, "missing": 1, "bad": 1}
    db.close()


def test_bad_maps_and_unreadable_databases_are_named(tmp_path: Path) -> None:
    for text in ("DE", "DEU=eu", "DE=Europe West", "1X=eu"):
        with pytest.raises(ConfigError, match=r"node\.region_map"):
            parse_region_map(text)
    with pytest.raises(ConfigError, match="cannot read"):
        RegionDatabase(str(tmp_path / "absent.mmdb"), {})
    (tmp_path / "junk.mmdb").write_bytes(b"not a database")
    with pytest.raises(ConfigError, match="cannot read"):
        RegionDatabase(str(tmp_path / "junk.mmdb"), {})
    with pytest.raises(ConfigError, match=r"node\.region_map"):
        load_config(env={"PARLEY_NODE_REGION_MAP": "DE=eu"})  # a map without a database


async def test_an_offer_is_placed_by_its_address_after_the_token_and_the_header(
    nursery: trio.Nursery, tmp_path: Path, database: Path
) -> None:
    certs = token_keys(tmp_path / "certs")
    db = RegionDatabase(str(database), parse_region_map("DE=eu"))
    backend, placer = RegionBackend(), Placer(region="never")
    gate = Gate("token", verifier=TokenVerifier(ClusterSettings(certs=str(certs)).token_keys()))
    server = SignalingServer(
        backend,
        limits=FAST,
        gate=gate,
        placer=placer,
        region_header="X-Client-Region",
        region_lookup=db.lookup,
    )
    await nursery.start(server.run)
    plain, claimed = make_token(certs, subject="u"), make_token(certs, subject="v", region="us")
    for token, extra in ((plain, []), (plain, [("X-Client-Region", "ap")]), (claimed, [])):
        headers = [("Content-Type", "application/sdp"), bearer(token), *extra]
        reply = await http(server, "POST", "/v1/session", headers=headers, body=b"v=0 x")
        assert reply.status == 201
    # the test's client connects from 127.0.0.1: the database's DE, mapped to eu
    assert backend.regions == ["eu", "ap", "us"]


def test_a_node_with_an_unreadable_database_does_not_start(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PARLEY_CONFIG": "/dev/null",
        "PARLEY_NODE_REGION_DB": str(tmp_path / "absent.mmdb"),
        "PARLEY_NODE_REGION_MAP": "DE=eu",
        "PARLEY_NODE_AUTH": "open",
    }
    done = subprocess.run(
        [*PARLEY, "node", "--etcd", "127.0.0.1:1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2 and "node.region_db: cannot read" in done.stderr, done.stderr
