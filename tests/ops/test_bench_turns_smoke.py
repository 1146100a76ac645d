"""The turns bench runs end to end and reports sane figures (a tiny run, not a benchmark)."""

from __future__ import annotations

import json

import pytest

from ops.bench import turns
from ops.bench.turns import main, measure
from sessions.audio import neural_vad
from sessions.turns import TurnConfig

pytestmark = pytest.mark.slow


def test_bench_turns_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    result = main(["--turns", "2", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result.as_dict()))
    assert printed["min_speech_ms"] == 200 and printed["end_silence_ms"] == 600
    assert printed["padding_ms"] == 200 and printed["aggressiveness"] == 2

    by_name = {d.name: d for d in result.detectors}
    assert {"parley", "silero", "hybrid", "fixed energy", "webrtcvad"} == set(by_name)
    assert by_name["webrtcvad"].available == (turns.load_webrtcvad() is not None)
    silero = neural_vad.available("silero")
    assert by_name["silero"].available == by_name["hybrid"].available == silero
    measured = [d for d in result.detectors if d.available]
    frame = 20.0
    for d in measured:
        # Two sentences, the second talked over: three user turns, three replies, one barge-in.
        assert (d.turns_expected, d.turns_started, d.replies) == (3, 3, 3), d
        assert (d.barge_ins_attempted, d.barge_ins_caught, d.false_barge_ins) == (1, 1, 0), d
        # The transceiver's own figures: end_silence_ms after the last voiced frame, to the
        # frame; the reply stops (is ducked) in the tick of the first voiced frame or soon after.
        assert d.end_of_turn.count == 3
        assert d.end_of_turn.p50_ms is not None and d.end_of_turn.p99_ms is not None
        assert 600 <= d.end_of_turn.p50_ms <= d.end_of_turn.p99_ms <= 600 + frame
        assert d.barge_in.count == 1
        assert d.barge_in.p50_ms is not None and 0 <= d.barge_in.p50_ms <= 200
        assert d.barge_in.p50_frames == d.barge_in.p50_ms / frame
        # From the truth at the client: both network legs (20 ms each) come on top.
        assert d.truth_end_of_turn.count == 3 and d.truth_barge_in.count == 1
        truth_end = d.truth_end_of_turn.p50_ms
        assert truth_end is not None and 600 + 2 * frame <= truth_end < 1200
        truth_barge = d.truth_barge_in.p50_ms
        assert truth_barge is not None and 2 * frame <= truth_barge < 600
        # The figure: the voice's arrival at the node -> the duck at the client: the
        # jitter buffer (20 ms), the tick it is played out in, the downlink (20 ms).
        assert d.voice_to_duck.count == 1 and d.voice_to_duck.p99_ms == 2 * frame, d
        assert d.truth_voice_to_duck.count == 1, d
        assert 0 < d.virtual_seconds < 120

    # Barge-in: parley, silero and fixed energy, echo estimator on and off, one reply per
    # scenario; then parley with the previous duck_after_ms, estimator on.
    assert [(b.detector, b.echo_aware) for b in result.barge] == [
        ("parley", True),
        ("parley", False),
        *([("silero", True), ("silero", False)] if silero else []),
        *([("hybrid", True), ("hybrid", False)] if silero else []),
        ("fixed energy", True),
        ("fixed energy", False),
        ("parley, duck 40 ms", True),
    ]
    for b in result.barge:
        assert b.caught == b.attempted == 1
        count, p50, p99 = b.reaction
        assert count == 1 and p50 is not None and p99 is not None and p50 <= p99 <= 60
        count, p50, p99 = b.at_client
        assert count == 1 and p99 is not None
        assert p99 == (60 if b.detector == "parley, duck 40 ms" else 40), b
        assert b.noise.interruptions == 0 and b.echo.agent_minutes > 0
        if b.echo_aware and b.detector not in ("silero", "hybrid"):
            assert b.echo.ducks == b.echo.interruptions == 0
    assert all(us > 0 for us in result.echo_cpu_us)

    text = turns.render(result)
    assert "barge-in: duck at once" in text and "echo estimator:" in text
    assert "min_speech_ms=200 end_silence_ms=600 padding_ms=200" in text
    assert "aggressiveness 2" in text and "fixed energy" in text and "webrtcvad" in text
    assert "reaction, the issue's figure" in text and "p99 <= 60" in text


def test_bench_turns_without_webrtcvad_and_other_thresholds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(turns, "load_webrtcvad", lambda: None)
    config = TurnConfig(min_speech_ms=100, end_silence_ms=400, padding_ms=100)
    result = measure(turns=1, config=config, aggressiveness=3, noise_dbfs=None)
    parley, _silero, _hybrid, fixed, webrtc = result.detectors
    assert not webrtc.available and "not installed" in webrtc.description
    assert "not installed" in turns.render(result)
    assert "aggressiveness 3" in parley.description
    for d in (parley, fixed):
        assert (d.turns_started, d.replies) == (1, 1), d
        assert d.end_of_turn.p50_ms is not None and 400 <= d.end_of_turn.p50_ms <= 420
    assert (result.min_speech_ms, result.end_silence_ms, result.padding_ms) == (100, 400, 100)
    assert result.noise_dbfs is None
