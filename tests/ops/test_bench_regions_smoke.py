"""The regions bench runs end to end and reports sane figures (a tiny run, not a benchmark):
two simulated globes (ops/bench/globe.py) on loopback, one aiortc client per region each."""

from __future__ import annotations

import json

import pytest

from ops.bench import regions
from ops.bench.globe import REGIONS

pytestmark = pytest.mark.slow


def test_bench_regions_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--clients", "1", "--priority-clients", "1", "--talk", "3", "--json"]
    result = regions.main(argv)
    printed = json.loads(capsys.readouterr().out)
    assert printed["clients_per_region"] == 1
    assert set(printed["runs"]) == {"unsteered", "steered"}
    for label, run in result["runs"].items():
        assert set(run["regions"]) == {
            f"{name}/{kind}" for name in REGIONS.values() for kind in ("first", "priority")
        }
        for name, figures in run["regions"].items():
            assert figures["clients"] == 1, (label, name, figures)
            # the first hop is one of the matrix's round trips, local or not
            assert figures["first_hop_p50_ms"] in {10.0, 60.0, 100.0, 150.0}, figures
            # the echo crossed at least both legs of a local path, and came back in time
            assert figures["echo_n"] >= 1, figures
            assert 20.0 <= figures["echo_p50_ms"] <= figures["echo_p99_ms"] < 1000.0, figures
        assert run["wan_lateness"]["n"] > 100
    text = regions.render(result)
    assert "unsteered" in text and "steered" in text and "1st hop p50" in text
    for name in REGIONS.values():
        assert f" {name}/first " in text and f" {name}/priority " in text
