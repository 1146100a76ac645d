"""aioquic as the tunnels use it: the connection class and its configuration.

aioquic's :class:`~aioquic.quic.connection.QuicConnection` is the sans-I/O QUIC core of every
tunnel. :class:`TunnelConnection` is the one place that touches aioquic internals, each for a
reason written where it is used; tests/relay/test_dependencies.py fails, naming the attribute,
if an aioquic upgrade removes one. :class:`LinkConfig` holds what every connection of one
endpoint shares: our certificate, the cluster CA and QUIC's limits. The protocol on top (phases,
authentication policy, greeting) is relay/tunnel/link.py.

aioquic cannot do the server half of mutual TLS on its own:

* an aioquic server only sends a CertificateRequest when the private
  ``tls.Context._request_client_certificate`` is set ("for test purposes only"); we set it in
  ``_initialize``, right after aioquic creates the TLS context;
* the server then checks the client's CertificateVerify signature (proof that the client holds
  the key) but neither verifies the client's chain nor refuses an empty Certificate message. So
  after ``HandshakeCompleted`` the link reads the peer's certificates from
  ``tls._peer_certificate`` and ``tls._peer_certificate_chain``
  (:meth:`TunnelConnection.peer_certificates`) and verifies them itself.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Callable
from typing import Any, Final, final

import attrs
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from relay.tunnel.certs import Credentials

__all__ = [
    "ACK_DELAY",
    "ALPN",
    "CID_LENGTH",
    "MAX_DATAGRAM_FRAME_SIZE",
    "LinkConfig",
    "TunnelConnection",
]

ALPN: Final = "parley-tunnel/1"
CID_LENGTH: Final = 8
#: what we accept (RFC 9221 §3: it bounds the whole frame); media never comes close
MAX_DATAGRAM_FRAME_SIZE: Final = 65536
#: how long a tunnel waits before acknowledging what it received. aioquic acknowledges after
#: 1 ms (its timer granularity), which at media rates means one ACK-only packet, one timer and
#: one wake-up on each side for every datagram. The tunnels carry DATAGRAM frames, which nobody
#: retransmits: RFC 9221 §5.2 asks receivers to delay those ACKs within max_ack_delay (25 ms,
#: aioquic's default, RFC 9000 §18.2). An ACK due by then rides on the next packet either way.
ACK_DELAY: Final = 0.020


class TunnelConnection(QuicConnection):
    """aioquic's connection, with every aioquic internal the tunnels rely on in one place
    (tests/relay/test_dependencies.py fails, naming it, if an upgrade removes one)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # aioquic internal: its ACK delay is fixed at 1 ms (see ACK_DELAY).
        self._ack_delay = ACK_DELAY

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            # aioquic internal: only this private flag makes its server send a
            # CertificateRequest (RFC 8446 §4.3.2). aioquic creates ``self.tls`` in
            # ``_initialize`` (on the first Initial), so this is the earliest point to set it.
            self.tls._request_client_certificate = True

    def peer_certificates(self) -> list[x509.Certificate]:
        """The peer's certificate chain, leaf first; empty if it sent none (aioquic internal)."""
        leaf = self.tls._peer_certificate
        return [] if leaf is None else [leaf, *self.tls._peer_certificate_chain]

    @property
    def peer_max_datagram_frame_size(self) -> int | None:
        """The peer's max_datagram_frame_size transport parameter (RFC 9221 §3); None if it
        does not accept DATAGRAM frames at all."""
        return self._remote_max_datagram_frame_size

    @property
    def queued_datagrams(self) -> int:
        return len(self._datagrams_pending)

    @property
    def close_event(self) -> events.ConnectionTerminated | None:
        """Why the connection is closing, as soon as it starts to (aioquic reports
        ConnectionTerminated only after the closing or draining period, RFC 9000 §10.2)."""
        return self._close_event


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@final
@attrs.frozen
class LinkConfig:
    """What every link of one endpoint shares: who we are, whom we trust, QUIC's limits."""

    credentials: Credentials
    idle_timeout: float = 10.0
    #: the largest UDP payload QUIC may send (RFC 9000 §14: at least 1200)
    max_datagram_size: int = 1452
    #: the wall clock, not Trio's: certificates expire in calendar time
    wall_clock: Callable[[], datetime.datetime] = _utc_now
    ca: x509.Certificate = attrs.field(init=False, repr=False)
    _cert: x509.Certificate = attrs.field(init=False, repr=False)
    _key: Any = attrs.field(init=False, repr=False)

    @ca.default
    def _load_ca(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.credentials.ca_pem)

    @_cert.default
    def _load_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.credentials.cert_pem)

    @_key.default
    def _load_key(self) -> Any:
        return load_pem_private_key(self.credentials.key_pem, password=None)

    def quic(self, *, is_client: bool) -> QuicConfiguration:
        """aioquic's configuration for one side of a link."""
        return QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            idle_timeout=self.idle_timeout,
            max_datagram_size=self.max_datagram_size,
            max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
            connection_id_length=CID_LENGTH,
            certificate=self._cert,
            private_key=self._key,
            cadata=self.credentials.ca_pem,
            # aioquic clients verify the server's chain against ``cadata``; without a
            # server_name they skip host names, which mean nothing here (we check the URI
            # identity ourselves). aioquic servers verify nothing: see Link._authenticate.
            server_name=None,
            verify_mode=ssl.CERT_REQUIRED if is_client else ssl.CERT_NONE,
        )
