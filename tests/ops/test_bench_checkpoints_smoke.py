"""The checkpoint-cost bench runs end to end and counts what the nodes really stored in etcd (a
tiny run, not a benchmark)."""

from __future__ import annotations

import json

import pytest

from ops.bench.checkpoints import main
from tests.ops.test_bench_migration_smoke import _children

pytestmark = pytest.mark.slow


def test_bench_checkpoints_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    before = _children()
    result = main(["--sessions", "2", "--window", "12", "--silent-window", "12"])

    assert result.baseline.sessions == 0 and result.talking.sessions == 2
    assert result.silent.sessions == 2 and result.params["silent_window"] == 12
    # an idle cluster stores no checkpoint; two talking sessions store about one per 10 s each
    assert result.baseline.counters["checkpoints_stored"] == 0, result.baseline
    assert 1 <= result.talking.counters["checkpoints_stored"] <= 8, result.talking
    assert result.talking.counters["checkpoints_failed"] == 0, result.talking
    # silent (the clients muted, the echo dry): the checkpoint after the last packet came
    # before the window, the next is a minute after it
    assert result.silent.counters["checkpoints_stored"] == 0, result.silent
    per = result.per_session_minute()
    assert 100 < per["bytes_per_checkpoint"] < 4096, per
    # etcd saw the writes: at least the checkpoints' own revisions above the idle rate
    assert result.talking.revisions >= result.talking.counters["checkpoints_stored"]
    assert result.owned_at_end == 2

    out = capsys.readouterr().out
    assert "per session-minute" in out and "checkpoints stored" in out and "silent" in out
    json.dumps(result.as_dict())  # JSON-ready
    assert _children() <= before  # everything it started is gone
