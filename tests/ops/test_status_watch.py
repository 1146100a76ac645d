"""``parley status --watch`` as an operator runs it: a separate process against a real etcd,
refreshing while the cluster changes under it, and ended by Ctrl-C (SIGINT) with exit status 0.

Through a pipe each refresh is a timestamped snapshot after a separator; on a terminal (a pty
here) each one clears the screen and redraws in place.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable

import pytest
import trio

from ops.etcdserver import EtcdServer
from ops.status import CLEAR_HOME, watch_frame
from storage.etcd import open_etcd
from storage.keys import Keyspace
from storage.members import Members, NodeInfo
from tests.helpers import PARLEY

PREFIX = "/parley-watch"
#: generous: two other engineers and a CI run share the machine's two cores
WITHIN = 60.0


def register(endpoint: str, node_id: str) -> None:
    """A node record under a lease, as a node daemon publishes it (the lease outlives the test)."""

    async def main() -> None:
        async with open_etcd(endpoint) as etcd:
            lease, _ = await etcd.lease_grant(60)
            await Members(etcd, Keyspace(PREFIX)).register_node(
                NodeInfo(id=node_id, addresses={"signaling": "ws://127.0.0.1:1/v1/session"}),
                lease,
            )

    trio.run(main)


def read_until(fd: int, done: Callable[[str], bool], process: subprocess.Popen[bytes]) -> str:
    """What ``fd`` yields until ``done(text so far)``; fails after :data:`WITHIN` seconds."""
    text = ""
    deadline = time.monotonic() + WITHIN
    while not done(text):
        left = deadline - time.monotonic()
        if left <= 0 or process.poll() is not None:
            pytest.fail(f"no such output within {WITHIN:.0f} s (exit {process.poll()}):\n{text}")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # a pty whose other end closed
                chunk = b""
            text += chunk.decode(errors="replace")
    return text


def interrupt(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(WITHIN)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("parley status --watch did not stop on SIGINT")


def watch_command(endpoint: str) -> list[str]:
    return [*PARLEY, "status", "--watch", "--interval", "0.3", "--etcd", endpoint]


def test_watch_through_a_pipe_prints_snapshots_until_ctrl_c(etcd_server: EtcdServer) -> None:
    register(etcd_server.endpoint, "watch-a")
    process = subprocess.Popen(
        [*watch_command(etcd_server.endpoint), "--prefix", PREFIX],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        fd = process.stdout.fileno()
        first = read_until(fd, lambda t: t.count("\n--- ") + t.startswith("--- ") >= 2, process)
        assert "watch-a" in first and "watch-b" not in first
        assert CLEAR_HOME not in first  # not a terminal: no escape sequences in a log
        # the cluster changes under the watch: a later refresh shows it
        register(etcd_server.endpoint, "watch-b")
        later = read_until(fd, lambda t: "watch-b" in t, process)
        frames = [f for f in (first + later).split("--- ") if f.strip()]
        assert len(frames) >= 3
        assert "nodes (2)" in frames[-1] or "nodes (2)" in later
    finally:
        code = interrupt(process)
    assert process.stderr is not None
    assert code == 0, process.stderr.read().decode(errors="replace")[-2000:]


def test_watch_on_a_terminal_redraws_in_place(etcd_server: EtcdServer) -> None:
    register(etcd_server.endpoint, "watch-tty")
    controller, terminal = os.openpty()
    process = subprocess.Popen(
        [*watch_command(etcd_server.endpoint), "--prefix", PREFIX],
        stdout=terminal,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    os.close(terminal)
    try:
        text = read_until(controller, lambda t: t.count(CLEAR_HOME) >= 2, process)
        redraws = text.split(CLEAR_HOME)[1:]
        assert all("watch-tty" in r and "Ctrl-C" in r for r in redraws[:1])
    finally:
        code = interrupt(process)
        os.close(controller)
    assert code == 0


def test_watch_keeps_going_when_etcd_is_gone(tmp_path: object) -> None:
    """Nothing listens there: each refresh says etcd did not answer; Ctrl-C still ends it."""
    from ops.etcdserver import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [*watch_command(endpoint), "--prefix", PREFIX],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        read_until(process.stdout.fileno(), lambda t: t.count("did not answer") >= 2, process)
    finally:
        code = interrupt(process)
    assert code == 0


def test_frames() -> None:
    assert watch_frame("x", at=0.0, interval=2, tty=True).startswith(CLEAR_HOME)
    piped = watch_frame("tables", at=0.0, interval=2, tty=False)
    assert piped.startswith("--- ") and "tables" in piped and CLEAR_HOME not in piped
