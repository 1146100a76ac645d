"""The ICE-lite responder as a state machine (RFC 8445 §2.5, RFC 7675; see
:mod:`sessions.webrtc.ice`).

Its state changes in one place, :meth:`IceLiteResponder._set_state`, and only along the edges
of :data:`TRANSITIONS` below; anything else is a bug here and raises
:class:`~sessions.webrtc.errors.StateTransitionError`.
"""

from __future__ import annotations

import collections
import enum
import ipaddress
from collections.abc import Mapping
from typing import Final, final

import attrs

from sessions.webrtc import stun
from sessions.webrtc.errors import StateTransitionError, StunError
from sessions.webrtc.ice.state import MAX_PAIRS, PWD_RE, UFRAG_RE, IceState, PeerAddress
from sessions.webrtc.stun import StunClass, StunMessage

__all__ = [
    "CONSENT_TIMEOUT",
    "TRANSITIONS",
    "ConsentExpired",
    "IceEvent",
    "IceLiteResponder",
    "PairNominated",
    "PairValidated",
    "ResponderState",
]


class ResponderState(enum.Enum):
    """Where the responder is in the life of one ICE session."""

    #: no valid check yet
    NEW = "new"
    #: at least one pair validated by a check, none nominated yet
    CHECKING = "checking"
    #: the client nominated a pair (:attr:`IceLiteResponder.selected`) and consent is fresh
    CONNECTED = "connected"
    #: consent on the selected pair expired (RFC 7675 §5.1); terminal, nothing is answered
    EXPIRED = "expired"


# The transition table (h11-style): from each state, the states it may move to, and why.
#
#   NEW       -> CHECKING   a first check was answered with success: a pair is valid
#                           (RFC 8445 §7.3)
#   CHECKING  -> CONNECTED  a check carried USE-CANDIDATE: the client nominated its pair
#                           (RFC 8445 §7.3.1.5, §7.3.2)
#   CONNECTED -> CONNECTED  a check on another pair carried USE-CANDIDATE: the latest
#                           nomination wins (see IceLiteResponder._learn)
#   CONNECTED -> EXPIRED    no valid check on the selected pair for CONSENT_TIMEOUT
#                           (RFC 7675 §5.1)
#   EXPIRED                 final: only an ICE restart, a new responder, goes on (RFC 8445 §9)
#
# A restore walks the same edges from NEW to the state it carries on from.
#: Allowed state changes of an :class:`IceLiteResponder`.
TRANSITIONS: Final[Mapping[ResponderState, frozenset[ResponderState]]] = {
    ResponderState.NEW: frozenset({ResponderState.CHECKING}),
    ResponderState.CHECKING: frozenset({ResponderState.CONNECTED}),
    ResponderState.CONNECTED: frozenset({ResponderState.CONNECTED, ResponderState.EXPIRED}),
    ResponderState.EXPIRED: frozenset(),
}

#: RFC 7675 §5.1: consent expires 30 s after the last proof of it.
CONSENT_TIMEOUT: Final = 30.0
#: Transaction ids remembered to recognize retransmitted and replayed checks (about 20 minutes
#: of consent checks at one per 5 s).
_RECENT_TRANSACTIONS: Final = 256


@final
@attrs.frozen
class PairValidated:
    """A check from ``addr`` was answered with success for the first time (RFC 8445 §7.3).

    The client holds the password and reaches us from ``addr``, so DTLS and media from there
    belong to the session; media should still be sent only to the selected pair.
    """

    addr: PeerAddress


@final
@attrs.frozen
class PairNominated:
    """The client nominated the pair with ``addr`` (RFC 8445 §7.3.1.5); send media there now."""

    addr: PeerAddress


@final
@attrs.frozen
class ConsentExpired:
    """No valid check on the selected pair ``addr`` for :data:`CONSENT_TIMEOUT` (RFC 7675 §5.1).

    Stop sending to ``addr`` at once; the responder is done and answers nothing more, so the
    client's own consent lapses too. Only an ICE restart (new credentials, a new responder)
    brings the session back (RFC 8445 §9).
    """

    addr: PeerAddress


IceEvent = PairValidated | PairNominated | ConsentExpired


def _mapped_host(host: str) -> str:
    """The host to report in XOR-MAPPED-ADDRESS: IPv4-mapped IPv6 as the IPv4 it stands for.

    A dual-stack socket sees an IPv4 client as ``::ffff:a.b.c.d``; that client sent its check
    over IPv4 and expects an IPv4 reflexive address back.
    """
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return host


@final
class IceLiteResponder:
    """The controlled, lite side of one ICE session: answers checks, follows nomination.

    ``local_ufrag`` / ``local_pwd`` are the credentials we put in our SDP answer (see
    :func:`mint_credentials`); ``remote_ufrag`` / ``remote_pwd`` come from the client's offer.
    Checks must carry ``USERNAME = local_ufrag:remote_ufrag`` and a MESSAGE-INTEGRITY keyed
    with ``local_pwd`` (RFC 8445 §7.2.2); replies are keyed with ``local_pwd`` too. The
    remote password is not needed to answer checks (a lite agent sends none) and is kept only
    so that :meth:`snapshot` carries the complete credentials of the session.

    The counters are public attributes, meant for metrics.
    """

    __slots__ = (
        "_events",
        "_expected_username",
        "_local_pwd_key",
        "_pairs",
        "_recent",
        "_selected",
        "_state",
        "bad_fingerprint",
        "bad_integrity",
        "bad_requests",
        "ignored",
        "local_pwd",
        "local_ufrag",
        "malformed",
        "remote_pwd",
        "remote_ufrag",
        "responses_sent",
        "retransmissions",
        "role_conflicts",
        "unknown_attributes",
        "wrong_username",
    )

    def __init__(
        self, local_ufrag: str, local_pwd: str, remote_ufrag: str, remote_pwd: str
    ) -> None:
        for name, value, pattern, rule in (
            ("local_ufrag", local_ufrag, UFRAG_RE, "4-256"),
            ("local_pwd", local_pwd, PWD_RE, "22-256"),
            ("remote_ufrag", remote_ufrag, UFRAG_RE, "4-256"),
            ("remote_pwd", remote_pwd, PWD_RE, "22-256"),
        ):
            if not pattern.fullmatch(value):
                raise ValueError(f"{name} must be {rule} ice-chars (RFC 8839 §5.4)")
        self.local_ufrag: Final = local_ufrag
        self.local_pwd: Final = local_pwd
        self.remote_ufrag: Final = remote_ufrag
        self.remote_pwd: Final = remote_pwd
        # RFC 8445 §7.2.2: the check's USERNAME is "<receiver's ufrag>:<sender's ufrag>".
        self._expected_username = f"{local_ufrag}:{remote_ufrag}"
        self._local_pwd_key = local_pwd.encode("ascii")
        # Valid pairs by remote address -> time of the last valid check, least recent first.
        self._pairs: dict[PeerAddress, float] = {}
        self._selected: PeerAddress | None = None
        self._state = ResponderState.NEW
        self._events: collections.deque[IceEvent] = collections.deque()
        # Transaction ids of the checks acted on lately, oldest first (a bounded ordered set).
        self._recent: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        #: datagrams that are not well-formed STUN (RFC 8489 §5, §6.3, §14)
        self.malformed = 0
        #: messages dropped for a FINGERPRINT that does not match (RFC 8489 §14.7)
        self.bad_fingerprint = 0
        #: checks dropped unanswered for a MESSAGE-INTEGRITY that does not verify
        self.bad_integrity = 0
        #: checks answered 401 for a USERNAME other than ``local_ufrag:remote_ufrag``
        self.wrong_username = 0
        #: requests answered 400 (missing credentials, role or PRIORITY)
        self.bad_requests = 0
        #: requests answered 420 for comprehension-required attributes we do not know
        self.unknown_attributes = 0
        #: checks answered 487 because the client claimed the controlled role
        self.role_conflicts = 0
        #: checks whose transaction id was already acted on: answered again, state unchanged
        self.retransmissions = 0
        #: well-formed STUN that is not a Binding request, or anything after consent expired
        self.ignored = 0
        #: datagrams returned by :meth:`receive_stun`, successes and errors
        self.responses_sent = 0

    def __repr__(self) -> str:
        return (
            f"IceLiteResponder(local_ufrag={self.local_ufrag!r}, "
            f"remote_ufrag={self.remote_ufrag!r}, state={self._state.value}, "
            f"selected={self._selected!r})"
        )

    def _set_state(self, new: ResponderState) -> None:
        """The one place the state changes, along an edge of :data:`TRANSITIONS` only."""
        if new not in TRANSITIONS[self._state]:
            raise StateTransitionError(
                f"ICE responder cannot go from {self._state.name} to {new.name}"
            )
        self._state = new

    # --- observation --------------------------------------------------------------------------

    @property
    def state(self) -> ResponderState:
        """The current :class:`ResponderState`."""
        return self._state

    @property
    def selected(self) -> PeerAddress | None:
        """The nominated pair's remote address (where media goes), or ``None``."""
        return self._selected

    @property
    def valid_addresses(self) -> tuple[PeerAddress, ...]:
        """Remote addresses of the valid pairs, least recently checked first."""
        return tuple(self._pairs)

    def is_valid(self, addr: PeerAddress) -> bool:
        """Whether a check from ``addr`` has succeeded (and the pair was not since dropped)."""
        return addr in self._pairs

    def last_check(self, addr: PeerAddress) -> float | None:
        """Time of the last valid check from ``addr``, or ``None`` if it is not a valid pair."""
        return self._pairs.get(addr)

    def next_event(self) -> IceEvent | None:
        """The oldest event not yet taken, or ``None``."""
        return self._events.popleft() if self._events else None

    # --- consent freshness (RFC 7675) ---------------------------------------------------------

    def get_timer(self) -> float | None:
        """When consent on the selected pair expires unless a check comes first; else ``None``.

        Only a connected responder has a deadline: before nomination there is no pair we send
        media on, and after expiry nothing is left to time.
        """
        if self._state is not ResponderState.CONNECTED or self._selected is None:
            return None
        return self._pairs[self._selected] + CONSENT_TIMEOUT

    def consent_expired(self, now: float) -> bool:
        """Whether consent on the selected pair has lapsed by ``now`` (RFC 7675 §5.1).

        False before nomination; true from the deadline on, even before :meth:`handle_timer`
        has noticed it.
        """
        if self._state is ResponderState.EXPIRED:
            return True
        deadline = self.get_timer()
        return deadline is not None and now >= deadline

    def handle_timer(self, now: float) -> None:
        """Expire consent if its deadline has passed, queuing :class:`ConsentExpired`.

        Calling it early, late or repeatedly is harmless.
        """
        deadline = self.get_timer()
        if deadline is None or now < deadline:
            return
        assert self._selected is not None  # get_timer() returned a deadline
        # RFC 7675 §5.1: no proof of consent for 30 s, so stop sending on this pair.
        self._set_state(ResponderState.EXPIRED)
        self._events.append(ConsentExpired(self._selected))

    # --- checks (RFC 8445 §7.3) ---------------------------------------------------------------

    def receive_stun(
        self, data: bytes, addr: PeerAddress, now: float
    ) -> list[tuple[bytes, PeerAddress]]:
        """Handle one datagram of STUN from ``addr`` received at ``now``.

        Returns the datagrams to send back (at most one, always to ``addr``). Never raises for
        anything in ``data``: what is not a valid check is answered with an error or counted
        and dropped. A deadline already due is applied first, so the outcome does not depend on
        whether the owner ran :meth:`handle_timer` before this datagram.
        """
        self.handle_timer(now)
        if self._state is ResponderState.EXPIRED:
            # RFC 7675 §5.2: we no longer consent, so we stop answering the client's checks.
            self.ignored += 1
            return []
        try:
            reply = self._handle(data, addr, now)
        except StunError:
            self.malformed += 1
            return []
        if reply is None:
            return []
        self.responses_sent += 1
        return [(reply, addr)]

    def _handle(self, data: bytes, addr: PeerAddress, now: float) -> bytes | None:
        msg = stun.parse(data)
        # RFC 8489 §6.3 and §7: a FINGERPRINT that does not match means this is not STUN after
        # all; discard it silently. ICE checks carry one (RFC 8445 §7), but we do not insist.
        if msg.has_fingerprint and not stun.verify_fingerprint(data):
            self.bad_fingerprint += 1
            return None
        # A lite agent sends no requests, so there are no responses to match; indications and
        # other methods mean nothing to ICE. Drop them unanswered (no reflection off our port).
        if msg.cls is not StunClass.REQUEST or msg.method != stun.BINDING:
            self.ignored += 1
            return None

        # Short-term credentials, in the order of RFC 8489 §9.1.3 (RFC 8445 §7.3 defers to it).
        username = msg.username
        if username is None or not msg.has_integrity:
            self.bad_requests += 1
            return self._error(msg, 400, "Bad Request", authenticated=False)
        if username != self._expected_username:
            # RFC 8489 §9.1.3 answers an unknown USERNAME with 401. It is unauthenticated, so a
            # client cannot act on it; it still makes a stale ufrag visible in the client's logs.
            self.wrong_username += 1
            return self._error(msg, 401, "Unauthenticated", authenticated=False)
        if not stun.verify_integrity(data, self._local_pwd_key):
            # RFC 8489 §9.1.3 would send 401 here too. We answer nothing: whoever sent it does
            # not know the password, so there is nobody to tell, and nothing to reflect.
            self.bad_integrity += 1
            return None

        # From here on the request is authenticated, and so is every response (RFC 8489 §9.1.3).
        # RFC 8489 §6.3.1: comprehension-required attributes we do not know get a 420.
        unknown = msg.unknown_comprehension_required()
        if unknown:
            self.unknown_attributes += 1
            return self._error(msg, 420, "Unknown Attribute", unknown_attributes=unknown)

        controlling = msg.ice_controlling
        controlled = msg.ice_controlled
        if controlled is not None and controlling is None:
            # The client thinks it is controlled too, so it missed our a=ice-lite: RFC 8445
            # §6.1.1 makes the full agent controlling and the lite agent controlled, always.
            # The tie-break of §7.3.1.1 (a procedure for full agents, §7.3.1) would have a
            # controlled agent switch to controlling when its tie-breaker is >= the peer's and
            # answer 487 otherwise. A lite agent cannot switch, since it neither checks nor
            # nominates (§2.5); answering success would leave both sides waiting for a
            # nomination that never comes. So we act as if our tie-breaker lost to every value:
            # always 487, whatever the tie-breakers, and the client takes the controlling role
            # and retries (§7.2.5.1). ICE-CONTROLLING, the normal case, is never a conflict.
            self.role_conflicts += 1
            return self._error(msg, 487, "Role Conflict")
        if controlling is None or controlled is not None or msg.priority is None:
            # RFC 8445 §7.1.1 and §7.1.3: a check carries PRIORITY and exactly one role.
            self.bad_requests += 1
            return self._error(msg, 400, "Bad Request")

        # RFC 8445 §7.3 / RFC 8489 §6.3.1.1: success, telling the client its address as we see
        # it (XOR-MAPPED-ADDRESS), signed with our password and fingerprinted. Only the client's
        # own transport address is reflected: the relay it came through is our side of the pair.
        response = stun.binding_success(msg, _mapped_host(addr.host), addr.port)
        reply = stun.encode(response, integrity_key=self._local_pwd_key, fingerprint=True)
        self._learn(msg, addr, now)
        return reply

    def _learn(self, msg: StunMessage, addr: PeerAddress, now: float) -> None:
        """Update the pairs after answering an authenticated check with success."""
        if msg.transaction_id in self._recent:
            # A retransmission (RFC 8489 §6.2.1) whose first copy already did its work, or a
            # captured check replayed, perhaps from a spoofed source. Binding is idempotent, so
            # it is answered again (RFC 8489 §6.3), but it proves nothing new: it must neither
            # validate or nominate another address nor keep consent alive on an old one.
            self.retransmissions += 1
            return
        self._recent[msg.transaction_id] = None
        if len(self._recent) > _RECENT_TRANSACTIONS:
            self._recent.popitem(last=False)

        # The pair is (the port this arrived on, addr); a lite agent has that one local
        # candidate, so addr names it. RFC 8445 §7.3.2 puts a lite agent's pair on the valid
        # list only once a check on it carries USE-CANDIDATE; we also remember, and report,
        # every address whose check we answered with success: it has proved it knows the
        # password and reaches us from there, which is what accepting its DTLS needs, and it is
        # where a renomination would come from. The time feeds consent freshness (RFC 7675):
        # the client's checks are our proof that it still listens.
        new = addr not in self._pairs
        self._pairs.pop(addr, None)
        self._pairs[addr] = now
        if new:
            self._evict()
            self._events.append(PairValidated(addr))
            if self._state is ResponderState.NEW:
                self._set_state(ResponderState.CHECKING)

        # RFC 8445 §7.3.1.5 and §7.3.2: USE-CANDIDATE nominates the pair the check came on;
        # with aggressive nomination it is on the very first check (validated just above).
        # RFC 8445 §8.1.1 lets a controlling agent nominate only once, so it never says which
        # of two nominations wins. Browsers facing a lite agent put USE-CANDIDATE on every
        # check of the pair they currently use and move to another pair when their network
        # changes; a lite agent has no view of its own on paths, so the latest nomination wins.
        if msg.use_candidate and self._selected != addr:
            self._selected = addr
            self._set_state(ResponderState.CONNECTED)
            self._events.append(PairNominated(addr))

    def _evict(self) -> None:
        """Drop the least recently checked pairs beyond :data:`MAX_PAIRS`, never the selected."""
        while len(self._pairs) > MAX_PAIRS:
            victim = next(a for a in self._pairs if a != self._selected)
            del self._pairs[victim]

    def _error(
        self,
        request: StunMessage,
        code: int,
        reason: str,
        *,
        authenticated: bool = True,
        unknown_attributes: tuple[int, ...] = (),
    ) -> bytes:
        """An error response to ``request``, signed only if the request was authenticated.

        RFC 8489 §9.1.3: the 400/401 sent before authentication carry no MESSAGE-INTEGRITY
        (we could not know the key is shared); later errors carry one keyed with our password.
        RFC 8445 §7: every ICE STUN message carries FINGERPRINT.
        """
        response = stun.error_response(request, code, reason, unknown_attributes=unknown_attributes)
        key = self._local_pwd_key if authenticated else None
        return stun.encode(response, integrity_key=key, fingerprint=True)

    # --- moving a session ---------------------------------------------------------------------

    def snapshot(self, now: float) -> IceState:
        """The state to carry this session to another node, with times relative to ``now``."""
        return IceState(
            local_ufrag=self.local_ufrag,
            local_pwd=self.local_pwd,
            remote_ufrag=self.remote_ufrag,
            remote_pwd=self.remote_pwd,
            pairs=tuple((addr, max(0.0, now - at)) for addr, at in self._pairs.items()),
            selected=self._selected,
            expired=self._state is ResponderState.EXPIRED,
        )

    @classmethod
    def restore(cls, state: IceState, now: float) -> IceLiteResponder:
        """A responder that carries on from ``state``, taken ``now`` by this node's clock.

        The same client keeps being answered (same credentials), its valid pairs stay valid,
        the selected pair stays selected, and consent keeps counting from the last check the
        old node saw: a session that was 10 s from expiry is still 10 s from it. No events are
        queued for what the old node already reported. Counters start at zero, and the record
        of recent transaction ids does not travel, so a replay of one of the last few checks is
        not recognized as such once.
        """
        responder = cls(state.local_ufrag, state.local_pwd, state.remote_ufrag, state.remote_pwd)
        # Least recently checked first, as the live responder keeps them (for eviction).
        for addr, age in sorted(state.pairs, key=lambda pair: -pair[1]):
            responder._pairs[addr] = now - age
        responder._selected = state.selected
        # The way a live responder got there: IceState guarantees that an expired session has
        # a selected pair and that the selected pair is one of the pairs.
        if state.pairs:
            responder._set_state(ResponderState.CHECKING)
        if state.selected is not None:
            responder._set_state(ResponderState.CONNECTED)
        if state.expired:
            responder._set_state(ResponderState.EXPIRED)
        return responder
