"""The sessions bench runs end to end and reports sane figures (a tiny run, not a benchmark)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

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

    assert result.cluster is not None and result.parley is not None and result.aiortc is not None
    assert [s.name for s in result.sides] == ["cluster", "parley", "aiortc"]
    for side in result.sides:
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
        # a step that failed (this machine may be busy) is followed by a smaller one
        step = side.steps[0]
        assert step.sessions == 3 and step.failed_setups == 0
        assert step.frames > 100  # 3 sessions x ~75 frames a 1.5 s window
        assert step.missing < step.frames
        assert step.server_cpu > 0 and step.cpu_per_session > 0 and step.client_cpu > 0
        assert math.isfinite(step.bad_fraction)
        assert 0 <= side.capacity <= 3
    # the node's own pacer stats, read from etcd (with the operator's certificate in cluster mode)
    assert result.cluster.steps[0].server_late is not None
    assert result.parley.steps[0].server_late is not None
    assert result.aiortc.steps[0].server_late is None
    # the relay is on the cluster's path, and its CPU is reported; the others have none
    relay = result.cluster.steps[0].relay_cpu
    assert relay is not None and relay > 0
    assert result.parley.steps[0].relay_cpu is None and result.aiortc.steps[0].relay_cpu is None
    # the codec floor, at the node's complexity and at 10 (which costs more)
    assert result.complexity == 5
    floor5, floor10 = result.floor_at(5), result.floor_at(10)
    assert floor5 is not None and floor10 is not None
    assert 0 < floor5.cpu_per_session < floor10.cpu_per_session < 0.5
    assert floor5.sessions_per_core > floor10.sessions_per_core > 2

    out = capsys.readouterr().out
    for label in ("parley cluster", "parley direct", "aiortc echo", "codec floor"):
        assert label in out
    assert "sessions/core" in out and "relay CPU/session @N=3" in out
    json.dumps(result.as_dict())  # JSON-ready
    # everything it started is gone, and our own CPU affinity is back
    assert _children() <= before
    assert os.sched_getaffinity(0) == affinity


def test_bench_sessions_sides_and_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--sides`` skips sides; ``--profile`` leaves py-spy's profiles of the node and prints
    their top entries."""
    before = _children()
    profile = tmp_path / "profile"
    argv = ["--sides", "cluster", "--setups", "1", "--sessions", "2", "--warmup", "0.5"]
    result = main([*argv, "--window", "1.0", "--profile", str(profile)])

    assert result.cluster is not None and result.parley is None and result.aiortc is None
    assert [top.kind for top in result.profile] == ["gil", "all"]
    for top in result.profile:
        assert top.samples > 0 and top.self_time and top.inclusive
        assert Path(top.path).parent == profile and Path(top.path).stat().st_size > 0
    out = capsys.readouterr().out
    assert "py-spy of the cluster's node" in out and "top self" in out
    assert "parley direct" not in out
    assert _children() <= before
