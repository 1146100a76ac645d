"""The OpenSSL side of the DTLS server: how the connection is configured, how the peer's
certificate is checked against the offered fingerprint, and how SRTP keys are exported.

Nothing here keeps state between calls; :class:`~sessions.webrtc.dtls.DtlsServer` owns the
connection and decides what each outcome means for the association.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Final

from OpenSSL import SSL, crypto

from sessions.webrtc.certs import FINGERPRINT_ALGORITHMS, Certificate, fingerprint
from sessions.webrtc.dtls.keys import BY_OPENSSL_NAME, SrtpKeys, SrtpProfile

__all__ = [
    "MAX_MTU",
    "MIN_MTU",
    "READ_SIZE",
    "VerifyCallback",
    "certificate_matches",
    "check_fingerprint",
    "describe",
    "export_srtp_keys",
    "selected_profile",
    "server_connection",
]

#: The MTU a server may be given, in bytes of UDP payload.
MIN_MTU: Final = 512
MAX_MTU: Final = 2**14
#: How much to ask of a memory BIO or of ``SSL_read`` at once: more than any datagram.
READ_SIZE: Final = 2**16

#: pyOpenSSL's verify callback: (connection, certificate, error number, depth, ok) -> accept.
VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]

_DTLS1_2_VERSION: Final = 0xFEFD  # RFC 6347 §4.1: {254, 253}; pyOpenSSL has no constant
_EXPORTER_LABEL: Final = b"EXTRACTOR-dtls_srtp"  # RFC 5764 §4.2
# RFC 8827 §6.5 makes TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 mandatory for every WebRTC
# endpoint; our certificate is ECDSA, so only ECDSA suites can be chosen. AEAD only.
_CIPHERS: Final = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384"
)
_FINGERPRINT_RE: Final = re.compile(r"[0-9A-F]{2}(?::[0-9A-F]{2})*", re.ASCII)
_REASON_LIMIT: Final = 200


def check_fingerprint(remote_fingerprint: tuple[str, str]) -> tuple[str, str]:
    """The offered ``(hash name, "AB:CD:...")`` in canonical case; ``ValueError`` if unusable.

    A local error: the SDP parser has already checked what the peer offered.
    """
    algorithm, digest = remote_fingerprint
    algorithm = algorithm.lower()
    digest = digest.upper()
    if algorithm not in FINGERPRINT_ALGORITHMS:
        raise ValueError(f"unsupported fingerprint hash function: {algorithm!r}")
    digest_size = hashlib.new(FINGERPRINT_ALGORITHMS[algorithm]).digest_size
    if not _FINGERPRINT_RE.fullmatch(digest) or len(digest) != 3 * digest_size - 1:
        raise ValueError(f"malformed {algorithm} fingerprint")
    return algorithm, digest


def server_connection(
    certificate: Certificate, profiles: Sequence[SrtpProfile], mtu: int, verify: VerifyCallback
) -> SSL.Connection:
    """A DTLS 1.2 server connection over memory BIOs, as WebRTC needs it; ``verify`` is this
    connection's own check of the peer's certificate chain."""
    conn = SSL.Connection(_shared_context(certificate, tuple(profiles)), None)
    conn.set_app_data(verify)
    conn.set_accept_state()
    conn.set_ciphertext_mtu(mtu)
    return conn


# One OpenSSL context per certificate and profile list, shared by every connection made with
# them: a node keeps a connection per session, and a context holding the certificate and key
# is about 24 KiB of OpenSSL's memory each (README, Benchmarks: scale). What differs between
# connections, the fingerprint the peer must match, is each connection's own ``verify``,
# reached through its app data. Forgotten with the certificate.
_contexts: weakref.WeakKeyDictionary[Certificate, dict[tuple[SrtpProfile, ...], SSL.Context]] = (
    weakref.WeakKeyDictionary()
)


def _shared_context(certificate: Certificate, profiles: tuple[SrtpProfile, ...]) -> SSL.Context:
    by_profiles = _contexts.setdefault(certificate, {})
    ctx = by_profiles.get(profiles)
    if ctx is None:
        ctx = by_profiles[profiles] = _server_context(certificate, profiles)
    return ctx


def _verify_connection(
    conn: SSL.Connection, cert: crypto.X509, err: int, depth: int, ok: int
) -> bool:
    """A shared context's verify callback: the connection's own; refuse if it has none, or if
    it raises. It must not raise: pyOpenSSL keeps a callback's exception on the context, so one
    session's failure would surface in whichever session's handshake the context served next."""
    verify = conn.get_app_data()
    if not callable(verify):
        return False
    try:
        return bool(verify(conn, cert, err, depth, ok))
    except Exception:  # refusing is the safe answer: the handshake fails
        return False


def _server_context(certificate: Certificate, profiles: Sequence[SrtpProfile]) -> SSL.Context:
    ctx = SSL.Context(SSL.DTLS_SERVER_METHOD)
    ctx.set_min_proto_version(_DTLS1_2_VERSION)
    ctx.set_max_proto_version(_DTLS1_2_VERSION)
    ctx.use_certificate(certificate.cert)
    ctx.use_privatekey(certificate.private_key)
    ctx.check_privatekey()
    ctx.set_cipher_list(_CIPHERS)
    ctx.set_options(
        SSL.OP_CIPHER_SERVER_PREFERENCE
        # the MTU is ours to set; a memory BIO has none to query (RFC 6347 §4.1.1.1)
        | SSL.OP_NO_QUERY_MTU
        # no resumption: an abbreviated handshake skips the client Certificate, and
        # the fingerprint check with it (RFC 8842 §5.1)
        | SSL.OP_NO_TICKET
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_NO_COMPRESSION
    )
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    # RFC 8827 §6.5 / RFC 8842 §5.1: the client must present a certificate, and it is
    # authenticated by fingerprint, not by a chain to a trust anchor.
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verify_connection)
    # RFC 5764 §4.1.1: the use_srtp extension; OpenSSL picks by our order of preference.
    ctx.set_tlsext_use_srtp(b":".join(p.openssl_name for p in profiles))
    return ctx


def certificate_matches(cert: crypto.X509, algorithm: str, expected: str) -> bool:
    """Whether ``cert`` hashes to the ``expected`` fingerprint (RFC 8122 §5), compared in
    constant time."""
    try:
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
    except crypto.Error:
        return False
    return hmac.compare_digest(fingerprint(der, algorithm), expected)


def selected_profile(conn: SSL.Connection) -> SrtpProfile | None:
    """The profile the use_srtp extension settled on (RFC 5764 §4.1.1), if any."""
    return BY_OPENSSL_NAME.get(conn.get_selected_srtp_profile())


def export_srtp_keys(conn: SSL.Connection, profile: SrtpProfile) -> SrtpKeys:
    """The SRTP master keys and salts of a completed handshake (RFC 5764 §4.2).

    Raises ``SSL.Error`` if OpenSSL cannot export them.
    """
    material = conn.export_keying_material(
        _EXPORTER_LABEL, 2 * (profile.key_length + profile.salt_length)
    )
    return SrtpKeys.from_exported(profile, material)


def describe(exc: SSL.Error) -> str:
    """A short, log-safe reason from OpenSSL's error queue (fixed library strings only)."""
    reasons: list[str] = []
    if exc.args and isinstance(exc.args[0], list):
        for entry in exc.args[0]:
            if isinstance(entry, tuple) and entry and isinstance(entry[-1], str):
                reasons.append(entry[-1])
    if isinstance(exc, SSL.SysCallError):
        reasons.append("unexpected end of input")
    text = "; ".join(r for r in reasons if r) or type(exc).__name__
    return text[:_REASON_LIMIT]
