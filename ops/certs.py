"""``parley certs``: the cluster's trust material, in one directory (``cluster.certs``).

* ``parley certs init --dir DIR`` makes the cluster CA (``ca.pem``, ``ca.key``), the secret
  that authenticates the relays' routing hints (``hint.secret``, relay/tunnel/hint.py) and the
  key that seals session snapshots when sessions move (``cluster.key``,
  storage/checkpoints.py), and the first access-token key pair (``token-keys/<kid>.key`` and
  ``.pub``; ``parley token rotate`` adds the next).
  It also issues etcd's own certificate for loopback (``etcd-server.pem`` / ``.key``) and the
  operator's client certificate (``parley-cli.pem`` / ``.key``), so that ``parley up``'s etcd
  can take only clients with a certificate of the cluster CA.
* ``parley certs issue --dir DIR node|relay ID`` signs a member certificate for one node or
  relay (``node-ID.pem`` / ``.key``): relays and nodes refuse tunnel peers without one, and
  present it to etcd. ``issue etcd [--host H ...]`` signs etcd's certificate for the names its
  clients dial; ``issue operator`` the operator's again.

Every relay and node needs ``ca.pem``, its own certificate and key, and ``hint.secret``;
``ca.key`` only belongs where certificates are issued; nodes need ``token-keys/*.pub``, and a
``.key`` only where tokens are minted. Private files are written mode 0600.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay.settings import (
    CLUSTER_KEY_FILE,
    ETCD_SERVER_CERT,
    HINT_SECRET_FILE,
    OPERATOR_CERT,
    TOKEN_KEYS_DIR,
)
from relay.tunnel.certs import init_ca, issue_files, issue_leaf, read_ca, write_pair
from storage.checkpoints import ClusterKey

__all__ = [
    "LOCAL_ETCD_HOSTS",
    "init_cluster",
    "issue_etcd_server",
    "issue_operator",
    "run_certs",
    "write_hint_secret",
    "write_token_key",
]

#: bytes of a new hint secret (HMAC-SHA256 key)
SECRET_BYTES = 32
#: what etcd's certificate is valid for unless told otherwise: loopback, where `parley up` runs it
LOCAL_ETCD_HOSTS = ("127.0.0.1", "::1", "localhost")


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        if not host or any(c.isspace() or c in "/:@" for c in host):
            raise ValueError(f"{host!r} is neither an IP address nor a host name") from None
        return x509.DNSName(host)


def issue_etcd_server(
    directory: Path, hosts: tuple[str, ...] | list[str] = LOCAL_ETCD_HOSTS
) -> tuple[Path, Path]:
    """etcd's own certificate, signed by the CA in ``directory``, valid for ``hosts`` (IP
    addresses and DNS names its clients and peers dial): ``etcd-server.pem`` / ``.key`` (0600).

    Its serverAuth serves etcd's clients; its clientAuth lets it dial its peers and its own
    gRPC gateway, which etcd does with this certificate when it requires client certificates."""
    if not hosts:
        raise ValueError("etcd's certificate needs at least one host name or address")
    ca_pem, ca_key_pem = read_ca(directory)
    names = [_host_name(host) for host in hosts]
    cert_pem, key_pem = issue_leaf(ca_pem, ca_key_pem, "etcd", names)
    return write_pair(directory, ETCD_SERVER_CERT, cert_pem, key_pem)


def issue_operator(directory: Path) -> tuple[Path, Path]:
    """The operator's client certificate for etcd, ``parley-cli.pem`` / ``.key`` (0600): what
    `parley status`, `drain`, `migrate` and `chaos` present. It names no tunnel identity, so no
    relay or node accepts it as a peer."""
    ca_pem, ca_key_pem = read_ca(directory)
    cert_pem, key_pem = issue_leaf(ca_pem, ca_key_pem, OPERATOR_CERT)
    return write_pair(directory, OPERATOR_CERT, cert_pem, key_pem)


def write_hint_secret(directory: Path, *, force: bool = False) -> Path:
    """A new random hint secret in ``directory``; refuses to replace one unless ``force``."""
    path = Path(directory) / HINT_SECRET_FILE
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"{path} already exists; a new secret breaks the hints of live sessions "
            "(use --force to replace it)"
        ) from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(SECRET_BYTES) + "\n")
    os.chmod(path, 0o600)
    return path


def write_cluster_key(directory: Path, *, force: bool = False) -> Path:
    """A new cluster key (seals session snapshots) in ``directory``, mode 0600."""
    path = Path(directory) / CLUSTER_KEY_FILE
    ClusterKey.generate().save(path, overwrite=force)
    return path


def write_token_key(directory: Path) -> tuple[Path, Path]:
    """A new Ed25519 token key pair in ``directory``/token-keys: ``<kid>.key`` (mode 0600) and
    ``<kid>.pub``. The kid starts with the UTC time, so the newest key sorts last and signs;
    older public keys stay until removed, so that tokens they signed stay valid meanwhile."""
    keys = Path(directory) / TOKEN_KEYS_DIR
    keys.mkdir(mode=0o700, parents=True, exist_ok=True)
    kid = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)
    key = Ed25519PrivateKey.generate()
    private = keys / f"{kid}.key"
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    public = keys / f"{kid}.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def init_cluster(directory: Path, *, force: bool = False) -> list[Path]:
    """The CA, the hint secret, the cluster key, a token key, etcd's certificate for loopback
    and the operator's; returns the files written."""
    ca = init_ca(Path(directory), force=force)
    return [
        ca,
        write_hint_secret(directory, force=force),
        write_cluster_key(directory, force=force),
        *write_token_key(directory),
        *issue_etcd_server(directory),
        *issue_operator(directory),
    ]


def _issue(args: argparse.Namespace, directory: Path) -> tuple[Path, Path]:
    if args.role in ("node", "relay"):
        if not args.id:
            raise ValueError(f"`parley certs issue {args.role}` needs the {args.role}'s id")
        return issue_files(directory, args.role, args.id)
    if args.id:
        raise ValueError(f"`parley certs issue {args.role}` takes no id (got {args.id!r})")
    if args.role == "etcd":
        hosts = [h.strip() for h in ",".join(args.host or LOCAL_ETCD_HOSTS).split(",")]
        return issue_etcd_server(directory, [h for h in hosts if h])
    return issue_operator(directory)


def run_certs(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    try:
        if args.certs_command == "init":
            for path in init_cluster(directory, force=args.force):
                print(f"wrote {path}")
            print(f"next: parley certs issue --dir {directory} node|relay ID, for each member")
        else:
            for path in _issue(args, directory):
                print(f"wrote {path}")
    except (OSError, ValueError) as exc:
        print(f"parley certs: {exc}", file=sys.stderr)
        return 2
    return 0
