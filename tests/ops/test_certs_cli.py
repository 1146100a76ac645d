"""`parley certs` and the configuration errors of cluster mode, as an operator meets them."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from ops.config import ConfigError, load_config, load_credentials, load_secrets
from relay.tunnel.certs import Identity
from storage.members import RelayInfo
from tests.helpers import PARLEY


def parley(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PARLEY, *args], capture_output=True, text=True, timeout=60)


def test_init_issue_and_load(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    out = parley("certs", "init", "--dir", str(certs))
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE((certs / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((certs / "hint.secret").stat().st_mode) == 0o600
    again = parley("certs", "init", "--dir", str(certs))
    assert again.returncode == 2 and "already exists" in again.stderr  # never silently replaced
    assert parley("certs", "issue", "--dir", str(certs), "relay", "r1").returncode == 0
    config = load_config(env={}, overrides={"cluster": {"certs": str(certs)}})
    assert load_credentials(config, "relay", "r1").identity == Identity("relay", "r1")
    assert len(load_secrets(config)[0]) == 32
    with pytest.raises(ConfigError, match="parley certs issue"):
        load_credentials(config, "node", "n1")


def test_relay_without_certs_is_refused_clearly(tmp_path: Path) -> None:
    out = subprocess.run(
        [*PARLEY, "relay", "--id", "r1", "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PARLEY_CONFIG": "/dev/null"},
    )
    assert out.returncode == 2 and "cluster.certs" in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"node": {"media": "relay"}}, "needs cluster.certs"),
        ({"node": {"media": "udp"}}, "node.media"),
        ({"relay": {"listen": "localhost:3478"}}, "relay.listen"),
        ({"relay": {"listen": "127.0.0.1:1,127.0.0.2:2"}}, "one IPv4"),
        ({"relay": {"listen": "127.0.0.1:70000"}}, "out of range"),
        ({"relay": {"receive_buffer": -1}}, "receive_buffer"),
    ],
)
def test_bad_cluster_settings_are_refused(
    settings: dict[str, dict[str, str]], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(env={}, overrides=settings)


def test_relay_records_round_trip_and_refuse_garbage() -> None:
    info = RelayInfo(id="r1", public=(("127.0.0.1", 3478), ("::1", 3478)), tunnel=("127.0.0.1", 9))
    assert RelayInfo.decode(info.encode()) == info
    for bad in (b"[]", b"{}", b'{"id": "r1", "tunnel": ["x"]}', b"\xff"):
        with pytest.raises(ValueError):
            RelayInfo.decode(bad)
