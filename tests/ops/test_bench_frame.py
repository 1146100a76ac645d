"""The per-frame bench runs end to end and reports sane figures (a tiny run, not a benchmark)."""

from __future__ import annotations

import json

import pytest

from ops.bench.frame import main


def test_bench_frame_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    # 300 frames a round: one round is all the checks below allow (python_us is the round's
    # difference), and at 100 frames (37 ms of CPU a side) it once timed the session below the
    # codec alone.
    result = main(["--frames", "300", "--rounds", "1", "--turns", "3", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result.as_dict()))
    assert printed["frames"] == 300 and len(printed["rounds"]) == 1
    assert printed["complexity"] == 5 and printed["bitrate"] == 32_000
    # The codec costs something, and the session costs the codec and more.
    assert result.codec_us > 0
    assert result.session_us > result.codec_us
    assert result.python_us == pytest.approx(result.session_us - result.codec_us)
    assert 0 < result.codec_over_session < 1 < result.session_over_codec
    # Media really flowed: the warm-up and the round's frames came back as echoed RTP, and the
    # session is still up.
    assert result.session_ended is None
    assert result.client_datagrams_sent >= 200
    assert result.client_rtp_received >= 150
    assert {"nproc", "cpu_model", "python", "libopus"} <= set(printed["machine"])
    # Through the relay's tunnel the same session costs more (QUIC both ways), and its media
    # crossed the tunnel both ways: the echo came back to the client.
    assert result.tunneled_us > result.session_us
    assert result.tunnel_us == pytest.approx(result.tunneled_us - result.session_us)
    assert 0 < result.codec_over_tunneled < result.codec_over_session
    assert result.tunneled_ended is None
    assert result.tunneled_rtp_received >= 150
    # Three more sessions took their steps in turn, each costing the codec and more, and all
    # of them stayed up.
    assert printed["turns"] == 3 and result.turns_us > result.codec_us
    assert result.turns_over_session == pytest.approx(result.turns_us / result.session_us)
    assert result.turns_ended is None
    # ... beside the codec floor of three codecs in turn, which costs less than they do
    assert 0 < result.turns_codec_us < result.turns_us
    assert result.turns_over_codec == pytest.approx(result.turns_us / result.turns_codec_us)
    assert printed["turns_codec_us"] == pytest.approx(result.turns_codec_us, abs=0.01)


def test_bench_frame_profile(capsys: pytest.CaptureFixture[str]) -> None:
    result = main(["--frames", "50", "--rounds", "1", "--complexity", "1", "--profile"])
    out = capsys.readouterr().out
    assert result.complexity == 1 and result.session_ended is None
    assert "session / floor" in out and "by cumulative" in out and "by tottime" in out
    assert "session + tunnel" in out
    assert "in turn" not in out  # not asked for
