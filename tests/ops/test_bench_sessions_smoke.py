"""The sessions bench runs end to end and reports sane figures (a tiny run, not a benchmark)."""

from __future__ import annotations

import json
import math
import os

import pytest

from ops.bench.sessions import main

pytestmark = pytest.mark.slow


def _children() -> set[int]:
    """Live (not zombie) processes whose parent is this one."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            except OSError:
                continue
            if int(ppid) == os.getpid() and state != "Z":
                found.add(int(name))
    return found


def test_bench_sessions_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    before = _children()
    affinity = os.sched_getaffinity(0)
    result = main(["--setups", "3", "--sessions", "3", "--warmup", "0.5", "--window", "1.5"])

    for side in (result.parley, result.aiortc):
        assert side.setups == 3 and side.failed_setups == 0, side.name
        for times in (side.answer_times, side.rtp_times, side.frame_times):
            assert len(times) == 3
            assert all(0 < t < 15 for t in times), (side.name, times)
        # the first echoed packet cannot come before the answer, nor the decoded frame before it
        for answer, rtp, frame in zip(
            side.answer_times, side.rtp_times, side.frame_times, strict=True
        ):
            assert answer < rtp <= frame
        assert side.setup_cpu > 0
        (step,) = side.steps
        assert step.sessions == 3 and step.failed_setups == 0
        assert step.frames > 100  # 3 sessions x ~75 frames a 1.5 s window
        assert step.missing < step.frames
        assert step.server_cpu > 0 and step.cpu_per_session > 0 and step.client_cpu > 0
        assert math.isfinite(step.bad_fraction)
        assert side.capacity in (0, 3)
    assert result.parley.steps[0].server_late is not None  # the node's own pacer stats
    assert result.aiortc.steps[0].server_late is None

    out = capsys.readouterr().out
    assert "figure" in out and "aiortc echo" in out and "sessions/core" in out
    json.dumps(result.as_dict())  # JSON-ready
    # everything it started is gone, and our own CPU affinity is back
    assert _children() <= before
    assert os.sched_getaffinity(0) == affinity
