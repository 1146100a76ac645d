"""A guarded etcd (issue #15): client-certificate TLS from the cluster CA. etcd takes a client
only with a certificate of that CA; nodes, relays and the operator's commands present theirs, and
a client without one, or with one of another CA, reads nothing."""

from __future__ import annotations

import base64
import json
import ssl
import stat
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import trio
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from ops.certs import init_cluster, run_certs
from ops.cli import build_parser
from ops.config import ConfigError, load_config
from ops.etcdserver import EtcdCluster, EtcdServer, EtcdServerError, EtcdServerTLS
from relay.settings import ClusterSettings, SettingsError
from relay.tunnel.certs import TunnelAuthError, issue_files, issue_leaf, make_ca, verify_peer
from storage.etcd import (
    Etcd,
    EtcdError,
    EtcdTLS,
    endpoints_use_tls,
    open_etcd,
    parse_endpoints,
    read_member_status,
)
from storage.etcdwire import etcdrpc
from tests.helpers import PARLEY, run_status

# -- certificates -------------------------------------------------------------------------------


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


BOTH = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_certs_init_issues_etcds_certificate_and_the_operators(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    written = init_cluster(certs)
    for name in ("etcd-server.pem", "etcd-server.key", "parley-cli.pem", "parley-cli.key"):
        assert certs / name in written
    for key in ("etcd-server.key", "parley-cli.key"):
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600

    server = _cert(certs / "etcd-server.pem")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert _usages(server) == BOTH  # clients, and its peers and gateway: etcd dials as a client
    operator = _cert(certs / "parley-cli.pem")
    assert ExtendedKeyUsageOID.CLIENT_AUTH in _usages(operator)
    # Members present their tunnel certificate to etcd: it must be good for a client too.
    node_pem, _ = issue_files(certs, "node", "n1")
    assert _usages(_cert(node_pem)) == BOTH

    # Neither of etcd's certificates opens a tunnel: they name no parley:// identity.
    ca = (certs / "ca.pem").read_bytes()
    for name in ("etcd-server.pem", "parley-cli.pem"):
        with pytest.raises(TunnelAuthError, match="subjectAltName"):
            verify_peer([_cert(certs / name)], ca, now=datetime.now(UTC))


def certs_command(*argv: str) -> int:
    """``parley certs ARGV`` in this process (what the command runs, without its logging)."""
    return run_certs(build_parser().parse_args(["certs", *argv]))


def test_certs_issue_etcd_for_named_hosts_and_the_operator_again(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_cluster(certs)
    argv = ["issue", "--dir", str(certs), "etcd", "--host", "etcd1.example,10.0.0.5"]
    assert certs_command(*argv, "--host", "[fd00::5]") == 0
    san = _cert(certs / "etcd-server.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["etcd1.example"]
    assert {str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)} == {
        "10.0.0.5",
        "fd00::5",
    }
    before = (certs / "parley-cli.pem").read_bytes()
    assert certs_command("issue", "--dir", str(certs), "operator") == 0
    assert (certs / "parley-cli.pem").read_bytes() != before
    assert certs_command("issue", "--dir", str(certs), "operator", "x") == 2
    assert certs_command("issue", "--dir", str(certs), "node") == 2  # needs an id
    assert certs_command("issue", "--dir", str(certs), "etcd", "--host", "a b") == 2


# -- which client presents what -------------------------------------------------------------------


def test_the_scheme_of_the_endpoints_decides_and_certs_supply_the_certificate(
    tmp_path: Path,
) -> None:
    assert parse_endpoints("https://a:1, https://b:2") == ["a:1", "b:2"]
    assert parse_endpoints("http://a:1,[::1]:3") == ["a:1", "[::1]:3"]
    assert endpoints_use_tls("https://a:1,https://b:2")
    assert not endpoints_use_tls("a:1,http://b:2")
    with pytest.raises(ValueError, match="mix"):
        endpoints_use_tls("https://a:1,b:2")
    with pytest.raises(ConfigError, match=r"cluster\.etcd: .*mix"):
        load_config(env={"PARLEY_CLUSTER_ETCD": "https://a:1,b:2"})

    # Plain etcd: nobody needs a certificate, not even a directory of them.
    assert ClusterSettings(etcd="127.0.0.1:2379").etcd_tls("node", "n1") is None
    # TLS etcd: the certificate comes from cluster.certs, and its absence is said clearly.
    with pytest.raises(SettingsError, match=r"cluster\.certs is not set"):
        ClusterSettings(etcd="https://127.0.0.1:2379").etcd_tls("operator")
    certs = tmp_path / "certs"
    init_cluster(certs)
    cluster = ClusterSettings(etcd="https://127.0.0.1:2379", certs=str(certs))
    with pytest.raises(SettingsError, match=rf"parley certs issue --dir {certs} node n1"):
        cluster.etcd_tls("node", "n1")
    issue_files(certs, "node", "n1")
    node = cluster.etcd_tls("node", "n1")
    assert node is not None and node.cert_pem == (certs / "node-n1.pem").read_bytes()
    assert node.key_pem == (certs / "node-n1.key").read_bytes()
    operator = cluster.etcd_tls("operator")
    assert operator is not None and operator.ca_pem == (certs / "ca.pem").read_bytes()
    assert operator.cert_pem == (certs / "parley-cli.pem").read_bytes()
    assert "PRIVATE" not in repr(operator)  # keys stay out of logs and tracebacks

    # The client refuses to talk plain to an https:// etcd, and TLS to an http:// one.
    with pytest.raises(ValueError, match="client certificate is needed"):
        Etcd("https://127.0.0.1:2379")
    with pytest.raises(ValueError, match="plain http"):
        Etcd("http://127.0.0.1:2379", tls=operator)


def test_an_etcd_cluster_made_plain_is_not_restarted_with_tls(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    (tmp_path / "etcd-members").write_text("3\n")  # a record from before TLS
    cluster = EtcdCluster(tmp_path, 3, tls=EtcdServerTLS.in_dir(certs))
    with pytest.raises(EtcdServerError, match=r"talk http, not https: set up\.etcd_tls = false"):
        cluster.spawn()
    assert all(m.process is None for m in cluster.members)


# -- a real etcd ----------------------------------------------------------------------------------


def _foreign(ours: bytes) -> EtcdTLS:
    """A client certificate of another CA (it trusts our CA for etcd's own certificate)."""
    ca_pem, ca_key = make_ca("Some other CA")
    cert_pem, key_pem = issue_leaf(ca_pem, ca_key, "parley-cli")
    return EtcdTLS(ours, cert_pem, key_pem)


def _range_over(channel: grpc.Channel) -> None:
    etcdrpc.KVStub(channel).Range(etcdrpc.RangeRequest(key=b"/", range_end=b"\0"), timeout=2)


def assert_strangers_read_nothing(endpoint: str, certs: Path) -> None:
    """Against a TLS etcd of the cluster CA in ``certs``: a client without a certificate (plain
    gRPC, TLS without one, plain HTTP, HTTPS without one) and one with a certificate of another
    CA are all refused."""
    (target,) = parse_endpoints(endpoint.split(",")[0])
    ca = (certs / "ca.pem").read_bytes()

    async def refused(tls: EtcdTLS | None) -> None:
        bare = target if tls is None else endpoint
        async with open_etcd(bare, rpc_timeout=2.0, tls=tls) as etcd:
            with pytest.raises(EtcdError):
                await etcd.get_prefix("/")

    trio.run(refused, None)  # plain gRPC to a TLS port
    trio.run(refused, _foreign(ca))
    credentials = grpc.ssl_channel_credentials(ca)  # TLS, but no client certificate
    with grpc.secure_channel(target, credentials) as channel, pytest.raises(grpc.RpcError):
        _range_over(channel)
    body = json.dumps({"key": base64.b64encode(b"/").decode(), "range_end": "AA=="}).encode()
    for scheme, context in (
        ("http", None),
        ("https", ssl.create_default_context(cafile=str(certs / "ca.pem"))),
    ):
        request = urllib.request.Request(f"{scheme}://{target}/v3/kv/range", data=body)
        with (
            pytest.raises((urllib.error.URLError, ssl.SSLError, OSError)) as refusal,
            urllib.request.urlopen(request, timeout=5, context=context) as response,
        ):
            response.read()
        assert not isinstance(refusal.value, urllib.error.HTTPError) or refusal.value.code >= 400


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[EtcdServer, Path]]:
    """An etcd of the cluster CA in ``tmp_path/certs`` that requires client certificates."""
    certs = tmp_path / "certs"
    init_cluster(certs)
    server = EtcdServer(tmp_path / "etcd", tls=EtcdServerTLS.in_dir(certs))
    server.start()
    try:
        yield server, certs
    finally:
        server.stop()


@pytest.mark.etcd
def test_a_tls_etcd_serves_the_cluster_and_refuses_strangers(
    tls_etcd: tuple[EtcdServer, Path],
) -> None:
    server, certs = tls_etcd
    command = server.command()
    for flag in ("--client-cert-auth", "--peer-client-cert-auth", "--trusted-ca-file"):
        assert flag in command
    assert server.endpoint.startswith("https://") and server.peer_url.startswith("https://")
    assert server.status().member_id  # our probes present the member's own certificate

    issue_files(certs, "node", "n1")
    cluster = ClusterSettings(etcd=server.endpoint, certs=str(certs))

    async def members() -> None:
        # A node's own member certificate, and the operator's, are both let in.
        async with open_etcd(server.endpoint, tls=cluster.etcd_tls("node", "n1")) as etcd:
            await etcd.put("/tls-test/n1", b"written by n1")
        async with open_etcd(server.endpoint, tls=cluster.etcd_tls("operator")) as etcd:
            found = await etcd.get("/tls-test/n1")
            assert found is not None and found.value == b"written by n1"

    trio.run(members)
    assert_strangers_read_nothing(server.endpoint, certs)
    with pytest.raises(EtcdError):
        read_member_status(server.endpoint.removeprefix("https://"), timeout=1.0)

    # `parley status` presents the operator's certificate ...
    status = run_status(server.endpoint, certs=certs)
    assert status["nodes"] == [] and status["sessions"] == []
    # ... and without one it says what is missing, in one line.
    bare = certs.parent / "bare"
    bare.mkdir()
    (bare / "ca.pem").write_bytes((certs / "ca.pem").read_bytes())
    done = subprocess.run(
        [*PARLEY, "status", "--etcd", server.endpoint, "--certs", str(bare)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"needs a client certificate: {bare / 'parley-cli.pem'} does not exist" in done.stderr
    assert f"parley certs issue --dir {bare} operator" in done.stderr
