"""Client certificates for an etcd that takes no client without one, and the endpoint rule.

Parley's etcd holds session keys (sealed) and every ownership record, so in a cluster it is run
with client-certificate TLS: etcd's ``--client-cert-auth`` with the cluster CA as its trusted CA.
A client then shows the CA that signed etcd's own certificate and a certificate of its own from
that CA (nodes and relays their member certificate, operators ``parley-cli``).

Which etcd needs TLS is written in its endpoints, and nowhere else: ``https://host:port`` is
TLS, ``host:port`` (or ``http://host:port``) is plain. A cluster's members share one scheme.
This module is the value a client presents (:class:`EtcdTLS`) and the parsing of endpoints; the
gRPC channel is made in :mod:`storage.etcdwire`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import final

import attrs

__all__ = ["HTTPS", "EtcdTLS", "check_client", "endpoints_use_tls", "parse_endpoints"]

HTTPS = "https://"
HTTP = "http://"
#: in a certificate directory: the CA that signs etcd's certificate and every client's
CA_FILE = "ca.pem"


@final
@attrs.frozen
class EtcdTLS:
    """What a client presents to an etcd with client-certificate TLS (PEM bytes): the CA that
    etcd's certificate must chain to, and the client's own certificate and key."""

    ca_pem: bytes = attrs.field(repr=False)
    cert_pem: bytes = attrs.field(repr=False)
    key_pem: bytes = attrs.field(repr=False)

    @classmethod
    def load(cls, directory: Path, stem: str) -> EtcdTLS:
        """``ca.pem``, ``<stem>.pem`` and ``<stem>.key`` from ``directory``; a missing file is
        a FileNotFoundError that names it, a file that is no PEM a ValueError."""
        directory = Path(directory)
        found = []
        for name in (CA_FILE, f"{stem}.pem", f"{stem}.key"):
            path = directory / name
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise FileNotFoundError(f"{path} does not exist") from None
            if b"-----BEGIN " not in data:
                raise ValueError(f"{path} is not PEM")
            found.append(data)
        return cls(*found)


def _split(item: str) -> tuple[str | None, str]:
    for scheme in (HTTPS, HTTP):
        if item.lower().startswith(scheme):
            return scheme, item[len(scheme) :]
    return None, item


def parse_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """``"h1:p1,h2:p2"`` or a list of ``host:port``, each optionally ``https://`` or
    ``http://``, as a list of bare ``host:port``; ValueError names a bad one."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed = [_split(item.strip())[1] for item in items]
    for item in parsed:
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"etcd endpoint must be host:port, not {item!r}")
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"etcd endpoints repeat one: {','.join(parsed)}")
    return parsed


def endpoints_use_tls(endpoints: str | Sequence[str]) -> bool:
    """Whether ``endpoints`` name a TLS etcd: every one ``https://`` (True) or none (False);
    ValueError when they mix the two."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    secure = {_split(item.strip())[0] == HTTPS for item in items}
    if len(secure) > 1:
        raise ValueError("etcd endpoints mix https:// with plain ones: one cluster, one scheme")
    return secure == {True}


def check_client(endpoints: str | Sequence[str], tls: EtcdTLS | None) -> None:
    """ValueError when a client's certificate does not fit the endpoints' scheme: ``https://``
    without one (etcd would refuse it), ``http://`` with one (the certificate would go unused:
    someone meant another etcd). Bare ``host:port`` takes either."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    if endpoints_use_tls(items) and tls is None:
        raise ValueError(
            f"etcd at {','.join(items)} takes TLS clients only: a client certificate is needed "
            "(cluster.certs)"
        )
    if tls is not None and any(_split(item.strip())[0] == HTTP for item in items):
        raise ValueError(f"etcd at {','.join(items)} is plain http: it takes no client certificate")
