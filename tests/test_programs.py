"""README's test command installs every program the tests start (tests/programs.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.programs import (
    AUDIT_ENV,
    ROOT,
    bootstrap_packages,
    debian_owner,
    have_dpkg,
    unprovided,
)

needs_dpkg = pytest.mark.skipif(not have_dpkg(), reason="not a Debian system")

CHILD = """
import subprocess, sys
sys.path.insert(0, sys.argv[1])
from tests.programs import record_from_env
record_from_env()
subprocess.run(["true"], check=True)
subprocess.run([sys.executable, "-c", "pass"], check=True)
"""


def test_a_child_process_records_the_programs_it_starts(tmp_path: Path) -> None:
    log = tmp_path / "programs"
    log.touch()
    env = {"PATH": "/usr/bin:/bin", AUDIT_ENV: str(log)}
    subprocess.run([sys.executable, "-c", CHILD, str(ROOT)], check=True, env=env, timeout=60)
    recorded = log.read_text().split()
    assert recorded[0].endswith("/true") and recorded[0].startswith("/")
    assert recorded[1] == sys.executable


def test_the_test_command_installs_what_the_up_command_does_and_the_test_tools() -> None:
    up, test = bootstrap_packages("up"), bootstrap_packages("test")
    assert {"etcd-server", "libopus0"} <= up <= test
    assert {"etcd-client", "espeak-ng", "chromium", "systemd"} <= test


@needs_dpkg
def test_a_program_from_a_package_bootstrap_does_not_install_is_named() -> None:
    # coreutils is Essential (on every Debian system): `true` always passes.
    true = "/usr/bin/true" if Path("/usr/bin/true").exists() else "/bin/true"
    assert debian_owner(true) == "coreutils"
    assert unprovided([true, sys.executable], set()) == []
    # A program from a package the list lacks (etcdctl, the very case that went unnoticed): named.
    etcdctl = "/usr/bin/etcdctl"
    if debian_owner(etcdctl) is None:
        pytest.skip("etcd-client is not installed here")
    (line,) = unprovided([etcdctl], {"etcd-server"})
    assert "etcdctl" in line and "etcd-client" in line
    assert unprovided([etcdctl], bootstrap_packages("test")) == []


@needs_dpkg
def test_a_diverted_program_belongs_to_the_package_that_diverts_it() -> None:
    # dpkg lists /bin/sh after two "diversion by dash from/to" lines; dash owns it (Essential).
    assert debian_owner("/bin/sh") == "dash"
    assert unprovided(["/bin/sh"], set()) == []


@needs_dpkg
def test_a_program_installed_by_hand_or_missing_is_named(tmp_path: Path) -> None:
    by_hand = tmp_path / "tool"
    by_hand.write_text("#!/bin/sh\n")
    assert "installed by hand" in unprovided([str(by_hand)], set())[0]
    assert "not found" in unprovided(["no-such-program-anywhere"], set())[0]
