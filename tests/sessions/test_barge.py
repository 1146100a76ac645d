"""Barge-in in two steps, on the voice loop with real Opus and espeak-ng speech, virtual clock:
duck within 3 frames (on the first voiced frame: the client hears it within 60 ms of that
frame reaching the node), resume after a cough or an "mm-hm", interrupt on a real turn, never
for the agent's own echo; and a move while ducked decides the duck before the handover."""

from __future__ import annotations

import functools
import itertools
import math

import pytest

from ops.bench.barge import EchoPath, LoopCall, backchannel, burst, said
from sessions.agents import TurnEchoAgent
from sessions.audio.echo import EchoEstimator
from sessions.audio.pacer import Pacer
from sessions.audio.vad import FRAME_BYTES
from sessions.transceiver.barge import fade_in, fade_out
from sessions.transceiver.parts import MovingParts
from sessions.transceiver.voice import VoiceLoop
from sessions.turns import TurnConfig

FRAME = 0.020


@functools.cache
def question() -> list[bytes]:
    return said("what is the weather like in Paris today")


@functools.cache
def interruption() -> list[bytes]:
    return said("wait, stop, that is not what I meant")


def asked(call: LoopCall, at: float = 0.5) -> float:
    """The user asks; returns when the reply started (turn-echo: the question played back)."""
    end = call.say(question(), at)
    call.run(end + 1.0)
    started = call.first("agent_started", at)
    assert started is not None, call.names()
    return started[0]


def played_before(call: LoopCall, faded_at: float, earlier_ducks: int) -> int:
    """Agent audio sent in full before the faded frame sent at ``faded_at``, in ms."""
    return 20 * (sum(1 for t in call.sent if t < faded_at) - earlier_ducks)


def test_user_voice_ducks_the_reply_within_three_frames_then_interrupts() -> None:
    call = LoopCall()
    start = asked(call)
    call.say(interruption(), start + 1.0)
    call.run(start + 6.0)
    names = call.names()
    assert names[:6] == [
        "speech_started",
        "speech_stopped",
        "agent_started",
        "agent_ducked",
        "speech_started",
        "agent_interrupted",
    ], names
    (duck,) = call.loop.ducks[:1]
    onset, faded = duck
    assert round((faded - onset) / FRAME) <= 3  # the promise: ducked within 3 frames
    # Nothing of the reply goes out after the faded frame until the interruption drops it.
    interrupted_at, fields = call.first("agent_interrupted") or (0.0, {})
    assert not [t for t in call.sent if faded < t <= interrupted_at]
    assert fields["played_ms"] == played_before(call, faded, 0)
    # The turn's first voiced frame is the burst's onset; the last agent frame, the faded one.
    assert call.loop.barge_ins == [(onset, faded)]


@pytest.mark.parametrize(
    "sound", [pytest.param(burst, id="cough-150ms"), pytest.param(backchannel, id="mm-hm-300ms")]
)
def test_a_cough_or_a_backchannel_ducks_then_resumes_and_the_reply_plays_to_the_end(
    sound: object,
) -> None:
    call = LoopCall()
    start = asked(call)
    frames = sound()  # type: ignore[operator]
    assert len(frames) == (8 if sound is burst else 15)
    call.say(frames, start + 1.0)
    call.run(start + 6.0)
    names = call.names()
    assert names == [
        "speech_started",
        "speech_stopped",
        "agent_started",
        "agent_ducked",
        "agent_resumed",
        "agent_finished",
    ], names
    (onset, faded), *_ = call.loop.ducks
    assert round((faded - onset) / FRAME) <= 3
    _ducked_at, ducked = call.first("agent_ducked") or (0.0, {})
    assert ducked["played_ms"] == played_before(call, faded, 0)
    # The whole reply went out, plus the one frame that was faded out and played again.
    reply_ms = (call.first("agent_started") or (0, {"ms": 0}))[1]["ms"]
    assert isinstance(reply_ms, int)
    assert len(call.sent) == reply_ms // 20 + 1
    # The agent heard of it too, and was never interrupted.
    assert call.agent.interruptions == 0
    stats = call.loop.stats()["barge"]
    assert isinstance(stats, dict) and stats["ducks"] == 1 and stats["resumes"] == 1


def test_the_duck_fades_without_a_click_and_resumes_where_it_stopped() -> None:
    call = LoopCall()
    start = asked(call)
    call.say(burst(), start + 1.0)
    call.run(start + 6.0)
    (_, faded_at), *_ = call.loop.ducks
    index = next(i for i, t in enumerate(call.sent) if t == faded_at)
    pcm = [memoryview(p).cast("h") for _, p in call.received]
    before, faded, resumed, after = pcm[index - 1], pcm[index], pcm[index + 1], pcm[index + 2]

    def steps(frames: list[memoryview]) -> int:
        joined = [s for f in frames for s in f]
        return max(abs(a - b) for a, b in itertools.pairwise(joined))

    # The fade: no step bigger than the speech's own steps around it; silence at its end and
    # at the start of the frame that brings the reply back.
    def rms(samples: memoryview) -> float:
        return (sum(s * s for s in samples) / len(samples)) ** 0.5

    assert steps([before, faded]) <= steps([before]) * 1.5 + 200
    assert rms(faded[-240:]) < 0.05 * rms(before)  # Opus's own noise: no audio left
    assert steps([faded, resumed]) <= steps([after]) * 1.5 + 200


def test_fades_are_raised_cosine_ramps() -> None:
    loud = memoryview(b"\xff\x3f" * (FRAME_BYTES // 2)).tobytes()  # 16383 everywhere
    out = memoryview(fade_out(loud, 5)).cast("h")
    inn = memoryview(fade_in(loud, 5)).cast("h")
    assert out[0] > 16000 and out[239] < 100 and not any(out[240:])
    assert inn[0] < 100 and inn[239] > 16000 and all(s == 16383 for s in inn[240:])
    assert max(abs(a - b) for a, b in itertools.pairwise(out)) < 200


def test_pacer_hold_keeps_the_queue_and_give_back_replays_the_frame() -> None:
    pacer = Pacer()
    for i in range(3):
        pacer.push(bytes([i]) * 4, 0.0)
    first = pacer.pop(0.0)
    assert first is not None and pacer.stats().talkspurt_ms == 20
    pacer.give_back(first.payload)
    pacer.hold()
    assert pacer.stats().talkspurt_ms == 0
    assert [pacer.pop(0.02 * i) for i in (1, 2, 3)] == [None, None, None]
    assert pacer.queued_ms == 60 and pacer.stats().held == 3 and pacer.stats().underruns == 0
    pacer.release()
    again = pacer.pop(0.08)
    assert again is not None and again.payload == first.payload and again.marker
    assert again.timestamp == first.timestamp + 4 * 960  # the clock kept real time


# --- echo -------------------------------------------------------------------------------------


def echo_call(*, aware: bool = True) -> LoopCall:
    return LoopCall(
        echo=EchoPath(gain_db=-10.0, delay_ms=120.0, lowpass_hz=2000.0),
        config=TurnConfig(echo_aware=aware),
    )


@pytest.mark.slow
def test_the_agents_own_echo_never_ducks_over_20_replies_but_the_user_still_barges_in() -> None:
    call = echo_call()
    texts = [
        "hello, can you hear me",
        "what is the weather like in Paris today",
        "please book a table for two at eight",
        "remind me to call my sister tomorrow",
    ]
    at = 0.5
    for n in range(20):
        q = said(texts[n % len(texts)])
        end = call.say(q, at)
        # the reply: as long as the question plus padding, after end_silence
        at = end + 0.6 + len(q) * FRAME + 0.4 + 0.8
        call.run(at)
    names = call.names()
    assert names.count("agent_started") == 20 and names.count("agent_finished") == 20, names
    assert "agent_ducked" not in names and "agent_interrupted" not in names
    assert names.count("speech_started") == 20  # the echo never started a turn either
    echo = call.loop.echo
    assert echo is not None and echo.converged
    # sent tick -> inbound playout: both legs, the client's 120 ms and the jitter buffer
    assert 140 <= echo.delay_ms <= 320, echo.delay_ms
    assert -18 <= echo.gain_db <= -6, echo.gain_db

    # The same client now talks over the echo of the next reply: barge-in.
    start = asked(call, at)
    call.say(interruption(), start + 1.0)
    call.run(start + 5.0)
    after = [n for t, n, _ in call.events if t > start]
    assert after[:3] == ["agent_ducked", "speech_started", "agent_interrupted"], after
    onset, faded = call.loop.ducks[-1]
    assert round((faded - onset) / FRAME) <= 3


def test_without_the_estimator_the_echo_barges_in() -> None:
    call = echo_call(aware=False)
    start = asked(call)
    call.run(start + 4.0)
    assert "agent_ducked" in call.names()


def test_estimator_finds_delay_and_gain_of_a_synthetic_path() -> None:
    import random

    rng = random.Random(3)
    est = EchoEstimator()
    levels = [rng.choice([0, 2000, 8000, 15000]) for _ in range(400)]
    delay = 7  # frames

    def frame(amp: float) -> bytes:
        return memoryview(
            bytes(
                b"".join(
                    int(amp * (1 if i % 2 else -1)).to_bytes(2, "little", signed=True)
                    for i in range(FRAME_BYTES // 2)
                )
            )
        ).tobytes()

    frames = {a: frame(a) for a in set(levels)}
    quiet = {a: frame(a * 0.3) for a in set(levels)}
    echoes = 0
    for k in range(len(levels)):
        est.sent(frames[levels[k]], k * FRAME)
        heard = quiet[levels[k - delay]] if k >= delay else frame(0)
        echoes += est.heard(heard, k * FRAME)
    assert est.converged and est.delay_ms == delay * 20
    assert abs(est.gain_db - 20 * math.log10(0.3)) < 2
    assert echoes > 0.9 * len(levels) * 3 / 4
    # A much louder frame is not echo.
    est.sent(frames[15000], 400 * FRAME)
    assert not est.heard(frame(30000), (400 + delay) * FRAME)


# --- the figure: from the voice's arrival at the node to the duck at the client --------


def test_the_client_hears_the_duck_within_60ms_of_the_voice_reaching_the_node() -> None:
    """Over several barge-ins at random points of the reply: the frame the first voiced frame
    is played out in already sends the faded frame (no frame of extra queueing), so the client
    gets it one jitter-buffer delay and one network leg after the voice reached the node."""
    import random

    call = LoopCall()  # 20 ms each way; the jitter buffer settles at its 20 ms minimum
    rng = random.Random(5)
    at = 0.5
    figures = []
    for n in range(6):
        start = asked(call, at)
        index = len(call.loop.duck_log)
        end = call.say(interruption(), start + rng.uniform(0.3, 1.0))
        at = end + 2.5
        call.run(at - 0.5)
        duck = call.loop.duck_log[index]
        # at the node: ducked on the first voiced frame, faded in the same tick
        assert math.isclose(duck.sent, duck.onset, abs_tol=1e-6), (n, duck)
        assert math.isclose(duck.onset - duck.arrived, 0.020, abs_tol=1e-6), (n, duck)
        at_client = call.at_client(index)
        assert at_client is not None
        figures.append(at_client)
        ducked = call.first("agent_ducked", start)
        assert ducked is not None and ducked[1]["voice_ms"] == 20
    assert max(figures) <= 0.060, figures
    assert all(math.isclose(f, 0.040, abs_tol=1e-6) for f in figures), figures


def test_the_duck_after_setting_still_delays_the_duck() -> None:
    call = LoopCall(config=TurnConfig(duck_after_ms=60))
    start = asked(call)
    call.say(interruption(), start + 0.5)
    call.run(start + 4.0)
    (duck,) = call.loop.duck_log[:1]
    assert math.isclose(duck.sent - duck.onset, 0.040, abs_tol=1e-6), duck
    assert call.at_client(0) is not None and call.at_client(0) == pytest.approx(0.080)


# --- a move while ducked ------------------------------------------------------------------------


def until_ducked(call: LoopCall, since: float) -> tuple[float, dict[str, object]]:
    while (ducked := call.first("agent_ducked", since)) is None:
        assert call.now < since + 5.0, call.names()
        call.run(call.now + FRAME)
    return ducked


def moved(call: LoopCall) -> MovingParts:
    """Quiesce the call's loop now and carry it into a fresh one on the same call."""
    old = call.loop
    old.quiesce(call.now)
    parts = old.moving_parts(call.now, None)
    new = VoiceLoop(
        agent=TurnEchoAgent(),
        may_send=True,
        timestamp=parts.next_timestamp,
        turn_config=call.config,
        turn_offset=parts.turns,
    )
    new.carry_in(
        playout=parts.playout,
        pending=parts.pending,
        agent_state=parts.agent_state,
        now=call.now,
        open_turn=parts.open_turn,
    )
    new.start(call.now)
    call._pump()  # the old loop's last events
    call.loop = new
    return parts


def test_a_move_while_ducked_over_an_open_turn_makes_the_interruption_final() -> None:
    call = LoopCall()
    start = asked(call)
    call.say(interruption(), start + 1.0)
    ducked = until_ducked(call, start)
    # 300 ms into the interruption: a turn is open (200 ms), not yet final (400 ms).
    call.run(ducked[0] + 0.3)
    barge = call.loop.stats()["barge"]
    assert isinstance(barge, dict)
    assert (barge["ducks"], barge["resumes"], barge["interruptions"]) == (1, 0, 0)
    sent_before = len(call.sent)
    parts = moved(call)
    after = [n for t, n, _ in call.events if t > start]
    assert after == ["agent_ducked", "speech_started", "agent_interrupted"], after
    assert parts.pending == () and parts.open_turn is not None
    call.run(call.now + 3.0)
    # The new node never sends the dropped reply; the user's turn goes on and is answered.
    names = [n for t, n, _ in call.events if t > start]
    assert names[3:5] == ["speech_stopped", "agent_started"], names
    replied = call.first("agent_started", ducked[0])
    assert replied is not None
    assert not [t for t in call.sent[sent_before:] if t < replied[0]]


def test_a_move_while_a_cough_ducks_the_reply_resumes_it_faded_in_on_the_next_node() -> None:
    call = LoopCall()
    start = asked(call)
    call.say(burst(), start + 1.0)
    ducked = until_ducked(call, start)
    call.run(ducked[0] + 0.1)
    faded_at = call.loop.ducks[-1][1]
    parts = moved(call)
    after = [n for t, n, _ in call.events if t > start]
    assert after == ["agent_ducked", "agent_resumed"], after
    # The frame faded out comes first, faded in: the next node plays on without a click.
    assert parts.pending
    first = memoryview(parts.pending[0]).cast("h")
    assert max(abs(s) for s in first[:24]) < 0.2 * max(abs(s) for s in first[240:])
    call.run(call.now + 6.0)
    names = [n for t, n, _ in call.events if t > start]
    assert names == ["agent_ducked", "agent_resumed", "agent_finished"], names
    # The whole reply went out: what was sent before the faded frame, it again, and the rest.
    reply_ms = (call.first("agent_started") or (0, {"ms": 0}))[1]["ms"]
    assert isinstance(reply_ms, int)
    assert len(call.sent) == reply_ms // 20 + 1
    assert sum(1 for t in call.sent if t <= faded_at) >= 1


def test_a_hold_while_ducked_keeps_the_duck_for_when_it_resumes_here() -> None:
    call = LoopCall()
    start = asked(call)
    call.say(burst(), start + 1.0)
    ducked = until_ducked(call, start)
    call.run(ducked[0] + 0.001)
    # An etcd stall: the session is held where it is, then goes on here; the duck is not
    # decided by the hold.
    call.loop.quiesce(call.now, decide_duck=False)
    call.run(call.now + 0.1)
    call.loop.resume(call.now)
    resumed_at = call.now
    call.run(call.now + 6.0)
    names = [n for t, n, _ in call.events if t > start]
    assert names == ["agent_ducked", "agent_resumed", "agent_finished"], names
    released = call.first("agent_resumed", start)
    assert released is not None and released[0] > resumed_at
    # Still ducked after the hold: nothing of the reply went out until the duck was released.
    faded_at = call.loop.ducks[-1][1]
    assert not [t for t in call.sent if faded_at < t < released[0]]
