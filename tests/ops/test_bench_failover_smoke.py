"""The failover bench runs end to end: every session whose node it SIGKILLs is adopted and its
client hears the echo again within the bound (a tiny run, not a benchmark; a real test of
crash adoption under ``parley up``)."""

from __future__ import annotations

import json

import pytest

from ops.bench.failover import main
from tests.ops.test_bench_migration_smoke import _children

pytestmark = pytest.mark.slow


def test_bench_failover_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    before = _children()
    result = main(["--kills", "2", "--clients", "2", "--reconnects", "2", "--ttl", "2"])

    assert result.ttl == 2 and result.bound == 2 + result.margin + 2.0
    assert len(result.kills) == 2
    # Two clients on node-1 and node-2: the first kill takes node-1 and one session, and the
    # other client's echo in the same window is the control.
    assert len(result.kills[0].sessions) == 1 and result.kills[0].control is not None
    assert result.lost_sessions == []
    for kill in result.kills:
        assert kill.sessions, kill
        assert kill.back is not None and 0 < kill.back < 60, kill  # parley up restarted it
        assert kill.adopted_seen is not None and kill.adopted_seen < result.bound + 5, kill
        for session in kill.sessions:
            # adopted: another epoch, claimed after the kill, logged by the adopter
            assert session.adopter is not None and session.epoch_after is not None, session
            assert session.epoch_after > session.epoch_before, session
            assert session.adopted_logged is not None, session
            assert 0 < session.adopted_logged < result.bound, session
            # the client heard silence from the kill (no echo without an owner: at least the
            # two thirds of a TTL a lease can still run), then its echo again, within the bound
            assert session.within_bound and session.heard_again is not None, session
            assert 2 * 2 / 3 - 0.1 < session.heard_again < result.bound, session
            assert session.gap.longest > session.heard_again - 0.05, session
            assert session.missed > 50, session
            # the restored stream continued above its reservation, and by less than 2**15,
            # so that the client's rollover estimate (RFC 3711 §3.3.1) held
            assert session.seq_jump is not None and 0 < session.seq_jump < 1 << 15, session
            assert 0 <= session.lost_other < 50, session
    assert len(result.reconnects) == 2 and result.failed_reconnects == 0
    assert all(0 < r < 15 for r in result.reconnects), result.reconnects

    out = capsys.readouterr().out
    assert "figure" in out and "kill: to first echo again" in out and "reconnect" in out
    json.dumps(result.as_dict())  # JSON-ready
    assert _children() <= before  # everything it started is gone
