"""The relay bench runs end to end and reports sane figures (a tiny run, not a benchmark)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from ops.bench.relay import BenchResult, Figures, Params, render

ROOT = Path(__file__).resolve().parents[2]


def test_bench_relay_smoke() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ops.bench.relay",
            "--quick",
            "--sessions",
            "1,10",
            "--seconds",
            "0.5",
            "--warmup",
            "0.15",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    rows = {(row["config"], row["sessions"]): row for row in result["rows"]}
    assert set(rows) == {(c, n) for c in ("parley", "baseline") for n in (1, 10)}
    for key, row in rows.items():
        for name in ("to_node_pps", "round_trip_pps", "packets_per_core", "p50", "p99"):
            assert row[name] is not None and row[name] > 0, (key, name, row[name])
        assert row["p50"] <= row["p99"] < 1.0, key  # seconds, on loopback
        assert row["latency_received"] > 0, key
        assert row["to_node"] >= row["round_trips"] * 0.9, key  # the relay forwarded them
    assert [a["sessions"] for a in result["added_latency"]] == [1, 10]


def test_bench_relay_with_two_workers_on_one_port() -> None:
    """``--workers 2``: two relay processes share the public port; both forward."""
    done = subprocess.run(
        [
            sys.executable, "-m", "ops.bench.relay", "--quick", "--workers", "2",
            "--sessions", "40", "--seconds", "0.4", "--warmup", "0.1", "--window", "64", "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["params"]["workers"] == 2
    (parley,) = [row for row in result["rows"] if row["config"] == "parley"]
    assert parley["round_trips"] > 0 and parley["packets_per_core"] > 0
    # The kernel hashes 40 client addresses over both workers: neither gets them all.
    assert 0.5 <= parley["worker_share"] < 1.0


def _figures(config: str, sessions: int, p50: float) -> Figures:
    return Figures(
        config=config,
        sessions=sessions,
        window=64,
        seconds=1.0,
        sent=1000,
        round_trips=990,
        to_node=995,
        to_client=990,
        relay_cpu=0.02,
        stalls=0,
        others=0.0,
        latency_rate=50.0,
        latency_sent=50,
        latency_received=49,
        p50=p50,
        p99=2 * p50,
        latency_relay_cpu=0.001,
        latency_others=0.0,
    )


def test_render_shows_both_paths_and_the_difference() -> None:
    result = BenchResult(
        machine={
            "nproc": 2,
            "cpu_model": "test",
            "python": "3",
            "trio": "0",
            "aioquic": "1",
            "kernel": "6",
            "pinned": True,
        },
        params=Params(sessions=(1,)),
        rows=[_figures("parley", 1, 0.0005), _figures("baseline", 1, 0.0002)],
        elapsed=1.0,
    )
    table = render(result)
    lines = table.splitlines()
    assert any(line.startswith("parley ") for line in lines)
    assert any(line.startswith("baseline ") for line in lines)
    assert "adds 0.300 ms at p50 and 0.600 ms at p99" in table
    assert "1 of 50 paced datagrams lost" in table
    data = result.as_dict()
    json.dumps(data)
    assert math.isclose(data["rows"][0]["packets_per_core"], 1985 / 0.02)
