"""The DTLS server association as a state machine (RFC 6347; see :mod:`sessions.webrtc.dtls`).

Its state changes in one place, :meth:`DtlsServer._set_state`, and only along the edges of
:data:`TRANSITIONS` below; anything else is a bug here and raises
:class:`~sessions.webrtc.errors.StateTransitionError`.
"""

from __future__ import annotations

import collections
import contextlib
import enum
from collections.abc import Mapping, Sequence
from typing import Final, final

import attrs
from OpenSSL import SSL, crypto

from sessions.deadlines import earlier
from sessions.webrtc.certs import Certificate
from sessions.webrtc.dtls import openssl
from sessions.webrtc.dtls.keys import SrtpKeys, SrtpProfile
from sessions.webrtc.dtls.records import DtlsError, check_datagram, pack
from sessions.webrtc.errors import StateTransitionError

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MTU",
    "TRANSITIONS",
    "Closed",
    "DtlsServer",
    "DtlsState",
    "Event",
    "HandshakeComplete",
    "HandshakeFailed",
]


class DtlsState(enum.Enum):
    """Where a :class:`DtlsServer` is; ``FAILED`` and ``CLOSED`` are inert and final."""

    HANDSHAKING = "handshaking"
    CONNECTED = "connected"
    FAILED = "failed"
    CLOSED = "closed"


# The transition table (h11-style): from each state, the states it may move to, and why.
#
#   HANDSHAKING -> CONNECTED  the handshake completed, the peer's certificate matched the
#                             offered fingerprint and SRTP keys were exported (RFC 5764 §4.2)
#   HANDSHAKING -> FAILED     the handshake failed, timed out, or completed without what
#                             WebRTC needs (certificate, fingerprint, use_srtp): no keys
#   HANDSHAKING -> CLOSED     close() before the handshake finished
#   CONNECTED   -> CLOSED     close_notify (RFC 5246 §7.2.1) or a fatal alert from the
#                             peer, too many retransmissions, or close()
#   FAILED, CLOSED            final: the server is inert
#
# A connected association never fails: after the handshake, whatever ends it closes it.
#: Allowed state changes of a :class:`DtlsServer`.
TRANSITIONS: Final[Mapping[DtlsState, frozenset[DtlsState]]] = {
    DtlsState.HANDSHAKING: frozenset({DtlsState.CONNECTED, DtlsState.FAILED, DtlsState.CLOSED}),
    DtlsState.CONNECTED: frozenset({DtlsState.CLOSED}),
    DtlsState.FAILED: frozenset(),
    DtlsState.CLOSED: frozenset(),
}

#: Largest datagram we emit. 1200 bytes of UDP payload fits any path WebRTC runs over,
#: including TURN and IPv6 tunnels; OpenSSL fragments handshake messages to fit
#: (RFC 6347 §4.1.1.1, §4.2.3).
DEFAULT_MTU: Final = 1200
#: Give up on a handshake that has not completed this long after its first datagram.
#: OpenSSL's own retransmission schedule (1 s doubling to 60 s, RFC 6347 §4.2.4.1) would
#: otherwise keep a dead peer's handshake alive for minutes.
DEFAULT_HANDSHAKE_TIMEOUT: Final = 30.0


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
        # Local errors: the SDP parser has already checked what the peer offered.
        algorithm, digest = openssl.check_fingerprint(remote_fingerprint)
        if not openssl.MIN_MTU <= mtu <= openssl.MAX_MTU:
            raise ValueError(f"mtu must be in [{openssl.MIN_MTU}, {openssl.MAX_MTU}], got {mtu}")
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
        self._conn = openssl.server_connection(certificate, profiles, mtu, self._verify)

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
        check_datagram(data)
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
        state = self._state
        if state is DtlsState.CONNECTED:
            return self._retransmit_deadline
        if state is not DtlsState.HANDSHAKING:
            return None
        return earlier(self._handshake_deadline, self._retransmit_deadline)

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
        if self._retransmit_deadline is None:
            # OpenSSL's retransmission timer is not running (_after reads it after every call
            # into OpenSSL), so DTLSv1_handle_timeout would do nothing, and nothing was written
            # since the last _flush: skip both, and the timer read. A connected association
            # is here on every media tick.
            return
        try:
            # RFC 6347 §4.2.4: resend the last flight if its timer expired (OpenSSL's clock).
            self._conn.DTLSv1_handle_timeout()
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:  # too many retransmissions (RFC 6347 §4.2.4.1)
            self._terminate(openssl.describe(exc))
        self._after(now)

    def close(self) -> None:
        """Send close_notify (RFC 5246 §7.2.1) if we can and become inert; emits Closed."""
        if self._state in (DtlsState.FAILED, DtlsState.CLOSED):
            return
        if self._state is DtlsState.CONNECTED:
            self._shutdown()
        self._set_state(DtlsState.CLOSED)
        self._events.append(Closed("local"))
        self._flush()

    # -- internals --------------------------------------------------------------------

    def _set_state(self, new: DtlsState) -> None:
        """The one place the state changes, along an edge of :data:`TRANSITIONS` only."""
        if new not in TRANSITIONS[self._state]:
            raise StateTransitionError(
                f"DTLS server cannot go from {self._state.name} to {new.name}"
            )
        self._state = new

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
        return openssl.certificate_matches(cert, self._algorithm, self._expected)

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
        return openssl.describe(exc)

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
        profile = openssl.selected_profile(self._conn)
        if profile is None:
            # RFC 5764 §4.1.1: without use_srtp there is nothing to key SRTP with.
            self._fail_connected("no SRTP protection profile in common")
            return
        try:
            keys = openssl.export_srtp_keys(self._conn, profile)
        except SSL.Error as exc:
            self._fail_connected(f"keying material export failed: {openssl.describe(exc)}")
            return
        self._set_state(DtlsState.CONNECTED)
        cipher = self._conn.get_cipher_name() or ""
        self._events.append(HandshakeComplete(profile=profile, keys=keys, cipher=cipher))

    def _read_records(self) -> None:
        """Let OpenSSL process records after the handshake: a retransmitted client Finished
        flight (answered by resending ours, RFC 6347 §4.2.4), alerts and application data."""
        while True:
            try:
                data = self._conn.recv(openssl.READ_SIZE)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                # RFC 5246 §7.2.1: answer close_notify with our own.
                self._shutdown()
                self._close("close_notify")
                return
            except SSL.Error as exc:
                self._close(openssl.describe(exc))
                return
            if not data:
                return
            self._application_records += 1

    def _fail(self, reason: str) -> None:
        self._set_state(DtlsState.FAILED)
        self._events.append(HandshakeFailed(reason))

    def _fail_connected(self, reason: str) -> None:
        """Fail after OpenSSL completed the handshake: tell the peer with close_notify."""
        self._shutdown()
        self._fail(reason)

    def _close(self, reason: str) -> None:
        self._set_state(DtlsState.CLOSED)
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
                chunk = self._conn.bio_read(openssl.READ_SIZE)
            except SSL.Error:  # WantReadError: empty
                break
            if not chunk:
                break
            pending += chunk
        if pending:
            self._outgoing.extend(pack(bytes(pending), self._mtu))
