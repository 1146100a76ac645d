"""``parley certs``: the cluster's trust material, in one directory (``cluster.certs``).

* ``parley certs init --dir DIR`` makes the cluster CA (``ca.pem``, ``ca.key``), the secret
  that authenticates the relays' routing hints (``hint.secret``, relay/tunnel/hint.py) and the
  key that seals session snapshots when sessions move (``cluster.key``,
  storage/checkpoints.py), and the first access-token key pair (``token-keys/<kid>.key`` and
  ``.pub``; ``parley token rotate`` adds the next).
* ``parley certs issue --dir DIR node|relay ID`` signs a tunnel certificate for one member
  (``node-ID.pem`` / ``.key``); relays and nodes refuse tunnel peers without one.

Every relay and node needs ``ca.pem``, its own certificate and key, and ``hint.secret``;
``ca.key`` only belongs where certificates are issued; nodes need ``token-keys/*.pub``, and a
``.key`` only where tokens are minted. Private files are written mode 0600.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay.settings import CLUSTER_KEY_FILE, HINT_SECRET_FILE, TOKEN_KEYS_DIR
from relay.tunnel.certs import init_ca, issue_files
from storage.checkpoints import ClusterKey

__all__ = ["init_cluster", "run_certs", "write_hint_secret", "write_token_key"]

#: bytes of a new hint secret (HMAC-SHA256 key)
SECRET_BYTES = 32


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
    """The CA, the hint secret, the cluster key and a token key; returns the files written."""
    ca = init_ca(Path(directory), force=force)
    return [
        ca,
        write_hint_secret(directory, force=force),
        write_cluster_key(directory, force=force),
        *write_token_key(directory),
    ]


def run_certs(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    try:
        if args.certs_command == "init":
            for path in init_cluster(directory, force=args.force):
                print(f"wrote {path}")
            print(f"next: parley certs issue --dir {directory} node|relay ID, for each member")
        else:
            for path in issue_files(directory, args.role, args.id):
                print(f"wrote {path}")
    except (OSError, ValueError) as exc:
        print(f"parley certs: {exc}", file=sys.stderr)
        return 2
    return 0
