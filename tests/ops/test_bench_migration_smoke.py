"""The migration bench runs end to end and reports sane figures (a tiny run, not a benchmark)."""

from __future__ import annotations

import json
import os

import pytest

from ops.bench.migration import main

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


def test_bench_migration_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    before = _children()
    result = main(["--moves", "3", "--clients", "3", "--reconnects", "2", "--drain", "3"])

    assert len(result.moves) == 3
    for move in result.moves:
        assert move.moved and {move.source, move.target} == {"node-2", "node-3"}, move
        # the moved client heard its echo around the move, and nothing it missed stays
        # unaccounted for: the window holds packets, the gap is real time (not a placeholder)
        assert move.gap.packets > 10, move
        assert 0.015 < move.gap.longest < 5.0, move
        assert move.gap.lost >= 0 and move.gap.delay_step is not None, move
        assert move.control is not None and move.control > 0, move
        assert 0 < move.seconds < 15, move
    # each move was logged by the node that took it in, with its blackout
    assert len(result.move_blackouts) == 3
    assert all(0 <= b < 5 for b in result.move_blackouts), result.move_blackouts
    assert len(result.reconnects) == 2 and result.failed_reconnects == 0
    assert all(0 < r < 15 for r in result.reconnects), result.reconnects
    drain = result.drain
    assert drain is not None and drain.sessions == 3 and drain.code == 0, drain
    assert drain.seconds is not None and 0 < drain.seconds < 60, drain
    assert len(drain.gaps) == 3 and all(g.packets > 10 for g in drain.gaps), drain
    assert len(drain.node_blackouts) == 3, drain

    out = capsys.readouterr().out
    assert "figure" in out and "reconnect" in out and "drain 3" in out
    json.dumps(result.as_dict())  # JSON-ready
    assert _children() <= before  # everything it started is gone
