"""`parley up` serves the ops page and prints its URL beside the demo pages; the page's data
shows the cluster it started; and `parley status --watch` follows that cluster (TLS etcd, the
operator's certificate) until Ctrl-C."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.etcdserver import free_port
from tests.helpers import PARLEY
from tests.ops.test_processes import wait_for
from tests.ops.test_status_watch import interrupt, read_until
from tests.ops.test_up import Up

pytestmark = pytest.mark.slow


@pytest.fixture
def up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Up]:
    # any free port: other clusters on this machine may hold the default one
    monkeypatch.setenv("PARLEY_UP_OPSVIEW_LISTEN", "127.0.0.1:0")
    cluster = Up(tmp_path / "data", port=free_port())
    try:
        yield cluster
    finally:
        cluster.close()


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read()


def test_parley_up_serves_the_ops_page_of_its_cluster(up: Up) -> None:
    up.wait_for_line("parley is up", within=120)
    text = up.text
    url = re.search(r"^ops page: (http://127\.0\.0\.1:\d+/)", text, re.MULTILINE)
    assert url is not None, text
    # printed after the demo pages, which it sits beside
    assert text.index("demo: open a node's page") < url.start()
    status, kind, page = get(url[1])
    assert status == 200 and kind.startswith("text/html") and b"<canvas" in page

    def cluster_seen() -> dict[str, Any] | None:
        view: dict[str, Any] = json.loads(get(url[1] + "api/view")[2])
        points = view["points"]
        if len(points) < 2 or set(points[-1]["nodes"]) != {"node-1", "node-2"}:
            return None
        return view if "relay-1" in points[-1]["relays"] else None

    view = wait_for(cluster_seen, 60, "the ops view of the nodes and relay-1")
    assert view["error"] == ""

    # `parley status --watch` against the same cluster, as an operator types it
    watch = subprocess.Popen(
        [*PARLEY, "status", "--watch", "--interval", "0.5", "--etcd", up.endpoint,
         "--certs", str(up.certs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert watch.stdout is not None
        frames = read_until(watch.stdout.fileno(), lambda t: t.count("--- ") >= 2, watch)
        assert "node-1" in frames and "relay-1" in frames
    finally:
        assert interrupt(watch) == 0

    up.process.send_signal(signal.SIGINT)
    assert up.process.wait(60) == 0
    started = time.monotonic()
    with pytest.raises(OSError):  # the page went with the cluster
        get(url[1])
    assert time.monotonic() - started < 30


def test_a_busy_ops_page_address_costs_the_page_not_the_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        monkeypatch.setenv("PARLEY_UP_OPSVIEW_LISTEN", listen)
        cluster = Up(tmp_path / "data", port=free_port(), nodes=1, relays=0)
        try:
            cluster.wait_for_line("parley is up", within=120)
            assert f"ops page: cannot serve on {listen}" in cluster.text
            assert "node-1" in json.dumps(cluster.status())
            cluster.process.send_signal(signal.SIGINT)
            assert cluster.process.wait(60) == 0
        finally:
            cluster.close()
