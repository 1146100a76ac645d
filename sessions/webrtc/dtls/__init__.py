"""Sans-I/O DTLS 1.2 server that keys SRTP for one WebRTC peer (RFC 6347, RFC 5764).

Parley always answers ``a=setup:passive``, so it is the DTLS server (RFC 8842 §5.3) and the
browser or aiortc peer is the client. :class:`DtlsServer` wraps an OpenSSL server connection
over memory BIOs and is driven like aioquic's connection: bytes and ``now`` in, datagrams,
events and the next deadline out. It never touches a socket or a clock.

What the handshake must establish (RFC 8827 §6.5, RFC 8842 §5.1, RFC 5764 §4):

* the peer presents a certificate (the server sends CertificateRequest and refuses an empty
  Certificate) and that certificate hashes to the ``a=fingerprint`` of the SDP offer. No CA
  is involved, so any self-signed certificate passes OpenSSL's chain checks and the
  fingerprint is the whole identity check. It runs inside the handshake, so a mismatch
  aborts before our Finished and no SRTP key is ever derived;
* a ``use_srtp`` protection profile both sides support (RFC 5764 §4.1.1); we prefer
  AEAD_AES_128_GCM (RFC 7714 §14.2) over AES128_CM_HMAC_SHA1_80;
* the SRTP master keys and salts, exported with the "EXTRACTOR-dtls_srtp" label and split
  as RFC 5764 §4.2 lays them out.

Deliberately absent: cookie exchange (RFC 6347 §4.2.1 makes HelloVerifyRequest optional;
ICE connectivity checks have already shown the peer receives at this address), session
resumption (a resumed handshake carries no client Certificate to check), renegotiation,
DTLS 1.0 (RFC 8996) and application data: SCTP data channels (RFC 8261) are not supported,
so application records after the handshake are counted and dropped.

Every malformed datagram raises :class:`DtlsError` from :meth:`DtlsServer.receive`; anything
else a peer can do ends as a :class:`HandshakeFailed` or :class:`Closed` event, after which
the server is inert.

The package: :mod:`~sessions.webrtc.dtls.server` (the state machine and its events),
:mod:`~sessions.webrtc.dtls.openssl` (connection setup, certificate check, key export),
:mod:`~sessions.webrtc.dtls.records` (RFC 6347 §4.1 record framing) and
:mod:`~sessions.webrtc.dtls.keys` (profiles and SRTP keys).
"""

from __future__ import annotations

from sessions.webrtc.dtls.keys import SrtpKeys, SrtpProfile
from sessions.webrtc.dtls.records import DtlsError
from sessions.webrtc.dtls.server import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MTU,
    Closed,
    DtlsServer,
    DtlsState,
    Event,
    HandshakeComplete,
    HandshakeFailed,
)

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MTU",
    "Closed",
    "DtlsError",
    "DtlsServer",
    "DtlsState",
    "Event",
    "HandshakeComplete",
    "HandshakeFailed",
    "SrtpKeys",
    "SrtpProfile",
]
