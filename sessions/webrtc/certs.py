"""Self-signed DTLS certificates and their SDP fingerprints (RFC 8827 §6.5, RFC 8122 §5).

WebRTC does not use a PKI for DTLS: each side presents a self-signed certificate and the
peer authenticates it by the hash carried in the signalled ``a=fingerprint`` line (RFC 8842
§5.1). So a certificate here is cheap and short-lived: an ECDSA P-256 key (the curve every
WebRTC stack supports for TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, RFC 8827 §6.5), a random
serial and a validity window of days, made per node or per session.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
from typing import Final, final

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "FINGERPRINT_ALGORITHMS",
    "Certificate",
    "fingerprint",
    "generate_certificate",
]

#: SDP hash function names (RFC 8122 §5, "hash-func") we can compute, mapped to hashlib's.
#: MD2 and MD5 are in the registry but RFC 8122 §5 forbids them for new fingerprints.
FINGERPRINT_ALGORITHMS: Final[dict[str, str]] = {
    "sha-1": "sha1",
    "sha-256": "sha256",
    "sha-384": "sha384",
    "sha-512": "sha512",
}

#: Chromium's default lifetime for a generated WebRTC certificate is 30 days.
_DEFAULT_VALIDITY: Final = datetime.timedelta(days=30)
#: notBefore is back-dated so a peer whose clock runs slow does not reject the certificate.
_BACKDATE: Final = datetime.timedelta(days=1)


def fingerprint(cert_der: bytes, algorithm: str = "sha-256") -> str:
    """The RFC 8122 §5 fingerprint of a DER certificate: upper-case hex pairs joined by ':'.

    ``algorithm`` is the SDP hash name (``sha-256``, ``sha-1``, ``sha-384``, ``sha-512``;
    case-insensitive). An unknown name is a local error: :class:`ValueError`.
    """
    name = FINGERPRINT_ALGORITHMS.get(algorithm.lower())
    if name is None:
        raise ValueError(f"unsupported fingerprint hash function: {algorithm!r}")
    return hashlib.new(name, cert_der).digest().hex(":").upper()


@final
@attrs.frozen
class Certificate:
    """A self-signed DTLS certificate with its private key.

    The repr names the certificate by its fingerprint and never shows the key.
    """

    cert: x509.Certificate = attrs.field(repr=False)
    private_key: ec.EllipticCurvePrivateKey = attrs.field(repr=False)
    #: the certificate in DER, what the fingerprint is computed over (RFC 8122 §5)
    der: bytes = attrs.field(repr=False)
    #: "AB:CD:..." SHA-256 fingerprint, for our ``a=fingerprint:sha-256`` line (RFC 8842 §5)
    fingerprint_sha256: str

    @property
    def not_valid_after(self) -> datetime.datetime:
        """End of validity (UTC); make a new certificate before this."""
        return self.cert.not_valid_after_utc

    def fingerprint(self, algorithm: str = "sha-256") -> str:
        """This certificate's fingerprint with another SDP hash function."""
        return fingerprint(self.der, algorithm)


def generate_certificate(
    *,
    validity: datetime.timedelta = _DEFAULT_VALIDITY,
    now: datetime.datetime | None = None,
    common_name: str = "parley",
) -> Certificate:
    """Make an ECDSA P-256 key and a self-signed certificate for it (signed with SHA-256).

    ``now`` (timezone-aware; defaults to the current UTC time) anchors the validity window
    ``[now - 1 day, now + validity]``.
    """
    if validity <= datetime.timedelta(0):
        raise ValueError("validity must be positive")
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        # RFC 5280 §4.1.2.2: positive, at most 20 octets; 64 random bits is plenty.
        .serial_number(secrets.randbits(64) | 1)
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + validity)
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    return Certificate(cert=cert, private_key=key, der=der, fingerprint_sha256=fingerprint(der))
