"""``parley migrate`` and ``parley drain`` keep to their ``--timeout`` as a whole, against a real
etcd: an operator's script that says 15 s gets its answer in 15 s, whatever part of the command
was waiting."""

from __future__ import annotations

import io
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from ops import moving
from ops.etcdserver import EtcdServer
from storage.etcd import Etcd
from storage.keys import Keyspace
from storage.members import Members, NodeInfo
from storage.moves import Moves
from storage.ownership import Owners

WITHIN = 1.0
#: what a bounded command may take past ``WITHIN`` (etcd round trips, the process's own pace)
SLACK = 1.5


async def two_nodes(etcd: Etcd, keys: Keyspace) -> None:
    """Nodes a and b registered active (no process behind them), a owning s1 and s2."""
    members, owners = Members(etcd, keys), Owners(etcd, keys)
    for node in ("a", "b"):
        lease, _ = await etcd.lease_grant(30)
        await members.register_node(NodeInfo(node), lease)
        if node == "a":
            for session in ("s1", "s2"):
                await owners.claim(session, "a", lease, control="c0ffee")


@pytest.fixture
def silent_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A moves watch that etcd never confirms (a member that took the stream and went quiet)."""

    @asynccontextmanager
    async def never(self: Moves) -> AsyncIterator[Any]:
        await trio.sleep_forever()
        yield  # pragma: no cover

    monkeypatch.setattr(Moves, "watch", never)


async def timed(command: Any) -> tuple[int, dict[str, Any] | None, float]:
    """Exit code, the JSON the command printed (None: nothing on stdout), seconds taken."""
    out = io.StringIO()
    started = time.monotonic()
    with trio.fail_after(WITHIN + 10):  # a hang fails the test rather than the run
        code = await command(out)
    lines = out.getvalue().splitlines()
    return code, json.loads(lines[-1]) if lines else None, time.monotonic() - started


async def migrate_s1_to_b(
    etcd_server: EtcdServer, keys: Keyspace
) -> tuple[int, dict[str, Any] | None, float]:
    return await timed(
        lambda out: moving.migrate(
            etcd_server.endpoint, keys.prefix, "s1", "b", within=WITHIN, as_json=True, out=out
        )
    )


async def test_migrate_to_a_node_that_never_takes_it_ends_at_its_timeout(
    etcd_server: EtcdServer, etcd: Etcd, keys: Keyspace
) -> None:
    await two_nodes(etcd, keys)
    code, said, took = await migrate_s1_to_b(etcd_server, keys)
    assert code == 1 and said is not None and said["moved"] is False
    assert said["reason"] == f"no outcome within {WITHIN:g} s (still running)"
    assert WITHIN <= took < WITHIN + SLACK
    assert (await Moves(etcd, keys).get("s1")) is not None  # it was asked, and still stands


@pytest.mark.usefixtures("silent_watch")
async def test_migrate_ends_at_its_timeout_when_etcd_never_confirms_its_watch(
    etcd_server: EtcdServer, etcd: Etcd, keys: Keyspace, capsys: pytest.CaptureFixture[str]
) -> None:
    await two_nodes(etcd, keys)
    code, said, took = await migrate_s1_to_b(etcd_server, keys)
    # etcd's part did not end: exit 2, as for an etcd that does not answer at all
    assert code == 2 and said is None
    assert "did not let the move start within 1 s" in capsys.readouterr().err
    assert took < WITHIN + SLACK
    assert (await Moves(etcd, keys).get("s1")) is None  # nothing was asked


@pytest.mark.usefixtures("silent_watch")
async def test_drain_ends_at_its_timeout_when_etcd_never_confirms_its_watch(
    etcd_server: EtcdServer, etcd: Etcd, keys: Keyspace
) -> None:
    await two_nodes(etcd, keys)
    code, said, took = await timed(
        lambda out: moving.drain(
            etcd_server.endpoint, keys.prefix, "a", within=WITHIN, as_json=True, out=out
        )
    )
    assert code == 1 and said is not None and said["drained"] is False
    assert said["error"] == f"not drained within {WITHIN:g} s"
    assert said["remaining"] == [
        "s1",
        "s2",
    ]  # read after the timeout: the operator sees what is left
    assert took < WITHIN + SLACK
