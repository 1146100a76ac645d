"""``parley relay --workers N``: N relay processes behind one public port.

Each worker is a whole relay (relay/daemon.py) bound to the same public address with
SO_REUSEPORT; the kernel hashes every client (address and port) to one worker's socket, so a
client's packets always reach the worker that cached it. Workers share the relay's certificate
and register apart (``relay-1.w0``, ``relay-1.w1``...) with a tunnel endpoint each: a node keeps
a tunnel to every worker and answers a client through the worker it heard the client from.

This process only supervises: it starts the workers with its own command line, restarts one that
exits (with backoff), and stops them all on SIGTERM or SIGINT. A restarted worker rejoins the
port's group; while one is missing the kernel hashes its clients to the others, which do not
know them and drop their media until the clients' next connectivity check (a few seconds).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import trio

from ops import children
from ops.children import stop_on

log = logging.getLogger("parley.relay")

#: how long stopping workers get before they are killed
STOP_GRACE = 10.0
_MAX_BACKOFF = 10.0


def run_relay_workers(
    relay_id: str, workers: int, argv: Sequence[str], parent_pid: int | None
) -> int:
    """Supervise ``workers`` processes of ``parley relay`` (``argv`` is this one's command line)
    until a signal, or until ``parent_pid`` is gone. Returns the exit status."""

    async def main() -> None:
        processes: dict[int, subprocess.Popen[bytes]] = {}
        async with trio.open_nursery() as nursery:
            for worker in range(workers):
                nursery.start_soon(_keep, relay_id, worker, argv, processes)
            await stop_on(nursery.cancel_scope.cancel, parent_pid)
        with trio.CancelScope(shield=True):
            await _stop(processes)

    log.info("relay workers starting", extra={"relay": relay_id, "workers": workers})
    trio.run(main)
    log.info("relay workers stopped", extra={"relay": relay_id})
    return 0


async def _keep(
    relay_id: str, worker: int, argv: Sequence[str], processes: dict[int, subprocess.Popen[bytes]]
) -> None:
    command = [
        sys.executable, "-m", "ops.cli", *argv,
        "--id", relay_id, "--worker", str(worker), "--parent-pid", str(os.getpid()),
    ]  # fmt: skip
    backoff = 0.5
    while True:
        started = trio.current_time()
        # Forked from the loop's thread: a worker gets SIGTERM if this process dies, even by
        # SIGKILL (ops/children.py); it also watches our pid (--parent-pid).
        process = children.spawn(command, new_session=False)
        processes[worker] = process
        code = await children.wait(process)
        if trio.current_time() - started > 30.0:
            backoff = 0.5  # it ran for a while: a fresh failure, not a crash loop
        log.warning(
            "relay worker exited; restarting",
            extra={"relay": relay_id, "worker": worker, "code": code, "retry_in": backoff},
        )
        await trio.sleep(backoff)
        backoff = min(backoff * 2, _MAX_BACKOFF)


async def _stop(processes: dict[int, subprocess.Popen[bytes]]) -> None:
    running = [p for p in processes.values() if p.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    with trio.move_on_after(STOP_GRACE):
        for process in running:
            await children.wait(process)
    for process in running:
        if process.poll() is None:
            process.kill()
            await children.wait(process)
