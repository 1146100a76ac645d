"""The cluster CA and the leaf certificates that authenticate QUIC tunnels.

Every relay↔node tunnel is mutually authenticated TLS 1.3 (design invariant 3). One private CA,
made once per cluster with :func:`init_ca`, signs one leaf per process with :func:`issue_files`.
A leaf names its holder twice: the subject CN ``"{role}:{ident}"`` for people reading it, and a
URI subjectAltName ``parley://{role}/{ident}`` that :func:`verify_peer` reads as the
:class:`Identity`. Host names play no part: a relay knows the node it talks to by its identity,
not by where it dials. Relays and nodes present the same leaf to etcd, whose other
certificates (its own, the operator's: ops/certs.py) come from :func:`issue_leaf` without a
``parley://`` identity, so no tunnel accepts them.

On disk a credentials directory holds::

    ca.pem                 the cluster CA certificate (every process)
    ca.key                 the CA's private key (only where certificates are issued), mode 0600
    {role}-{ident}.pem     a leaf certificate, e.g. node-n1.pem
    {role}-{ident}.key     its private key, mode 0600

This module is pure: it does no network I/O and reads the clock only where a caller does not pass
``now``.
"""

from __future__ import annotations

import datetime
import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, final

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from storage.keys import check_name

__all__ = [
    "ROLES",
    "Credentials",
    "CredentialsNotFound",
    "Identity",
    "Role",
    "TunnelAuthError",
    "init_ca",
    "issue",
    "issue_files",
    "issue_leaf",
    "make_ca",
    "read_ca",
    "verify_peer",
    "write_ca",
    "write_leaf",
    "write_pair",
]

Role = Literal["node", "relay"]
ROLES: tuple[Role, ...] = ("node", "relay")

URI_SCHEME = "parley://"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CA_DAYS = 3650
LEAF_DAYS = 825
# Certificates start a little in the past, so a peer whose clock runs slightly behind ours does
# not reject a certificate issued a moment ago.
BACKDATE = datetime.timedelta(minutes=5)


class TunnelAuthError(Exception):
    """A peer's certificate does not prove a cluster identity.

    A *remote* error: whoever handles it logs it, counts it and drops the peer.
    """


class CredentialsNotFound(FileNotFoundError):
    """A credentials file is missing; the message names it and the command that makes it."""

    def __init__(self, path: Path, hint: str) -> None:
        self.message = f"{path} does not exist: {hint}"
        super().__init__(errno.ENOENT, self.message, str(path))

    def __str__(self) -> str:
        return self.message


@final
@attrs.frozen
class Identity:
    """Who a certificate speaks for, e.g. ``Identity("node", "n1")``."""

    role: str
    ident: str

    @property
    def uri(self) -> str:
        return f"{URI_SCHEME}{self.role}/{self.ident}"

    def __str__(self) -> str:
        return f"{self.role}:{self.ident}"


def _check_role(role: str) -> Role:
    if role == "node":
        return "node"
    if role == "relay":
        return "relay"
    raise ValueError(f"invalid role {role!r}: use 'node' or 'relay'")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("expected an ECDSA private key")
    return key


def make_ca(name: str = "Parley cluster CA") -> tuple[bytes, bytes]:
    """A new self-signed cluster CA: (certificate PEM, private key PEM).

    ECDSA P-256, valid for ten years, allowed to sign leaf certificates only (path length 0).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue_leaf(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    names: Sequence[x509.GeneralName] = (),
    *,
    days: int = LEAF_DAYS,
) -> tuple[bytes, bytes]:
    """A leaf certificate signed by the CA: (certificate PEM, key PEM).

    ECDSA P-256, usable both as a TLS server and as a TLS client (extended key usages
    serverAuth and clientAuth: relays and nodes authenticate each other whichever side dials,
    and etcd checks clientAuth on every client certificate, its peers' included), with
    ``names`` as its subjectAltNames (none: a certificate only for clients).
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = _load_key(ca_key_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = (
        builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    role: Role,
    ident: str,
    *,
    days: int = LEAF_DAYS,
) -> tuple[bytes, bytes]:
    """A leaf certificate for ``role``/``ident`` signed by the CA: (certificate PEM, key PEM).

    It names its holder as the subject CN ``role:ident`` and the URI ``parley://role/ident``;
    see :func:`issue_leaf` for the rest. Nodes and relays also present it to etcd.
    """
    role = _check_role(role)
    check_name(role, ident)
    identity = Identity(role, ident)
    uri = x509.UniformResourceIdentifier(identity.uri)
    return issue_leaf(ca_cert_pem, ca_key_pem, str(identity), [uri], days=days)


def _identity_of(cert: x509.Certificate) -> Identity:
    """The identity in ``cert``'s single parley:// URI SAN; raises TunnelAuthError."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        raise TunnelAuthError("certificate has no subjectAltName") from None
    except ValueError as exc:  # extensions are parsed lazily; a corrupt one shows up here
        raise TunnelAuthError(f"certificate extensions do not parse: {exc}") from None
    if len(uris) != 1:
        raise TunnelAuthError(f"certificate needs exactly one URI subjectAltName, has {len(uris)}")
    uri = uris[0]
    if not uri.startswith(URI_SCHEME):
        raise TunnelAuthError(f"certificate URI {uri!r} is not a parley:// identity")
    role, slash, ident = uri[len(URI_SCHEME) :].partition("/")
    if not slash or role not in ROLES:
        raise TunnelAuthError(f"certificate URI {uri!r} names no node or relay")
    try:
        check_name(role, ident)
    except ValueError as exc:
        raise TunnelAuthError(f"certificate URI {uri!r}: {exc}") from None
    return Identity(role, ident)


def _as_cert(value: x509.Certificate | bytes) -> x509.Certificate:
    if isinstance(value, x509.Certificate):
        return value
    if value.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(value)
    return x509.load_der_x509_certificate(value)


def verify_peer(
    chain_der_or_certs: Sequence[bytes | x509.Certificate],
    ca_cert: x509.Certificate | bytes,
    *,
    now: datetime.datetime,
) -> Identity:
    """The identity a peer's certificate chain proves, or :class:`TunnelAuthError`.

    ``chain_der_or_certs`` is what the peer sent, leaf first (DER bytes or parsed certificates);
    only the leaf matters, since cluster leaves are signed by the CA directly. ``ca_cert`` is the
    cluster CA (parsed, or PEM/DER bytes: a local value, so a bad one raises ValueError). ``now``
    must be timezone-aware. The leaf must be signed by the CA, valid at ``now``, not a CA itself,
    and carry exactly one well-formed ``parley://{role}/{ident}`` URI subjectAltName.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    ca = _as_cert(ca_cert)
    if not chain_der_or_certs:
        raise TunnelAuthError("peer sent no certificate")
    try:
        leaf = _as_cert(chain_der_or_certs[0])
    except ValueError as exc:
        raise TunnelAuthError(f"peer certificate does not parse: {exc}") from None
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise TunnelAuthError(f"peer certificate is not issued by the cluster CA: {exc}") from None
    for cert, what in ((ca, "cluster CA"), (leaf, "peer certificate")):
        if now < cert.not_valid_before_utc:
            raise TunnelAuthError(f"{what} is not valid before {cert.not_valid_before_utc}")
        if now > cert.not_valid_after_utc:
            raise TunnelAuthError(f"{what} expired at {cert.not_valid_after_utc}")
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        pass  # RFC 5280 §4.2.1.9: without the extension a certificate is no CA
    except ValueError as exc:
        raise TunnelAuthError(f"certificate extensions do not parse: {exc}") from None
    else:
        if constraints.ca:
            raise TunnelAuthError("peer certificate is a CA certificate, not a leaf")
    return _identity_of(leaf)


def _read(path: Path, hint: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CredentialsNotFound(path, hint) from None


def _leaf_stem(role: str, ident: str) -> str:
    return f"{_check_role(role)}-{check_name(role, ident)}"


@final
@attrs.frozen
class Credentials:
    """What one process needs to open tunnels: the cluster CA and its own leaf (PEM bytes)."""

    ca_pem: bytes = attrs.field(repr=False)
    cert_pem: bytes = attrs.field(repr=False)
    key_pem: bytes = attrs.field(repr=False)

    @property
    def identity(self) -> Identity:
        """Whom ``cert_pem`` names (read from its URI subjectAltName)."""
        try:
            return _identity_of(x509.load_pem_x509_certificate(self.cert_pem))
        except TunnelAuthError as exc:
            raise ValueError(f"our own certificate names no identity: {exc}") from None

    @classmethod
    def issued(
        cls, ca_pem: bytes, ca_key_pem: bytes, role: Role, ident: str, *, days: int = LEAF_DAYS
    ) -> Credentials:
        """Fresh credentials in memory (for tests and tools that hold the CA key)."""
        cert_pem, key_pem = issue(ca_pem, ca_key_pem, role, ident, days=days)
        return cls(ca_pem, cert_pem, key_pem)

    @classmethod
    def load(cls, directory: Path, role: Role, ident: str) -> Credentials:
        """Read ``ca.pem``, ``{role}-{ident}.pem`` and ``{role}-{ident}.key`` from ``directory``.

        Raises :class:`CredentialsNotFound` (a FileNotFoundError) naming a missing file, and
        ValueError when the files do not fit together: a certificate not issued by this CA, not
        valid now, naming someone else, or not matching the key. Checking here means a
        misconfigured process fails at startup, not at its first handshake.
        """
        directory = Path(directory)
        stem = _leaf_stem(role, ident)
        ca_pem = _read(directory / CA_CERT_FILE, "copy the cluster CA there (`parley certs init`)")
        issue_hint = f"create it with `parley certs issue {role} {ident}`"
        cert_pem = _read(directory / f"{stem}.pem", issue_hint)
        key_pem = _read(directory / f"{stem}.key", issue_hint)
        credentials = cls(ca_pem, cert_pem, key_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
        try:
            identity = verify_peer([cert], ca_pem, now=_now())
        except TunnelAuthError as exc:
            raise ValueError(f"{directory / f'{stem}.pem'}: {exc}") from None
        if identity != Identity(role, ident):
            raise ValueError(
                f"{directory / f'{stem}.pem'} is issued to {identity}, not {role}:{ident}"
            )
        if _load_key(key_pem).public_key() != cert.public_key():
            raise ValueError(f"{directory / f'{stem}.key'} is not the key of {stem}.pem")
        return credentials


def _write(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write ``data`` to ``path`` with permissions ``mode`` from the first byte on.

    The file is written beside its final name and renamed into place, so a reader never sees
    half a key, and a key is never briefly readable by others.
    """
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists; pass force=True to replace it")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if someone created ``path`` meanwhile: never overwrite
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_ca(directory: Path, cert_pem: bytes, key_pem: bytes, *, force: bool = False) -> Path:
    """Store a CA as ``ca.pem`` and ``ca.key`` (0600) in ``directory``; returns ca.pem's path.

    Refuses (FileExistsError) to replace an existing CA unless ``force``: replacing it
    silently would lock every existing certificate out of the cluster.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not force:
        for name in (CA_CERT_FILE, CA_KEY_FILE):
            if (directory / name).exists():
                raise FileExistsError(
                    f"{directory / name} already exists; replacing the cluster CA invalidates "
                    "every certificate it issued (use force to do it anyway)"
                )
    _write(directory / CA_KEY_FILE, key_pem, mode=0o600, overwrite=force)
    _write(directory / CA_CERT_FILE, cert_pem, mode=0o644, overwrite=force)
    return directory / CA_CERT_FILE


def write_pair(directory: Path, stem: str, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    """Store a certificate as ``{stem}.pem`` and its key as ``{stem}.key`` (0600), replacing
    older ones. Returns (certificate path, key path)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    _write(key_path, key_pem, mode=0o600, overwrite=True)
    _write(cert_path, cert_pem, mode=0o644, overwrite=True)
    return cert_path, key_path


def write_leaf(
    directory: Path, role: Role, ident: str, cert_pem: bytes, key_pem: bytes
) -> tuple[Path, Path]:
    """Store a leaf as ``{role}-{ident}.pem`` and ``.key`` (0600), replacing an older one.

    Returns (certificate path, key path).
    """
    return write_pair(directory, _leaf_stem(role, ident), cert_pem, key_pem)


def read_ca(directory: Path) -> tuple[bytes, bytes]:
    """The CA in ``directory``: (``ca.pem``, ``ca.key``); CredentialsNotFound names a missing
    file."""
    directory = Path(directory)
    hint = "create the cluster CA first with `parley certs init`"
    return _read(directory / CA_CERT_FILE, hint), _read(directory / CA_KEY_FILE, hint)


def init_ca(directory: Path, force: bool = False) -> Path:
    """``parley certs init``: make a new cluster CA in ``directory``; returns ca.pem's path.

    Writes ``ca.pem`` (give it to every relay and node) and ``ca.key`` (mode 0600; keep it only
    where certificates are issued). Raises FileExistsError if a CA is already there, unless
    ``force`` — a new CA invalidates every certificate the old one issued.
    """
    cert_pem, key_pem = make_ca()
    return write_ca(directory, cert_pem, key_pem, force=force)


def issue_files(
    directory: Path, role: Role, ident: str, *, days: int = LEAF_DAYS
) -> tuple[Path, Path]:
    """``parley certs issue ROLE IDENT``: sign a leaf with the CA in ``directory``.

    Reads ``ca.pem`` and ``ca.key`` (CredentialsNotFound, naming the file, if either is
    missing), writes ``{role}-{ident}.pem`` and ``{role}-{ident}.key`` (0600) beside them and
    returns their paths. ``role`` is "node" or "relay"; ``ident`` is the node or relay id
    (ValueError if invalid). Re-issuing replaces the old leaf.
    """
    ca_pem, ca_key_pem = read_ca(directory)
    cert_pem, key_pem = issue(ca_pem, ca_key_pem, role, ident, days=days)
    return write_leaf(directory, role, ident, cert_pem, key_pem)
