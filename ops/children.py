"""Child processes that die with their parent, even when the parent is SIGKILLed.

``parley up`` supervises etcd, relays and nodes. If it is killed outright it cannot stop them, so
each child asks the kernel for a signal when its parent dies (``PR_SET_PDEATHSIG``, prctl(2)).
The kernel ties that signal to the parent *thread* that forked the child, not to the process: a
child forked from one of Trio's worker threads (``trio.lowlevel.open_process`` forks there) would
be signalled when that idle thread retires after ten seconds. So :func:`spawn` forks from the
calling thread — the Trio loop's own, which lives as long as ``parley up`` does — and
:func:`wait` waits for the exit through a pidfd without blocking the loop.

Why our own few lines: the standard library has no prctl, and ``python-prctl`` is an unmaintained
C extension; one libc call through ctypes is all it takes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

import trio

log = logging.getLogger("parley.cli")

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl: Callable[..., int] = libc.prctl
    return prctl


# Resolved once in the parent: after fork() the child must not load libraries (a lock another
# thread held at fork time would never be released).
_prctl = _load_prctl()


def die_with_parent(parent_pid: int, signum: int = signal.SIGTERM) -> None:
    """Ask for ``signum`` when the parent exits; if ``parent_pid`` is already gone, send it now."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signum), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signum)


def spawn(
    argv: Sequence[str],
    *,
    stdout: IO[bytes] | int | None = None,
    stderr: IO[bytes] | int | None = None,
    signum: int = signal.SIGTERM,
    new_session: bool = True,
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` from the calling thread; it gets ``signum`` when this process dies.

    ``new_session``: its own session, so Ctrl-C in a terminal reaches only us and we stop the
    children in order.
    """
    parent = os.getpid()
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=new_session,
        preexec_fn=lambda: die_with_parent(parent, signum),
        **popen,
    )


async def wait(process: subprocess.Popen[bytes]) -> int:
    """The exit status of ``process``, waited for without blocking Trio."""
    try:
        fd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return process.wait()
    try:
        await trio.lowlevel.wait_readable(fd)  # readable once the process has exited
    finally:
        os.close(fd)
    return process.wait()


async def stop_on(stop: Callable[[], None], parent_pid: int | None) -> None:
    """Call ``stop`` on SIGTERM or SIGINT, or once process ``parent_pid`` is gone."""

    async def on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("stopping on signal", extra={"signal": signal.Signals(signum).name})
                stop()

    async def watch_parent(pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # already gone
            pass
        else:
            try:
                await trio.lowlevel.wait_readable(fd)  # readable once the process exits
            finally:
                os.close(fd)
        log.warning("parent process is gone; stopping", extra={"parent": pid})
        stop()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signal)
        if parent_pid is not None:
            nursery.start_soon(watch_parent, parent_pid)
