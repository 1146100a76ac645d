"""Barge-in in two steps, on the voice loop with real Opus and espeak-ng speech, virtual clock:
duck within 3 frames, resume after a cough or an "mm-hm", interrupt on a real turn, and never
for the agent's own echo."""

from __future__ import annotations

import functools
import itertools
import math

import pytest

from ops.bench.barge import EchoPath, LoopCall, backchannel, burst, said
from sessions.audio.echo import EchoEstimator
from sessions.audio.pacer import Pacer
from sessions.audio.vad import FRAME_BYTES
from sessions.transceiver.barge import fade_in, fade_out
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
