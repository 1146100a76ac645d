"""The VAD bench runs and reports sane figures (a small corpus, not a measurement)."""

from __future__ import annotations

import json

import pytest

from ops.bench import vad
from sessions.audio.neural_vad import available

pytestmark = pytest.mark.slow


def test_bench_vad_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    result = vad.main(["--quick", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["quick"] is True and printed["session_cpu_ms"] == vad.SESSION_CPU_MS
    assert [d["name"] for d in printed["detectors"]] == ["energy", "silero", "hybrid"]
    energy = result.by_name("energy")
    silero = result.by_name("silero")
    assert energy.available and silero.available == available("silero")
    rows = {r.kind: r for r in energy.rows}
    assert set(rows) == {
        "clean speech",
        "silence and dither",
        "white noise",
        "pink noise",
        "brown noise",
        "music",
        "10 dB SNR",
        "over music",
        "clicks, 150 ms apart",
        "bursts, tones, chords",
    }
    assert rows["clean speech"].speech and rows["clean speech"].low >= 0.95
    assert rows["silence and dither"].high == 0.0
    # Every frame of the corpus, timed: a positive cost, and fewer sessions with a dearer VAD.
    assert energy.frames > 1000 and energy.us_per_frame > 0
    assert result.sessions_per_core("energy") == pytest.approx(1000 / vad.SESSION_CPU_MS)
    text = vad.render(result)
    assert "clean speech: recall" in text and "sessions per core" in text
    if silero.available:
        srows = {r.kind: r for r in silero.rows}
        assert srows["clean speech"].low >= 0.9
        assert srows["music"].high <= 0.05 and srows["pink noise"].high <= 0.05
        assert silero.us_per_frame > energy.us_per_frame  # a model costs more than a sum
        assert silero.onset_p50_ms is not None and 0 <= silero.onset_p50_ms <= 120
        # Resident memory grown by the builds: 0 when this process already freed as much
        # (the turns bench's smoke test builds and drops Silero detectors before this one).
        assert silero.build_kb >= 0
        # The hybrid: Silero's verdicts, and the energy detector's onsets.
        hybrid = result.by_name("hybrid")
        hrows = {r.kind: r for r in hybrid.rows}
        assert hrows["clean speech"].low >= srows["clean speech"].low
        assert hybrid.onset_p50_ms is not None and energy.onset_p50_ms is not None
        assert hybrid.onset_p50_ms <= energy.onset_p50_ms + 20
    else:
        assert "not installed: silero" in text


def test_bench_vad_without_the_neural_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vad, "available", lambda name: name == "energy")
    result = vad.measure(quick=True, session_cpu_ms=40.0)
    energy, silero, hybrid = result.detectors
    assert energy.available and not silero.available and not silero.rows
    assert not hybrid.available
    assert result.sessions_per_core("energy") == pytest.approx(25.0)
    text = vad.render(result)
    assert "not installed: silero, hybrid (pip install 'parley[vad]')" in text
    assert "silero" not in text.splitlines()[0]
