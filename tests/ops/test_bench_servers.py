"""A bench's servers go with the bench, even when the bench is killed outright."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ops.test_up import alive

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

# A bench in miniature: `parley up` as the scale bench starts it, then nothing until killed.
_BENCH = """
import asyncio, json, sys
from pathlib import Path
from ops.bench.sessions_servers import ClusterServer
server = ClusterServer(Path(sys.argv[1]), {0}, {0})
server.start()
asyncio.run(server.ready())
print(json.dumps(sorted(server.pids())), flush=True)
sys.stdin.read()
"""


def test_a_killed_bench_takes_its_cluster_with_it(tmp_path: Path) -> None:
    bench = subprocess.Popen(
        [sys.executable, "-c", _BENCH, str(tmp_path)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert bench.stdout is not None
        line = bench.stdout.readline()
        assert line, "the bench's cluster did not start"
        pids = json.loads(line)
        assert len(pids) == 3 and all(alive(p) for p in pids)  # parley up, its node and relay
    finally:
        bench.send_signal(signal.SIGKILL)
        bench.wait(10)
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in pids if alive(p)]
    for pid in left:  # do not leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert left == [], "the cluster outlived its bench"
