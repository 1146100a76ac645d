"""Which programs the test run starts, checked against what README's test command installs.

CI runs on a machine where earlier work may have installed programs by hand, so a green run
there can hide a missing install step (it did: the tests called ``etcdctl`` and nothing installed
Debian's ``etcd-client``). Every process that the test run or its scenario scripts start is
recorded through a Python audit hook (the ``subprocess.Popen`` event, which ``subprocess.run``,
``trio.run_process`` and ``trio.lowlevel.open_process`` all raise), and at the end of the session
each program outside the virtual environment must belong to a Debian package that
``ops/bootstrap.sh`` installs for the tests, or to Debian's required base that every Debian
system has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: the file every process of the test run appends the programs it starts to
AUDIT_ENV = "PARLEY_TEST_PROGRAMS"


def _program(event_args: Sequence[Any]) -> str | None:
    executable, args = event_args[0], event_args[1]
    name = executable
    if name is None:
        if isinstance(args, str | bytes | os.PathLike):
            name = args
        elif args:
            name = args[0]
    if name is None:
        return None
    name = os.fsdecode(name)
    if os.sep not in name:
        env = event_args[3] if len(event_args) > 3 else None
        path = (env or {}).get("PATH") if isinstance(env, dict) else None
        name = shutil.which(name, path=path) or name
    return os.path.abspath(name) if os.sep in name else name


def record_to(path: str | os.PathLike[str]) -> None:
    """Append every program this process starts to ``path``, one per line."""
    target = os.fspath(path)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event != "subprocess.Popen":
            return
        try:
            program = _program(args)
        except Exception:  # an audit hook must never break the call it watches
            return
        if program:
            # One short O_APPEND write per line: concurrent processes do not interleave. The
            # file is made before the run; once the run has read and removed it, nothing more.
            try:
                fd = os.open(target, os.O_WRONLY | os.O_APPEND)
            except OSError:
                return
            try:
                os.write(fd, (program + "\n").encode())
            finally:
                os.close(fd)

    sys.addaudithook(hook)


def record_from_env() -> None:
    """In a scenario script the tests start: record into the test run's file, if there is one."""
    path = os.environ.get(AUDIT_ENV)
    if path:
        record_to(path)


def bootstrap_packages(mode: str = "test") -> set[str]:
    """The Debian packages ``bash ops/bootstrap.sh MODE`` installs."""
    out = subprocess.run(
        ["bash", str(ROOT / "ops" / "bootstrap.sh"), "packages", mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return set(out.stdout.split())


@cache
def debian_owner(program: str) -> str | None:
    """The Debian package that installed ``program``, or None (also with no dpkg)."""
    candidates = [program, os.path.realpath(program)]
    # Merged /usr: dpkg may know /bin/x while PATH finds /usr/bin/x, and the other way round.
    for path in list(candidates):
        if path.startswith("/usr/bin/") or path.startswith("/usr/sbin/"):
            candidates.append(path.removeprefix("/usr"))
        elif path.startswith("/bin/") or path.startswith("/sbin/"):
            candidates.append("/usr" + path)
    for path in dict.fromkeys(candidates):
        try:
            out = subprocess.run(
                ["dpkg-query", "-S", path], capture_output=True, text=True, timeout=30
            )
        except FileNotFoundError:
            return None
        # "pkg: /path", or "pkg:arch: /path", or "pkg1, pkg2: /path" for shared directories;
        # a diverted file (/bin/sh) is listed after lines "diversion by pkg from/to: ..."
        owners = [line for line in out.stdout.splitlines() if not line.startswith("diversion by ")]
        if out.returncode == 0 and owners and ":" in owners[0]:
            return owners[0].split(":", 1)[0].split(",")[0].strip()
    return None


@cache
def is_base_package(package: str) -> bool:
    """Essential or of required priority: on every Debian system, even a minimal container."""
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Essential} ${Priority}", package],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.returncode == 0 and (out.stdout.startswith("yes") or "required" in out.stdout)


def _ours(program: str) -> bool:
    """Python itself and whatever the virtual environment installed."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(ROOT / ".venv")}
    if program in (sys.executable, os.path.realpath(sys.executable)):
        return True
    return any(program.startswith(root.rstrip("/") + "/") for root in roots)


def unprovided(programs: Iterable[str], packages: set[str]) -> list[str]:
    """The programs in ``programs`` that neither the venv nor ``packages`` (nor Debian's base)
    provide, each with what provides it here, sorted."""
    missing = []
    for program in sorted(set(programs)):
        if _ours(program):
            continue
        if os.sep not in program:
            missing.append(f"{program} (not found on PATH)")
            continue
        owner = debian_owner(program)
        if owner is None:
            missing.append(f"{program} (installed by hand: no Debian package owns it)")
        elif owner not in packages and not is_base_package(owner):
            missing.append(
                f"{program} (from Debian's {owner}, which bootstrap.sh does not install)"
            )
    return missing


def have_dpkg() -> bool:
    return shutil.which("dpkg-query") is not None
