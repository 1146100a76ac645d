"""The voice loop on a virtual clock: turns, the turn-echo agent, barge-in, client events."""

from __future__ import annotations

import functools

from sessions.agents import FRAME_BYTES, EchoAgent, TurnEchoAgent
from sessions.audio import speech
from sessions.audio.opus import VoiceCodec
from sessions.transceiver import ClientEvent
from sessions.transceiver.voice import VoiceLoop
from sessions.turns import TurnConfig
from sessions.webrtc.demux import PacketKind, classify
from tests.sessions.test_transceiver import FRAME, Sim

SILENCE = bytes(FRAME_BYTES)


@functools.cache
def sentence() -> bytes:
    return speech.speak("the quick brown fox jumps over the lazy dog", rate=190)


@functools.cache
def other_sentence() -> bytes:
    return speech.speak("stop, wait a moment please", rate=190)


def client_events(sim: Sim) -> list[tuple[float, ClientEvent]]:
    return [(t, e) for t, e in sim.events if isinstance(e, ClientEvent)]


def connected(agent: TurnEchoAgent) -> Sim:
    sim = Sim(agent=agent)
    sim.connect()
    return sim


def test_turn_echo_plays_the_turn_back_after_it_ends_with_events_in_order() -> None:
    sim = connected(TurnEchoAgent())
    sent = sentence()
    frames = speech.frames(sent) + [SILENCE] * 100  # the client keeps sending silence
    end = sim.talk(frames)
    sim.keep_consent(end + 6)
    sim.run(end + 6)
    names = [e.name for _, e in client_events(sim)]
    assert names == ["speech_started", "speech_stopped", "agent_started", "agent_finished"]
    received = sim.client.pcm()
    score, _ = speech.correlation(sent, received, len(received) // 2 - 1)
    assert score > 0.8, score
    # The reply starts once end_silence has passed after the last voiced frame.
    (latency,) = sim.core.turn_latencies
    gap = latency[1] - latency[0]
    assert TurnConfig().end_silence_ms / 1000 <= gap <= TurnConfig().end_silence_ms / 1000 + 0.1
    stopped = next(e for _, e in client_events(sim) if e.name == "speech_stopped")
    assert stopped.fields["duration_ms"] > 1000


def test_a_client_that_bursts_as_it_starts_talking_is_heard_whole() -> None:
    # A client that starts late sends its first packets at once, with speech from the first
    # one. The jitter buffer shortens the delay the burst left by dropping packets where the
    # user is quiet, not in the words: the turn-echo reply is the sentence, whole. (Dropping
    # one packet every shrink_interval from the start, as it did, cut four 20 ms holes in the
    # sentence and the reply scored 0.25.)
    sim = connected(TurnEchoAgent())
    sent = sentence()
    frames = speech.frames(sent) + [SILENCE] * 150
    begin, burst = sim.now, 4
    for i, pcm in enumerate(frames):
        sim.at(begin + max(i, burst) * FRAME, functools.partial(sim._talk, pcm))
    end = begin + len(frames) * FRAME
    sim.keep_consent(end + 6)
    sim.run(end + 6)
    received = sim.client.pcm()
    score, _ = speech.correlation(sent, received, len(received) // 2 - 1)
    jitter = sim.core.stats()["jitter_buffer"]
    assert jitter["dropped"] >= burst - 1  # the burst's delay was taken back...
    print("SCORE", score, jitter)
    assert jitter["dropped_in_speech"] == 0  # ...where the user was quiet
    assert score > 0.8, score


def test_barge_in_stops_agent_audio_within_frames_and_reports_what_was_played() -> None:
    sim = connected(TurnEchoAgent())
    first = speech.frames(sentence())
    interruption = speech.frames(other_sentence())
    end = sim.talk(first + [SILENCE] * 60)  # the reply starts about 0.6 s into this silence
    # Talk over the reply, one second after the first turn ended.
    barge_at = end - 60 * FRAME + 1.6
    sim.talk([SILENCE] * round((barge_at - end) / FRAME) + interruption + [SILENCE] * 100, end)
    sim.keep_consent(barge_at + 8)
    sim.run(barge_at + 8)

    events = client_events(sim)
    names = [e.name for _, e in events]
    assert names[:6] == [
        "speech_started",
        "speech_stopped",
        "agent_started",
        "agent_ducked",  # within 3 frames of the first voiced frame
        "speech_started",  # held until the interruption is final (turns.interrupt_ms)
        "agent_interrupted",
    ]
    interrupted_at, interrupted = next((t, e) for t, e in events if e.name == "agent_interrupted")
    # The reply was heard in part: more than nothing, less than all of it.
    reply_ms = next(e for _, e in events if e.name == "agent_started").fields["ms"]
    assert 0 < interrupted.fields["played_ms"] < reply_ms
    assert interrupted.fields["dropped_ms"] >= 0

    # Reaction: first voiced frame of the interruption -> first ducked agent frame sent (faded
    # out: the last one that carries any of the reply), within 3 frames.
    (duck,) = sim.core.ducks
    assert round((duck[1] - duck[0]) / FRAME) <= 3, duck
    (reaction,) = sim.core.barge_ins
    assert reaction == duck
    ducked_at = next(t for t, e in events if e.name == "agent_ducked")
    assert not [t for t in rtp_times(sim) if ducked_at + FRAME < t <= interrupted_at]
    # And nothing of the first reply goes out after the interruption, until the second turn
    # ends and its own reply starts.
    second_stop = [t for t, e in events if e.name == "speech_stopped"][1]
    leaked = [t for t in rtp_times(sim) if interrupted_at + FRAME < t < second_stop]
    assert not leaked, "agent audio after barge-in"
    assert names[-2:] == ["agent_started", "agent_finished"]  # the second turn is answered


def rtp_times(sim: Sim) -> set[float]:
    from sessions.webrtc.demux import PacketKind, classify, is_rtcp

    return {t for t, d, _ in sim.sent if classify(d) is PacketKind.RTP_RTCP and not is_rtcp(d)}


def _reply_sizes(codec: VoiceCodec | None) -> tuple[list[int], list[int], bytes]:
    """Payload sizes of the agent's reply to one turn before a restore and one after it, and
    the second reply's PCM as the client decoded it."""
    sim = Sim(agent=TurnEchoAgent(), codec=codec)
    sim.connect()
    frames = speech.frames(sentence()) + [SILENCE] * 150
    end = sim.talk(frames)
    sim.keep_consent(end + 30)
    sim.run(end)
    before = [len(p.payload) for p in sim.client.received]
    sim.move()  # a crash restore from the newest checkpoint: a fresh encoder
    end = sim.talk(frames, end)
    sim.run(end + 1)
    after = sim.client.received[len(before) :]
    return before, [len(p.payload) for p in after], sim.client.pcm(after)


def test_the_node_s_codec_setting_encodes_every_reply_before_and_after_a_restore() -> None:
    low = VoiceCodec(bitrate=12_000, complexity=0)
    small_before, small_after, pcm = _reply_sizes(low)
    big_before, big_after, _ = _reply_sizes(None)  # 32 kbit/s, complexity 5
    assert len(small_before) > 100 and len(small_after) > 100
    mean = lambda sizes: sum(sizes) / len(sizes)  # noqa: E731
    # 12 kbit/s against 32 (silent frames are small at both): the setting reaches the encoder
    # of the session's first core and of the one restored from its checkpoint.
    for small, big in ((small_before, big_before), (small_after, big_after)):
        assert mean(big) > 2 * mean(small), (mean(small), mean(big))
    score, _ = speech.correlation(sentence(), pcm, len(pcm) // 2 - 1)
    assert score > 0.6, score  # still the user's speech played back


class _ChattyEcho:
    """An echo that does not say it is reactive: it may have audio of its own at any time."""

    interruptible = False

    def __init__(self) -> None:
        self.pulls = 0
        self._inner = EchoAgent()

    def on_audio(self, pcm: bytes, now: float) -> None:
        self._inner.on_audio(pcm, now)

    def pull(self, now: float) -> bytes | None:
        self.pulls += 1
        return self._inner.pull(now)

    def on_turn(self, event: object, now: float) -> None:
        pass

    def on_interrupted(self, played_ms: int, now: float) -> None:
        pass

    def poll_events(self) -> list[dict[str, object]]:
        return []


class _QuietEcho(_ChattyEcho):
    """The same echo, saying it is reactive (sessions.agents.ReactiveAgent)."""

    reactive = True


def test_a_reactive_agent_is_not_asked_while_nothing_plays_and_others_are() -> None:
    pulls = {}
    for agent in (_QuietEcho(), _ChattyEcho()):
        sim = Sim(agent=agent)  # type: ignore[arg-type]
        sim.connect()
        before = agent.pulls
        sim.keep_consent(sim.now + 1.0)
        sim.run(sim.now + 1.0)  # the client sends no audio
        pulls[type(agent).__name__] = agent.pulls - before
    assert pulls["_QuietEcho"] <= 2 and pulls["_ChattyEcho"] >= 45, pulls  # every 20 ms


def test_a_reply_that_ends_after_the_client_fell_silent_still_says_it_finished() -> None:
    sim = connected(TurnEchoAgent())
    end = sim.talk(speech.frames(sentence()) + [SILENCE] * 30)  # then the client sends nothing
    sim.keep_consent(end + 10)
    sim.run(end + 10)
    names = [e.name for _, e in client_events(sim)]
    assert names == ["speech_started", "speech_stopped", "agent_started", "agent_finished"]
    finished = next(t for t, e in client_events(sim) if e.name == "agent_finished")
    last_rtp = max(t for t, d, _ in sim.sent if classify(d) is PacketKind.RTP_RTCP and d[1] < 192)
    assert last_rtp <= finished < last_rtp + 0.01  # said in the tick that found it over


def test_libopus_state_is_made_on_the_first_frame_each_way_not_for_a_silent_session() -> None:
    # About 73 KiB of libopus per session (README, Benchmarks: scale): a connected session
    # that neither hears nor says anything has none.
    sim = Sim(agent=EchoAgent())
    sim.connect()
    sim.keep_consent(sim.now + 2.0)
    sim.run(sim.now + 2.0)  # keyed, consent kept, no audio either way
    assert sim.core._voice.codecs == (None, None)
    end = sim.talk(speech.frames(sentence())[:10])
    sim.run(end + 0.5)
    encoder, decoder = sim.core._voice.codecs
    assert encoder is not None and decoder is not None
    assert len(sim.client.pcm()) > 0  # the echo came back through them


class _ReadyReply:
    """An agent whose whole reply is ready (a TTS that ran ahead of real time)."""

    interruptible = False

    def __init__(self, frames: int) -> None:
        self._left = frames

    def on_audio(self, pcm: bytes, now: float) -> None:
        pass

    def on_turn(self, event: object, now: float) -> None:
        pass

    def on_interrupted(self, played_ms: int, now: float) -> None:
        pass

    def pull(self, now: float) -> bytes | None:
        if not self._left:
            return None
        self._left -= 1
        return bytes([self._left % 200]) * FRAME_BYTES

    def poll_events(self) -> list[dict[str, object]]:
        return []


def test_a_frame_sent_late_counts_late_though_its_tick_was_handled_in_time() -> None:
    """A node's grid handles every session's tick before it sends their frames
    (sessions/grid.py): a frame that leaves more than the pacer's 5 ms after its deadline is a
    late frame all the same, counted once."""
    loop = VoiceLoop(agent=_ReadyReply(200), may_send=True, timestamp=0)
    loop.start(0.0)
    waits = [0.0, 0.004, 0.006, 0.030, 0.0]  # from the tick's handling to the send
    for index, wait in enumerate(waits):
        loop.handle_timer(index * FRAME)
        assert len(loop.frames_to_send(index * FRAME + wait)) == 1
    loop.handle_timer(5 * FRAME + 0.008)  # a tick handled late, its frame sent later still
    assert len(loop.frames_to_send(5 * FRAME + 0.012)) == 1
    assert loop.stats()["late_frames"] == 3


def test_a_late_tick_sends_every_due_frame_of_a_ready_reply_without_a_hole() -> None:
    """A node busy for 100 ms handles its next tick five ticks late: the frames due meanwhile
    leave together (the pacer's catch-up burst, which a jitter buffer absorbs), the RTP
    timestamps run on without a gap, and nothing counts as an underrun. Pulling only the
    usual two frames ahead left three of those ticks empty: holes in the reply."""
    loop = VoiceLoop(agent=_ReadyReply(200), may_send=True, timestamp=0)
    loop.start(0.0)
    sent: list[list[int]] = []

    def tick(at: float) -> None:
        loop.handle_timer(at)
        sent.append([frame.timestamp for frame in loop.frames_to_send()])

    for index in range(10):
        tick(index * FRAME)
    tick(14 * FRAME)  # ticks 10 to 14 are due at once
    for index in range(15, 20):
        tick(index * FRAME)
    assert [len(frames) for frames in sent] == [1] * 10 + [5] + [1] * 5
    stamps = [stamp for frames in sent for stamp in frames]
    assert stamps == [960 * index for index in range(20)]
    pacer = loop.stats()["pacer"]
    assert isinstance(pacer, dict)
    assert pacer["underruns"] == 0 and pacer["skipped"] == 0 and pacer["late"] >= 4
