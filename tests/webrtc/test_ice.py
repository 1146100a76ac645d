"""ICE-lite responder: checks as aioice builds them, errors, nomination, consent, migration."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Callable
from typing import Any, cast

import aioice
import aioice.ice
import attr
import pytest
from aioice import stun as aioice_stun
from aioice.candidate import Candidate
from hypothesis import given, settings
from hypothesis import strategies as st

from sessions.webrtc import stun
from sessions.webrtc.demux import PacketKind, classify
from sessions.webrtc.errors import RemoteInputError, StateTransitionError, StunError
from sessions.webrtc.ice import (
    CONSENT_TIMEOUT,
    MAX_PAIRS,
    ConsentExpired,
    IceEvent,
    IceLiteResponder,
    IceState,
    PairNominated,
    PairValidated,
    PeerAddress,
    ResponderState,
    mint_credentials,
)
from sessions.webrtc.ice import responder as ice_responder
from sessions.webrtc.ice.responder import TRANSITIONS
from sessions.webrtc.stun import AttrType, StunClass, StunMessage
from tests.webrtc import transitions

LOCAL_UFRAG = "PaRl"
LOCAL_PWD = "parley+local/password0123"
REMOTE_UFRAG = "brWs"
REMOTE_PWD = "browser+remote/password99"
USERNAME = f"{LOCAL_UFRAG}:{REMOTE_UFRAG}"
CLIENT = PeerAddress("192.0.2.10", 50000)
OTHER = PeerAddress("198.51.100.7", 61000)
TIE_BREAKER = 0x0123_4567_89AB_CDEF
# RFC 8445 §5.1.2.1 priority of a peer-reflexive candidate: type preference 110.
PRFLX_PRIORITY = (110 << 24) | (65535 << 8) | 255


def _responder() -> IceLiteResponder:
    return IceLiteResponder(LOCAL_UFRAG, LOCAL_PWD, REMOTE_UFRAG, REMOTE_PWD)


def _check(
    *,
    username: str = USERNAME,
    pwd: str | None = LOCAL_PWD,
    role: str = "ICE-CONTROLLING",
    use_candidate: bool = False,
    priority: int | None = PRFLX_PRIORITY,
    transaction_id: bytes | None = None,
) -> bytes:
    """A connectivity check built by aioice, attribute by attribute as its Connection does."""
    request = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING,
        message_class=aioice_stun.Class.REQUEST,
        transaction_id=transaction_id,
    )
    request.attributes["USERNAME"] = username
    if priority is not None:
        request.attributes["PRIORITY"] = priority
    if role:
        request.attributes[role] = TIE_BREAKER
    if use_candidate:
        request.attributes["USE-CANDIDATE"] = None
    if pwd is None:
        request.add_fingerprint()
    else:
        request.add_message_integrity(pwd.encode())  # adds FINGERPRINT after it
    return bytes(request)


def _our_check(*extra: tuple[int, bytes], use_candidate: bool = False) -> bytes:
    """A check with attributes aioice cannot encode, built with our own STUN encoder."""
    request = stun.binding_request(
        bytes(range(12)),
        username=USERNAME,
        priority=PRFLX_PRIORITY,
        controlling=True,
        tie_breaker=TIE_BREAKER,
        use_candidate=use_candidate,
    )
    request = StunMessage(
        request.method, request.cls, request.transaction_id, request.attributes + extra
    )
    return stun.encode(request, integrity_key=LOCAL_PWD.encode(), fingerprint=True)


def _reply(
    replies: list[tuple[bytes, PeerAddress]], addr: PeerAddress = CLIENT
) -> aioice_stun.Message:
    """The single reply, parsed by aioice (which also checks its FINGERPRINT)."""
    assert len(replies) == 1
    data, to = replies[0]
    assert to == addr
    assert stun.verify_fingerprint(data)
    return aioice_stun.parse_message(data)


def _events(responder: IceLiteResponder) -> list[IceEvent]:
    events = []
    while (event := responder.next_event()) is not None:
        events.append(event)
    return events


# --- successful checks ------------------------------------------------------------------------


@pytest.mark.parametrize("addr", [CLIENT, PeerAddress("2001:db8::7", 40000)])
def test_aioice_check_gets_authenticated_success(addr: PeerAddress) -> None:
    responder = _responder()
    request = _check()
    response = _reply(responder.receive_stun(request, addr, 0.0), addr)
    assert response.message_method == aioice_stun.Method.BINDING
    assert response.message_class == aioice_stun.Class.RESPONSE
    assert response.transaction_id == request[8:20]
    assert response.attributes["XOR-MAPPED-ADDRESS"] == addr.socket_address
    assert response.check_message_integrity(LOCAL_PWD.encode())
    assert not response.check_message_integrity(REMOTE_PWD.encode())
    assert responder.responses_sent == 1
    assert responder.state is ResponderState.CHECKING
    assert responder.is_valid(addr)
    assert responder.last_check(addr) == 0.0
    assert responder.selected is None
    assert responder.get_timer() is None  # nothing to keep fresh before nomination
    assert _events(responder) == [PairValidated(addr)]


def test_ipv4_mapped_source_is_reported_as_ipv4() -> None:
    # A dual-stack socket sees an IPv4 client as ::ffff:a.b.c.d; the client wants IPv4 back.
    responder = _responder()
    addr = PeerAddress("::ffff:192.0.2.10", 50000)
    response = _reply(responder.receive_stun(_check(), addr, 0.0), addr)
    assert response.attributes["XOR-MAPPED-ADDRESS"] == CLIENT.socket_address
    assert responder.is_valid(addr)


def test_relayed_paths_are_separate_pairs_reflecting_the_client_address() -> None:
    # Through relays r1 and r2 one client address is two candidate pairs (the relay is our
    # local candidate); each is answered with the client's own address, and nominating one
    # selects that relay's path.
    responder = _responder()
    via_1, via_2 = CLIENT._replace(relay="r1"), CLIENT._replace(relay="r2")
    for addr in (via_1, via_2):
        response = _reply(responder.receive_stun(_check(), addr, 0.0), addr)
        assert response.attributes["XOR-MAPPED-ADDRESS"] == CLIENT.socket_address
    assert responder.is_valid(via_1) and responder.is_valid(via_2)
    assert not responder.is_valid(CLIENT)
    responder.receive_stun(_check(use_candidate=True), via_2, 1.0)
    assert responder.selected == via_2


def test_check_without_fingerprint_is_answered() -> None:
    responder = _responder()
    data = stun.encode(stun.parse(_our_check()), integrity_key=LOCAL_PWD.encode())
    assert not stun.parse(data).has_fingerprint
    response = _reply(responder.receive_stun(data, CLIENT, 0.0))
    assert response.message_class == aioice_stun.Class.RESPONSE


def test_comprehension_optional_attributes_are_ignored() -> None:
    # Chrome adds GOOG-NETWORK-INFO (0xC057); SOFTWARE is optional too (RFC 8489 §14.14).
    responder = _responder()
    data = _our_check((0xC057, b"\x00\x01\x00\x0a"), (AttrType.SOFTWARE, b"test"))
    response = _reply(responder.receive_stun(data, CLIENT, 0.0))
    assert response.message_class == aioice_stun.Class.RESPONSE
    assert response.check_message_integrity(LOCAL_PWD.encode())


# --- failed checks ----------------------------------------------------------------------------


def test_wrong_password_is_dropped_and_counted() -> None:
    responder = _responder()
    assert responder.receive_stun(_check(pwd=REMOTE_PWD), CLIENT, 0.0) == []
    assert responder.receive_stun(_check(pwd="x" * 22, use_candidate=True), CLIENT, 1.0) == []
    assert responder.bad_integrity == 2
    assert responder.responses_sent == 0
    assert responder.state is ResponderState.NEW
    assert not responder.is_valid(CLIENT)
    assert _events(responder) == []


@pytest.mark.parametrize(
    "username",
    [
        f"{REMOTE_UFRAG}:{LOCAL_UFRAG}",  # reversed
        f"{LOCAL_UFRAG}:oldUfrag",  # the client's ufrag before an ICE restart
        f"other:{REMOTE_UFRAG}",
        LOCAL_UFRAG,
        f"{LOCAL_UFRAG}:{REMOTE_UFRAG}:x",
        "",
    ],
)
def test_wrong_username_gets_unsigned_401(username: str) -> None:
    responder = _responder()
    response = _reply(responder.receive_stun(_check(username=username), CLIENT, 0.0))
    assert response.message_class == aioice_stun.Class.ERROR
    assert response.attributes["ERROR-CODE"] == (401, "Unauthenticated")
    # RFC 8489 §9.1.3: not authenticated, so not signed; a client will not act on it.
    assert "MESSAGE-INTEGRITY" not in response.attributes
    assert responder.wrong_username == 1
    assert responder.bad_integrity == 0
    assert responder.state is ResponderState.NEW
    assert _events(responder) == []


def test_missing_integrity_gets_400() -> None:
    responder = _responder()
    response = _reply(responder.receive_stun(_check(pwd=None), CLIENT, 0.0))
    assert response.attributes["ERROR-CODE"] == (400, "Bad Request")
    assert "MESSAGE-INTEGRITY" not in response.attributes
    assert responder.bad_requests == 1
    assert responder.state is ResponderState.NEW


def test_missing_username_gets_400() -> None:
    responder = _responder()
    request = stun.parse(_our_check())
    without = [a for a in request.attributes if a[0] != AttrType.USERNAME]
    data = stun.encode(
        StunMessage(request.method, request.cls, request.transaction_id, tuple(without)),
        integrity_key=LOCAL_PWD.encode(),
        fingerprint=True,
    )
    response = _reply(responder.receive_stun(data, CLIENT, 0.0))
    assert response.attributes["ERROR-CODE"] == (400, "Bad Request")
    assert "MESSAGE-INTEGRITY" not in response.attributes


def test_plain_stun_binding_request_gets_400() -> None:
    # A STUN-server style request with no credentials at all.
    responder = _responder()
    data = stun.encode(StunMessage(stun.BINDING, StunClass.REQUEST, bytes(12)), fingerprint=True)
    response = _reply(responder.receive_stun(data, CLIENT, 0.0))
    assert response.attributes["ERROR-CODE"] == (400, "Bad Request")


@pytest.mark.parametrize("missing", ["role", "PRIORITY"])
def test_authenticated_bad_request_gets_signed_400(missing: str) -> None:
    responder = _responder()
    request = _check(role="") if missing == "role" else _check(priority=None)
    response = _reply(responder.receive_stun(request, CLIENT, 0.0))
    assert response.attributes["ERROR-CODE"] == (400, "Bad Request")
    assert response.check_message_integrity(LOCAL_PWD.encode())
    assert responder.bad_requests == 1
    assert not responder.is_valid(CLIENT)


def test_both_roles_get_400() -> None:
    responder = _responder()
    data = _our_check((AttrType.ICE_CONTROLLED, TIE_BREAKER.to_bytes(8, "big")))
    response = _reply(responder.receive_stun(data, CLIENT, 0.0))
    assert response.attributes["ERROR-CODE"] == (400, "Bad Request")


def test_unknown_comprehension_required_attribute_gets_signed_420() -> None:
    responder = _responder()
    data = _our_check((0x7FF0, b"?"), (0x0030, b""), use_candidate=True)
    replies = responder.receive_stun(data, CLIENT, 0.0)
    response = _reply(replies)
    assert response.attributes["ERROR-CODE"] == (420, "Unknown Attribute")
    assert response.check_message_integrity(LOCAL_PWD.encode())
    assert stun.parse(replies[0][0]).unknown_attributes == (0x7FF0, 0x0030)
    assert responder.unknown_attributes == 1
    assert responder.selected is None
    assert _events(responder) == []


@pytest.mark.parametrize("tie_breaker", [0, TIE_BREAKER, (1 << 64) - 1])
def test_controlled_peer_always_gets_487(tie_breaker: int) -> None:
    # RFC 8445 §7.3.1.1 would let a controlled full agent with the larger tie-breaker switch to
    # controlling; a lite agent cannot, so whatever the tie-breakers, the client must switch.
    responder = _responder()
    request = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING, message_class=aioice_stun.Class.REQUEST
    )
    request.attributes["USERNAME"] = USERNAME
    request.attributes["PRIORITY"] = PRFLX_PRIORITY
    request.attributes["ICE-CONTROLLED"] = tie_breaker
    request.add_message_integrity(LOCAL_PWD.encode())
    response = _reply(responder.receive_stun(bytes(request), CLIENT, 0.0))
    assert response.attributes["ERROR-CODE"] == (487, "Role Conflict")
    # Signed: aioice (like browsers) ignores an unauthenticated 487.
    assert response.check_message_integrity(LOCAL_PWD.encode())
    assert responder.role_conflicts == 1
    assert responder.state is ResponderState.NEW
    assert _events(responder) == []


def test_bad_fingerprint_is_dropped_and_counted() -> None:
    responder = _responder()
    data = bytearray(_check())
    data[-1] ^= 0x01
    assert responder.receive_stun(bytes(data), CLIENT, 0.0) == []
    assert responder.bad_fingerprint == 1
    assert responder.responses_sent == 0


@pytest.mark.parametrize("cls", [StunClass.INDICATION, StunClass.SUCCESS, StunClass.ERROR])
def test_non_requests_are_ignored(cls: StunClass) -> None:
    responder = _responder()
    data = stun.encode(
        StunMessage(stun.BINDING, cls, bytes(12)),
        integrity_key=LOCAL_PWD.encode(),
        fingerprint=True,
    )
    assert responder.receive_stun(data, CLIENT, 0.0) == []
    assert responder.ignored == 1


def test_other_methods_are_ignored() -> None:
    responder = _responder()
    data = stun.encode(StunMessage(0x003, StunClass.REQUEST, bytes(12)), fingerprint=True)
    assert responder.receive_stun(data, CLIENT, 0.0) == []  # TURN Allocate: not ours
    assert responder.ignored == 1


def test_malformed_is_counted() -> None:
    responder = _responder()
    for data in [b"", b"\x00\x01", _check()[:-3], b"\x16\xfe\xfd" + bytes(30)]:
        assert responder.receive_stun(data, CLIENT, 0.0) == []
    assert responder.malformed == 4


# --- nomination -------------------------------------------------------------------------------


def test_regular_nomination() -> None:
    responder = _responder()
    _reply(responder.receive_stun(_check(), CLIENT, 0.0))
    assert _events(responder) == [PairValidated(CLIENT)]
    _reply(responder.receive_stun(_check(use_candidate=True), CLIENT, 0.1))
    assert _events(responder) == [PairNominated(CLIENT)]
    assert responder.selected == CLIENT
    assert responder.state is ResponderState.CONNECTED
    assert responder.get_timer() == 0.1 + CONSENT_TIMEOUT


def test_aggressive_nomination_on_the_first_check() -> None:
    responder = _responder()
    _reply(responder.receive_stun(_check(use_candidate=True), CLIENT, 0.0))
    assert _events(responder) == [PairValidated(CLIENT), PairNominated(CLIENT)]
    assert responder.selected == CLIENT
    assert responder.state is ResponderState.CONNECTED
    # Browsers keep USE-CANDIDATE on every later check of that pair: no more events.
    for i in range(1, 5):
        _reply(responder.receive_stun(_check(use_candidate=True), CLIENT, 5.0 * i))
    assert _events(responder) == []


def test_latest_nomination_wins() -> None:
    responder = _responder()
    responder.receive_stun(_check(use_candidate=True), CLIENT, 0.0)
    responder.receive_stun(_check(use_candidate=True), OTHER, 1.0)
    assert responder.selected == OTHER
    responder.receive_stun(_check(use_candidate=True), CLIENT, 2.0)
    assert responder.selected == CLIENT
    assert _events(responder) == [
        PairValidated(CLIENT),
        PairNominated(CLIENT),
        PairValidated(OTHER),
        PairNominated(OTHER),
        PairNominated(CLIENT),
    ]
    assert set(responder.valid_addresses) == {CLIENT, OTHER}


def test_retransmission_is_answered_but_changes_nothing() -> None:
    responder = _responder()
    request = _check(use_candidate=True)
    first = responder.receive_stun(request, CLIENT, 0.0)
    again = responder.receive_stun(request, CLIENT, 0.5)
    assert again == first  # Binding is idempotent: the same answer
    assert responder.retransmissions == 1
    assert responder.last_check(CLIENT) == 0.0
    assert _events(responder) == [PairValidated(CLIENT), PairNominated(CLIENT)]


def test_replayed_check_cannot_move_media_elsewhere() -> None:
    # An on-path attacker replays a nominating check from a spoofed source: it is answered
    # (the answer is smaller than the request) but validates and nominates nothing.
    responder = _responder()
    captured = _check(use_candidate=True)
    responder.receive_stun(captured, CLIENT, 0.0)
    _events(responder)
    response = _reply(responder.receive_stun(captured, OTHER, 1.0), OTHER)
    assert response.attributes["XOR-MAPPED-ADDRESS"] == OTHER.socket_address
    assert responder.selected == CLIENT
    assert not responder.is_valid(OTHER)
    assert _events(responder) == []


def test_pairs_are_bounded_and_the_selected_one_is_kept() -> None:
    responder = _responder()
    responder.receive_stun(_check(use_candidate=True), CLIENT, 0.0)
    for i in range(MAX_PAIRS + 20):
        responder.receive_stun(_check(), PeerAddress("203.0.113.1", 1000 + i), 1.0 + i / 100)
    assert len(responder.valid_addresses) == MAX_PAIRS
    assert responder.selected == CLIENT
    assert responder.is_valid(CLIENT)
    assert not responder.is_valid(PeerAddress("203.0.113.1", 1000))  # least recent went first
    assert responder.is_valid(PeerAddress("203.0.113.1", 1000 + MAX_PAIRS + 19))


# --- consent freshness ------------------------------------------------------------------------


def _connect(responder: IceLiteResponder, now: float = 0.0, addr: PeerAddress = CLIENT) -> None:
    _reply(responder.receive_stun(_check(use_candidate=True), addr, now), addr)
    _events(responder)


def test_consent_checks_keep_the_session_alive_for_minutes() -> None:
    responder = _responder()
    _connect(responder)
    rng = random.Random(7675)
    now = 0.0
    while now < 600.0:
        # RFC 7675 §5.1: the client checks every 5 s, randomized to 0.8..1.2 of that.
        interval = 5.0 * (0.8 + 0.4 * rng.random())
        responder.handle_timer(now + interval / 2)  # a timer loop may wake in between
        now += interval
        response = _reply(responder.receive_stun(_check(use_candidate=True), CLIENT, now))
        assert response.message_class == aioice_stun.Class.RESPONSE
        assert responder.get_timer() == now + CONSENT_TIMEOUT
        assert not responder.consent_expired(now + CONSENT_TIMEOUT - 0.001)
    assert responder.state is ResponderState.CONNECTED
    assert _events(responder) == []


def test_consent_expires_exactly_at_the_deadline() -> None:
    responder = _responder()
    _connect(responder, 0.0)
    for now in (5.0, 10.0, 15.0):
        responder.receive_stun(_check(), CLIENT, now)  # consent checks: no USE-CANDIDATE
    deadline = responder.get_timer()
    assert deadline == 15.0 + CONSENT_TIMEOUT
    responder.handle_timer(deadline - 1e-6)
    assert not responder.consent_expired(deadline - 1e-6)
    assert _events(responder) == []
    assert responder.consent_expired(deadline)
    responder.handle_timer(deadline)
    assert _events(responder) == [ConsentExpired(CLIENT)]
    assert responder.state is ResponderState.EXPIRED
    assert responder.get_timer() is None
    responder.handle_timer(deadline + 100.0)
    assert _events(responder) == []
    # Expired is terminal: a late check is not answered (RFC 7675 §5.2), so the client's own
    # consent lapses too; only an ICE restart brings the session back.
    assert responder.receive_stun(_check(use_candidate=True), CLIENT, deadline + 1.0) == []
    assert responder.ignored == 1
    assert responder.consent_expired(deadline + 1.0)


def test_a_check_after_the_deadline_does_not_revive_consent() -> None:
    # The outcome must not depend on whether the timer ran before the late datagram.
    responder = _responder()
    _connect(responder, 0.0)
    assert responder.receive_stun(_check(), CLIENT, CONSENT_TIMEOUT) == []
    assert _events(responder) == [ConsentExpired(CLIENT)]


def test_checks_on_another_pair_do_not_keep_the_selected_one_fresh() -> None:
    responder = _responder()
    _connect(responder, 0.0)
    for now in (5.0, 10.0, 15.0, 20.0, 25.0, 29.0):
        responder.receive_stun(_check(), OTHER, now)
    assert responder.get_timer() == CONSENT_TIMEOUT
    responder.handle_timer(CONSENT_TIMEOUT)
    assert _events(responder) == [PairValidated(OTHER), ConsentExpired(CLIENT)]


def test_nat_rebinding_after_nomination() -> None:
    # The client's NAT maps it to a new address mid-call. Its checks from there validate the
    # new pair at once; media moves when the client renominates (browsers put USE-CANDIDATE on
    # every check of the pair they use), and consent then follows the new pair.
    responder = _responder()
    _connect(responder, 0.0)
    responder.receive_stun(_check(use_candidate=True), CLIENT, 5.0)
    response = _reply(responder.receive_stun(_check(), OTHER, 8.0), OTHER)
    assert response.attributes["XOR-MAPPED-ADDRESS"] == OTHER.socket_address
    assert _events(responder) == [PairValidated(OTHER)]
    assert responder.selected == CLIENT
    assert responder.get_timer() == 5.0 + CONSENT_TIMEOUT

    _reply(responder.receive_stun(_check(use_candidate=True), OTHER, 13.0), OTHER)
    assert _events(responder) == [PairNominated(OTHER)]
    assert responder.selected == OTHER
    assert responder.get_timer() == 13.0 + CONSENT_TIMEOUT
    responder.handle_timer(5.0 + CONSENT_TIMEOUT)  # the old pair's deadline no longer matters
    assert responder.state is ResponderState.CONNECTED
    assert _events(responder) == []


# --- snapshot and restore ---------------------------------------------------------------------


def test_snapshot_and_restore_continue_the_session() -> None:
    old = _responder()
    _connect(old, 100.0)
    old.receive_stun(_check(), OTHER, 104.0)
    old.receive_stun(_check(), CLIENT, 107.0)
    _events(old)
    state = old.snapshot(110.0)
    assert state.selected == CLIENT
    assert state.consent_age == 3.0
    assert dict(state.pairs) == {OTHER: 6.0, CLIENT: 3.0}
    assert not state.expired
    assert LOCAL_PWD not in repr(state) and REMOTE_PWD not in repr(state)

    # Another node, another monotonic clock.
    new = IceLiteResponder.restore(state, 5000.0)
    assert new.state is ResponderState.CONNECTED
    assert new.selected == CLIENT
    assert new.is_valid(OTHER)
    assert new.get_timer() == 5000.0 - 3.0 + CONSENT_TIMEOUT
    assert _events(new) == []
    # The same client, unchanged, is answered with the same credentials.
    response = _reply(new.receive_stun(_check(), CLIENT, 5001.0))
    assert response.check_message_integrity(LOCAL_PWD.encode())
    assert response.attributes["XOR-MAPPED-ADDRESS"] == CLIENT.socket_address
    assert _events(new) == []  # the pair was already valid
    assert new.get_timer() == 5001.0 + CONSENT_TIMEOUT
    new.handle_timer(5001.0 + CONSENT_TIMEOUT)
    assert _events(new) == [ConsentExpired(CLIENT)]


def test_restore_keeps_counting_towards_expiry() -> None:
    old = _responder()
    _connect(old, 0.0)
    state = old.snapshot(25.0)
    new = IceLiteResponder.restore(state, 1000.0)
    assert new.get_timer() == 1005.0
    new.handle_timer(1005.0)
    assert _events(new) == [ConsentExpired(CLIENT)]


@pytest.mark.parametrize("step", ["new", "checking", "expired"])
def test_restore_each_state(step: str) -> None:
    old = _responder()
    if step != "new":
        old.receive_stun(_check(use_candidate=step == "expired"), CLIENT, 0.0)
    if step == "expired":
        old.handle_timer(CONSENT_TIMEOUT)
    new = IceLiteResponder.restore(old.snapshot(40.0), 0.0)
    assert new.state is old.state
    assert new.state.value == step
    assert new.selected == old.selected
    assert new.valid_addresses == old.valid_addresses


def _state(
    *,
    local_pwd: str = LOCAL_PWD,
    pairs: tuple[tuple[PeerAddress, float], ...] = (),
    selected: PeerAddress | None = None,
    expired: bool = False,
) -> IceState:
    return IceState(
        local_ufrag=LOCAL_UFRAG,
        local_pwd=local_pwd,
        remote_ufrag=REMOTE_UFRAG,
        remote_pwd=REMOTE_PWD,
        pairs=pairs,
        selected=selected,
        expired=expired,
    )


def test_ice_state_survives_a_json_round_trip() -> None:
    old = _responder()
    _connect(old, 0.0)
    old.receive_stun(_check(), OTHER, 2.0)
    old.receive_stun(_check(), OTHER._replace(relay="relay-2"), 3.0)
    state = old.snapshot(4.0)
    # tuples come back as lists (attrs cannot rebuild the NamedTuple PeerAddress itself)
    fields = json.loads(json.dumps(attr.asdict(state, retain_collection_types=False)))
    assert IceState(**fields) == state
    assert OTHER._replace(relay="relay-2") in [addr for addr, _ in IceState(**fields).pairs]
    new = IceLiteResponder.restore(IceState(**fields), 10.0)
    assert new.selected == CLIENT
    assert new.get_timer() == 6.0 + CONSENT_TIMEOUT


def test_ice_state_rejects_inconsistent_values() -> None:
    assert _state(pairs=((CLIENT, 1.0),), selected=CLIENT, expired=True).consent_age == 1.0
    with pytest.raises(ValueError, match="selected"):
        _state(selected=CLIENT)
    with pytest.raises(ValueError, match="twice"):
        _state(pairs=((CLIENT, 1.0), (CLIENT, 2.0)))
    with pytest.raises(ValueError, match="age"):
        _state(pairs=((CLIENT, -1.0),))
    with pytest.raises(ValueError, match="age"):
        _state(pairs=((CLIENT, float("nan")),))
    with pytest.raises(ValueError, match="expired"):
        _state(expired=True)
    with pytest.raises(ValueError, match="ice-chars"):
        _state(local_pwd="short")
    port_as_text: Any = ("192.0.2.1", "80")
    with pytest.raises(TypeError, match="address"):
        _state(pairs=((port_as_text, 1.0),))


# --- the transition table ---------------------------------------------------------------------


def test_the_table_rejects_an_illegal_transition() -> None:
    responder = _responder()
    with pytest.raises(StateTransitionError, match="NEW to CONNECTED") as caught:
        responder._set_state(ResponderState.CONNECTED)  # nominated before any valid check
    # a bug of ours, not the peer's input: callers must not count and drop it
    assert not isinstance(caught.value, RemoteInputError)
    assert responder.state is ResponderState.NEW


@pytest.mark.parametrize(("old", "new"), transitions.forbidden(TRANSITIONS))
def test_every_transition_outside_the_table_is_refused(
    old: ResponderState, new: ResponderState
) -> None:
    responder = _responder()
    responder._state = old  # put there directly: this tests the table, not a path to ``old``
    with pytest.raises(StateTransitionError):
        responder._set_state(new)
    assert responder.state is old


def test_the_state_changes_only_in_set_state() -> None:
    assert transitions.state_writers(ice_responder) == {"__init__", "_set_state"}


def test_every_transition_the_tests_drive_is_in_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    with transitions.recording(monkeypatch, IceLiteResponder, lambda r: r.state) as driven:
        test_aioice_check_gets_authenticated_success(CLIENT)
        test_regular_nomination()
        test_aggressive_nomination_on_the_first_check()
        test_latest_nomination_wins()
        test_consent_expires_exactly_at_the_deadline()
        test_snapshot_and_restore_continue_the_session()
        test_restore_keeps_counting_towards_expiry()
        for step in ("new", "checking", "expired"):
            test_restore_each_state(step)
    allowed = transitions.edges(TRANSITIONS)
    assert driven <= allowed
    assert driven == allowed, f"no test drives {allowed - driven}"


# --- credentials ------------------------------------------------------------------------------


def test_mint_credentials_are_ice_chars_of_the_right_length() -> None:
    ufrag, pwd = mint_credentials()
    assert re.fullmatch(r"[A-Za-z0-9+/]{16}", ufrag)
    assert re.fullmatch(r"[A-Za-z0-9+/]{32}", pwd)
    assert len({mint_credentials() for _ in range(50)}) == 50
    ufrag, pwd = mint_credentials(ufrag_length=4, pwd_length=22)
    assert (len(ufrag), len(pwd)) == (4, 22)
    ufrag, pwd = mint_credentials(ufrag_length=256, pwd_length=256)
    IceLiteResponder(ufrag, pwd, REMOTE_UFRAG, REMOTE_PWD)  # accepted as they are


def test_mint_credentials_with_a_seeded_rng_is_reproducible() -> None:
    assert mint_credentials(random.Random(1)) == mint_credentials(random.Random(1))
    assert mint_credentials(random.Random(1)) != mint_credentials(random.Random(2))


@pytest.mark.parametrize(("ufrag_length", "pwd_length"), [(3, 22), (4, 21), (257, 22), (4, 257)])
def test_mint_credentials_rejects_lengths_outside_rfc_8839(
    ufrag_length: int, pwd_length: int
) -> None:
    with pytest.raises(ValueError, match="RFC 8839"):
        mint_credentials(ufrag_length=ufrag_length, pwd_length=pwd_length)


@pytest.mark.parametrize(
    "creds",
    [
        ("abc", LOCAL_PWD, REMOTE_UFRAG, REMOTE_PWD),
        (LOCAL_UFRAG, "too-short", REMOTE_UFRAG, REMOTE_PWD),
        (LOCAL_UFRAG, LOCAL_PWD, "bad:ufrag", REMOTE_PWD),
        (LOCAL_UFRAG, LOCAL_PWD, REMOTE_UFRAG, "password with spaces in it"),
    ],
)
def test_responder_rejects_bad_credentials(creds: tuple[str, str, str, str]) -> None:
    with pytest.raises(ValueError, match="ice-chars"):
        IceLiteResponder(*creds)


def test_repr_hides_passwords() -> None:
    text = repr(_responder())
    assert LOCAL_UFRAG in text
    assert LOCAL_PWD not in text and REMOTE_PWD not in text


# --- fuzzing ----------------------------------------------------------------------------------


def _assert_well_formed_replies(
    replies: list[tuple[bytes, PeerAddress]], request: bytes, addr: PeerAddress
) -> None:
    assert len(replies) <= 1
    for data, to in replies:
        assert to == addr
        reply = stun.parse(data)
        assert reply.cls in (StunClass.SUCCESS, StunClass.ERROR)
        assert reply.transaction_id == request[8:20]
        assert stun.verify_fingerprint(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    responder = _responder()
    replies = responder.receive_stun(data, CLIENT, 0.0)
    try:
        stun.parse(data)
    except StunError:
        assert replies == []
        assert responder.malformed == 1
    else:
        _assert_well_formed_replies(replies, data, CLIENT)


_ATTRIBUTE = st.tuples(
    st.sampled_from([*map(int, AttrType), 0x0003, 0x7FFF, 0xC057, 0xFFFF]),
    st.binary(max_size=24),
)


@settings(max_examples=400, deadline=None)
@given(
    attributes=st.lists(_ATTRIBUTE, max_size=6),
    cls=st.sampled_from(StunClass),
    sign=st.booleans(),
    fingerprint=st.booleans(),
)
def test_well_framed_stun_with_random_attributes_never_raises(
    attributes: list[tuple[int, bytes]], cls: StunClass, sign: bool, fingerprint: bool
) -> None:
    responder = _responder()
    data = stun.encode(
        StunMessage(stun.BINDING, cls, bytes(12), tuple(attributes)),
        integrity_key=LOCAL_PWD.encode() if sign else None,
        fingerprint=fingerprint,
    )
    _assert_well_formed_replies(responder.receive_stun(data, CLIENT, 0.0), data, CLIENT)


@settings(max_examples=400, deadline=None)
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_corrupted_checks_never_raise_and_never_validate(position: int, value: int) -> None:
    request = bytearray(_check(use_candidate=True))
    position %= len(request)
    if request[position] == value:
        return
    request[position] = value
    responder = _responder()
    replies = responder.receive_stun(bytes(request), CLIENT, 0.0)
    _assert_well_formed_replies(replies, bytes(request), CLIENT)
    # MESSAGE-INTEGRITY covers everything before the trailing FINGERPRINT attribute: nothing
    # changed there can validate a pair. A change inside the FINGERPRINT is dropped, except
    # one that turns it into another attribute type, which RFC 8489 §14.5 then ignores (it
    # follows MESSAGE-INTEGRITY), leaving an authentic check without a FINGERPRINT.
    if position < len(request) - 8 or position >= len(request) - 6:
        assert responder.selected is None
        assert not responder.is_valid(CLIENT)


# --- end to end: a real aioice agent over UDP on 127.0.0.1 ------------------------------------


class _MediaPort(asyncio.DatagramProtocol):
    """Our side: one UDP socket, demultiplexed (RFC 7983), STUN handed to the responder."""

    def __init__(self, responder: IceLiteResponder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None
        self.data: asyncio.Queue[tuple[bytes, PeerAddress]] = asyncio.Queue()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        assert self.transport is not None
        source = PeerAddress(str(addr[0]), int(addr[1]))
        if classify(data) is PacketKind.STUN:
            now = asyncio.get_running_loop().time()
            for reply, to in self.responder.receive_stun(data, source, now):
                self.transport.sendto(reply, to.socket_address)
        else:
            self.data.put_nowait((data, source))


async def _connect_aioice(ice_controlling: bool) -> None:
    client = aioice.Connection(ice_controlling=ice_controlling, use_ipv6=False)
    responder = IceLiteResponder(
        LOCAL_UFRAG, LOCAL_PWD, client.local_username, client.local_password
    )
    loop = asyncio.get_running_loop()
    transport, port = await loop.create_datagram_endpoint(
        lambda: _MediaPort(responder), local_addr=("127.0.0.1", 0)
    )
    try:
        host, port_number = transport.get_extra_info("sockname")[:2]
        await client.gather_candidates()
        [local] = client.local_candidates
        assert local.host == "127.0.0.1"
        # What the signaling would carry: our ufrag/pwd, a=ice-lite, our one host candidate.
        client.remote_username = LOCAL_UFRAG
        client.remote_password = LOCAL_PWD
        client.remote_is_lite = True
        await client.add_remote_candidate(
            Candidate(
                foundation="parley",
                component=1,
                transport="udp",
                priority=(126 << 24) | (65535 << 8) | 255,
                host=host,
                port=port_number,
                type="host",
            )
        )
        await client.add_remote_candidate(None)
        await asyncio.wait_for(client.connect(), 5)

        client_addr = PeerAddress(local.host, local.port)
        assert responder.selected == client_addr
        assert responder.state is ResponderState.CONNECTED
        assert _events(responder) == [PairValidated(client_addr), PairNominated(client_addr)]
        assert responder.role_conflicts == (0 if ice_controlling else 1)

        # The pair carries data both ways.
        await client.send(b"\x80media")
        assert await asyncio.wait_for(port.data.get(), 5) == (b"\x80media", client_addr)
        assert port.transport is not None
        port.transport.sendto(b"\x80back", client_addr.socket_address)
        assert await asyncio.wait_for(client.recv(), 5) == b"\x80back"

        # aioice's consent checks (sped up by the test) keep consent fresh on our side.
        first = responder.last_check(client_addr)
        assert first is not None
        await asyncio.sleep(0.3)
        last = responder.last_check(client_addr)
        assert last is not None and last > first
        assert responder.get_timer() == last + CONSENT_TIMEOUT
        assert responder.bad_integrity == responder.malformed == 0
    finally:
        await client.close()
        transport.close()


@pytest.mark.parametrize("ice_controlling", [True, False], ids=["controlling", "role-conflict"])
def test_aioice_connection_end_to_end(
    monkeypatch: pytest.MonkeyPatch, ice_controlling: bool
) -> None:
    # aioice gathers no loopback candidates by default; give it 127.0.0.1 only, and make its
    # RFC 7675 consent checks frequent enough to observe within the test.
    host_addresses: Callable[..., list[str]] = lambda **_: ["127.0.0.1"]  # noqa: E731
    monkeypatch.setattr(aioice.ice, "get_host_addresses", host_addresses)
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.05)
    asyncio.run(_connect_aioice(ice_controlling))
