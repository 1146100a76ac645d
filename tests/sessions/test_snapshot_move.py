"""Planned moves on the virtual clock: a quiesced session's exact snapshot continues on another
transceiver (another node, as far as it knows) with the very next sequence number and SRTP and
SRTCP indexes, a timestamp that kept pace with the blackout, the same SSRC and ICE credentials;
the client renegotiates nothing and no index is ever used twice. Also: resuming an abandoned
move, refusals, the snapshot's encoding, and the agents' state moving with the session."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import trio

from sessions.agents import FRAME_BYTES, TurnEchoAgent
from sessions.agents.bridge import BridgeAgent
from sessions.audio import speech
from sessions.audio.pacer import FRAME_TIMESTAMP
from sessions.snapshot import MAX_AGENT_STATE, SNAPSHOT_VERSION, SessionSnapshot
from sessions.transceiver import (
    CheckpointDue,
    ClientEvent,
    DtlsConnected,
    IceConnected,
    MediaStarted,
    MoveRefused,
    SessionClosed,
    SessionState,
    Transceiver,
    frames_elapsed,
)
from sessions.transceiver.connection import TRANSITIONS
from sessions.transceiver.handover import continue_srtp, exact_state
from sessions.turns import SpeechStarted, SpeechStopped
from sessions.webrtc import rtcp, rtp, stun
from sessions.webrtc.demux import PacketKind, classify, is_rtcp
from sessions.webrtc.ice import PeerAddress
from sessions.webrtc.rtp import SequenceTracker
from sessions.webrtc.srtp import (
    RTP_RESERVE,
    SRTCP_RESERVE,
    SrtpIndexError,
    SrtpProfile,
    SrtpSession,
)
from sessions.webrtc.srtp.srtcp import index_of
from tests.sessions.test_transceiver import (
    CLIENT_ADDR,
    FRAME,
    SERVER_CERT,
    Sim,
    browser_offer,
    utterance,
)

SILENCE = bytes(FRAME_BYTES)


class MoveSim(Sim):
    """A :class:`Sim` whose datagrams, while the session is quiesced, are kept as the session
    actor keeps them, for the next owner (or for a resume)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.held: list[tuple[bytes, PeerAddress]] = []
        self.cores: list[Transceiver] = [self.core]
        self.sent_by: list[int] = []  # for each entry of self.sent, the index of its core

    def to_core(self, data: bytes, addr: PeerAddress = CLIENT_ADDR) -> None:
        def land() -> None:
            if self.core.quiesced:
                self.held.append((data, addr))
            else:
                self.core.receive(data, addr, self.now)

        self.at(self.now + self.delay, land)

    def pump(self) -> None:
        for data, addr in self.core.datagrams_to_send():
            self.sent.append((self.now, data, addr))
            self.sent_by.append(len(self.cores) - 1)
            if addr == CLIENT_ADDR:
                self.at(self.now + self.delay, functools.partial(self._to_client, data))
        while (event := self.core.next_event()) is not None:
            self.events.append((self.now, event))
            # A quiesced session takes no checkpoint (the session actor skips the request).
            if isinstance(event, CheckpointDue) and self.auto_checkpoint and not self.core.quiesced:
                self.checkpoint()

    def quiesce(self) -> bytes:
        snapshot = self.core.quiesce(self.now)
        assert snapshot.exact
        self.pump()  # the frame that was due goes out; nothing after it
        return snapshot.to_bytes()

    def arrive(self, data: bytes, elapsed: float, **kw: Any) -> Transceiver:
        """The next node: restore the exact snapshot, then take what the old one kept."""
        self.core = Transceiver.restore(
            SessionSnapshot.from_bytes(data),
            certificate=SERVER_CERT,
            now=self.now,
            elapsed=elapsed,
            **kw,
        )
        self.cores.append(self.core)
        held, self.held = self.held, []
        for datagram, addr in held:
            self.core.receive(datagram, addr, self.now)
        self.pump()
        return self.core

    def resume(self) -> None:
        self.core.resume(self.now)
        held, self.held = self.held, []
        for datagram, addr in held:
            self.core.receive(datagram, addr, self.now)
        self.pump()

    def outbound_indexes(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(core, index) of every SRTP and every SRTCP packet any of our cores sent."""
        profile = SrtpProfile(str(self.cores[0].stats()["profile"]))
        tracker = SequenceTracker()
        rtp_sent, srtcp_sent = [], []
        for (_, data, _), core in zip(self.sent, self.sent_by, strict=True):
            if classify(data) is not PacketKind.RTP_RTCP:
                continue
            if is_rtcp(data):
                srtcp_sent.append((core, index_of(profile, data)))
            else:
                seq = int.from_bytes(data[2:4], "big")
                rtp_sent.append((core, tracker.update(seq)))
        return rtp_sent, srtcp_sent


def moving_call(**kw: Any) -> tuple[MoveSim, float]:
    """A connected call whose client talks (and reports) until the returned time."""
    sim = MoveSim(**kw)
    sim.connect()
    end = sim.talk(speech.frames(utterance()) + [SILENCE] * 50)
    sim.keep_consent(until=end + 40)
    sim.every(sim.now + 0.5, 1.0, end, lambda: sim.to_core(sim.client.report(sim.now)))
    return sim, end


def _across_the_move(sim: MoveSim, move: int = 1) -> tuple[rtp.RtpPacket, rtp.RtpPacket]:
    """The client's last packet from before move number ``move`` and its first from after."""
    mark = next(i for i, core in enumerate(sim.sent_by) if core == move)
    first_seq = next(
        int.from_bytes(d[2:4], "big")
        for _, d, _ in sim.sent[mark:]
        if classify(d) is PacketKind.RTP_RTCP and not is_rtcp(d)
    )
    received = sim.client.received
    index = next(i for i, p in enumerate(received) if p.sequence_number == first_seq)
    return received[index - 1], received[index]


def assert_no_index_twice(sim: MoveSim) -> None:
    rtp_sent, srtcp_sent = sim.outbound_indexes()
    for sent in (rtp_sent, srtcp_sent):
        indexes = [index for _, index in sent]
        assert len(indexes) == len(set(indexes)), "an index was used twice"
        # and each core's indexes follow the previous core's
        for older, newer in itertools.pairwise(range(len(sim.cores))):
            before = [i for core, i in sent if core == older]
            after = [i for core, i in sent if core == newer]
            if before and after:
                assert min(after) > max(before)


# --- the planned move ---------------------------------------------------------------------------


def test_planned_move_continues_the_streams_exactly() -> None:
    sim, end = moving_call()
    sim.run(sim.now + 1.503)  # mid-utterance, between two frames, after the first RTCP
    assert sim.core.stats()["rtcp_out"]
    source = sim.core
    stun_before = len(sim.client.stun_replies)
    data = sim.quiesce()
    snapshot = SessionSnapshot.from_bytes(data)
    sim.run(sim.now + 0.05)  # the blackout: the snapshot travels, the relay switches
    assert sim.held, "the client's packets reach the old node meanwhile"
    assert source.datagrams_to_send() == []  # the old node sent nothing after the quiesce
    events_before = len(sim.events)
    target = sim.arrive(data, elapsed=0.05)
    assert target.state is SessionState.CONNECTED
    assert target.local_ssrc == source.local_ssrc and target.local_ufrag == source.local_ufrag
    # nothing of the connection happens again: no ICE, DTLS or media start, only a checkpoint
    assert [type(e) for _, e in sim.events[events_before:]] == [CheckpointDue]
    sim.run(end + 1.0)

    received = sim.client.received
    assert sim.client.srtp_errors == 0  # the client decrypts all of it: same keys, no replay
    last_old, first_new = _across_the_move(sim)
    assert first_new.ssrc == last_old.ssrc == source.local_ssrc
    # the very next sequence number: no jump at all
    assert first_new.sequence_number == (last_old.sequence_number + 1) & 0xFFFF
    assert first_new.sequence_number == snapshot.next_seq
    # the timestamp kept pace with the 50 ms blackout, in whole frames (rounded up): 3
    assert frames_elapsed(0.05) == 3
    assert first_new.timestamp == (snapshot.next_timestamp + 3 * FRAME_TIMESTAMP) % 2**32
    assert snapshot.next_timestamp == (last_old.timestamp + FRAME_TIMESTAMP) % 2**32
    assert first_new.marker  # a talkspurt starts after the silence (RFC 3551 §4.1)
    seqs = [p.sequence_number for p in received]
    assert all(rtp.seq_distance(a, b) == 1 for a, b in itertools.pairwise(seqs))

    # SRTP and SRTCP indexes: never one twice, across both owners; SRTCP goes on at the next
    assert_no_index_twice(sim)
    _, srtcp_sent = sim.outbound_indexes()
    old_srtcp = [i for core, i in srtcp_sent if core == 0]
    new_srtcp = [i for core, i in srtcp_sent if core == 1]
    assert old_srtcp and new_srtcp and new_srtcp[0] == max(old_srtcp) + 1

    # what the client sent after the quiesce was decrypted by the new owner, and nothing
    # was refused there: its replay window and rollover counter came along
    stats = target.stats()
    assert stats["dropped"] == {}
    old_in, new_in = source.stats()["packets_in"], stats["packets_in"]
    assert isinstance(old_in, int) and isinstance(new_in, int)
    assert old_in + new_in == sim.client.sent
    # the echo goes on across the move
    score, _ = speech.correlation(utterance(), sim.client.pcm(), speech.SAMPLE_RATE // 2)
    assert score > 0.8, score

    # consent checks are answered by the new owner, with the same credentials (Client checks
    # MESSAGE-INTEGRITY with the password of the answer), long after the old one is gone
    sim.run(sim.now + 40)
    assert target.state is SessionState.CONNECTED
    replies = sim.client.stun_replies[stun_before:]
    assert len(replies) >= 8
    assert all(r.cls is stun.StunClass.SUCCESS for r in replies)


def test_exact_restore_sends_at_once_and_checkpoints_from_there() -> None:
    sim, end = moving_call(auto_checkpoint=False)
    sim.checkpoint()  # the one the old owner stored
    sim.run(sim.now + 1.0)
    data = sim.quiesce()
    target = sim.arrive(data, elapsed=0.02)
    # no checkpoint of its own yet, and it sends all the same: within the stored reservation
    sim.run(sim.now + 0.5)
    new_rtp = [i for core, i in sim.outbound_indexes()[0] if core == 1]
    assert new_rtp and target.stats()["send_blocked"] == 0
    # its own checkpoint then reserves from where it is
    snapshot = target.snapshot(sim.now)
    assert not snapshot.exact
    assert snapshot.srtp.rtp_index == max(new_rtp)
    target.confirm(snapshot)
    sim.run(end)
    assert sim.client.srtp_errors == 0
    assert_no_index_twice(sim)


def test_moves_back_and_forth() -> None:
    sim, end = moving_call()
    sim.run(sim.now + 0.7)
    for blackout in (0.0, 0.013, 0.02, 0.031, 0.06):
        data = sim.quiesce()
        sim.run(sim.now + blackout)
        sim.arrive(data, elapsed=blackout)
        sim.run(sim.now + 0.27)
    sim.run(end + 0.5)
    assert len(sim.cores) == 6
    assert sim.client.srtp_errors == 0
    assert_no_index_twice(sim)
    seqs = [p.sequence_number for p in sim.client.received]
    assert all(rtp.seq_distance(a, b) == 1 for a, b in itertools.pairwise(seqs))
    score, _ = speech.correlation(utterance(), sim.client.pcm(), speech.SAMPLE_RATE // 2)
    assert score > 0.7, score


def test_a_crash_restore_of_an_exact_snapshot_stored_as_checkpoint_still_jumps() -> None:
    sim, _ = moving_call()
    sim.run(sim.now + 1.0)
    snapshot = SessionSnapshot.from_bytes(sim.quiesce())
    target = sim.arrive(snapshot.to_bytes(), elapsed=0.0)
    sim.run(sim.now + 0.3)  # the new owner sends within the old reservation, then crashes
    checkpoint = snapshot.as_checkpoint()
    assert not checkpoint.exact and checkpoint.playout == () and checkpoint.pending == ()
    assert checkpoint.agent_state == b""
    restored = Transceiver.restore(checkpoint, certificate=SERVER_CERT, now=sim.now)
    assert restored.stats()["state"] == "connected"
    # a crash restore starts above the reservation: beyond anything either owner sent
    new_rtp = [i for core, i in sim.outbound_indexes()[0] if core == 1]
    reserved = checkpoint.srtp.rtp_reserved
    assert reserved is not None and max(new_rtp) <= reserved
    assert restored._transport.next_seq == (reserved + 1) & 0xFFFF
    del target


def test_a_crash_restore_keeps_the_timestamp_in_pace_with_the_time_since_the_checkpoint() -> None:
    sim, _ = moving_call()
    sim.run(sim.now + 1.0)
    checkpoint = attrs.evolve(sim.core.snapshot(sim.now), taken_at=1_000.0)
    data = checkpoint.to_bytes()
    assert SessionSnapshot.from_bytes(data).taken_at == 1_000.0
    paced = Transceiver.restore(checkpoint, certificate=SERVER_CERT, now=sim.now, elapsed=2.0)
    frames = (paced._voice._pacer.next_timestamp - checkpoint.next_timestamp) % 2**32 // 960
    assert frames == 100 + 5  # 2 s of 20 ms frames, and the slack for pacer and clocks
    # Without the time, it jumps as far as the sequence number does (a reservation's worth).
    blind = Transceiver.restore(checkpoint, certificate=SERVER_CERT, now=sim.now)
    frames = (blind._voice._pacer.next_timestamp - checkpoint.next_timestamp) % 2**32 // 960
    assert frames > 1000


def test_a_version_2_snapshot_still_reads_without_its_time() -> None:
    sim, _ = moving_call()
    sim.run(sim.now + 1.0)
    data = bytearray(sim.core.snapshot(sim.now).to_bytes())
    length = int.from_bytes(data[5:9], "big")
    header = json.loads(data[9 : 9 + length])
    del header["taken_at"]
    encoded = json.dumps(header).encode()
    old = bytes(data[:4]) + b"\x02" + len(encoded).to_bytes(4, "big") + encoded
    old += bytes(data[9 + length :])
    assert SessionSnapshot.from_bytes(old).taken_at == 0.0


# --- resume ---------------------------------------------------------------------------------------


def test_resume_after_quiesce_continues_with_the_next_sequence_number() -> None:
    sim, end = moving_call()
    sim.run(sim.now + 1.21)
    snapshot = SessionSnapshot.from_bytes(sim.quiesce())
    sent = len(sim.sent)
    sim.run(sim.now + 0.1)  # the move is abandoned 100 ms later
    assert sim.held
    assert len(sim.sent) == sent  # nothing went out meanwhile
    sim.resume()
    assert sim.core.stats()["state"] == "connected"
    sim.run(end + 0.5)
    assert sim.client.srtp_errors == 0
    received = sim.client.received
    first_new = next(p for p in received if p.sequence_number == snapshot.next_seq)
    last_old = received[received.index(first_new) - 1]
    assert first_new.sequence_number == (last_old.sequence_number + 1) & 0xFFFF
    # the timestamp kept pace with the 100 ms pause: 5 frames more than the next one's
    assert first_new.timestamp == (snapshot.next_timestamp + 5 * FRAME_TIMESTAMP) % 2**32
    assert sim.core.stats()["dropped"] == {}
    assert_no_index_twice(sim)
    score, _ = speech.correlation(utterance(), sim.client.pcm(), speech.SAMPLE_RATE // 2)
    assert score > 0.8, score


# --- what a quiesced session does and does not do -------------------------------------------------


def test_quiesced_session_takes_nothing_sends_nothing_and_has_no_timer() -> None:
    sim, _ = moving_call()
    sim.run(sim.now + 0.5)
    sim.quiesce()
    core = sim.core
    assert core.quiesced and core.state is SessionState.QUIESCED
    assert core.get_timer() is None
    core.handle_timer(sim.now + 100)  # harmless, does nothing
    assert core.datagrams_to_send() == []
    with pytest.raises(RuntimeError, match="quiesced"):
        core.receive(sim.client.check(), CLIENT_ADDR, sim.now)
    with pytest.raises(RuntimeError, match="checkpoint"):
        core.snapshot(sim.now)
    with pytest.raises(RuntimeError, match="already quiesced"):
        core.quiesce(sim.now)
    # closing it sends nothing either: no BYE, no close_notify (the session lives elsewhere)
    core.close(sim.now)
    assert core.datagrams_to_send() == []
    assert core.next_event() == SessionClosed("closed while quiesced")
    with pytest.raises(MoveRefused) as refused:
        core.resume(sim.now)
    assert refused.value.code == "not_quiesced"


def test_quiesce_is_refused_before_dtls_and_after_the_end() -> None:
    sim = MoveSim()
    with pytest.raises(MoveRefused) as refused:
        sim.core.quiesce(0.0)
    assert refused.value.code == "not_connected"
    sim.core.receive(sim.client.check(), CLIENT_ADDR, 0.0)  # ICE, but no DTLS yet
    with pytest.raises(MoveRefused) as refused:
        sim.core.quiesce(0.0)
    assert refused.value.code == "not_connected"
    assert sim.core.state is SessionState.CONNECTING
    assert not sim.core.quiesced

    sim = MoveSim()
    sim.connect()
    sim.core.close(sim.now)
    with pytest.raises(MoveRefused) as refused:
        sim.core.quiesce(sim.now)
    assert refused.value.code == "ended"

    # consent lapsed, and the session ends on the very tick the quiesce handles
    sim = MoveSim()
    sim.connect()
    deadline = sim.core.get_timer()
    assert deadline is not None
    with pytest.raises(MoveRefused) as refused:
        sim.core.quiesce(sim.now + 31)
    assert refused.value.code == "ended"


def test_move_refused_is_an_exception_with_its_code() -> None:
    refused = MoveRefused("not_connected", "DTLS first")
    assert refused.code == "not_connected" and "DTLS first" in str(refused)
    import pickle

    again = pickle.loads(pickle.dumps(refused))
    assert (again.code, again.reason) == (refused.code, refused.reason)


# --- the exact snapshot as bytes ------------------------------------------------------------------


def test_exact_snapshot_round_trip() -> None:
    sim, _ = moving_call(agent=TurnEchoAgent())
    sim.run(sim.now + 1.0)
    snapshot = SessionSnapshot.from_bytes(sim.quiesce())
    data = snapshot.to_bytes()
    assert data[:4] == b"PLSS" and data[4] == SNAPSHOT_VERSION == 3
    assert SessionSnapshot.from_bytes(data) == snapshot
    assert snapshot.exact and snapshot.turns == 1
    assert snapshot.playout and snapshot.agent_state
    header = json.loads(data[9 : 9 + int.from_bytes(data[5:9], "big")])
    assert header["exact"] is True
    # the relay is an address field of its own ("" for a client that came directly)
    assert header["ice"]["selected"] == {"host": "192.0.2.10", "port": 50000, "relay": ""}
    shown = repr(snapshot)
    assert snapshot.agent_state.hex()[:32] not in shown


def test_relayed_addresses_survive_the_snapshot() -> None:
    via = PeerAddress("192.0.2.10", 50000, relay="relay-7")
    sim = MoveSim()
    sim.at(0.0, lambda: sim.core.receive(sim.client.check(), via, sim.now))
    sim.run(0.1)
    assert sim.core.selected_address == via
    state = sim.core._transport._connection.ice_snapshot(0.1)
    snapshot = attrs.evolve(_any_snapshot(), ice=state)
    again = SessionSnapshot.from_bytes(snapshot.to_bytes())
    assert again.client_addr == via and again.client_addr.relay == "relay-7"


@functools.cache
def _exact_bytes() -> bytes:
    sim, _ = moving_call(agent=TurnEchoAgent())
    sim.run(sim.now + 1.0)
    return sim.quiesce()


def _any_snapshot() -> SessionSnapshot:
    return SessionSnapshot.from_bytes(_exact_bytes())


def test_exact_snapshot_bytes_are_checked_strictly() -> None:
    data = _exact_bytes()
    header_end = 9 + int.from_bytes(data[5:9], "big")
    header = data[9:header_end]

    def with_header(old: bytes, new: bytes) -> bytes:
        assert old in header, old
        changed = header.replace(old, new, 1)
        return data[:5] + len(changed).to_bytes(4, "big") + changed + data[header_end:]

    bad = [
        data[:4] + bytes([1]) + data[5:],  # version 1 is not read any more
        with_header(b'"exact":true', b'"exact":1'),
        with_header(b'"turns":1', b'"turns":-1'),
        with_header(b'"relay":""', b'"relay":5'),
        with_header(b',"relay":""', b""),
        with_header(b'"playout":[[', b'"playout":[["x",'),
        data[:-1],
        data + b"\0",
    ]
    for candidate in bad:
        with pytest.raises(ValueError):
            SessionSnapshot.from_bytes(candidate)
    snapshot = _any_snapshot()
    with pytest.raises(ValueError):
        attrs.evolve(snapshot, agent_state=bytes(MAX_AGENT_STATE + 1))
    with pytest.raises(ValueError):
        attrs.evolve(snapshot, pending=(b"short",))
    with pytest.raises(ValueError):
        attrs.evolve(snapshot, playout=((1, 2, b"", 0.0),))  # an empty payload


# --- agents move with their session ---------------------------------------------------------------


def test_turn_echo_mid_playback_goes_on_playing_after_the_move() -> None:
    sentence = speech.speak("the quick brown fox jumps over the lazy dog", rate=190)
    sim = MoveSim(agent=TurnEchoAgent())
    sim.connect()
    end = sim.talk(speech.frames(sentence) + [SILENCE] * 250)
    sim.keep_consent(until=end + 5)
    sim.run(end - 250 * FRAME + 1.5)  # the reply has been playing for about a second
    names = [e.name for _, e in sim.events if isinstance(e, ClientEvent)]
    assert names[-1] == "agent_started"
    played_before = len(sim.client.received)
    data = sim.quiesce()
    sim.run(sim.now + 0.04)
    agent = TurnEchoAgent()
    sim.arrive(data, elapsed=0.04, agent=agent)
    sim.run(end + 1)
    assert sim.client.srtp_errors == 0
    # the new node's agent plays the rest of the reply and finishes it: no second start
    names = [e.name for _, e in sim.events if isinstance(e, ClientEvent)]
    assert names == ["speech_started", "speech_stopped", "agent_started", "agent_finished"]
    assert agent.turns_played == 1
    # the whole reply, both halves together, is the sentence
    received = sim.client.pcm()
    score, _ = speech.correlation(sentence, received, len(received) // 2 - 1)
    assert score > 0.8, score
    after = sim.client.pcm(sim.client.received[played_before:])
    rest, _ = speech.correlation(sentence, after, len(after) // 2 - 1)
    assert rest > 0.3  # the second half is the sentence's, not silence
    seqs = [p.sequence_number for p in sim.client.received]
    assert all(rtp.seq_distance(a, b) == 1 for a, b in itertools.pairwise(seqs))


def test_a_turn_open_at_the_quiesce_goes_on_on_the_new_node() -> None:
    sentence = speech.speak("the quick brown fox jumps over the lazy dog", rate=190)
    sim = MoveSim(agent=TurnEchoAgent())
    sim.connect()
    start = sim.now
    end = sim.talk(speech.frames(sentence) + [SILENCE] * 150)
    sim.keep_consent(until=end + 5)
    sim.run(start + 1.2)  # mid-sentence: a turn is open
    data = sim.quiesce()
    snapshot = SessionSnapshot.from_bytes(data)
    assert snapshot.turns == 1 and snapshot.open_turn is not None
    assert 0.8 < snapshot.open_turn < 1.2
    names = [e.name for _, e in sim.events if isinstance(e, ClientEvent)]
    assert names == ["speech_started"]
    sim.run(sim.now + 0.02)
    sim.arrive(data, elapsed=0.02, agent=TurnEchoAgent())
    sim.run(end + 3)
    events = [e for _, e in sim.events if isinstance(e, ClientEvent)]
    # one turn, started on the old node and ended on the new one, then its whole reply
    assert [e.name for e in events] == [
        "speech_started",
        "speech_stopped",
        "agent_started",
        "agent_finished",
    ]
    stopped = events[1]
    assert stopped.fields["turn"] == 1 and "cut" not in stopped.fields
    assert stopped.fields["duration_ms"] > 2000  # counted from its start on the old node
    received = sim.client.pcm()
    score, _ = speech.correlation(sentence, received, len(received) // 2 - 1)
    assert score > 0.8, score


def test_a_turn_open_at_the_quiesce_ends_when_the_user_stays_silent() -> None:
    sentence = speech.speak("the quick brown fox", rate=190)
    sim = MoveSim(agent=TurnEchoAgent())
    sim.connect()
    frames = speech.frames(sentence)
    end = sim.talk(frames + [SILENCE] * 150)
    sim.keep_consent(until=end + 5)
    sim.run(end - 150 * FRAME + 0.1)  # the user just stopped: the turn is still open
    data = sim.quiesce()
    assert SessionSnapshot.from_bytes(data).open_turn is not None
    moved_at = sim.now
    sim.arrive(data, elapsed=0.0, agent=TurnEchoAgent())
    sim.run(end + 3)
    events = [(t, e) for t, e in sim.events if isinstance(e, ClientEvent)]
    assert [e.name for _, e in events] == [
        "speech_started",
        "speech_stopped",
        "agent_started",
        "agent_finished",
    ]
    stop_time, stopped = events[1]
    assert stopped.fields["turn"] == 1
    assert stop_time == pytest.approx(moved_at + 0.6)  # end_silence_ms after the move
    received = sim.client.pcm()
    score, _ = speech.correlation(sentence, received, len(received) // 2 - 1)
    assert score > 0.8, score


def test_turn_echo_state_round_trip_and_size() -> None:
    agent = TurnEchoAgent()
    ten_seconds = (speech.frames(utterance()) * 6)[:500]
    now = 100.0
    for frame in ten_seconds:
        now += 0.02
        agent.on_audio(frame, now)
    agent.on_turn(SpeechStarted(at=100.02, turn=1), now)
    agent.on_turn(SpeechStopped(at=now, turn=1, duration_ms=10_000), now)
    assert agent.poll_events()[0]["event"] == "agent_started"
    played = [agent.pull(now) for _ in range(50)]
    began = time.perf_counter()
    state = agent.save_state(now)
    took = time.perf_counter() - began
    # what the documentation promises: about 40 KiB for a 10 s turn, well under the cap
    assert 10_000 < len(state) < 60_000, len(state)
    assert len(state) < MAX_AGENT_STATE
    assert took < 1.0  # on this machine some 30 ms; a generous bound for loaded CI

    fresh = TurnEchoAgent()
    fresh.load_state(state, 5000.0)
    rest = []
    while (pcm := fresh.pull(5000.0)) is not None:
        rest.append(pcm)
    assert len(rest) == len(ten_seconds) - 50  # the whole turn (it has no pre-roll), less played
    assert fresh.poll_events() == [{"event": "agent_finished"}]
    assert all(len(pcm) == FRAME_BYTES for pcm in rest)
    # what plays on is what was left, sample for sample (the encoder's lookahead taken out)
    expected = b"".join(ten_seconds[50:])
    score, lag = speech.correlation(expected, b"".join(rest), 48_000 // 10)
    assert score > 0.9 and abs(lag) <= 8, (score, lag)  # 312 samples without
    assert played[0] is not None

    with pytest.raises(ValueError):
        TurnEchoAgent().load_state(b"PTE1" + b"\xff" * 10, 0.0)
    with pytest.raises(ValueError):
        TurnEchoAgent().load_state(b'{"kind":"parley.bridge"}', 0.0)
    with pytest.raises(ValueError):
        TurnEchoAgent().load_state(state[:-3], 0.0)


def test_an_agent_of_another_kind_starts_fresh() -> None:
    sim, end = moving_call(agent=TurnEchoAgent())
    sim.run(sim.now + 1.0)
    data = sim.quiesce()
    # the new node runs the echo agent: the turn-echo state is not its own
    target = sim.arrive(data, elapsed=0.0)
    assert target.stats()["agent_state_rejected"] == 1
    sim.run(end)
    assert sim.client.srtp_errors == 0


def test_bridge_state_carries_the_conversation() -> None:
    old = BridgeAgent("ws://127.0.0.1:9/agent", "s-move")
    old.on_turn(SpeechStarted(at=1.0, turn=3), 1.0)
    state = old.save_state(2.0)
    assert json.loads(state) == {"kind": "parley.bridge", "turn": 3, "played_ms": None}
    new = BridgeAgent("ws://127.0.0.1:9/agent", "s-move")
    new.load_state(state, 7.0)
    assert new._resume and new.stats()["turn"] == 3
    new.moved_in(from_node="node-a", to_node="node-b", epoch=12)
    assert new._move == {
        "type": "session_moved",
        "session": "s-move",
        "from_node": "node-a",
        "to_node": "node-b",
        "epoch": 12,
        "turn": 3,
    }
    with pytest.raises(ValueError):
        new.load_state(b"PTE1", 0.0)
    with pytest.raises(ValueError):
        new.load_state(b'{"kind":"parley.bridge","turn":true,"played_ms":null}', 0.0)


def test_a_move_before_any_rtp_was_sent_starts_at_the_next_sequence_number() -> None:
    sim = MoveSim(offer=browser_offer(direction="sendonly"))  # we never send RTP to it
    sim.connect()
    sim.run(sim.now + 0.1)
    data = sim.quiesce()
    snapshot = SessionSnapshot.from_bytes(data)
    assert snapshot.srtp.rtp_index is None
    target = sim.arrive(data, elapsed=0.0)
    assert target._transport.next_seq == snapshot.next_seq
    sim.run(sim.talk(speech.frames(utterance())[:20]) + 0.5)
    assert sim.client.srtp_errors == 0
    assert target.stats()["packets_in"] == 20
    kinds = {type(e) for _, e in sim.events}
    assert {IceConnected, DtlsConnected, MediaStarted} <= kinds


# --- the SRTP hand-over on its own ----------------------------------------------------------------


def _srtp_pair() -> tuple[SrtpSession, SrtpSession]:
    """Our sending session and the client's receiving one, keyed alike (AES-CM)."""
    profile = SrtpProfile.AES128_CM_HMAC_SHA1_80
    ours, theirs = bytes(range(30)), bytes(range(30, 60))
    sender = SrtpSession.create(profile, local_key=ours, remote_key=theirs, local_ssrc=0x1234)
    receiver = SrtpSession.create(profile, local_key=theirs, remote_key=ours, local_ssrc=0x99)
    return sender, receiver


def _packet(seq: int) -> bytes:
    return rtp.serialize(
        rtp.RtpPacket(payload_type=111, sequence_number=seq, timestamp=seq * 960, ssrc=0x1234)
    )


def test_handover_of_a_session_never_snapshotted_reserves_as_a_first_checkpoint() -> None:
    sender, receiver = _srtp_pair()
    for seq in range(5000, 5010):
        receiver.unprotect_rtp(sender.protect_rtp(_packet(seq)))
    assert sender.rtp_headroom is None  # no fence yet
    state = exact_state(sender)
    assert state.rtp_index == 5009 and state.rtp_reserved == 5009 + RTP_RESERVE
    assert state.srtcp_index is None and state.srtcp_reserved == SRTCP_RESERVE - 1
    moved = continue_srtp(state, 5010)
    assert moved.next_rtp_seq == 5010
    for seq in range(5010, 5020):  # at once, and the client takes it
        receiver.unprotect_rtp(moved.protect_rtp(_packet(seq)))
    with pytest.raises(SrtpIndexError):  # never at or below what the old owner used
        moved.protect_rtp(_packet(5009))
    # no SRTCP sent yet: the new owner's first is index 1 (0 stays unused, harmless)
    compound = rtcp.serialize([rtcp.ReceiverReport(ssrc=0x1234)])
    assert index_of(SrtpProfile.AES128_CM_HMAC_SHA1_80, moved.protect_rtcp(compound)) == 1


def test_handover_of_a_used_up_reservation_waits_for_a_checkpoint_of_its_own() -> None:
    sender, _ = _srtp_pair()
    sender.protect_rtp(_packet(7000))
    sender.confirm(sender.snapshot(rtp_reserve=3))  # fence at 7003
    for seq in range(7001, 7004):
        sender.protect_rtp(_packet(seq))
    assert sender.rtp_headroom == 0
    state = exact_state(sender)
    assert (state.rtp_index, state.rtp_reserved) == (7003, 7003)
    moved = continue_srtp(state, 7004)
    with pytest.raises(SrtpIndexError, match="beyond the reservation"):
        moved.protect_rtp(_packet(7004))
    moved.confirm(moved.snapshot())  # its own checkpoint, stored
    moved.protect_rtp(_packet(7004))
    with pytest.raises(ValueError, match="follow"):
        continue_srtp(state, 7010)


def test_frames_elapsed_rounds_up_to_whole_frames() -> None:
    assert [frames_elapsed(s) for s in (0.0, -1.0, 0.001, 0.02, 0.04, 0.05, 0.06, 0.061)] == [
        0,
        0,
        1,
        1,
        2,
        3,
        3,
        4,
    ]
    assert frames_elapsed(float("nan")) == 0


# --- the bridge agent and the example agent keep one conversation across a move -----------------

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "agent_echo.py"


def _example_serve() -> Callable[..., Awaitable[None]]:
    spec = importlib.util.spec_from_file_location("parley_example_agent_echo_move", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return cast(Callable[..., Awaitable[None]], module.serve)


async def _wait_for(probe: Callable[[], bool]) -> None:
    """Poll what another task changes (the bridge announces no event of its own for it)."""
    with trio.fail_after(5):
        while True:
            if probe():
                return
            await trio.sleep(0.01)


async def test_the_example_agent_keeps_its_conversation_across_a_move(
    nursery: trio.Nursery,
) -> None:
    port = await nursery.start(partial(_example_serve(), "127.0.0.1", 0))
    url = f"ws://127.0.0.1:{port}/agent"
    said = speech.speak("Hello agent, say this back.", rate=280)
    now = 1000.0

    old = BridgeAgent(url, "s-move")
    old_scope = trio.CancelScope()

    async def run_old() -> None:
        with old_scope:
            await old.run()

    nursery.start_soon(run_old)
    await _wait_for(lambda: old.connected)
    # one user turn, fed faster than real time
    onset = now
    for pcm in speech.frames(said):
        old.on_audio(pcm, now)
        now += 0.02
        await trio.sleep(0.004)
    old.on_turn(SpeechStarted(at=onset, turn=1), now)
    old.on_turn(SpeechStopped(at=now, turn=1, duration_ms=round((now - onset) * 1000)), now)
    heard = bytearray()
    with trio.fail_after(5):
        while len(heard) < 30 * FRAME_BYTES:  # 600 ms of the reply play on the old node
            if (pcm := old.pull(now)) is not None:
                heard += pcm
            now += 0.02
            await trio.sleep(0.02)
    await trio.sleep(0.3)  # the old node stands still; the agent streams on (not heard)

    # the move: the old bridge's state goes with the session to the new node's bridge
    new = BridgeAgent(url, "s-move")
    new.load_state(old.save_state(now), now)
    new.moved_in(from_node="node-a", to_node="node-b", epoch=2)
    nursery.start_soon(new.run)
    await _wait_for(lambda: new.connected)
    old.moved_out()
    old_scope.cancel()  # the old actor ends: its link closes with 1001, "session moved"

    events: list[dict[str, Any]] = []
    with trio.fail_after(10):
        while not any(e["event"] == "agent_finished" for e in events):
            events += new.poll_events()
            if (pcm := new.pull(now)) is not None:
                heard += pcm
            now += 0.02
            await trio.sleep(0.02)
    while (pcm := new.pull(now)) is not None or new.pull(now) is not None:
        heard += pcm or b""
    assert {"event": "agent_connected", "resumed": True} in events
    # the reply went on from what the user heard: said once, nothing skipped, nothing twice
    score, _ = speech.correlation(said, bytes(heard), 48_000 // 2)
    assert score > 0.9, score
    # (the turn starts with the audio, so the example's 200 ms pre-roll has nothing to take)
    assert abs(len(heard) - len(said)) <= 2 * FRAME_BYTES, (len(heard), len(said))


def test_the_transition_table_quiesces_only_a_connected_session() -> None:
    quiesced = SessionState.QUIESCED
    assert TRANSITIONS[quiesced] == {SessionState.CONNECTED, SessionState.CLOSED}
    assert [s for s, allowed in TRANSITIONS.items() if quiesced in allowed] == [
        SessionState.CONNECTED
    ]
    sim = MoveSim()
    with pytest.raises(RuntimeError, match="illegal session state change NEW -> QUIESCED"):
        sim.core._transport._connection.quiesce()
