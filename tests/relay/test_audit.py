"""The relay's optional SRTP/SRTCP index audit (relay/audit.py), on packets our own SRTP made."""

from __future__ import annotations

import struct

import pytest

from relay.audit import WINDOW, IndexAuditor
from relay.edge import Client, Limits, RelayEdge, TokenBucket
from relay.routes import RouteTable
from relay.settings import RelaySettings
from relay.tunnel import frames
from sessions.webrtc.srtp import SrtpProfile, SrtpSession
from storage.ownership import OwnershipChange

SESSION = "sessionaaaaaaaaaaaaa"
CLIENT = ("198.51.100.7", 40000)


def rtp(seq: int, ssrc: int = 0x1234, size: int = 40) -> bytes:
    return struct.pack("!BBHII", 0x80, 111, seq & 0xFFFF, seq * 960 & 0xFFFFFFFF, ssrc) + bytes(
        size
    )


def receiver_report(ssrc: int = 0x1234) -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


def sender(profile: SrtpProfile) -> SrtpSession:
    key = bytes(range(profile.key_length)) + bytes(range(profile.salt_length))
    return SrtpSession.create(profile, local_key=key, remote_key=key, local_ssrc=0x1234)


def counters() -> tuple[IndexAuditor, dict[str, int]]:
    found: dict[str, int] = {}
    return IndexAuditor(found), found


@pytest.mark.parametrize("profile", list(SrtpProfile))
def test_real_srtcp_trailers_are_read_for_both_profiles(profile: SrtpProfile) -> None:
    session = sender(profile)
    auditor, found = counters()
    sent = [session.protect_rtcp(receiver_report()) for _ in range(5)]
    for packet in sent:
        auditor.observe(SESSION, "out", packet)
    assert found["srtcp_audited"] == 5 and found["srtcp_index_reused"] == 0
    auditor.observe(SESSION, "out", sent[2])  # the same index again
    assert found["srtcp_index_reused"] == 1
    assert found["audit_unchecked"] == 0


@pytest.mark.parametrize("profile", list(SrtpProfile))
def test_real_srtp_packets_are_checked_by_their_index(profile: SrtpProfile) -> None:
    session = sender(profile)
    auditor, found = counters()
    sent = [session.protect_rtp(rtp(seq)) for seq in range(100, 110)]
    for packet in sent:
        auditor.observe(SESSION, "in", packet)
    assert found["srtp_audited"] == 10 and found["srtp_index_reused"] == 0
    auditor.observe(SESSION, "in", sent[0])
    assert found["srtp_index_reused"] == 1
    # Another session, another direction, another SSRC: other keys or other keystreams.
    auditor.observe("othersessionaaaaaaaa", "in", sent[0])
    auditor.observe(SESSION, "out", sent[0])
    auditor.observe(SESSION, "in", rtp(100, ssrc=0x5678))
    assert found["srtp_index_reused"] == 1


def test_the_rollover_counter_is_estimated_across_a_wrap() -> None:
    auditor, found = counters()
    for seq in range(65_000, 65_536 + 500):  # the sequence number wraps: ROC 0 -> 1
        auditor.observe(SESSION, "out", rtp(seq))
    assert found["srtp_index_reused"] == 0
    auditor.observe(SESSION, "out", rtp(65_536 + 10))  # seq 10 of ROC 1, seen
    auditor.observe(SESSION, "out", rtp(65_530))  # late, from ROC 0: seen too
    assert found["srtp_index_reused"] == 2
    assert auditor.streams() == 1


def test_a_stream_continued_at_the_next_index_is_clean_and_a_repeat_is_not() -> None:
    """What a move must look like from outside: the new owner goes on at the next index."""
    auditor, found = counters()
    for seq in range(1000, 1050):  # the old owner
        auditor.observe(SESSION, "out", rtp(seq))
    for seq in range(1050, 1100):  # the new owner, same SSRC and keys
        auditor.observe(SESSION, "out", rtp(seq))
    assert found["srtp_index_reused"] == 0
    for seq in range(1095, 1105):  # a new owner that started from a stale state
        auditor.observe(SESSION, "out", rtp(seq))
    assert found["srtp_index_reused"] == 5


def test_what_is_too_old_or_not_srtp_is_not_guessed_at() -> None:
    auditor, found = counters()
    auditor.observe(SESSION, "in", rtp(WINDOW + 10))
    auditor.observe(SESSION, "in", rtp(5))  # below the window: unchecked, not "new"
    auditor.observe(SESSION, "in", b"\x00\x01" + bytes(30))  # STUN
    auditor.observe(SESSION, "in", b"\x16\xfe\xfd" + bytes(30))  # DTLS
    auditor.observe(SESSION, "in", receiver_report() + bytes(9))  # no trailer to read
    assert found["audit_unchecked"] == 2 and found["srtp_audited"] == 2
    auditor.forget(SESSION)
    assert auditor.streams() == 0


def test_the_edge_audits_both_directions_only_when_asked() -> None:
    assert "srtp_audited" not in RelayEdge("relay-a", [b"s" * 32], RouteTable()).counters
    assert RelaySettings(audit=True).limits().audit_indexes
    routes = RouteTable(clock=lambda: 0.0)
    edge = RelayEdge(
        "relay-a", [b"s" * 32], routes, limits=Limits(audit_indexes=True), clock=lambda: 0.0
    )
    routes.apply(OwnershipChange(SESSION, "node-a", 10, 10))
    edge.send_to_client = lambda data, addr: None  # type: ignore[method-assign]
    edge.clients[CLIENT] = Client(SESSION, TokenBucket(1000, 1000, 0.0), 0.0)

    class Sink:
        def send_datagram(self, data: bytes, *, may_wait: bool = False) -> bool:
            return True

    edge.tunnels["node-a"] = Sink()
    for _ in range(2):
        edge.from_client(rtp(7), CLIENT)
        edge.from_node("node-a", frames.encode_to_client(SESSION, 10, CLIENT, rtp(9)))
    assert edge.counters["srtp_audited"] == 4
    assert edge.counters["srtp_index_reused"] == 2  # once per direction
