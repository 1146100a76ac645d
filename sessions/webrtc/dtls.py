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
"""

from __future__ import annotations

import collections
import contextlib
import enum
import hashlib
import hmac
import re
import struct
from collections.abc import Sequence
from typing import Final, final

import attrs
from OpenSSL import SSL, crypto

from sessions.webrtc.certs import FINGERPRINT_ALGORITHMS, Certificate, fingerprint
from sessions.webrtc.errors import RemoteInputError

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

#: Largest datagram we emit. 1200 bytes of UDP payload fits any path WebRTC runs over,
#: including TURN and IPv6 tunnels; OpenSSL fragments handshake messages to fit
#: (RFC 6347 §4.1.1.1, §4.2.3).
DEFAULT_MTU: Final = 1200
#: Give up on a handshake that has not completed this long after its first datagram.
#: OpenSSL's own retransmission schedule (1 s doubling to 60 s, RFC 6347 §4.2.4.1) would
#: otherwise keep a dead peer's handshake alive for minutes.
DEFAULT_HANDSHAKE_TIMEOUT: Final = 30.0

_DTLS1_2_VERSION: Final = 0xFEFD  # RFC 6347 §4.1: {254, 253}; pyOpenSSL has no constant
_EXPORTER_LABEL: Final = b"EXTRACTOR-dtls_srtp"  # RFC 5764 §4.2
# RFC 8827 §6.5 makes TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 mandatory for every WebRTC
# endpoint; our certificate is ECDSA, so only ECDSA suites can be chosen. AEAD only.
_CIPHERS: Final = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384"
)

# RFC 6347 §4.1: type(1) version(2) epoch(2) sequence_number(6) length(2).
_RECORD_HEADER: Final = struct.Struct("!BBBHHIH")
_HEADER_LENGTH: Final = 13
# RFC 6347 §4.1 keeps TLS's content types: change_cipher_spec, alert, handshake,
# application_data (RFC 5246 §6.2.1). Heartbeat (24) is not negotiated by us.
_CONTENT_TYPES: Final = frozenset({20, 21, 22, 23})
# RFC 6347 §4.1: DTLS versions are the one's complement of TLS ones, so always 0xFE.. .
_VERSION_MAJOR: Final = 0xFE
# RFC 5246 §6.2.3 (kept by RFC 6347 §4.1): TLSCiphertext.length <= 2^14 + 2048.
_MAX_RECORD_LENGTH: Final = 2**14 + 2048
# Datagrams longer than this are refused unread; OpenSSL's DTLS read buffer takes one whole
# datagram at a time and a WebRTC peer never sends more than ~1500 bytes.
_MAX_DATAGRAM: Final = 2**14
_MIN_MTU: Final = 512
_MAX_MTU: Final = 2**14
_READ_SIZE: Final = 2**16
_REASON_LIMIT: Final = 200


class DtlsError(RemoteInputError):
    """A datagram was not a well-formed sequence of DTLS records; it was dropped unread."""


class SrtpProfile(enum.StrEnum):
    """SRTP protection profiles we negotiate, by their IANA names (RFC 5764 §4.1.2)."""

    #: RFC 7714 §14.2; preferred
    AEAD_AES_128_GCM = "SRTP_AEAD_AES_128_GCM"
    #: RFC 5764 §4.1.2; every WebRTC endpoint implements it (RFC 8827 §6.5)
    AES128_CM_HMAC_SHA1_80 = "SRTP_AES128_CM_HMAC_SHA1_80"

    @property
    def protection_profile_id(self) -> int:
        """The two-byte SRTPProtectionProfile value, also libsrtp's and pylibsrtp's id."""
        return _PROFILE_PARAMETERS[self][0]

    @property
    def key_length(self) -> int:
        """Master key length in bytes."""
        return _PROFILE_PARAMETERS[self][1]

    @property
    def salt_length(self) -> int:
        """Master salt length in bytes."""
        return _PROFILE_PARAMETERS[self][2]

    @property
    def openssl_name(self) -> bytes:
        """The name OpenSSL uses in ``SSL_CTX_set_tlsext_use_srtp``."""
        return _PROFILE_PARAMETERS[self][3]


# (profile id, key length, salt length, OpenSSL name): RFC 5764 §4.1.2 gives
# AES128_CM_HMAC_SHA1_80 a 128-bit key and 112-bit salt; RFC 7714 §12 gives AEAD_AES_128_GCM
# a 128-bit key and a 96-bit salt.
_PROFILE_PARAMETERS: Final[dict[SrtpProfile, tuple[int, int, int, bytes]]] = {
    SrtpProfile.AEAD_AES_128_GCM: (0x0007, 16, 12, b"SRTP_AEAD_AES_128_GCM"),
    SrtpProfile.AES128_CM_HMAC_SHA1_80: (0x0001, 16, 14, b"SRTP_AES128_CM_SHA1_80"),
}
_BY_OPENSSL_NAME: Final = {params[3]: profile for profile, params in _PROFILE_PARAMETERS.items()}


def _check_key(instance: SrtpKeys, attribute: attrs.Attribute[bytes], value: bytes) -> None:
    want = (
        instance.profile.salt_length
        if attribute.name.endswith("salt")
        else instance.profile.key_length
    )
    if len(value) != want:
        # the message names lengths only: key material must never reach a log
        raise ValueError(f"{attribute.name} must be {want} bytes, got {len(value)}")


@final
@attrs.frozen(repr=False)
class SrtpKeys:
    """SRTP master keys and salts for both directions (RFC 5764 §4.2).

    The client is the remote peer: it protects with the client key and salt and we
    unprotect with them; we protect with the server ones. The repr (and str) never show key
    material, so an event or a key set can be logged as is.
    """

    profile: SrtpProfile
    client_key: bytes = attrs.field(validator=_check_key)
    client_salt: bytes = attrs.field(validator=_check_key)
    server_key: bytes = attrs.field(validator=_check_key)
    server_salt: bytes = attrs.field(validator=_check_key)

    @classmethod
    def from_exported(cls, profile: SrtpProfile, material: bytes) -> SrtpKeys:
        """Split exporter output laid out as RFC 5764 §4.2 says: client_write_SRTP_master_key,
        server_write_SRTP_master_key, client_write_SRTP_master_salt,
        server_write_SRTP_master_salt."""
        k, s = profile.key_length, profile.salt_length
        if len(material) != 2 * (k + s):
            raise ValueError(f"need {2 * (k + s)} bytes of keying material, got {len(material)}")
        return cls(
            profile=profile,
            client_key=material[:k],
            server_key=material[k : 2 * k],
            client_salt=material[2 * k : 2 * k + s],
            server_salt=material[2 * k + s :],
        )

    @property
    def client_master(self) -> bytes:
        """Client key then salt: libsrtp's key format, for unprotecting what the peer sends."""
        return self.client_key + self.client_salt

    @property
    def server_master(self) -> bytes:
        """Server key then salt: libsrtp's key format, for protecting what we send."""
        return self.server_key + self.server_salt

    def __repr__(self) -> str:
        return f"SrtpKeys(profile={self.profile.value}, keys=<redacted>)"

    __str__ = __repr__


@final
@attrs.frozen
class HandshakeComplete:
    """The handshake finished, the peer's certificate matched the offer, SRTP is keyed."""

    profile: SrtpProfile
    keys: SrtpKeys
    #: negotiated cipher suite in OpenSSL's naming, for diagnostics
    cipher: str = ""


@final
@attrs.frozen
class HandshakeFailed:
    """The handshake failed; no keys were derived and the server is now inert."""

    reason: str


@final
@attrs.frozen
class Closed:
    """The association ended after (or instead of) a handshake; the server is now inert.

    ``reason`` is ``"close_notify"`` when the peer closed cleanly (RFC 5246 §7.2.1),
    ``"local"`` after :meth:`DtlsServer.close`, else a short description of the fatal
    alert or error.
    """

    reason: str = "close_notify"


Event = HandshakeComplete | HandshakeFailed | Closed


class DtlsState(enum.Enum):
    """Where a :class:`DtlsServer` is; ``FAILED`` and ``CLOSED`` are inert and final."""

    HANDSHAKING = "handshaking"
    CONNECTED = "connected"
    FAILED = "failed"
    CLOSED = "closed"


_FINGERPRINT_RE: Final = re.compile(r"[0-9A-F]{2}(?::[0-9A-F]{2})*", re.ASCII)


@final
class DtlsServer:
    """One DTLS server association with one WebRTC peer, without I/O.

    ``remote_fingerprint`` is the offer's ``(hash name, "AB:CD:...")`` pair, as
    :attr:`sessions.webrtc.sdp.AudioOffer.fingerprint` holds it.

    Feed every DTLS datagram (first byte 20..63, RFC 7983 §7) to :meth:`receive`, then send
    :meth:`datagrams_to_send`, drain :meth:`next_event` and sleep until :meth:`get_timer`,
    when :meth:`handle_timer` is due.

    **Time.** ``now`` is the caller's clock in seconds (e.g. ``trio.current_time()``) and
    drives the handshake timeout directly. Retransmission (RFC 6347 §4.2.4: resend the last
    flight after 1 s, doubling up to 60 s) is OpenSSL's, and OpenSSL runs that timer on its
    own reading of the system's real-time clock, with no way to inject time:
    ``DTLSv1_get_timeout`` only reports how long remains and ``DTLSv1_handle_timeout``
    retransmits only once OpenSSL's clock says the timer expired. So after each call we read
    the remaining time and report the deadline ``now + remaining`` on the caller's clock.
    With a clock that runs at real speed, like Trio's, the two agree (OpenSSL treats a timer
    within 15 ms of expiry as expired). If the caller's clock runs ahead of real time (a
    test's virtual clock, or an early wake-up), :meth:`handle_timer` retransmits nothing and
    re-arms for the time OpenSSL still wants: retransmissions are delayed to real time,
    never lost.
    """

    def __init__(
        self,
        certificate: Certificate,
        remote_fingerprint: tuple[str, str],
        *,
        mtu: int = DEFAULT_MTU,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        profiles: Sequence[SrtpProfile] = (
            SrtpProfile.AEAD_AES_128_GCM,
            SrtpProfile.AES128_CM_HMAC_SHA1_80,
        ),
    ) -> None:
        algorithm, digest = remote_fingerprint
        algorithm = algorithm.lower()
        digest = digest.upper()
        # Local errors: the SDP parser has already checked what the peer offered.
        if algorithm not in FINGERPRINT_ALGORITHMS:
            raise ValueError(f"unsupported fingerprint hash function: {algorithm!r}")
        digest_size = hashlib.new(FINGERPRINT_ALGORITHMS[algorithm]).digest_size
        if not _FINGERPRINT_RE.fullmatch(digest) or len(digest) != 3 * digest_size - 1:
            raise ValueError(f"malformed {algorithm} fingerprint")
        if not _MIN_MTU <= mtu <= _MAX_MTU:
            raise ValueError(f"mtu must be in [{_MIN_MTU}, {_MAX_MTU}], got {mtu}")
        if handshake_timeout is not None and handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")
        if not profiles or len(set(profiles)) != len(profiles):
            raise ValueError("profiles must be non-empty and without repeats")

        self._algorithm = algorithm
        self._expected = digest
        self._mtu = mtu
        self._handshake_timeout = handshake_timeout
        self._state = DtlsState.HANDSHAKING
        self._events: collections.deque[Event] = collections.deque()
        self._outgoing: list[bytes] = []
        self._handshake_deadline: float | None = None
        self._retransmit_deadline: float | None = None
        # set by the verify callback when the peer's certificate is not the offered one
        self._fingerprint_mismatch = False
        self._application_records = 0
        self._ignored_datagrams = 0

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
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        # RFC 5764 §4.1.1: the use_srtp extension; OpenSSL picks by our order of preference.
        ctx.set_tlsext_use_srtp(b":".join(p.openssl_name for p in profiles))

        self._conn = SSL.Connection(ctx, None)
        self._conn.set_accept_state()
        self._conn.set_ciphertext_mtu(mtu)

    # -- public API -------------------------------------------------------------------

    @property
    def state(self) -> DtlsState:
        """Where the association is; it only moves forward."""
        return self._state

    @property
    def application_records_ignored(self) -> int:
        """Application-data records received after the handshake and dropped."""
        return self._application_records

    @property
    def datagrams_ignored(self) -> int:
        """Datagrams that arrived after the association failed or closed."""
        return self._ignored_datagrams

    def receive(self, data: bytes, now: float) -> None:
        """Process one DTLS datagram received at ``now``.

        Raises :class:`DtlsError` (and changes nothing) if ``data`` is not a sequence of
        whole DTLS 1.x records; RFC 6347 §4.1.2.7 says to discard such input silently, so
        the caller counts it and drops it. Once failed or closed this is a no-op.
        """
        if self._state in (DtlsState.FAILED, DtlsState.CLOSED):
            self._ignored_datagrams += 1
            return
        _check_datagram(data)
        if self._handshake_deadline is None and self._handshake_timeout is not None:
            self._handshake_deadline = now + self._handshake_timeout
        try:
            self._conn.bio_write(data)
        except SSL.Error as exc:  # a memory BIO only fails to grow
            raise DtlsError("could not buffer the datagram") from exc
        if self._state is DtlsState.HANDSHAKING:
            self._continue_handshake()
        if self._state is DtlsState.CONNECTED:
            self._read_records()
        self._after(now)

    def datagrams_to_send(self) -> list[bytes]:
        """Datagrams to send to the peer, in order; each at most the MTU."""
        out, self._outgoing = self._outgoing, []
        return out

    def next_event(self) -> Event | None:
        """The next event, or None."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due, on the caller's clock; None if never."""
        if self._state is DtlsState.HANDSHAKING:
            deadlines = [self._handshake_deadline, self._retransmit_deadline]
        elif self._state is DtlsState.CONNECTED:
            deadlines = [self._retransmit_deadline]
        else:
            return None
        present = [d for d in deadlines if d is not None]
        return min(present) if present else None

    def handle_timer(self, now: float) -> None:
        """Run timers due at ``now``: retransmit a flight, or fail a handshake that timed out.

        Harmless to call early or repeatedly.
        """
        if self._state in (DtlsState.FAILED, DtlsState.CLOSED):
            return
        if (
            self._state is DtlsState.HANDSHAKING
            and self._handshake_deadline is not None
            and now >= self._handshake_deadline
        ):
            self._fail("handshake timed out")
            self._after(now)
            return
        try:
            # RFC 6347 §4.2.4: resend the last flight if its timer expired (OpenSSL's clock).
            self._conn.DTLSv1_handle_timeout()
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:  # too many retransmissions (RFC 6347 §4.2.4.1)
            self._terminate(_describe(exc))
        self._after(now)

    def close(self) -> None:
        """Send close_notify (RFC 5246 §7.2.1) if we can and become inert; emits Closed."""
        if self._state in (DtlsState.FAILED, DtlsState.CLOSED):
            return
        if self._state is DtlsState.CONNECTED:
            self._shutdown()
        self._state = DtlsState.CLOSED
        self._events.append(Closed("local"))
        self._flush()

    # -- internals --------------------------------------------------------------------

    def _verify(
        self, conn: SSL.Connection, cert: crypto.X509, err: int, depth: int, ok: int
    ) -> bool:
        """OpenSSL's verify callback, once or more per certificate of the peer's chain.

        RFC 8842 §5.1 / RFC 8122 §5: the end-entity certificate (depth 0) must hash to the
        offered fingerprint; chain errors such as "self-signed" are expected and ignored.
        Returning False aborts the handshake with a fatal alert, before our Finished. The
        alert is the one for the chain error OpenSSL was reporting (unknown_ca for a
        self-signed certificate), not bad_certificate: pyOpenSSL gives the callback no way
        to set the verification error.
        """
        if depth != 0:
            return True
        if self._matches(cert):
            return True
        self._fingerprint_mismatch = True
        return False

    def _matches(self, cert: crypto.X509) -> bool:
        try:
            der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
        except crypto.Error:
            return False
        return hmac.compare_digest(fingerprint(der, self._algorithm), self._expected)

    def _continue_handshake(self) -> None:
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.Error as exc:
            self._fail(self._handshake_reason(exc))
            return
        self._complete()

    def _handshake_reason(self, exc: SSL.Error) -> str:
        if self._fingerprint_mismatch:
            return f"peer certificate does not match the offered {self._algorithm} fingerprint"
        if isinstance(exc, SSL.ZeroReturnError):
            return "peer sent close_notify during the handshake"
        return _describe(exc)

    def _complete(self) -> None:
        # Re-check what the verify callback saw: nothing below may run without a
        # matching peer certificate (RFC 8827 §6.5).
        peer = self._conn.get_peer_certificate()
        if peer is None:
            self._fail_connected("peer presented no certificate")
            return
        if not self._matches(peer):
            self._fail_connected(
                f"peer certificate does not match the offered {self._algorithm} fingerprint"
            )
            return
        profile = _BY_OPENSSL_NAME.get(self._conn.get_selected_srtp_profile())
        if profile is None:
            # RFC 5764 §4.1.1: without use_srtp there is nothing to key SRTP with.
            self._fail_connected("no SRTP protection profile in common")
            return
        try:
            material = self._conn.export_keying_material(
                _EXPORTER_LABEL, 2 * (profile.key_length + profile.salt_length)
            )
        except SSL.Error as exc:
            self._fail_connected(f"keying material export failed: {_describe(exc)}")
            return
        keys = SrtpKeys.from_exported(profile, material)
        self._state = DtlsState.CONNECTED
        cipher = self._conn.get_cipher_name() or ""
        self._events.append(HandshakeComplete(profile=profile, keys=keys, cipher=cipher))

    def _read_records(self) -> None:
        """Let OpenSSL process records after the handshake: a retransmitted client Finished
        flight (answered by resending ours, RFC 6347 §4.2.4), alerts and application data."""
        while True:
            try:
                data = self._conn.recv(_READ_SIZE)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                # RFC 5246 §7.2.1: answer close_notify with our own.
                self._shutdown()
                self._close("close_notify")
                return
            except SSL.Error as exc:
                self._close(_describe(exc))
                return
            if not data:
                return
            self._application_records += 1

    def _fail(self, reason: str) -> None:
        self._state = DtlsState.FAILED
        self._events.append(HandshakeFailed(reason))

    def _fail_connected(self, reason: str) -> None:
        """Fail after OpenSSL completed the handshake: tell the peer with close_notify."""
        self._shutdown()
        self._fail(reason)

    def _close(self, reason: str) -> None:
        self._state = DtlsState.CLOSED
        self._events.append(Closed(reason))

    def _terminate(self, reason: str) -> None:
        if self._state is DtlsState.HANDSHAKING:
            self._fail(reason)
        else:
            self._close(reason)

    def _shutdown(self) -> None:
        with contextlib.suppress(SSL.Error):
            self._conn.shutdown()

    def _after(self, now: float) -> None:
        self._flush()
        if self._state in (DtlsState.FAILED, DtlsState.CLOSED):
            self._retransmit_deadline = None
            return
        remaining = self._conn.DTLSv1_get_timeout()
        self._retransmit_deadline = None if remaining is None else now + remaining

    def _flush(self) -> None:
        """Move what OpenSSL wrote to the memory BIO into MTU-sized datagrams.

        A memory BIO is a byte stream and loses the datagram boundaries OpenSSL meant, so we
        re-cut at record boundaries: whole records, several per datagram when they fit
        (RFC 6347 §4.1.1), never one record across two.
        """
        pending = bytearray()
        while True:
            try:
                chunk = self._conn.bio_read(_READ_SIZE)
            except SSL.Error:  # WantReadError: empty
                break
            if not chunk:
                break
            pending += chunk
        if pending:
            self._outgoing.extend(_pack(bytes(pending), self._mtu))


def _check_datagram(data: bytes) -> None:
    """Refuse anything that is not one or more whole DTLS 1.x records (RFC 6347 §4.1)."""
    if not data:
        raise DtlsError("empty datagram")
    if len(data) > _MAX_DATAGRAM:
        raise DtlsError(f"datagram of {len(data)} bytes is too long")
    offset = 0
    while offset < len(data):
        if len(data) - offset < _HEADER_LENGTH:
            raise DtlsError("truncated DTLS record header")
        content_type, major, _minor, _epoch, _seq_hi, _seq_lo, length = _RECORD_HEADER.unpack_from(
            data, offset
        )
        if content_type not in _CONTENT_TYPES:
            raise DtlsError(f"unknown DTLS content type {content_type}")
        if major != _VERSION_MAJOR:
            raise DtlsError("not a DTLS record version")
        if length > _MAX_RECORD_LENGTH:
            raise DtlsError(f"DTLS record length {length} exceeds 2^14 + 2048")
        offset += _HEADER_LENGTH + length
        if offset > len(data):
            raise DtlsError("truncated DTLS record")


def _pack(stream: bytes, mtu: int) -> list[bytes]:
    """Cut OpenSSL's output into datagrams of whole records, each at most ``mtu`` if the
    records allow (OpenSSL sizes them to the MTU we set)."""
    records: list[bytes] = []
    offset = 0
    while offset < len(stream):
        if len(stream) - offset < _HEADER_LENGTH:
            records.append(stream[offset:])  # cannot happen with OpenSSL; keep the bytes
            break
        (length,) = struct.unpack_from("!H", stream, offset + 11)
        end = min(offset + _HEADER_LENGTH + length, len(stream))
        records.append(stream[offset:end])
        offset = end
    datagrams: list[bytes] = []
    current = b""
    for record in records:
        if current and len(current) + len(record) > mtu:
            datagrams.append(current)
            current = b""
        current += record
    if current:
        datagrams.append(current)
    return datagrams


def _describe(exc: SSL.Error) -> str:
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
