"""DTLS server core: handshakes against pyOpenSSL and aiortc clients, fingerprint checks,
retransmission, close, record framing, fuzzing; and the certificate helpers."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import re
import struct
import time
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL, crypto

from sessions.webrtc.certs import Certificate, fingerprint, generate_certificate
from sessions.webrtc.dtls import (
    DEFAULT_MTU,
    Closed,
    DtlsError,
    DtlsServer,
    DtlsState,
    Event,
    HandshakeComplete,
    HandshakeFailed,
    SrtpKeys,
    SrtpProfile,
)
from sessions.webrtc.dtls import openssl as dtls_openssl
from sessions.webrtc.dtls import server as dtls_server
from sessions.webrtc.dtls.server import TRANSITIONS
from sessions.webrtc.errors import RemoteInputError, StateTransitionError
from tests.webrtc import transitions

BOTH_PROFILES = b"SRTP_AEAD_AES_128_GCM:SRTP_AES128_CM_SHA1_80"
LABEL = b"EXTRACTOR-dtls_srtp"
FUZZ = settings(max_examples=60, deadline=None)


# One certificate per side for the whole module, as WebRTC stacks use one per session or node.
SERVER_CERT = generate_certificate()
CLIENT_CERT = generate_certificate(common_name="client")


# -- an in-memory DTLS client (pyOpenSSL, memory BIOs) ---------------------------------------


def split_records(stream: bytes) -> list[bytes]:
    """DTLS records of a byte stream (RFC 6347 §4.1 header: length at bytes 11..13); a
    truncated tail comes out as it is."""
    records = []
    offset = 0
    while offset < len(stream):
        length = int.from_bytes(stream[offset + 11 : offset + 13], "big")
        records.append(stream[offset : offset + 13 + length])
        offset += 13 + length
    return records


class Client:
    """A WebRTC-style DTLS client: presents a (self-signed) certificate, offers use_srtp."""

    def __init__(
        self,
        certificate: Certificate | None,
        *,
        profiles: bytes | None = BOTH_PROFILES,
        mtu: int = DEFAULT_MTU,
        rsa_cert: tuple[x509.Certificate, rsa.RSAPrivateKey] | None = None,
    ) -> None:
        ctx = SSL.Context(SSL.DTLS_CLIENT_METHOD)
        if certificate is not None:
            ctx.use_certificate(certificate.cert)
            ctx.use_privatekey(certificate.private_key)
        if rsa_cert is not None:
            ctx.use_certificate(rsa_cert[0])
            ctx.use_privatekey(rsa_cert[1])
        ctx.set_verify(SSL.VERIFY_PEER, lambda *_: True)
        if profiles is not None:
            ctx.set_tlsext_use_srtp(profiles)
        ctx.set_options(SSL.OP_NO_QUERY_MTU)
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_connect_state()
        self.conn.set_ciphertext_mtu(mtu)
        self.mtu = mtu
        self.done = False
        self.error: SSL.Error | None = None
        self.closed_by_peer = False

    def step(self) -> None:
        if self.error is not None or self.closed_by_peer:
            return
        try:
            if not self.done:
                self.conn.do_handshake()
                self.done = True
            while True:
                self.conn.recv(65536)
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            self.closed_by_peer = True
        except SSL.Error as exc:
            self.error = exc

    def receive(self, datagram: bytes) -> None:
        self.conn.bio_write(datagram)
        self.step()

    def datagrams(self) -> list[bytes]:
        stream = b""
        with contextlib.suppress(SSL.WantReadError):
            while True:
                stream += self.conn.bio_read(65536)
        out: list[bytes] = []
        for record in split_records(stream):
            if out and len(out[-1]) + len(record) <= self.mtu:
                out[-1] += record
            else:
                out.append(record)
        return out

    def export(self, length: int) -> bytes:
        return self.conn.export_keying_material(LABEL, length)


def drain(server: DtlsServer) -> list[Event]:
    events = []
    while (event := server.next_event()) is not None:
        events.append(event)
    return events


def pump(server: DtlsServer, client: Client, now: float = 0.0) -> list[bytes]:
    """Move datagrams both ways until neither side has anything to say; returns everything
    the server sent."""
    sent: list[bytes] = []
    client.step()
    for _ in range(50):
        moved = False
        for datagram in client.datagrams():
            server.receive(datagram, now)
            moved = True
        for datagram in server.datagrams_to_send():
            sent.append(datagram)
            client.receive(datagram)
            moved = True
        if not moved:
            return sent
    raise AssertionError("handshake did not settle")


def new_server(algorithm: str = "sha-256", **kw: Any) -> DtlsServer:
    return DtlsServer(SERVER_CERT, (algorithm, CLIENT_CERT.fingerprint(algorithm)), **kw)


def handshake(**kw: Any) -> tuple[DtlsServer, Client, HandshakeComplete]:
    server = new_server(**kw)
    client = Client(CLIENT_CERT)
    pump(server, client)
    (event,) = drain(server)
    assert isinstance(event, HandshakeComplete)
    assert client.done and client.error is None
    return server, client, event


def content_types(datagrams: list[bytes]) -> list[int]:
    return [record[0] for d in datagrams for record in split_records(d)]


# -- handshakes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "profile"),
    [
        (b"SRTP_AES128_CM_SHA1_80", SrtpProfile.AES128_CM_HMAC_SHA1_80),
        (b"SRTP_AEAD_AES_128_GCM", SrtpProfile.AEAD_AES_128_GCM),
        # our preference wins over the client's order (RFC 5764 §4.1.1 lets the server pick)
        (b"SRTP_AES128_CM_SHA1_80:SRTP_AEAD_AES_128_GCM", SrtpProfile.AEAD_AES_128_GCM),
    ],
)
def test_handshake_keys_srtp_like_the_client(offered: bytes, profile: SrtpProfile) -> None:
    server = new_server()
    client = Client(CLIENT_CERT, profiles=offered)
    pump(server, client)
    (event,) = drain(server)
    assert isinstance(event, HandshakeComplete)
    assert event.profile is profile and event.keys.profile is profile
    assert client.done and client.error is None
    assert client.conn.get_selected_srtp_profile() == profile.openssl_name
    assert client.conn.get_protocol_version_name() == "DTLSv1.2"
    assert event.cipher == "ECDHE-ECDSA-AES128-GCM-SHA256"  # RFC 8827 §6.5's mandatory suite

    k, s = profile.key_length, profile.salt_length
    material = client.export(2 * (k + s))
    keys = event.keys
    assert keys == SrtpKeys.from_exported(profile, material)
    # RFC 5764 §4.2 layout, spelled out
    assert keys.client_key == material[:k]
    assert keys.server_key == material[k : 2 * k]
    assert keys.client_salt == material[2 * k : 2 * k + s]
    assert keys.server_salt == material[2 * k + s :]
    assert keys.client_master == keys.client_key + keys.client_salt
    assert keys.server_master == keys.server_key + keys.server_salt
    assert server.state is DtlsState.CONNECTED
    assert server.get_timer() is None


def test_server_side_profile_restriction() -> None:
    _, _, event = handshake(profiles=(SrtpProfile.AES128_CM_HMAC_SHA1_80,))
    assert event.profile is SrtpProfile.AES128_CM_HMAC_SHA1_80


def test_nothing_shows_key_material() -> None:
    _, _, event = handshake()
    keys = event.keys
    for text in (repr(event), str(event), repr(keys), str(keys)):
        assert "redacted" in text
        for secret in (keys.client_key, keys.client_salt, keys.server_key, keys.server_salt):
            assert secret.hex() not in text
            assert repr(secret) not in text
            assert secret.hex()[:8] not in text.lower()
    assert "private" not in repr(SERVER_CERT).lower()
    assert SERVER_CERT.fingerprint_sha256 in repr(SERVER_CERT)
    with pytest.raises(ValueError, match="client_key must be 16 bytes, got 3") as info:
        SrtpKeys(SrtpProfile.AEAD_AES_128_GCM, b"abc", bytes(12), bytes(16), bytes(12))
    assert "abc" not in str(info.value)


@pytest.mark.parametrize("algorithm", ["sha-1", "sha-256", "sha-384", "sha-512", "SHA-256"])
def test_every_offered_hash_function(algorithm: str) -> None:
    handshake(algorithm=algorithm)


def test_lower_case_offered_fingerprint() -> None:
    server = DtlsServer(SERVER_CERT, ("sha-256", CLIENT_CERT.fingerprint_sha256.lower()))
    client = Client(CLIENT_CERT)
    pump(server, client)
    assert isinstance(server.next_event(), HandshakeComplete)


def test_rsa_client_certificate() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "rsa-peer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    server = DtlsServer(SERVER_CERT, ("sha-256", fingerprint(der)))
    client = Client(None, rsa_cert=(cert, key))
    pump(server, client)
    assert isinstance(server.next_event(), HandshakeComplete)


def test_wrong_fingerprint_fails_without_keys() -> None:
    other = generate_certificate()
    server = DtlsServer(SERVER_CERT, ("sha-256", other.fingerprint_sha256))
    client = Client(CLIENT_CERT)
    sent = pump(server, client)
    events = drain(server)
    assert len(events) == 1
    (event,) = events
    assert isinstance(event, HandshakeFailed)
    assert "fingerprint" in event.reason
    # the handshake was aborted with a fatal alert before our Finished
    assert content_types(sent)[-1] == 21
    assert client.error is not None and not client.done
    assert server.state is DtlsState.FAILED
    assert server.get_timer() is None
    # inert from now on
    server.receive(b"garbage that would otherwise raise", 1.0)
    server.handle_timer(1000.0)
    assert server.datagrams_to_send() == [] and server.next_event() is None
    assert server.datagrams_ignored == 1


def test_sessions_share_one_context_but_each_checks_its_own_fingerprint() -> None:
    # A node's sessions share one OpenSSL context per certificate (memory); the fingerprint a
    # peer must match stays each connection's own, checked in the handshake (alert before our
    # Finished), whichever session the other offer belonged to.
    other = generate_certificate(common_name="another client")
    theirs = DtlsServer(SERVER_CERT, ("sha-256", other.fingerprint_sha256))
    ours = new_server()
    assert theirs._conn.get_context() is ours._conn.get_context()

    client = Client(CLIENT_CERT)  # matches ``ours`` only
    sent = pump(theirs, client)
    (event,) = drain(theirs)
    assert isinstance(event, HandshakeFailed) and "fingerprint" in event.reason
    assert content_types(sent)[-1] == 21 and not client.done

    client = Client(CLIENT_CERT)
    pump(ours, client)
    assert isinstance(ours.next_event(), HandshakeComplete) and client.done
    again = DtlsServer(SERVER_CERT, ("sha-256", other.fingerprint_sha256))
    client = Client(other)
    pump(again, client)
    assert isinstance(again.next_event(), HandshakeComplete) and client.done


def test_a_connection_of_the_shared_context_without_its_own_check_refuses() -> None:
    ours = new_server()
    conn = SSL.Connection(ours._conn.get_context(), None)  # no verify of its own
    cert = crypto.X509.from_cryptography(CLIENT_CERT.cert)
    assert dtls_openssl._verify_connection(conn, cert, 0, 0, 1) is False


def test_a_check_that_raises_refuses_its_own_handshake_and_no_other() -> None:
    broken = new_server()

    def raising(*_: object) -> bool:
        raise RuntimeError("a bug in one session's check")

    broken._conn.set_app_data(raising)
    client = Client(CLIENT_CERT)
    pump(broken, client)
    (event,) = drain(broken)
    assert isinstance(event, HandshakeFailed) and not client.done
    # The shared context kept nothing of it: the next session's handshake completes.
    server, client, _ = handshake()
    assert server.state is DtlsState.CONNECTED and client.done


def test_client_without_certificate_fails() -> None:
    server = new_server()
    client = Client(None)
    sent = pump(server, client)
    (event,) = drain(server)
    assert isinstance(event, HandshakeFailed)
    assert "certificate" in event.reason
    assert content_types(sent)[-1] == 21
    assert client.error is not None
    assert server.state is DtlsState.FAILED


@pytest.mark.parametrize("offered", [b"SRTP_AES128_CM_SHA1_32", None])
def test_no_common_srtp_profile_fails(offered: bytes | None) -> None:
    server = new_server()
    client = Client(CLIENT_CERT, profiles=offered)
    sent = pump(server, client)
    (event,) = drain(server)
    assert event == HandshakeFailed("no SRTP protection profile in common")
    assert content_types(sent)[-1] == 21  # close_notify after our Finished
    assert client.closed_by_peer


def test_flights_fit_the_mtu() -> None:
    for mtu in (DEFAULT_MTU, 512):
        server = new_server(mtu=mtu)
        client = Client(CLIENT_CERT, mtu=mtu)
        sent = pump(server, client)
        assert isinstance(server.next_event(), HandshakeComplete)
        assert all(len(d) <= mtu for d in sent)
        if mtu == 512:
            assert len(sent) > 2  # the server's second flight needed several datagrams
        for d in sent:  # whole records only (RFC 6347 §4.1.1)
            assert b"".join(split_records(d)) == d


# -- retransmission and timers ----------------------------------------------------------------


def test_lost_first_flight_is_retransmitted() -> None:
    # Real time: OpenSSL runs its retransmission timer on its own clock (see DtlsServer).
    server = new_server()
    client = Client(CLIENT_CERT)
    client.step()
    t0 = time.monotonic()
    for datagram in client.datagrams():
        server.receive(datagram, t0)
    lost = server.datagrams_to_send()
    assert lost
    deadline = server.get_timer()
    assert deadline is not None and t0 + 0.5 < deadline <= t0 + 1.01  # RFC 6347 §4.2.4.1

    server.handle_timer(time.monotonic())  # early: nothing to do
    assert server.datagrams_to_send() == []

    time.sleep(max(0.0, deadline - time.monotonic()) + 0.02)
    now = time.monotonic()
    assert now >= deadline
    server.handle_timer(now)
    again = server.datagrams_to_send()
    # the same flight again (RFC 6347 §4.2.4): same handshake fragments, new record numbers
    old_records = [r for d in lost for r in split_records(d)]
    new_records = [r for d in again for r in split_records(d)]
    assert [r[13:] for r in new_records] == [r[13:] for r in old_records]
    assert min(r[5:11] for r in new_records) > max(r[5:11] for r in old_records)
    # the timer doubled
    next_deadline = server.get_timer()
    assert next_deadline is not None and 1.5 < next_deadline - now <= 2.01

    for datagram in again:
        client.receive(datagram)
    pump(server, client, now)
    assert isinstance(server.next_event(), HandshakeComplete)
    assert client.done


def test_lost_final_flight_is_resent_when_the_client_retransmits() -> None:
    server = new_server()
    client = Client(CLIENT_CERT)
    client.step()
    for datagram in client.datagrams():
        server.receive(datagram, 0.0)
    for datagram in server.datagrams_to_send():
        client.receive(datagram)
    for datagram in client.datagrams():
        server.receive(datagram, 0.0)
    assert isinstance(server.next_event(), HandshakeComplete)
    assert server.datagrams_to_send()  # ChangeCipherSpec + Finished: lost
    assert not client.done

    timeout = client.conn.DTLSv1_get_timeout()
    assert timeout is not None
    time.sleep(timeout + 0.02)
    assert client.conn.DTLSv1_handle_timeout()
    for datagram in client.datagrams():  # the client's whole last flight, again
        server.receive(datagram, 2.0)
    resent = server.datagrams_to_send()
    assert resent
    for datagram in resent:
        client.receive(datagram)
    assert client.done and client.error is None
    assert server.next_event() is None  # no second HandshakeComplete
    assert server.state is DtlsState.CONNECTED


def test_timer_on_a_clock_ahead_of_real_time_retransmits_nothing() -> None:
    server = new_server()
    client = Client(CLIENT_CERT)
    client.step()
    for datagram in client.datagrams():
        server.receive(datagram, 1000.0)
    server.datagrams_to_send()
    deadline = server.get_timer()
    assert deadline is not None
    server.handle_timer(deadline + 5)  # OpenSSL's clock has not moved: not yet
    assert server.datagrams_to_send() == []
    rearmed = server.get_timer()
    assert rearmed is not None and deadline + 5 < rearmed <= deadline + 6.01
    assert server.state is DtlsState.HANDSHAKING


def test_handshake_timeout() -> None:
    server = new_server(handshake_timeout=5.0)
    assert server.get_timer() is None  # nothing before the first datagram
    client = Client(CLIENT_CERT)
    client.step()
    for datagram in client.datagrams():
        server.receive(datagram, 100.0)
    timer = server.get_timer()
    assert timer is not None and timer <= 101.01
    server.handle_timer(104.9)
    assert server.next_event() is None
    server.handle_timer(105.0)
    assert server.next_event() == HandshakeFailed("handshake timed out")
    assert server.get_timer() is None
    assert server.state is DtlsState.FAILED


# -- after the handshake ----------------------------------------------------------------------


def test_peer_close_notify() -> None:
    server, client, _ = handshake()
    client.conn.shutdown()
    for datagram in client.datagrams():
        server.receive(datagram, 1.0)
    assert drain(server) == [Closed("close_notify")]
    assert content_types(server.datagrams_to_send()) == [21]  # our close_notify in reply
    assert server.state is DtlsState.CLOSED
    assert server.get_timer() is None
    server.receive(b"\x17\xfe\xfd" + bytes(10), 2.0)
    assert server.next_event() is None and server.datagrams_ignored == 1


def test_local_close() -> None:
    server, client, _ = handshake()
    server.close()
    assert drain(server) == [Closed("local")]
    for datagram in server.datagrams_to_send():
        client.receive(datagram)
    assert client.closed_by_peer
    server.close()  # idempotent
    assert server.next_event() is None


def test_local_close_during_the_handshake() -> None:
    server = new_server()
    client = Client(CLIENT_CERT)
    client.step()
    for datagram in client.datagrams():
        server.receive(datagram, 0.0)
    assert server.datagrams_to_send()  # our first flight
    server.close()
    assert drain(server) == [Closed("local")]
    assert server.state is DtlsState.CLOSED
    assert server.get_timer() is None  # no retransmission of a flight nobody waits for
    assert server.datagrams_to_send() == []  # nothing was keyed, so no close_notify
    server.receive(b"\x16\xfe\xfd" + bytes(10), 1.0)
    assert server.next_event() is None and server.datagrams_ignored == 1


def test_application_data_is_counted_and_dropped() -> None:
    server, client, _ = handshake()
    client.conn.send(b"an SCTP packet")
    client.conn.send(b"another")
    for datagram in client.datagrams():
        server.receive(datagram, 1.0)
    assert server.next_event() is None
    assert server.datagrams_to_send() == []
    assert server.application_records_ignored == 2
    assert server.state is DtlsState.CONNECTED


# -- the transition table --------------------------------------------------------------------


def test_the_table_rejects_an_illegal_transition() -> None:
    server, _, _ = handshake()
    with pytest.raises(StateTransitionError, match="CONNECTED to FAILED") as caught:
        server._set_state(DtlsState.FAILED)  # a keyed association closes, it never fails
    # a bug of ours, not the peer's input: callers must not count and drop it
    assert not isinstance(caught.value, RemoteInputError)
    assert server.state is DtlsState.CONNECTED


@pytest.mark.parametrize(("old", "new"), transitions.forbidden(TRANSITIONS))
def test_every_transition_outside_the_table_is_refused(old: DtlsState, new: DtlsState) -> None:
    server = new_server()
    server._state = old  # put there directly: this tests the table, not a path to ``old``
    with pytest.raises(StateTransitionError):
        server._set_state(new)
    assert server.state is old


def test_the_state_changes_only_in_set_state() -> None:
    assert transitions.state_writers(dtls_server) == {"__init__", "_set_state"}


def test_every_transition_the_tests_drive_is_in_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    with transitions.recording(monkeypatch, DtlsServer, lambda s: s.state) as driven:
        handshake()
        test_wrong_fingerprint_fails_without_keys()
        test_client_without_certificate_fails()
        test_no_common_srtp_profile_fails(None)
        test_handshake_timeout()
        test_peer_close_notify()
        test_local_close()
        test_local_close_during_the_handshake()
    allowed = transitions.edges(TRANSITIONS)
    assert driven <= allowed
    assert driven == allowed, f"no test drives {allowed - driven}"


# -- framing and fuzzing ----------------------------------------------------------------------


def record(content_type: int, body: bytes, *, version: int = 0xFEFD, epoch: int = 0) -> bytes:
    return struct.pack("!BHH6sH", content_type, version, epoch, bytes(6), len(body)) + body


@pytest.mark.parametrize(
    ("datagram", "message"),
    [
        (b"", "empty"),
        (b"\x16\xfe\xfd\x00", "truncated DTLS record header"),
        (record(22, b"x") + b"\x16", "truncated DTLS record header"),
        (record(22, b"abc")[:-1], "truncated DTLS record"),
        (record(24, b"heartbeat"), "content type 24"),
        (record(0x30, b"dtls 1.3 unified header"), "content type 48"),
        (record(22, b"tls", version=0x0303), "not a DTLS record version"),
        (record(23, bytes(2**14 + 2049)), "too long"),
        (record(23, b"")[:11] + b"\xff\xff" + bytes(100), "exceeds"),
    ],
)
def test_malformed_datagrams_raise_dtls_error(datagram: bytes, message: str) -> None:
    server = new_server()
    with pytest.raises(DtlsError, match=message) as info:
        server.receive(datagram, 0.0)
    assert isinstance(info.value, RemoteInputError)
    assert server.next_event() is None and server.datagrams_to_send() == []
    assert server.state is DtlsState.HANDSHAKING


def feed_safely(server: DtlsServer, datagram: bytes, now: float) -> None:
    """The fuzzing contract: DtlsError or nothing, and the server stays usable."""
    with contextlib.suppress(DtlsError):
        server.receive(datagram, now)
    server.handle_timer(now + 100)
    server.get_timer()
    server.datagrams_to_send()
    drain(server)


records = st.builds(
    record,
    st.sampled_from([20, 21, 22, 23]),
    st.binary(max_size=120),
    version=st.sampled_from([0xFEFF, 0xFEFD, 0xFE00]),
    epoch=st.integers(0, 2),
)
datagrams = st.lists(records, min_size=1, max_size=3).map(b"".join)


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), datagrams))
def test_fuzz_fresh_server(data: bytes) -> None:
    feed_safely(new_server(), data, 0.0)


def mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for position, value in flips:
        out[position % len(out)] ^= value or 1
    return bytes(out[:cut] if cut else out)


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=4),
    cut=st.none() | st.integers(1, 600),
    stage=st.sampled_from(["client hello", "client flight", "connected"]),
)
def test_fuzz_mutated_client_flights(
    flips: list[tuple[int, int]],
    cut: int | None,
    stage: str,
) -> None:
    server = new_server()
    client = Client(CLIENT_CERT)
    client.step()
    flight = b"".join(client.datagrams())
    if stage != "client hello":
        server.receive(flight, 0.0)
        for datagram in server.datagrams_to_send():
            client.receive(datagram)
        flight = b"".join(client.datagrams())
    if stage == "connected":
        server.receive(flight, 0.0)
        assert isinstance(server.next_event(), HandshakeComplete)
        for datagram in server.datagrams_to_send():
            client.receive(datagram)
        client.conn.send(b"payload")
        flight = b"".join(client.datagrams())
    for datagram in split_records(mutate(flight, flips, cut)) or [b""]:
        feed_safely(server, datagram, 1.0)
    feed_safely(server, mutate(flight, flips, cut), 2.0)


@FUZZ
@given(data=datagrams)
def test_fuzz_connected_server(data: bytes) -> None:
    server, _, _ = handshake()
    feed_safely(server, data, 1.0)
    assert server.state in (DtlsState.CONNECTED, DtlsState.CLOSED)


# -- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remote", "kwargs"),
    [
        (("md5", "AB:CD"), {}),
        (("sha-256", "AB:CD"), {}),
        (("sha-256", "zz" + ":00" * 31), {}),
        (("sha-256", None), {"mtu": 100}),
        (("sha-256", None), {"handshake_timeout": 0}),
        (("sha-256", None), {"profiles": ()}),
    ],
)
def test_bad_configuration_is_a_local_error(
    remote: tuple[str, str | None], kwargs: dict[str, Any]
) -> None:
    algorithm, digest = remote
    with pytest.raises(ValueError):
        DtlsServer(SERVER_CERT, (algorithm, digest or SERVER_CERT.fingerprint_sha256), **kwargs)


def test_profile_parameters() -> None:
    gcm, cm = SrtpProfile.AEAD_AES_128_GCM, SrtpProfile.AES128_CM_HMAC_SHA1_80
    assert (gcm.protection_profile_id, gcm.key_length, gcm.salt_length) == (0x0007, 16, 12)
    assert (cm.protection_profile_id, cm.key_length, cm.salt_length) == (0x0001, 16, 14)
    assert isinstance(gcm, str) and gcm == "SRTP_AEAD_AES_128_GCM"


# -- certificates -----------------------------------------------------------------------------


def test_generated_certificate() -> None:
    cert = SERVER_CERT.cert
    assert re.fullmatch(r"[0-9A-F]{2}(:[0-9A-F]{2}){31}", SERVER_CERT.fingerprint_sha256)
    assert SERVER_CERT.fingerprint_sha256 == cert.fingerprint(hashes.SHA256()).hex(":").upper()
    assert SERVER_CERT.der == cert.public_bytes(serialization.Encoding.DER)
    assert cert.issuer == cert.subject  # self-signed
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha256"
    assert SERVER_CERT.private_key.curve.name == "secp256r1"
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=30) < life <= datetime.timedelta(days=31)
    assert SERVER_CERT.not_valid_after == cert.not_valid_after_utc
    other = generate_certificate()
    assert other.fingerprint_sha256 != SERVER_CERT.fingerprint_sha256
    assert other.cert.serial_number != cert.serial_number


def test_certificate_validity_window() -> None:
    now = datetime.datetime(2030, 1, 2, tzinfo=datetime.UTC)
    cert = generate_certificate(validity=datetime.timedelta(hours=6), now=now).cert
    assert cert.not_valid_before_utc == now - datetime.timedelta(days=1)
    assert cert.not_valid_after_utc == now + datetime.timedelta(hours=6)
    with pytest.raises(ValueError):
        generate_certificate(now=datetime.datetime(2030, 1, 2))
    with pytest.raises(ValueError):
        generate_certificate(validity=datetime.timedelta(0))


@pytest.mark.parametrize(
    ("algorithm", "hash_name"),
    [("sha-1", "sha1"), ("sha-256", "sha256"), ("SHA-384", "sha384"), ("sha-512", "sha512")],
)
def test_fingerprint_helper(algorithm: str, hash_name: str) -> None:
    digest = hashlib.new(hash_name, SERVER_CERT.der).digest()
    expected = ":".join(f"{b:02X}" for b in digest)
    assert fingerprint(SERVER_CERT.der, algorithm) == expected
    assert SERVER_CERT.fingerprint(algorithm) == expected


def test_fingerprint_rejects_unknown_hash() -> None:
    with pytest.raises(ValueError, match="md5"):
        fingerprint(SERVER_CERT.der, "md5")


# -- interop: aiortc's DTLS client ------------------------------------------------------------


class FakeIceTransport:
    """Just enough of aiortc's RTCIceTransport for RTCDtlsTransport: a role, _send, _recv.

    DTLS goes to our server core; anything else (SRTP) is collected."""

    role = "controlled"  # ORTC-style role choice: controlled ICE agent -> DTLS client

    def __init__(self, server: DtlsServer) -> None:
        self.server = server
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.srtp: list[bytes] = []

    async def _send(self, data: bytes) -> None:
        if 20 <= data[0] <= 63:  # RFC 7983 §7
            self.server.receive(data, time.monotonic())
            self.flush()
        else:
            self.srtp.append(data)

    def flush(self) -> None:
        for datagram in self.server.datagrams_to_send():
            self.inbox.put_nowait(datagram)

    async def _recv(self) -> bytes:
        return await self.inbox.get()


def rtp_packet(seq: int, payload: bytes) -> bytes:
    return struct.pack("!BBHII", 0x80, 111, seq, seq * 960, 0x1234ABCD) + payload


def test_aiortc_dtls_client_interop() -> None:
    pytest.importorskip("aiortc")
    pylibsrtp = pytest.importorskip("pylibsrtp")
    from aiortc.rtcdtlstransport import (
        RTCCertificate,
        RTCDtlsFingerprint,
        RTCDtlsParameters,
        RTCDtlsTransport,
    )

    async def scenario() -> tuple[list[Event], list[Event]]:
        peer_cert = RTCCertificate.generateCertificate()
        peer_fp = next(f for f in peer_cert.getFingerprints() if f.algorithm == "sha-256")
        server = DtlsServer(SERVER_CERT, (peer_fp.algorithm, peer_fp.value))
        ice = FakeIceTransport(server)
        dtls = RTCDtlsTransport(ice, [peer_cert])  # type: ignore[arg-type]
        remote = RTCDtlsParameters(
            fingerprints=[RTCDtlsFingerprint("sha-256", SERVER_CERT.fingerprint_sha256)]
        )
        await asyncio.wait_for(dtls.start(remote), timeout=10)
        assert dtls.state == "connected"
        handshake_events = drain(server)
        (done,) = handshake_events
        assert isinstance(done, HandshakeComplete)
        policy = pylibsrtp.Policy
        libsrtp_profile = done.profile.protection_profile_id

        # aiortc -> us: unprotect with the client key and salt
        plain = rtp_packet(1, b"hello from aiortc")
        await dtls._send_rtp(plain)
        rx = pylibsrtp.Session(
            policy(
                key=done.keys.client_master,
                ssrc_type=policy.SSRC_ANY_INBOUND,
                srtp_profile=libsrtp_profile,
            )
        )
        (protected,) = ice.srtp
        assert protected != plain
        assert rx.unprotect(protected) == plain

        # us -> aiortc: protect with the server key and salt
        tx = pylibsrtp.Session(
            policy(
                key=done.keys.server_master,
                ssrc_type=policy.SSRC_ANY_OUTBOUND,
                srtp_profile=libsrtp_profile,
            )
        )
        reply = rtp_packet(2, b"hello from parley")
        assert dtls._rx_srtp.unprotect(tx.protect(reply)) == reply

        await dtls.stop()  # aiortc sends close_notify
        return handshake_events, drain(server)

    (done,), closing = asyncio.run(scenario())
    assert isinstance(done, HandshakeComplete)
    # aiortc offers AEAD_AES_256_GCM first, which we do not negotiate
    assert done.profile is SrtpProfile.AEAD_AES_128_GCM
    assert closing == [Closed("close_notify")]
