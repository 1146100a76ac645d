"""How a session connects and ends, sans-I/O: ICE-lite, the DTLS handshake that keys SRTP, and
the session's state machine.

:class:`Connection` is the lower half of :class:`~sessions.transceiver.transport.Transport`:
it is handed the STUN and DTLS datagrams, answers them, follows the client's nomination,
keys SRTP when the handshake completes, and decides when the session is over (connect
timeout, DTLS failure, consent expiry, close_notify, or our own :meth:`Connection.close`).

1. The client checks connectivity; the ICE-lite responder answers (RFC 8445 §7.3) and follows
   its nomination (:class:`~sessions.transceiver.events.IceConnected`).
2. The client, always the DTLS client (RFC 8842 §5.3), runs the handshake from an address whose
   check succeeded; its certificate must match the offer's fingerprint (RFC 8827 §6.5). The
   exported keys key SRTP (RFC 5764 §4.2): we are the server, so we protect with the server
   key and salt and unprotect with the client's
   (:class:`~sessions.transceiver.events.DtlsConnected`).
3. The client's consent checks keep the session alive; 30 s without one ends it (RFC 7675
   §5.1).
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Mapping
from typing import Final, final

from sessions.deadlines import earlier
from sessions.transceiver.events import (
    CODE_CONNECT_TIMEOUT,
    CODE_CONSENT_EXPIRED,
    CODE_DTLS_FAILED,
    DtlsConnected,
    IceConnected,
    SessionClosed,
    SessionEvent,
    SessionFailed,
)
from sessions.webrtc.dtls import (
    Closed,
    DtlsError,
    DtlsServer,
    DtlsState,
    HandshakeComplete,
    HandshakeFailed,
)
from sessions.webrtc.ice import (
    ConsentExpired,
    IceLiteResponder,
    IceState,
    PairNominated,
    PeerAddress,
    ResponderState,
)
from sessions.webrtc.srtp import SrtpProfile, SrtpSession

__all__ = ["CONNECT_TIMEOUT", "TRANSITIONS", "Connection", "SessionState"]


class SessionState(enum.Enum):
    """Where a session is; ``FAILED`` and ``CLOSED`` are final and inert."""

    #: waiting for the client's first valid connectivity check
    NEW = "new"
    #: ICE checks succeeded; waiting for nomination and the DTLS handshake
    CONNECTING = "connecting"
    #: SRTP is keyed (media flows once a pair is nominated)
    CONNECTED = "connected"
    #: frozen for a planned move: nothing is received, sent or timed until it is resumed; its
    #: exact snapshot continues elsewhere (see :mod:`sessions.transceiver.handover`)
    QUIESCED = "quiesced"
    FAILED = "failed"
    CLOSED = "closed"


_S = SessionState

#: The session's life, h11 style: from each state, the states it may move to. Every change goes
#: through :meth:`Connection._set_state`, which raises :class:`RuntimeError` for any other (a
#: bug here, never the peer's doing: remote input is counted and dropped instead).
#:
#: * NEW -> CONNECTING: the first valid connectivity check (RFC 8445 §7.3);
#: * NEW -> CONNECTED: a restore, keyed from its snapshot;
#: * CONNECTING -> CONNECTED: the DTLS handshake keyed SRTP (RFC 5764 §4.2);
#: * NEW, CONNECTING, CONNECTED -> FAILED: connect timeout (NEW, CONNECTING), DTLS failure
#:   (CONNECTING, CONNECTED), consent expiry (CONNECTED, RFC 7675 §5.1);
#: * NEW, CONNECTING, CONNECTED -> CLOSED: :meth:`Connection.close`, or the client's
#:   close_notify (RFC 5246 §7.2.1);
#: * CONNECTED -> QUIESCED: :meth:`Connection.quiesce`, a planned move (only once keyed);
#: * QUIESCED -> CONNECTED: :meth:`Connection.resume`, the move was abandoned;
#: * QUIESCED -> CLOSED: :meth:`Connection.close` of a quiesced session, which sends nothing
#:   (the client's DTLS must not hear a close_notify for a session that lives on elsewhere).
#:
#: A quiesced session has no timer and takes no input, so nothing else can happen to it.
TRANSITIONS: Final[Mapping[SessionState, frozenset[SessionState]]] = {
    _S.NEW: frozenset({_S.CONNECTING, _S.CONNECTED, _S.FAILED, _S.CLOSED}),
    _S.CONNECTING: frozenset({_S.CONNECTED, _S.FAILED, _S.CLOSED}),
    _S.CONNECTED: frozenset({_S.QUIESCED, _S.FAILED, _S.CLOSED}),
    _S.QUIESCED: frozenset({_S.CONNECTED, _S.CLOSED}),
    _S.FAILED: frozenset(),
    _S.CLOSED: frozenset(),
}

#: A session that is not keyed and nominated this long after the offer was accepted fails.
CONNECT_TIMEOUT: Final = 30.0

_ENDED: Final = (SessionState.FAILED, SessionState.CLOSED)
# States with timers: not ended, not quiesced. A tuple, not a set: membership tests identity
# first, where a set would hash the enum member in Python (Enum.__hash__).
_TIMED: Final = (SessionState.CONNECTED, SessionState.CONNECTING, SessionState.NEW)
_REASON_LIMIT: Final = 200


@final
class Connection:
    """ICE-lite, DTLS and the session's state (see the module docstring).

    ``dtls`` is the server for a new session; a restored one has none (:meth:`restored`).
    """

    def __init__(
        self,
        *,
        ice: IceLiteResponder,
        remote_fingerprint: tuple[str, str],
        local_ssrc: int,
        now: float,
        dtls: DtlsServer | None = None,
    ) -> None:
        self._ice = ice
        #: the offer's ``a=fingerprint`` the client's certificate must match (RFC 8122 §5)
        self.remote_fingerprint: Final = remote_fingerprint
        self._local_ssrc = local_ssrc
        self._dtls = dtls
        self._dtls_addr: PeerAddress | None = None
        self._srtp: SrtpSession | None = None
        self._state = SessionState.NEW
        self._connect_deadline: float | None = now + CONNECT_TIMEOUT
        self._events: collections.deque[SessionEvent] = collections.deque()
        self._out: list[tuple[bytes, PeerAddress]] = []
        #: DTLS records handed to the DTLS server
        self.dtls_in = 0
        self.dropped: collections.Counter[str] = collections.Counter()

    @classmethod
    def restored(
        cls,
        *,
        ice: IceLiteResponder,
        remote_fingerprint: tuple[str, str],
        srtp: SrtpSession,
        now: float,
    ) -> Connection:
        """A connection continued from a snapshot: keyed, without a DTLS association. One whose
        consent had already expired fails at once."""
        connection = cls(
            ice=ice, remote_fingerprint=remote_fingerprint, local_ssrc=srtp.local_ssrc, now=now
        )
        connection._srtp = srtp
        connection._set_state(SessionState.CONNECTED)
        if ice.state is ResponderState.EXPIRED:
            connection._fail("consent expired before the restore", CODE_CONSENT_EXPIRED)
        else:
            connection._on_ready()
        return connection

    # --- observation --------------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """Where the session is."""
        return self._state

    @property
    def ended(self) -> bool:
        """Whether the session is over (failed or closed): inert from then on."""
        return self._state in _ENDED

    @property
    def quiesced(self) -> bool:
        """Whether the session is frozen for a planned move (:meth:`quiesce`)."""
        return self._state is SessionState.QUIESCED

    @property
    def timed(self) -> bool:
        """Whether the session has timers and takes input: neither ended nor quiesced. One
        test instead of :attr:`ended` and :attr:`quiesced`, for the per-tick timer calls."""
        return self._state in _TIMED

    @property
    def idle(self) -> bool:
        """Whether nothing is queued: no datagram to send, no event to take."""
        return not self._out and not self._events

    @property
    def ice(self) -> IceLiteResponder:
        """The ICE-lite responder (for its credentials and counters)."""
        return self._ice

    @property
    def selected_address(self) -> PeerAddress | None:
        """The client's nominated address, where media goes; ``None`` before nomination."""
        return self._ice.selected

    @property
    def keys(self) -> SrtpSession | None:
        """The SRTP state once DTLS keyed it (or a restore brought it), else ``None``."""
        return self._srtp

    @property
    def ready(self) -> bool:
        """SRTP is keyed and the client nominated a pair: media may flow."""
        return self._srtp is not None and self._ice.selected is not None

    def accepts_media_from(self, addr: PeerAddress) -> bool:
        """Whether SRTP from ``addr`` may be ours.

        Media is bound to the nominated pair. Before any nomination, a pair whose check
        succeeded may already carry media (RFC 8445 §12.1: browsers start sending on it before
        they nominate); any other address has no business here, even with valid SRTP (a replay
        from elsewhere).
        """
        selected = self._ice.selected
        return addr == selected or (selected is None and self._ice.is_valid(addr))

    def consent_expired(self, now: float) -> bool:
        """Whether consent on the selected pair has expired by ``now`` (RFC 7675 §5.1)."""
        return self._ice.consent_expired(now)

    def ice_snapshot(self, now: float) -> IceState:
        """The ICE responder as a value."""
        return self._ice.snapshot(now)

    def next_event(self) -> SessionEvent | None:
        """The oldest event not yet taken, or ``None``."""
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self) -> list[tuple[bytes, PeerAddress]]:
        """STUN answers and DTLS records to send, in order, each with its destination."""
        out, self._out = self._out, []
        return out

    # --- input --------------------------------------------------------------------------------

    def receive_stun(self, data: bytes, addr: PeerAddress, now: float) -> None:
        """A STUN datagram from ``addr``, for the ICE-lite responder."""
        self._out.extend(self._ice.receive_stun(data, addr, now))
        if self._state is SessionState.NEW and self._ice.state is not ResponderState.NEW:
            self._set_state(SessionState.CONNECTING)
        self._drain_ice()

    def receive_dtls(self, data: bytes, addr: PeerAddress, now: float) -> None:
        """A DTLS datagram from ``addr``, for the DTLS server."""
        dtls = self._dtls
        if dtls is None:
            # A restored session has keys but no DTLS association: nothing can read this.
            self.dropped["dtls_no_association"] += 1
            return
        if not self._ice.is_valid(addr):
            # RFC 8826 §4.2 / RFC 8445 §7.3: only a peer that proved it knows the ICE password
            # from this address may use it; anything else could make us a reflector.
            self.dropped["dtls_unvalidated"] += 1
            return
        self._dtls_addr = addr
        # Well-framed records OpenSSL then discards (stale epochs, bad MACs, RFC 6347
        # §4.1.2.7) leave no trace but this count.
        self.dtls_in += 1
        try:
            dtls.receive(data, now)
        except DtlsError:
            self.dropped["dtls_malformed"] += 1
        self._flush_dtls()
        self._drain_dtls()

    # --- timers -------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due, or ``None`` (an ended or quiesced session has
        none)."""
        if self._state not in _TIMED:
            return None
        deadline = earlier(self._ice.get_timer(), self._connect_deadline)
        if self._dtls is not None:
            deadline = earlier(deadline, self._dtls.get_timer())
        return deadline

    def handle_timer(self, now: float) -> None:
        """Consent expiry, DTLS retransmission, then the connect timeout, as due at ``now``."""
        if self._state not in _TIMED:
            return
        self._ice.handle_timer(now)
        self._drain_ice()
        dtls = self._dtls
        # A DTLS server without a timer (a connected one whose last flight needs no
        # retransmission: every media tick) would do nothing here, and has nothing queued:
        # every call into it is followed by _flush_dtls and _drain_dtls. Skip the calls.
        if dtls is not None and not self.ended and dtls.get_timer() is not None:
            dtls.handle_timer(now)
            self._flush_dtls()
            self._drain_dtls()
        if self.ended:
            return
        if self._connect_deadline is not None and now >= self._connect_deadline:
            self._fail(
                f"not connected within {CONNECT_TIMEOUT:g} s of the offer", CODE_CONNECT_TIMEOUT
            )

    # --- a planned move -----------------------------------------------------------------------

    def quiesce(self) -> None:
        """Freeze the connected session for a move: no input, no timer, nothing sent, until
        :meth:`resume` (or a silent :meth:`close`). Only a keyed session can move."""
        self._set_state(SessionState.QUIESCED)

    def resume(self) -> None:
        """The move was abandoned: carry on as before."""
        self._set_state(SessionState.CONNECTED)

    # --- ending -------------------------------------------------------------------------------

    def close(self) -> None:
        """End the session from our side: DTLS close_notify (RFC 5246 §7.2.1) if there is an
        association, then :class:`~sessions.transceiver.events.SessionClosed`. A quiesced
        session sends nothing: it may live on elsewhere, and a close_notify would end the
        client's DTLS association there too."""
        if self.ended:
            return
        if self.quiesced:
            self._end(SessionState.CLOSED, SessionClosed("closed while quiesced"))
            return
        dtls = self._dtls
        if dtls is not None and dtls.state in (DtlsState.HANDSHAKING, DtlsState.CONNECTED):
            dtls.close()
            self._flush_dtls()
            while dtls.next_event() is not None:
                pass  # our own Closed("local")
        self._end(SessionState.CLOSED, SessionClosed("closed locally"))

    def _fail(self, reason: str, code: str) -> None:
        self._end(SessionState.FAILED, SessionFailed(reason[:_REASON_LIMIT], code))

    def _end(self, state: SessionState, event: SessionEvent) -> None:
        self._set_state(state)
        self._connect_deadline = None
        self._events.append(event)

    def _set_state(self, state: SessionState) -> None:
        """The one place the session's state changes, checked against :data:`TRANSITIONS`."""
        if state not in TRANSITIONS[self._state]:
            raise RuntimeError(f"illegal session state change {self._state.name} -> {state.name}")
        self._state = state

    # --- plumbing -----------------------------------------------------------------------------

    def _on_ready(self) -> None:
        """Called when SRTP is keyed or a pair nominated: connected once both are there."""
        if self.ready:
            self._connect_deadline = None

    def _drain_ice(self) -> None:
        while (event := self._ice.next_event()) is not None:
            if isinstance(event, PairNominated):
                self._events.append(IceConnected(event.addr))
                self._on_ready()
            elif isinstance(event, ConsentExpired):
                # RFC 7675 §5.1: stop sending at once; the responder answers nothing more.
                self._fail("consent expired", CODE_CONSENT_EXPIRED)
                return

    def _flush_dtls(self) -> None:
        dtls = self._dtls
        if dtls is None:
            return
        # DTLS answers go where the client's DTLS came from (its handshake may precede nomination).
        to = self._dtls_addr or self._ice.selected
        for datagram in dtls.datagrams_to_send():
            if to is not None:
                self._out.append((datagram, to))

    def _drain_dtls(self) -> None:
        dtls = self._dtls
        while dtls is not None and (event := dtls.next_event()) is not None:
            if self.ended:
                continue
            if isinstance(event, HandshakeComplete):
                self._keyed(event)
            elif isinstance(event, HandshakeFailed):
                self._fail(f"DTLS handshake failed: {event.reason}", CODE_DTLS_FAILED)
            elif isinstance(event, Closed) and event.reason != "local":
                if event.reason == "close_notify":
                    self._end(SessionState.CLOSED, SessionClosed("the client sent close_notify"))
                else:
                    self._fail(f"DTLS association ended: {event.reason}", CODE_DTLS_FAILED)

    def _keyed(self, event: HandshakeComplete) -> None:
        # RFC 5764 §4.2: as the DTLS server we send with the server key and salt and receive
        # with the client's.
        profile = SrtpProfile(event.profile.value)
        self._srtp = SrtpSession.create(
            profile,
            local_key=event.keys.server_master,
            remote_key=event.keys.client_master,
            local_ssrc=self._local_ssrc,
        )
        self._set_state(SessionState.CONNECTED)
        self._events.append(DtlsConnected(profile))
        self._on_ready()
