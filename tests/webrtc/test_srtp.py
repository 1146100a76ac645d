"""SRTP/SRTCP whose state is a value: interop with plain libsrtp, moves across a sequence-number
wrap, no index ever protected twice, replay and forgery refused, fuzzing."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator

import attrs
import pylibsrtp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessions.webrtc.errors import RemoteInputError
from sessions.webrtc.srtp import (
    RTP_RESERVE,
    SrtpError,
    SrtpIndexError,
    SrtpProfile,
    SrtpSession,
    SrtpState,
    binding,
    srtcp,
)
from sessions.webrtc.srtp.index import guess_index
from sessions.webrtc.srtp.state import MAX_RTCP_SOURCES

PROFILES = list(SrtpProfile)
OUR_SSRC = 0x11223344
PEER_SSRC = 0x55667788


def keys(profile: SrtpProfile) -> tuple[bytes, bytes]:
    """(our key + salt, the peer's key + salt), fixed so failures reproduce."""
    n = profile.master_length
    return bytes(range(1, n + 1)), bytes(range(101, 101 + n))


def rtp(seq: int, ssrc: int = OUR_SSRC, payload: bytes = b"opus frame") -> bytes:
    return struct.pack("!BBHII", 0x80, 111, seq & 0xFFFF, seq * 960 & 0xFFFFFFFF, ssrc) + payload


def rtcp(ssrc: int = OUR_SSRC, body: bytes = bytes(range(20))) -> bytes:
    # a sender report: 8-byte first header, then sender info
    return struct.pack("!BBHI", 0x80, 200, 6, ssrc) + body


def srtcp_index(profile: SrtpProfile, packet: bytes) -> int:
    at = len(packet) - 4 if profile.is_aead else len(packet) - 4 - profile.tag_length
    word: int = struct.unpack_from("!I", packet, at)[0]
    assert word >> 31 == 1, "SRTCP must be encrypted (E flag)"
    return word & 0x7FFFFFFF


class Client:
    """The other side: plain pylibsrtp sessions that never move."""

    def __init__(self, profile: SrtpProfile, ssrc: int = PEER_SSRC) -> None:
        ours, theirs = keys(profile)
        pid = profile.protection_profile_id
        self.tx = pylibsrtp.Session()
        self.tx.add_stream(
            pylibsrtp.Policy(
                key=theirs,
                ssrc_type=pylibsrtp.Policy.SSRC_SPECIFIC,
                ssrc_value=ssrc,
                srtp_profile=pid,
            )
        )
        self.rx = pylibsrtp.Session(
            pylibsrtp.Policy(
                key=ours, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND, srtp_profile=pid
            )
        )
        self.ssrc = ssrc

    def send(self, seq: int) -> bytes:
        return bytes(self.tx.protect(rtp(seq, self.ssrc, b"client %d" % seq)))

    def receive_index(self, packet: bytes, seq: int) -> int:
        """Decrypt our packet; return its index as libsrtp saw it (packets come in order)."""
        assert self.rx.unprotect(packet) == rtp(seq, OUR_SSRC, b"ours %d" % seq)
        roc = binding.stream_roc(self.rx, OUR_SSRC)
        assert roc is not None
        return roc << 16 | seq


def new_session(profile: SrtpProfile, remote_ssrc: int | None = None) -> SrtpSession:
    ours, theirs = keys(profile)
    return SrtpSession.create(
        profile, local_key=ours, remote_key=theirs, local_ssrc=OUR_SSRC, remote_ssrc=remote_ssrc
    )


def move(session: SrtpSession, **reserve: int) -> tuple[SrtpState, SrtpSession]:
    """Snapshot, through bytes, into a fresh session whose own snapshot is then 'stored'."""
    state = session.snapshot(**reserve)
    blob = state.to_bytes()
    restored = SrtpSession.restore(SrtpState.from_bytes(blob))
    assert restored.snapshot(**reserve).rtp_received == state.rtp_received
    restored.confirm(restored.snapshot(**reserve))
    return state, restored


# --- profiles and primitives ---------------------------------------------------------------------


def test_profiles() -> None:
    cm, gcm = SrtpProfile.AES128_CM_HMAC_SHA1_80, SrtpProfile.AEAD_AES_128_GCM
    assert (cm.key_length, cm.salt_length, cm.tag_length, cm.is_aead) == (16, 14, 10, False)
    assert (gcm.key_length, gcm.salt_length, gcm.tag_length, gcm.is_aead) == (16, 12, 16, True)
    assert cm.protection_profile_id == pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80
    assert gcm.protection_profile_id == pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM
    assert SrtpProfile.from_id(7) is gcm
    assert SrtpProfile("SRTP_AES128_CM_HMAC_SHA1_80") is cm
    with pytest.raises(ValueError):
        SrtpProfile.from_id(2)


def test_key_derivation_matches_rfc3711_appendix_b3() -> None:
    master = bytes.fromhex("E1F97A0D3E018BE0D64FA32C06DE41390EC675AD498AFEEBB6960B3AABE6")
    assert srtcp.derive(master, 16, 0x00, 16).hex() == "c61e7a93744f39ee10734afe3ff7a087"
    assert srtcp.derive(master, 16, 0x02, 14).hex() == "30cbbc08863d8c85d49db34a9ae1"
    assert srtcp.derive(master, 16, 0x01, 20).hex() == "cebe321f6ff7716b6fd4ab49af256a156d38baa4"


@pytest.mark.parametrize("profile", PROFILES)
def test_our_srtcp_is_bit_exact_with_libsrtp(profile: SrtpProfile) -> None:
    # libsrtp numbers its SRTCP packets 1, 2, 3...; ours at the same index must be identical,
    # which pins key derivation (RFC 3711 §4.3, RFC 7714 §11), IV, AAD and layout at once.
    ours, _ = keys(profile)
    reference = pylibsrtp.Session(
        pylibsrtp.Policy(
            key=ours,
            ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
            srtp_profile=profile.protection_profile_id,
        )
    )
    mine = srtcp.SrtcpProtector(profile, ours)
    for index in range(1, 40):
        packet = rtcp(0xDEADBEEF, bytes(range(index % 7, 20 + index)))
        assert mine.protect(packet, index) == reference.protect_rtcp(packet)


@pytest.mark.parametrize("profile", PROFILES)
def test_libsrtp_decrypts_our_srtcp_at_any_index(profile: SrtpProfile) -> None:
    client = Client(profile)
    mine = srtcp.SrtcpProtector(profile, keys(profile)[0])
    for index in (0, 1, 65_536, 2**31 - 1):
        assert client.rx.unprotect_rtcp(mine.protect(rtcp(), index)) == rtcp()


def test_index_guess_mirrors_libsrtp() -> None:
    guess = guess_index
    assert guess(None, 65_500) == 65_500
    assert guess(100, 65_500) == 65_500  # libsrtp: ROC 0 while the highest is <= 2**15
    assert guess(65_535, 0) == 1 << 16
    assert guess(1 << 16 | 5, 65_530) == 65_530  # just before the wrap: ROC - 1
    assert guess(3 << 16 | 40_000, 7_000) == 4 << 16 | 7_000


# --- round trips and interop -----------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_round_trip_between_two_sessions(profile: SrtpProfile) -> None:
    ours, theirs = keys(profile)
    a = SrtpSession.create(profile, local_key=ours, remote_key=theirs, local_ssrc=OUR_SSRC)
    b = SrtpSession.create(profile, local_key=theirs, remote_key=ours, local_ssrc=PEER_SSRC)
    for seq in range(100, 130):
        assert b.unprotect_rtp(a.protect_rtp(rtp(seq))) == rtp(seq)
        assert a.unprotect_rtp(b.protect_rtp(rtp(seq, PEER_SSRC))) == rtp(seq, PEER_SSRC)
        assert b.unprotect_rtcp(a.protect_rtcp(rtcp())) == rtcp()
        assert a.unprotect_rtcp(b.protect_rtcp(rtcp(PEER_SSRC))) == rtcp(PEER_SSRC)
    assert a.remote_ssrc == PEER_SSRC and b.remote_ssrc == OUR_SSRC
    assert a.protect_rtp(rtp(130)) != rtp(130)


@pytest.mark.parametrize("profile", PROFILES)
def test_interop_with_a_plain_libsrtp_peer(profile: SrtpProfile) -> None:
    session, client = new_session(profile), Client(profile)
    for seq in range(1000, 1020):
        packet = rtp(seq, payload=b"ours %d" % seq)
        assert client.receive_index(session.protect_rtp(packet), seq) == seq
        assert session.unprotect_rtp(client.send(seq + 5)) == rtp(
            seq + 5, PEER_SSRC, b"client %d" % (seq + 5)
        )
        assert client.rx.unprotect_rtcp(session.protect_rtcp(rtcp())) == rtcp()
        assert session.unprotect_rtcp(client.tx.protect_rtcp(rtcp(PEER_SSRC))) == rtcp(PEER_SSRC)


# --- moves ----------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_snapshot_restore_across_a_sequence_wrap(profile: SrtpProfile) -> None:
    session, client = new_session(profile), Client(profile)
    out_seq = in_seq = 65_500

    def exchange(count: int) -> None:
        nonlocal out_seq, in_seq
        for _ in range(count):
            sent = session.protect_rtp(rtp(out_seq, payload=b"ours %d" % out_seq))
            client.receive_index(sent, out_seq)
            plain = session.unprotect_rtp(client.send(in_seq))
            assert plain == rtp(in_seq, PEER_SSRC, b"client %d" % in_seq)
            assert client.rx.unprotect_rtcp(session.protect_rtcp(rtcp())) == rtcp()
            assert session.unprotect_rtcp(client.tx.protect_rtcp(rtcp(PEER_SSRC))) == rtcp(
                PEER_SSRC
            )
            out_seq, in_seq = (out_seq + 1) & 0xFFFF, (in_seq + 1) & 0xFFFF

    exchange(30)  # both directions end at 65529, ROC 0
    first, session = move(session)
    assert (first.out_roc, first.out_seq, first.in_roc, first.in_seq) == (0, 65_529, 0, 65_529)
    # The restored libsrtp receiver sits where the old one did: same ROC, and the peer's wrap
    # six packets later is guessed right (the trap of setting only the ROC).
    assert binding.stream_roc(session._in, PEER_SSRC) == 0
    assert session.next_rtp_seq is not None
    out_seq = session.next_rtp_seq  # the reservation gap carries our stream past its wrap
    exchange(100)
    second, session = move(session)
    assert (second.out_roc, second.in_roc) == (1, 1)
    assert binding.stream_roc(session._in, PEER_SSRC) == 1
    assert session.next_rtp_seq is not None
    out_seq = session.next_rtp_seq
    exchange(50)
    assert binding.stream_roc(client.rx, OUR_SSRC) == 1
    assert binding.stream_roc(session._out, OUR_SSRC) == 1
    final = session.snapshot()
    assert (final.out_roc, final.in_roc) == (1, 1)
    assert final.in_seq == in_seq - 1


@pytest.mark.parametrize("profile", PROFILES)
def test_restore_at_a_high_rollover_counter(profile: SrtpProfile) -> None:
    # ROC 7 in both directions, as after hours of audio: outbound starts with
    # srtp_set_stream_roc (the AEAD path too), inbound is primed.
    ours, theirs = keys(profile)
    state = SrtpState(
        profile=profile,
        local_key=ours,
        remote_key=theirs,
        local_ssrc=OUR_SSRC,
        rtp_index=7 << 16 | 60_000,
        rtp_reserved=7 << 16 | 60_100,
        srtcp_index=4000,
        srtcp_reserved=4100,
        remote_ssrc=PEER_SSRC,
        rtp_received=7 << 16 | 65_534,
        rtp_window=0b1011,
    )
    session = SrtpSession.restore(state)
    session.confirm(session.snapshot())
    client = Client(profile)
    binding.set_roc(client.tx, PEER_SSRC, 7)
    client.tx.protect(rtp(65_534, PEER_SSRC))  # the client's own sender passes that index
    for seq in (65_535, 0, 1, 2):  # wraps to ROC 8
        session.unprotect_rtp(client.send(seq))
    receiver = pylibsrtp.Session()  # a peer's receiver that already followed us to ROC 7
    receiver.add_stream(
        pylibsrtp.Policy(
            key=ours,
            ssrc_type=pylibsrtp.Policy.SSRC_SPECIFIC,
            ssrc_value=OUR_SSRC,
            srtp_profile=profile.protection_profile_id,
        )
    )
    binding.set_roc(receiver, OUR_SSRC, 7)
    assert session.next_rtp_seq == 60_101
    for seq in range(60_101, 60_110):
        assert receiver.unprotect(session.protect_rtp(rtp(seq))) == rtp(seq)
    assert binding.stream_roc(receiver, OUR_SSRC) == 7
    assert session.snapshot().in_roc == 8
    srtcp = session.protect_rtcp(rtcp())
    assert srtcp_index(profile, srtcp) == 4101


@pytest.mark.parametrize("profile", PROFILES)
def test_no_index_is_protected_twice_across_two_moves(profile: SrtpProfile) -> None:
    client = Client(profile)
    rtp_indexes: list[int] = []  # ROC * 2**16 + SEQ, as the client's libsrtp saw them
    srtcp_indexes: list[int] = []

    def send(session: SrtpSession, seq: int) -> None:
        packet = session.protect_rtp(rtp(seq, payload=b"ours %d" % seq))
        rtp_indexes.append(client.receive_index(packet, seq))
        control = session.protect_rtcp(rtcp())
        assert client.rx.unprotect_rtcp(control) == rtcp()
        srtcp_indexes.append(srtcp_index(profile, control))

    def send_until_fence(session: SrtpSession, seq: int) -> int:
        """The old owner goes on after the snapshot, as far as it is allowed."""
        for _ in range(1000):
            try:
                send(session, seq)
            except SrtpIndexError:
                return seq
            seq += 1
        raise AssertionError("the old owner was never stopped by its reservation")

    reserve = {"rtp_reserve": 40, "srtcp_reserve": 40}
    old = new_session(profile)
    for seq in range(30_000, 30_050):
        send(old, seq)
    first, new = move(old, **reserve)
    stopped = send_until_fence(old, 30_050)  # a crash-resume worst case: it used everything
    assert max(rtp_indexes) == first.rtp_reserved == 30_049 + 40
    assert stopped == 30_090
    assert new.next_rtp_seq == 30_090

    seq = new.next_rtp_seq
    for _ in range(30):
        send(new, seq)
        seq += 1
    second, newer = move(new, **reserve)
    for _ in range(3):  # a few packets in flight after the hand-off
        send(new, seq)
        seq += 1
    assert newer.next_rtp_seq is not None
    seq = newer.next_rtp_seq
    for _ in range(30):
        send(newer, seq)
        seq += 1

    assert len(rtp_indexes) == len(set(rtp_indexes)) == 50 + 40 + 30 + 3 + 30
    assert len(srtcp_indexes) == len(set(srtcp_indexes))
    assert srtcp_indexes == sorted(srtcp_indexes)  # and the peer's replay check liked them all
    assert second.rtp_reserved is not None
    assert min(rtp_indexes[-30:]) > second.rtp_reserved


@pytest.mark.parametrize("profile", PROFILES)
def test_a_restored_session_sends_nothing_before_its_own_snapshot_is_confirmed(
    profile: SrtpProfile,
) -> None:
    # Two owners restoring the same state (the first died before storing its own) would
    # otherwise both continue at the same index.
    session = new_session(profile)
    for seq in range(10):
        session.protect_rtp(rtp(seq))
    state = session.snapshot()
    a, b = SrtpSession.restore(state), SrtpSession.restore(state)
    for restored in (a, b):
        assert restored.next_rtp_seq == (state.rtp_reserved or 0) + 1
        with pytest.raises(SrtpIndexError, match="reservation"):
            restored.protect_rtp(rtp(restored.next_rtp_seq or 0))
        with pytest.raises(SrtpIndexError, match="reservation"):
            restored.protect_rtcp(rtcp())
        assert restored.rtp_headroom == 0
    a.confirm(a.snapshot())
    a.protect_rtp(rtp(a.next_rtp_seq or 0))
    with pytest.raises(SrtpIndexError, match="earlier owner"):
        a.protect_rtp(rtp(9))


def test_outbound_limits_and_confirmation() -> None:
    profile = SrtpProfile.AES128_CM_HMAC_SHA1_80
    session = new_session(profile)
    assert session.next_rtp_seq is None and session.rtp_headroom is None
    for seq in range(5):
        session.protect_rtp(rtp(seq))
    first = session.snapshot(rtp_reserve=3, srtcp_reserve=2)
    assert (first.rtp_index, first.rtp_reserved) == (4, 7)
    assert (first.srtcp_index, first.srtcp_reserved) == (None, 1)
    # until a snapshot is confirmed, the first one's reservation is the limit
    later = session.snapshot(rtp_reserve=10, srtcp_reserve=10)
    assert session.rtp_headroom == 3 and session.srtcp_headroom == 2
    for seq in range(5, 8):
        session.protect_rtp(rtp(seq))
    session.protect_rtcp(rtcp())
    session.protect_rtcp(rtcp())
    with pytest.raises(SrtpIndexError):
        session.protect_rtp(rtp(8))
    with pytest.raises(SrtpIndexError):
        session.protect_rtcp(rtcp())
    session.confirm(later)
    assert session.rtp_headroom == 14 - 7
    session.protect_rtp(rtp(8))
    # a smaller reserve never shrinks what was reserved before
    assert session.snapshot(rtp_reserve=1).rtp_reserved == later.rtp_reserved
    # a snapshot taken before anything was sent covers first sequence numbers below 2**15
    fresh = new_session(profile).snapshot()
    assert fresh.rtp_index is None and fresh.rtp_reserved == 2**15 - 1 + RTP_RESERVE


def test_confirm_refuses_foreign_or_invented_states() -> None:
    profile = SrtpProfile.AEAD_AES_128_GCM
    session = new_session(profile)
    with pytest.raises(ValueError):
        session.confirm(new_session(profile).snapshot())  # never reserved anything itself
    state = session.snapshot()
    other = attrs.evolve(state, local_ssrc=1)
    with pytest.raises(ValueError, match="not a snapshot"):
        session.confirm(other)
    with pytest.raises(ValueError, match="never reserved"):
        session.confirm(attrs.evolve(state, rtp_reserved=(state.rtp_reserved or 0) + 1))
    session.confirm(state)


def test_outbound_refuses_what_is_not_our_rtp() -> None:
    session = new_session(SrtpProfile.AES128_CM_HMAC_SHA1_80)
    with pytest.raises(ValueError, match="SSRC"):
        session.protect_rtp(rtp(1, ssrc=PEER_SSRC))
    with pytest.raises(ValueError):
        session.protect_rtp(b"\x00" * 20)
    with pytest.raises(ValueError):
        session.protect_rtcp(b"\x80\xc8")
    session.protect_rtp(rtp(1))
    with pytest.raises(SrtpIndexError, match="already protected"):
        session.protect_rtp(rtp(1))


def test_index_spaces_run_out() -> None:
    profile = SrtpProfile.AES128_CM_HMAC_SHA1_80
    ours, theirs = keys(profile)
    state = SrtpState(
        profile=profile,
        local_key=ours,
        remote_key=theirs,
        local_ssrc=OUR_SSRC,
        rtp_reserved=2**48 - 1,
        srtcp_reserved=2**31 - 1,
    )
    session = SrtpSession.restore(state)
    session.confirm(session.snapshot())
    with pytest.raises(SrtpIndexError, match="rekey"):
        session.protect_rtcp(rtcp())
    with pytest.raises(SrtpIndexError, match="rekey"):
        session.protect_rtp(rtp(0))


# --- inbound: forgery, replay, SSRCs ------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_tampered_packets_are_refused(profile: SrtpProfile) -> None:
    session, client = new_session(profile), Client(profile)
    packet = client.send(10)
    control = bytes(client.tx.protect_rtcp(rtcp(PEER_SSRC)))
    for position in (2, 13, len(packet) - 1):
        forged = bytearray(packet)
        forged[position] ^= 0x01
        with pytest.raises(SrtpError):
            session.unprotect_rtp(bytes(forged))
    for position in (1, 9, len(control) - 1, len(control) - 5):
        forged = bytearray(control)
        forged[position] ^= 0x01
        with pytest.raises(SrtpError):
            session.unprotect_rtcp(bytes(forged))
    with pytest.raises(SrtpError):
        session.unprotect_rtp(packet[:-1])
    # nothing forged moved any state: the genuine packets still pass
    assert session.unprotect_rtp(packet)
    assert session.unprotect_rtcp(control) == rtcp(PEER_SSRC)
    assert issubclass(SrtpError, RemoteInputError)


@pytest.mark.parametrize("profile", PROFILES)
def test_replayed_packets_are_refused_also_after_a_move(profile: SrtpProfile) -> None:
    session, client = new_session(profile), Client(profile)
    packets = {seq: client.send(seq) for seq in range(500, 700)}
    controls = [bytes(client.tx.protect_rtcp(rtcp(PEER_SSRC))) for _ in range(5)]
    for seq in range(500, 690):
        if seq != 680:  # 680 is late: it arrives only after the move
            session.unprotect_rtp(packets[seq])
    for control in controls[:4]:
        session.unprotect_rtcp(control)
    with pytest.raises(SrtpError, match="replay"):
        session.unprotect_rtp(packets[600])
    session.unprotect_rtp(packets[680])  # late, but inside the window: accepted once
    with pytest.raises(SrtpError, match="replay"):
        session.unprotect_rtp(packets[689])
    with pytest.raises(SrtpError, match="replay"):
        session.unprotect_rtcp(controls[2])

    _, moved = move(session)
    for seq in (689, 650, 600):
        with pytest.raises(SrtpError, match="replay"):
            moved.unprotect_rtp(packets[seq])
    with pytest.raises(SrtpError, match="too old"):
        moved.unprotect_rtp(packets[500])
    with pytest.raises(SrtpError, match="replay"):
        moved.unprotect_rtcp(controls[3])
    moved.unprotect_rtcp(controls[4])
    for seq in range(690, 700):
        moved.unprotect_rtp(packets[seq])


@pytest.mark.parametrize("profile", PROFILES)
def test_a_late_packet_is_still_accepted_once_after_a_move(profile: SrtpProfile) -> None:
    session, client = new_session(profile), Client(profile)
    packets = {seq: client.send(seq) for seq in range(40_000, 40_010)}
    for seq in range(40_000, 40_010):
        if seq != 40_005:
            session.unprotect_rtp(packets[seq])
    _, moved = move(session)
    assert moved.unprotect_rtp(packets[40_005])
    with pytest.raises(SrtpError, match="replay"):
        moved.unprotect_rtp(packets[40_005])


def test_the_peer_ssrc_is_learned_from_its_first_authentic_packet() -> None:
    profile = SrtpProfile.AEAD_AES_128_GCM
    session, client = new_session(profile), Client(profile)
    stranger = Client(profile, ssrc=0x0BADF00D)  # same key, other SSRC
    assert session.remote_ssrc is None
    forged = bytearray(client.send(1))
    forged[-1] ^= 1
    with pytest.raises(SrtpError):
        session.unprotect_rtp(bytes(forged))
    assert session.remote_ssrc is None
    session.unprotect_rtp(client.send(2))
    assert session.remote_ssrc == PEER_SSRC
    with pytest.raises(SrtpError, match="unexpected SSRC"):
        session.unprotect_rtp(stranger.send(3))
    # RTCP may come from other SSRCs of the peer, each with its own index space
    session.unprotect_rtcp(bytes(stranger.tx.protect_rtcp(rtcp(0x0BADF00D))))
    session.unprotect_rtcp(bytes(client.tx.protect_rtcp(rtcp(PEER_SSRC))))
    state = session.snapshot()
    assert state.srtcp_highest(0x0BADF00D) == 1 and state.srtcp_highest(PEER_SSRC) == 1


def test_srtcp_sources_are_bounded() -> None:
    profile = SrtpProfile.AES128_CM_HMAC_SHA1_80
    session = new_session(profile)
    for n in range(MAX_RTCP_SOURCES):
        peer = Client(profile, ssrc=1000 + n)
        session.unprotect_rtcp(bytes(peer.tx.protect_rtcp(rtcp(1000 + n))))
    late = Client(profile, ssrc=5000)
    with pytest.raises(SrtpError, match="too many"):
        session.unprotect_rtcp(bytes(late.tx.protect_rtcp(rtcp(5000))))
    assert len(SrtpState.from_bytes(session.snapshot().to_bytes()).srtcp_received) == 16


# --- the state as a value ---------------------------------------------------------------------


def busy_state(profile: SrtpProfile) -> SrtpState:
    session, client = new_session(profile), Client(profile)
    for seq in range(65_530, 65_540):
        session.protect_rtp(rtp(seq))
        session.unprotect_rtp(client.send(seq))
        session.protect_rtcp(rtcp())
    session.unprotect_rtcp(bytes(client.tx.protect_rtcp(rtcp(PEER_SSRC))))
    return session.snapshot()


@pytest.mark.parametrize("profile", PROFILES)
def test_state_round_trips_through_bytes(profile: SrtpProfile) -> None:
    for state in (
        busy_state(profile),
        new_session(profile).snapshot(),
        new_session(profile, 7).snapshot(),
    ):
        blob = state.to_bytes()
        assert SrtpState.from_bytes(blob) == state
        assert SrtpState.from_bytes(bytearray(blob)) == state
    state = busy_state(profile)
    assert (state.out_roc, state.out_seq, state.in_roc, state.in_seq) == (1, 3, 1, 3)
    assert state.rtp_window == 0b11_1111_1111
    assert len(state.to_bytes()) < 160


def test_state_repr_leaves_the_keys_out() -> None:
    profile = SrtpProfile.AES128_CM_HMAC_SHA1_80
    state = busy_state(profile)
    for key in keys(profile):
        for text in (repr(state), str(state)):
            assert key.hex() not in text and repr(key) not in text
    assert "local_ssrc=287454020" in repr(state)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\0", "trailing"),
        (lambda b: b"XX" + b[2:], "magic"),
        (lambda b: b[:2] + b"\x02" + b[3:], "version"),
        (lambda b: b[:3] + b"\x00\x02" + b[5:], "profile"),
        (lambda b: b[:5] + b"\xff" + b[6:], "flags"),
        (lambda b: b"", "truncated"),
    ],
)
def test_bad_state_bytes_raise_value_error(mangle: Callable[[bytes], bytes], message: str) -> None:
    blob = busy_state(SrtpProfile.AEAD_AES_128_GCM).to_bytes()
    with pytest.raises(ValueError, match=message):
        SrtpState.from_bytes(mangle(blob))
    with pytest.raises(TypeError):
        SrtpState.from_bytes("PS")  # type: ignore[arg-type]


def test_state_invariants() -> None:
    profile = SrtpProfile.AES128_CM_HMAC_SHA1_80
    ours, theirs = keys(profile)
    base: dict[str, object] = {
        "profile": profile,
        "local_key": ours,
        "remote_key": theirs,
        "local_ssrc": OUR_SSRC,
    }
    bad: list[dict[str, object]] = [
        {"local_key": ours[:-1]},
        {"local_ssrc": 2**32},
        {"rtp_index": 5},  # used without a reservation: a restore would reuse it
        {"rtp_index": 50, "rtp_reserved": 40, "srtcp_reserved": 1},
        {"rtp_reserved": 40},  # RTP reserved without SRTCP
        {"rtp_received": 3},  # received without an SSRC
        {"remote_ssrc": 1, "rtp_received": 3, "rtp_window": 0b10},  # highest not marked
        {"remote_ssrc": 1, "rtp_received": 3, "rtp_window": 0b1_0001},  # below index 0
        {"srtcp_received": ((2, 5, 1), (1, 5, 1))},  # unsorted
        {"srtcp_reserved": 2**31, "rtp_reserved": 1},
    ]
    for changes in bad:
        with pytest.raises(ValueError):
            SrtpState(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize("profile", PROFILES)
def test_restoring_a_never_snapshotted_state_is_a_fresh_session(profile: SrtpProfile) -> None:
    ours, theirs = keys(profile)
    state = SrtpState(profile=profile, local_key=ours, remote_key=theirs, local_ssrc=OUR_SSRC)
    session, client = SrtpSession.restore(state), Client(profile)
    assert session.rtp_headroom is None
    client.receive_index(session.protect_rtp(rtp(9, payload=b"ours 9")), 9)


# --- fuzzing ----------------------------------------------------------------------------------


@contextlib.contextmanager
def only_srtp_errors() -> Iterator[None]:
    with contextlib.suppress(SrtpError):
        yield


FUZZ = settings(max_examples=300, deadline=None)
_RTP_HEADERS = st.builds(
    lambda b, pt, seq, ssrc: struct.pack("!BBHII", b, pt, seq, 0, ssrc),
    st.sampled_from([0x80, 0x90, 0x8F, 0xA0, 0x9F]),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.sampled_from([PEER_SSRC, OUR_SSRC, 0]),
)


@FUZZ
@given(
    st.sampled_from(PROFILES),
    st.one_of(
        st.binary(max_size=1600),
        st.tuples(_RTP_HEADERS, st.binary(max_size=200)).map(lambda t: t[0] + t[1]),
    ),
)
def test_fuzz_unprotect_rtp_raises_only_srtp_error(profile: SrtpProfile, data: bytes) -> None:
    for remote in (None, PEER_SSRC):
        session = new_session(profile, remote)
        with only_srtp_errors():
            session.unprotect_rtp(data)
        with only_srtp_errors():
            session.unprotect_rtcp(data)


@FUZZ
@given(st.sampled_from(PROFILES), st.integers(0, 10_000), st.integers(0, 7), st.binary(max_size=4))
def test_fuzz_flipped_bits_never_authenticate(
    profile: SrtpProfile, position: int, bit: int, tail: bytes
) -> None:
    client = Client(profile)
    session = new_session(profile)
    for packet, unprotect in (
        (client.send(1), session.unprotect_rtp),
        (bytes(client.tx.protect_rtcp(rtcp(PEER_SSRC))), session.unprotect_rtcp),
    ):
        forged = bytearray(packet)
        forged[position % len(forged)] ^= 1 << bit
        with pytest.raises(SrtpError):
            unprotect(bytes(forged))
        if tail:
            with pytest.raises(SrtpError):
                unprotect(packet + tail)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_state_from_bytes_raises_only_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        assert SrtpState.from_bytes(data).to_bytes() == data


_BLOB = busy_state(SrtpProfile.AES128_CM_HMAC_SHA1_80).to_bytes()


@FUZZ
@given(st.integers(0, len(_BLOB) - 1), st.integers(1, 255))
def test_fuzz_mutated_state_is_refused_or_exact(position: int, xor: int) -> None:
    blob = bytearray(_BLOB)
    blob[position] ^= xor
    with contextlib.suppress(ValueError):
        assert SrtpState.from_bytes(bytes(blob)).to_bytes() == bytes(blob)
