"""The ops view against a real etcd: ownership changes made with the same storage calls the
nodes make (claim, a planned move, a release, a lost lease and an adoption) show up in
``GET /api/view`` with their reasons; nodes and relays show up in its history; and requests that
are not what it serves, or not HTTP at all, get a clear error while the server carries on.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from ops.etcdserver import EtcdServer
from ops.opsview import OpsView, parse_listen
from storage.etcd import Etcd
from storage.keys import Keyspace
from storage.members import Members, NodeInfo, RelayInfo
from storage.moves import Moves
from storage.ownership import Owners
from tests.helpers import PARLEY, eventually


@pytest.fixture
async def view(etcd: Etcd, keys: Keyspace) -> AsyncIterator[OpsView]:
    async with trio.open_nursery() as nursery:
        opsview = OpsView(etcd, keys, interval=0.2)
        await nursery.start(opsview.run, "127.0.0.1", 0)
        yield opsview
        nursery.cancel_scope.cancel()


def fetch(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


async def api(view: OpsView) -> dict[str, Any]:
    status, kind, body = await trio.to_thread.run_sync(fetch, view.url + "api/view")
    assert status == 200 and kind == "application/json"
    data: dict[str, Any] = json.loads(body)
    return data


async def raw(view: OpsView, data: bytes) -> bytes:
    """Send ``data`` as it is, and read whatever comes back until the server closes."""
    stream = await trio.open_tcp_stream(*view.address)
    async with stream:
        await stream.send_all(data)
        await stream.send_eof()
        answer = b""
        with trio.fail_after(15):
            while chunk := await stream.receive_some(65536):
                answer += chunk
    return answer


async def test_ownership_changes_reach_the_page_with_their_reasons(
    etcd: Etcd, keys: Keyspace, view: OpsView
) -> None:
    owners, moves, members = Owners(etcd, keys), Moves(etcd, keys), Members(etcd, keys)
    lease1, _ = await etcd.lease_grant(30)
    lease2, _ = await etcd.lease_grant(30)
    await members.register_node(NodeInfo(id="n1", sessions=2), lease1)
    await members.register_relay(
        RelayInfo(id="r1", tunnel=("127.0.0.1", 1), counters={"client_in": 5, "client_out": 5}),
        lease2,
    )
    await eventually(lambda: api(view), lambda v: len(v["points"]) >= 2, within=30)

    await owners.claim("s1", "n1", lease1)
    await owners.claim("s2", "n1", lease1)
    move = await moves.request("s1", "n2")
    move = await moves.ready(move, b"sealed", quiesced_at=time.time())
    done = await moves.take(move, lease2)
    await owners.release("s1", done.new_epoch)
    await etcd.lease_revoke(lease1)  # n1 dies: s2 loses its owner, its checkpoint would stay
    await owners.claim("s2", "n2", lease2)

    def complete(v: dict[str, Any]) -> bool:
        return len(v["changes"]) >= 6

    found = await eventually(lambda: api(view), complete, within=30)
    got = [(c["session"], c["what"], c["reason"]) for c in reversed(found["changes"])]
    assert got == [
        ("s1", "claimed", "new session"),
        ("s2", "claimed", "new session"),
        ("s1", "moved", "planned move (migrate) from n1"),
        ("s1", "ended", "ended"),
        ("s2", "lost", "owner n1 lost its lease"),
        ("s2", "adopted", "failover: n1 lost its lease"),
    ]
    assert any("n1" in p["nodes"] for p in found["points"])
    assert found["error"] == "" and found["samples"] >= 2


async def test_the_page_and_clear_errors(view: OpsView) -> None:
    status, kind, page = await trio.to_thread.run_sync(fetch, view.url)
    assert status == 200 and kind.startswith("text/html")
    assert b"<canvas" in page and b"api/view" in page
    assert b"http://" not in page.replace(b"http://www.w3.org", b"")  # nothing from elsewhere
    status, _, body = await trio.to_thread.run_sync(fetch, view.url + "nope")
    assert status == 404 and b"api/view" in body
    status, _, body = await trio.to_thread.run_sync(fetch, view.url + "api/view", "POST")
    assert status == 405
    assert (await raw(view, b"\x16\x03\x01 not http at all\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await raw(view, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")).startswith(
        b"HTTP/1.1 400 "
    )
    assert (await raw(view, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n")).startswith(
        b"HTTP/1.1 431 "
    )
    assert await raw(view, b"") == b""  # connected and left without a word
    # still serving
    status, _, _ = await trio.to_thread.run_sync(fetch, view.url + "api/view")
    assert status == 200


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8770") == ("127.0.0.1", 8770)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8770", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)


def test_parley_opsview_serves_until_ctrl_c(etcd_server: EtcdServer) -> None:
    argv = [*PARLEY, "opsview", "--etcd", etcd_server.endpoint, "--interval", "0.2"]
    process = subprocess.Popen(
        [*argv, "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        found = re.match(r"ops page: (http://127\.0\.0\.1:\d+/) ", line)
        assert found is not None, line
        deadline = time.monotonic() + 60
        while json.loads(fetch(found[1] + "api/view")[2])["samples"] < 2:
            assert time.monotonic() < deadline, "no samples within 60 s"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
    assert code == 0
    bad = subprocess.run([*argv, "--listen", "nowhere"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
