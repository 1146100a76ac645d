"""The cluster CA and leaf certificates: what verify_peer accepts, and everything it must not."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.tunnel.certs import (
    Credentials,
    CredentialsNotFound,
    Identity,
    TunnelAuthError,
    init_ca,
    issue,
    issue_files,
    make_ca,
    verify_peer,
    write_ca,
)

UTC = datetime.UTC


def now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return make_ca()


def test_ca_and_leaf_round_trip(ca: tuple[bytes, bytes]) -> None:
    ca_pem, ca_key = ca
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert (ca_cert.not_valid_after_utc - ca_cert.not_valid_before_utc).days >= 3650

    cert_pem, key_pem = issue(ca_pem, ca_key, "node", "n1")
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node:n1"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku

    # DER bytes (what TLS carries), parsed certificates and PEM CA bytes all work.
    assert verify_peer([der(cert_pem)], ca_cert, now=now()) == Identity("node", "n1")
    assert verify_peer([cert], ca_pem, now=now()) == Identity("node", "n1")
    relay_pem, _ = issue(ca_pem, ca_key, "relay", "r-1.eu")
    assert verify_peer([der(relay_pem)], ca_pem, now=now()) == Identity("relay", "r-1.eu")

    credentials = Credentials(ca_pem, cert_pem, key_pem)
    assert credentials.identity == Identity("node", "n1")
    assert "BEGIN" not in repr(credentials)  # keys stay out of logs


def test_issue_validates_its_input(ca: tuple[bytes, bytes]) -> None:
    with pytest.raises(ValueError, match="invalid node id"):
        issue(*ca, "node", "bad/name")
    with pytest.raises(ValueError, match="role"):
        issue(*ca, "agent", "a1")  # type: ignore[arg-type]


def test_rejects_a_leaf_from_another_ca(ca: tuple[bytes, bytes]) -> None:
    other = make_ca("Some other CA")
    cert_pem, _ = issue(*other, "node", "n1")
    with pytest.raises(TunnelAuthError, match="not issued by the cluster CA"):
        verify_peer([der(cert_pem)], ca[0], now=now())


def test_rejects_a_leaf_from_a_ca_with_the_same_name(ca: tuple[bytes, bytes]) -> None:
    # Same subject, different key: only the signature tells them apart.
    impostor = make_ca()
    cert_pem, _ = issue(*impostor, "node", "n1")
    with pytest.raises(TunnelAuthError, match="not issued by the cluster CA"):
        verify_peer([der(cert_pem)], ca[0], now=now())


def test_rejects_an_expired_leaf(ca: tuple[bytes, bytes]) -> None:
    cert_pem, _ = issue(*ca, "node", "n1", days=1)
    assert verify_peer([der(cert_pem)], ca[0], now=now()) == Identity("node", "n1")
    with pytest.raises(TunnelAuthError, match="expired"):
        verify_peer([der(cert_pem)], ca[0], now=now() + datetime.timedelta(days=2))
    with pytest.raises(TunnelAuthError, match="not valid before"):
        verify_peer([der(cert_pem)], ca[0], now=now() - datetime.timedelta(days=1))


def test_rejects_the_ca_itself_as_a_leaf(ca: tuple[bytes, bytes]) -> None:
    with pytest.raises(TunnelAuthError, match="CA certificate"):
        verify_peer([der(ca[0])], ca[0], now=now())


def _signed_by_ca(ca: tuple[bytes, bytes], san: x509.SubjectAlternativeName | None) -> bytes:
    ca_cert = x509.load_pem_x509_certificate(ca[0])
    ca_key = serialization.load_pem_private_key(ca[1], password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node:n1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - datetime.timedelta(hours=1))
        .not_valid_after(now() + datetime.timedelta(days=1))
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("san", "match"),
    [
        (None, "no subjectAltName"),
        (x509.SubjectAlternativeName([x509.DNSName("n1.example")]), "exactly one URI"),
        (
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("parley://node/n1"),
                    x509.UniformResourceIdentifier("parley://relay/r1"),
                ]
            ),
            "exactly one URI",
        ),
        (
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("https://node/n1")]),
            "not a parley",
        ),
        (
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("parley://agent/a1")]),
            "names no node or relay",
        ),
        (
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("parley://node/a/b")]),
            "invalid node id",
        ),
    ],
)
def test_rejects_a_leaf_without_one_good_uri(
    ca: tuple[bytes, bytes], san: x509.SubjectAlternativeName | None, match: str
) -> None:
    with pytest.raises(TunnelAuthError, match=match):
        verify_peer([_signed_by_ca(ca, san)], ca[0], now=now())


def test_rejects_no_certificate_and_garbage(ca: tuple[bytes, bytes]) -> None:
    with pytest.raises(TunnelAuthError, match="no certificate"):
        verify_peer([], ca[0], now=now())
    with pytest.raises(TunnelAuthError, match="does not parse"):
        verify_peer([b"\x30\x03garbage"], ca[0], now=now())


def test_now_must_be_aware(ca: tuple[bytes, bytes]) -> None:
    cert_pem, _ = issue(*ca, "node", "n1")
    with pytest.raises(ValueError, match="timezone"):
        verify_peer([der(cert_pem)], ca[0], now=datetime.datetime.now())


def test_files_round_trip(tmp_path: Path) -> None:
    ca_path = init_ca(tmp_path)
    assert ca_path == tmp_path / "ca.pem"
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    cert_path, key_path = issue_files(tmp_path, "node", "n1")
    assert (cert_path.name, key_path.name) == ("node-n1.pem", "node-n1.key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600

    credentials = Credentials.load(tmp_path, "node", "n1")
    assert credentials.identity == Identity("node", "n1")
    assert credentials.ca_pem == ca_path.read_bytes()
    assert not list(tmp_path.glob(".*tmp"))


def test_init_never_replaces_a_ca_unless_forced(tmp_path: Path) -> None:
    init_ca(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca.key").read_bytes()
    with pytest.raises(FileExistsError, match=r"ca\.pem"):
        init_ca(tmp_path)
    assert ((tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca.key").read_bytes()) == before
    init_ca(tmp_path, force=True)
    assert (tmp_path / "ca.pem").read_bytes() != before[0]
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600


def test_write_ca_refuses_a_half_present_ca(tmp_path: Path) -> None:
    (tmp_path / "ca.key").write_bytes(b"an old key")
    with pytest.raises(FileExistsError, match=r"ca\.key"):
        write_ca(tmp_path, *make_ca())
    assert not (tmp_path / "ca.pem").exists()


def test_load_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialsNotFound, match=r"ca\.pem") as caught:
        Credentials.load(tmp_path, "node", "n1")
    assert isinstance(caught.value, FileNotFoundError)
    assert caught.value.filename == str(tmp_path / "ca.pem")

    init_ca(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"node-n1\.pem.*parley certs issue node n1"):
        Credentials.load(tmp_path, "node", "n1")

    issue_files(tmp_path, "node", "n1")
    (tmp_path / "node-n1.key").unlink()
    with pytest.raises(FileNotFoundError, match=r"node-n1\.key"):
        Credentials.load(tmp_path, "node", "n1")


def test_issue_files_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="parley certs init"):
        issue_files(tmp_path, "relay", "r1")


def test_load_refuses_mismatched_files(tmp_path: Path) -> None:
    init_ca(tmp_path)
    issue_files(tmp_path, "node", "n1")
    issue_files(tmp_path, "node", "n2")
    # n1's name, n2's certificate: the file names lie about the identity.
    (tmp_path / "node-n1.pem").write_bytes((tmp_path / "node-n2.pem").read_bytes())
    with pytest.raises(ValueError, match="issued to node:n2"):
        Credentials.load(tmp_path, "node", "n1")
    issue_files(tmp_path, "node", "n1")
    (tmp_path / "node-n1.key").write_bytes((tmp_path / "node-n2.key").read_bytes())
    with pytest.raises(ValueError, match="not the key"):
        Credentials.load(tmp_path, "node", "n1")
    # A leaf of another cluster.
    other = tmp_path / "other"
    init_ca(other)
    issue_files(other, "node", "n1")
    for suffix in (".pem", ".key"):
        (tmp_path / f"node-n1{suffix}").write_bytes((other / f"node-n1{suffix}").read_bytes())
    with pytest.raises(ValueError, match="not issued by the cluster CA"):
        Credentials.load(tmp_path, "node", "n1")
