"""The relay bench runs end to end and reports sane figures (a tiny run, not a benchmark)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import attrs

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
        # Phase 3: the echo nodes answer on a 20 ms grid, as a node sends. With 10 sessions
        # taking turns every 2 ms, the echoes wait for their grid points about 10 ms at the
        # median, which answering at once does not. (One session sends every 20 ms, in step
        # with the grid: its wait is whatever its phase is.)
        assert row["grid_received"] > 0 and row["grid_cpu_per_packet"] > 0, key
        assert row["grid_p99"] < 0.1, key
        if key[1] == 10:
            assert row["grid_p50"] > row["p50"] + 0.004, key
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
        grid_sent=50,
        grid_received=50,
        grid_p50=0.01 + p50,
        grid_p99=0.02 + p50,
        grid_relay_cpu=0.0005 if config == "parley" else 0.0002,
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
    assert "sending on a 20 ms grid" in table
    # relay_cpu 0.02 over a 1 s window: the relay was far from full, and the line says so
    assert "the relay used 0.02 of a core: the echo node and the load generator" in table
    busy = attrs.evolve(result, rows=[attrs.evolve(result.rows[0], relay_cpu=0.95), result.rows[1]])
    assert "not the relay, bounded" not in render(busy)
    (grid,) = [line for line in lines if line.startswith("       1      50")]
    assert "2.5x" in grid and "10.500 / 20.500" in grid and "10.200 / 20.200" in grid
    data = result.as_dict()
    json.dumps(data)
    assert math.isclose(data["rows"][0]["packets_per_core"], 1985 / 0.02)
