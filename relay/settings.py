"""Settings the relay package owns: the cluster's (shared with the nodes above) and a relay's.

Plain attrs values with working defaults. ``ops/config.py`` maps TOML, environment variables and
command-line flags onto them; nothing here reads a file of settings or the environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Literal, final

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from relay.addresses import Address, parse_listen
from relay.edge import Limits
from relay.tunnel.certs import Credentials, Role
from storage.checkpoints import ClusterKey, ClusterKeyError, Sealer
from storage.etcdtls import EtcdTLS, endpoints_use_tls

__all__ = [
    "CLUSTER_KEY_FILE",
    "ETCD_SERVER_CERT",
    "HINT_SECRET_FILE",
    "OPERATOR_CERT",
    "TOKEN_KEYS_DIR",
    "ClusterSettings",
    "RelaySettings",
    "SettingsError",
]

#: in ``cluster.certs``: the secret that authenticates the relays' routing hints, hex, one per
#: line, current first (more than one while rotating)
HINT_SECRET_FILE = "hint.secret"
#: in ``cluster.certs``: the AES-256-GCM key that seals session checkpoints and move snapshots
#: (storage/checkpoints.py); ``cluster.key.old`` may hold the previous one while rotating
CLUSTER_KEY_FILE = "cluster.key"
#: in ``cluster.certs``: the access-token keys, ``<kid>.pub`` (every node reads all of them) and
#: ``<kid>.key`` (Ed25519, PKCS #8, mode 0600: only where tokens are minted); kids sort by age,
#: the newest ``.key`` signs
TOKEN_KEYS_DIR = "token-keys"
#: in ``cluster.certs``: etcd's own certificate (``etcd-server.pem`` / ``.key``): serverAuth for
#: its clients, clientAuth for its peers and its own gateway; `parley up`'s etcd runs with it
ETCD_SERVER_CERT = "etcd-server"
#: in ``cluster.certs``: the operator's client certificate (``parley-cli.pem`` / ``.key``) that
#: `parley status`, `drain`, `migrate` and `chaos` present to etcd
OPERATOR_CERT = "parley-cli"

#: who presents a certificate to etcd: a node or relay its member certificate, the operator's
#: commands ``parley-cli``
EtcdClientRole = Literal["node", "relay", "operator"]
_LIMITS = Limits()


class SettingsError(ValueError):
    """A setting is invalid or what it names is unusable; the message names the setting."""


@final
@attrs.frozen
class ClusterSettings:
    """Where the cluster's shared state and trust material are."""

    #: etcd's client endpoints, ``host:port`` each; ``https://host:port`` for an etcd that takes
    #: only clients with a certificate of the cluster CA (`parley up`'s, by default)
    etcd: str = "https://127.0.0.1:23790"
    prefix: str = "/parley"
    #: directory of the cluster CA (ca.pem), member certificates and the hint secret
    certs: str = ""

    def certs_dir(self) -> Path:
        if not self.certs:
            raise SettingsError(
                "cluster.certs is not set: make a cluster CA with `parley certs init --dir DIR` "
                "and set cluster.certs = DIR"
            )
        return Path(self.certs)

    def credentials(self, role: Role, ident: str) -> Credentials:
        """This member's tunnel certificate, key and the cluster CA, from ``certs``."""
        directory = self.certs_dir()
        try:
            return Credentials.load(directory, role, ident)
        except OSError as exc:
            raise SettingsError(
                f"{exc} (`parley certs issue --dir {directory} {role} {ident}` makes one)"
            ) from None

    def etcd_uses_tls(self) -> bool:
        """Whether ``etcd`` names a TLS etcd (``https://`` endpoints); raises SettingsError."""
        try:
            return endpoints_use_tls(self.etcd)
        except ValueError as exc:
            raise SettingsError(f"cluster.etcd: {exc}") from None

    def etcd_tls(self, role: EtcdClientRole, ident: str = "") -> EtcdTLS | None:
        """What this process presents to etcd: None when ``etcd`` is plain, else the cluster CA
        and its certificate from ``certs`` (a node's or relay's member certificate,
        ``{role}-{ident}``; the operator's ``parley-cli``). The one place that decides it."""
        if not self.etcd_uses_tls():
            return None
        directory = self.certs_dir()
        if role == "operator":
            stem, issue = OPERATOR_CERT, f"parley certs issue --dir {directory} operator"
        else:
            stem, issue = f"{role}-{ident}", f"parley certs issue --dir {directory} {role} {ident}"
        try:
            return EtcdTLS.load(directory, stem)
        except (OSError, ValueError) as exc:
            raise SettingsError(
                f"etcd at {self.etcd} needs a client certificate: {exc} (`{issue}` makes one)"
            ) from None

    def sealer(self) -> Sealer:
        """Seals and opens session snapshots with the cluster key(s) in ``certs``."""
        directory = self.certs_dir()
        keys = []
        for name in (CLUSTER_KEY_FILE, CLUSTER_KEY_FILE + ".old"):
            path = directory / name
            if name != CLUSTER_KEY_FILE and not path.exists():
                continue
            try:
                keys.append(ClusterKey.load(path))
            except ClusterKeyError as exc:
                raise SettingsError(f"{exc} (`parley certs init` makes one)") from None
        return Sealer(keys)

    def token_keys(self) -> dict[str, Ed25519PublicKey]:
        """The public keys that sign access tokens, by kid, from ``certs``/token-keys/*.pub."""
        directory = self.certs_dir() / TOKEN_KEYS_DIR
        keys: dict[str, Ed25519PublicKey] = {}
        try:
            paths = sorted(directory.glob("*.pub"))
            for path in paths:
                key = serialization.load_pem_public_key(path.read_bytes())
                if not isinstance(key, Ed25519PublicKey):
                    raise SettingsError(f"{path}: not an Ed25519 public key")
                keys[path.stem] = key
        except OSError as exc:
            raise SettingsError(f"cannot read the token keys in {directory}: {exc}") from None
        except ValueError:
            raise SettingsError(f"{directory}: a token key is not a PEM public key") from None
        if not keys:
            raise SettingsError(
                f"no token keys in {directory} (`parley token rotate --certs DIR` makes one)"
            )
        return keys

    def token_signer(self) -> tuple[str, Ed25519PrivateKey] | None:
        """The newest private token key and its kid, or None where tokens are not minted."""
        directory = self.certs_dir() / TOKEN_KEYS_DIR
        private = sorted(directory.glob("*.key"))
        if not private:
            return None
        path = private[-1]
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise SettingsError(f"cannot load the token key {path}: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SettingsError(f"{path}: not an Ed25519 private key")
        return path.stem, key

    def hint_secrets(self) -> list[bytes]:
        """The cluster's hint secrets, current first, from ``certs``/hint.secret."""
        path = self.certs_dir() / HINT_SECRET_FILE
        try:
            found = [bytes.fromhex(line) for line in path.read_text().split()]
        except OSError as exc:
            raise SettingsError(
                f"cannot read the hint secret {path}: {exc.strerror} (`parley certs init` makes it)"
            ) from None
        except ValueError:
            raise SettingsError(f"{path}: each line must be one secret in hex") from None
        if not found or any(len(secret) < 16 for secret in found):
            raise SettingsError(f"{path}: needs at least one secret of 16 bytes or more")
        return found


@final
@attrs.frozen
class RelaySettings:
    """One relay: its public port(s), its tunnel endpoint, and the edge's limits."""

    id: str = ""
    #: public UDP addresses, comma-separated: at most one IPv4 and one IPv6 (``[::]:3478``)
    listen: str = "0.0.0.0:3478,[::]:3478"
    #: the addresses clients send to, when they are not the bound ones (a 1:1 NAT such as a
    #: cloud's public IPv4, or ``listen`` on 0.0.0.0): every session's candidates, one per
    #: address family of ``listen``; "": the bound addresses
    advertise: str = ""
    #: where the public port is, e.g. "eu-west" (``node.region``'s form); nodes offer a client
    #: its own region's relays first. "": none
    region: str = attrs.field(
        default="", validator=lambda _, __, v: check_region(v, "relay.region")
    )
    tunnel_host: str = "127.0.0.1"
    tunnel_port: int = 0
    #: the address nodes dial for the tunnel when it is not the bound one (a NAT or a proxy in
    #: front of it), ``IP:PORT``, registered in etcd instead of the bound address; "": the bound
    #: one. A single endpoint: not with several workers
    tunnel_advertise: str = ""
    lease_ttl: int = 5
    #: how long the tunnel may hold client datagrams bound for one node, so that several share
    #: a QUIC packet (one to seal here and one to open there instead of one per datagram): a
    #: datagram waits at most this long, less once a packet's worth waits; 0: never (0-10)
    tunnel_hold_ms: float = 2.0
    # The edge's own defaults (relay/edge.py Limits), so that the two cannot drift apart.
    idle_timeout: float = _LIMITS.idle_timeout
    new_source_rate: float = _LIMITS.new_source_rate
    client_rate: float = _LIMITS.client_rate
    max_clients: int = _LIMITS.max_clients
    receive_buffer: int = _LIMITS.receive_buffer
    #: processes serving the public port together (SO_REUSEPORT), each a registration of its
    #: own (``<id>.w0``, ``<id>.w1``...) with its own tunnel endpoint
    workers: int = 1
    #: count SRTP/SRTCP indexes seen twice per session and direction (relay/audit.py): for
    #: tests and diagnostics (``PARLEY_RELAY_AUDIT=1``); off in production, it costs CPU
    audit: bool = False
    #: the ops port (GET /metrics for Prometheus, GET /healthz), ``IP:PORT``: never the public
    #: port, and on loopback unless set otherwise; port 0 picks a free one (the registration
    #: shows it), a worker adds its number to a fixed port; "" serves none
    ops_listen: str = "127.0.0.1:0"

    def ops_address(self, worker: int | None = None) -> Address | None:
        """``ops_listen`` parsed (None: no ops port); raises SettingsError."""
        if not self.ops_listen:
            return None
        try:
            host, port = parse_listen(self.ops_listen, "relay.ops_listen")
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        return host, (port + worker if port and worker else port)

    def relay_id(self) -> str:
        return self.id or f"relay-{socket.gethostname().split('.')[0]}-{os.getpid()}"

    def limits(self) -> Limits:
        return Limits(
            new_source_rate=self.new_source_rate,
            client_rate=self.client_rate,
            max_clients=self.max_clients,
            idle_timeout=self.idle_timeout,
            receive_buffer=self.receive_buffer,
            audit_indexes=self.audit,
        )

    def listen_addresses(self) -> list[tuple[str, int]]:
        """``listen`` parsed; raises SettingsError."""
        return _addresses(self.listen, "relay.listen", any_port=True)

    def advertise_addresses(self) -> list[tuple[str, int]]:
        """``advertise`` parsed ([]: none; the bound addresses are offered); raises SettingsError.

        One per address family that ``listen`` binds, each a specific address with a port: a
        client cannot send to 0.0.0.0 or to port 0.
        """
        if not self.advertise:
            return []
        out = _addresses(self.advertise, "relay.advertise", any_port=False)
        for host, _ in out:
            if ipaddress.ip_address(host).is_unspecified:
                raise SettingsError(f"relay.advertise: {host} is no address a client can reach")
        families = sorted(":" in host for host, _ in out)
        if families != sorted(":" in host for host, _ in self.listen_addresses()):
            raise SettingsError(
                "relay.advertise: one address per address family of relay.listen, in any order"
            )
        return out

    def tunnel_advertise_address(self) -> tuple[str, int] | None:
        """``tunnel_advertise`` parsed (None: the bound tunnel address); raises SettingsError."""
        if not self.tunnel_advertise:
            return None
        out = _addresses(self.tunnel_advertise, "relay.tunnel_advertise", any_port=False)
        if len(out) != 1 or ipaddress.ip_address(out[0][0]).is_unspecified:
            raise SettingsError("relay.tunnel_advertise: one address nodes can dial, IP:PORT")
        if self.workers > 1:
            raise SettingsError(
                "relay.tunnel_advertise names one tunnel endpoint; each of several workers has "
                "its own: leave it empty with relay.workers > 1"
            )
        return out[0]


#: a region's name: lowercase letters, digits and dashes, as cloud regions are named
_REGION = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")


def check_region(value: str, setting: str = "region") -> str:
    """``value`` if it is "" or a region's name; raises SettingsError naming ``setting``."""
    if value and not _REGION.fullmatch(value):
        raise SettingsError(
            f"{setting}: {value!r} is not a region name (lowercase letters, digits and dashes, "
            "at most 32)"
        )
    return value


def _addresses(value: str, setting: str, *, any_port: bool) -> list[tuple[str, int]]:
    """``IP:PORT[,IP:PORT]`` (IPv6 as ``[ADDR]:PORT``): at most one per address family."""
    out: list[tuple[str, int]] = []
    for item in (part.strip() for part in value.split(",")):
        host, _, port = item.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        try:
            ipaddress.ip_address(host)
            number = int(port)
        except ValueError:
            raise SettingsError(
                f"{setting}: {item!r} is not IP:PORT (IPv6 as [ADDR]:PORT)"
            ) from None
        if not (0 if any_port else 1) <= number <= 0xFFFF:
            raise SettingsError(f"{setting}: port out of range in {item!r}")
        out.append((host, number))
    families = [":" in host for host, _ in out]
    if not out or len(set(families)) != len(families):
        raise SettingsError(f"{setting}: one IPv4 and/or one IPv6 address")
    return out
