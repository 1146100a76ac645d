"""The actors bench runs and reports sane figures (small count; not a performance test)."""

from __future__ import annotations

import json
import math

import pytest

from ops.bench.actors import main


@pytest.mark.parametrize("as_json", [False, True])
def test_bench_smoke(capsys: pytest.CaptureFixture[str], as_json: bool) -> None:
    result = main(["--count", "200", *(["--json"] if as_json else [])])
    assert result.count == 200
    assert result.memory_method == "tracemalloc"
    for side in (result.actors, result.baseline, result.baseline_started):
        for figure in (side.spawned_per_second, side.bytes_per_idle, side.stopped_per_second):
            assert math.isfinite(figure)
            assert figure > 0
    # An idle actor is a task plus a mailbox and its bookkeeping: it cannot be
    # smaller than a bare task on a channel, nor absurdly larger.
    assert result.baseline.bytes_per_idle < result.actors.bytes_per_idle < 100_000
    out = capsys.readouterr().out
    if as_json:
        assert json.loads(out)["actors"]["bytes_per_idle"] == result.actors.bytes_per_idle
    else:
        assert "spawned per second" in out
        assert "bytes per idle (tracemalloc)" in out
