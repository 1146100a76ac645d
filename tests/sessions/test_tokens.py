"""Access tokens at the signaling door (issue #15): who may open, and end, a session.

A real signaling server over real sockets, with a fake backend (tests/sessions/test_signaling.py)
and token keys made as `parley certs init` makes them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

from relay.settings import ClusterSettings, SettingsError
from sessions.node.settings import NodeSettings
from sessions.node.signaling import Gate, SignalingServer, node_gate
from sessions.node.tokens import TokenRefused, TokenVerifier, mint_token
from tests.helpers import PARLEY, bearer, make_token, token_keys
from tests.sessions.test_signaling import FAST, FakeBackend, Reply, http, receive, send

SDP = [("Content-Type", "application/sdp")]


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return token_keys(tmp_path / "certs")


def expired(certs: Path) -> str:
    """A token of the cluster's key that expired an hour ago."""
    kid, key = ClusterSettings(certs=str(certs)).token_signer() or ("", None)
    assert key is not None
    return mint_token(key, kid, subject="late", ttl=60, now=time.time() - 3600)


def token_gate(certs: Path, agent: str = "echo") -> Gate:
    cluster = ClusterSettings(certs=str(certs))
    return Gate("token", verifier=TokenVerifier(cluster.token_keys()), agent=agent)


async def serve(nursery: trio.Nursery, backend: FakeBackend, gate: Gate | None) -> SignalingServer:
    server = SignalingServer(backend, limits=FAST, gate=gate)
    started: SignalingServer = await nursery.start(server.run)
    return started


async def post(server: SignalingServer, token: str | None = None, sdp: str = "v=0 ok") -> Reply:
    headers = [*SDP, bearer(token)] if token is not None else SDP
    return await http(server, "POST", "/v1/session", headers=headers, body=sdp.encode())


def refused(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, reply
    assert reply.json()["code"] == code
    if status == 401:
        assert reply.headers["www-authenticate"].startswith("Bearer")


# -- the verifier --------------------------------------------------------------------------------


def test_a_token_carries_its_claims(certs: Path) -> None:
    token = make_token(certs, subject="alice", agent="echo", room="r1", max_sessions=2, ttl=60)
    grant = TokenVerifier(ClusterSettings(certs=str(certs)).token_keys()).verify(token)
    assert (grant.subject, grant.agent, grant.room, grant.max_sessions) == (
        "alice",
        "echo",
        "r1",
        2,
    )
    assert time.time() + 50 < grant.expires <= time.time() + 61


def test_bad_tokens_are_refused_with_their_code(certs: Path, tmp_path: Path) -> None:
    verifier = TokenVerifier(ClusterSettings(certs=str(certs)).token_keys())
    other = make_token(token_keys(tmp_path / "other"), subject="mallory")
    kid, key = ClusterSettings(certs=str(certs)).token_signer() or ("", None)
    assert key is not None
    old = mint_token(key, kid, subject="bob", ttl=60, now=time.time() - 3600)
    cases = {
        None: "token_missing",
        "": "token_missing",
        "not a token": "token_invalid",
        other: "token_invalid",  # signed by a key this cluster does not have
        old: "token_expired",
        old[:-4] + "AAAA": "token_invalid",  # a forged signature is invalid before it is old
    }
    for token, code in cases.items():
        with pytest.raises(TokenRefused) as info:
            verifier.verify(token)
        assert info.value.code == code, token


def test_a_node_in_token_mode_without_keys_does_not_start(tmp_path: Path) -> None:
    setup = SimpleNamespace(cluster=ClusterSettings(certs=str(tmp_path)), node=NodeSettings())
    with pytest.raises(SettingsError, match="token keys"):
        node_gate(setup)
    open_setup = SimpleNamespace(cluster=ClusterSettings(), node=NodeSettings(auth="open"))
    assert node_gate(open_setup).mode == "open"
    with pytest.raises(ValueError):
        NodeSettings(auth="none")


# -- WHIP ----------------------------------------------------------------------------------------


async def test_whip_post_needs_a_valid_token(nursery: trio.Nursery, certs: Path) -> None:
    backend = FakeBackend()
    server = await serve(nursery, backend, token_gate(certs))
    refused(await post(server), 401, "token_missing")
    refused(await post(server, "garbage"), 401, "token_invalid")
    refused(await post(server, expired(certs)), 401, "token_expired")
    refused(await post(server, make_token(certs, agent="bridge")), 403, "token_forbidden")
    # ?token= works for clients that cannot set headers
    query = f"/v1/session?token={make_token(certs)}"
    reply = await http(server, "POST", query, headers=SDP, body=b"v=0 ok")
    assert reply.status == 201
    assert (await post(server, make_token(certs, agent="echo"))).status == 201
    assert len(backend.opened) == 2  # no refused offer reached the backend
    for code in ("token_missing", "token_invalid", "token_expired", "token_forbidden"):
        assert server.counters[code] == 1
        assert server.published_counters()[f"signaling_{code}"] == 1


async def test_max_sessions_limits_a_subject_until_one_ends(
    nursery: trio.Nursery, certs: Path
) -> None:
    backend = FakeBackend()
    server = await serve(nursery, backend, token_gate(certs))
    token = make_token(certs, subject="carol", max_sessions=2)
    first, second = await post(server, token), await post(server, token)
    assert first.status == second.status == 201
    refused(await post(server, token), 403, "token_forbidden")
    assert (await post(server, make_token(certs, subject="dave"))).status == 201  # others go on
    # the first session ends: its slot is free again
    location = first.headers["location"]
    assert (await http(server, "DELETE", location, headers=[bearer(token)])).status == 200
    await trio.testing.wait_all_tasks_blocked()  # the session's watcher has let go of it
    assert (await post(server, token)).status == 201


async def test_rotation_accepts_tokens_of_every_key(
    nursery: trio.Nursery, certs: Path, tmp_path: Path
) -> None:
    before = make_token(certs, subject="old")
    out = await trio.run_process(
        [*PARLEY, "token", "rotate", "--certs", str(certs)], capture_stdout=True
    )
    assert out.stdout.decode().count("wrote") == 2
    after = make_token(certs, subject="new")
    # the newest key signs
    assert json.loads(_segment(after))["kid"] != json.loads(_segment(before))["kid"]
    server = await serve(nursery, FakeBackend(), token_gate(certs))
    assert (await post(server, before)).status == 201
    assert (await post(server, after)).status == 201
    # retiring the old public key retires its tokens
    old_kid = json.loads(_segment(before))["kid"]
    (certs / "token-keys" / f"{old_kid}.pub").unlink()
    server = await serve(nursery, FakeBackend(), token_gate(certs))
    refused(await post(server, before), 401, "token_invalid")
    assert (await post(server, after)).status == 201


def _segment(token: str) -> str:
    import base64

    head = token.split(".")[0]
    return base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)).decode()


async def test_parley_token_create_is_accepted(nursery: trio.Nursery, certs: Path) -> None:
    argv = [*PARLEY, "token", "create", "--certs", str(certs), "--sub", "script", "--ttl", "60"]
    out = await trio.run_process(argv, capture_stdout=True)
    token = out.stdout.decode().strip()
    assert token.count(".") == 2 and "\n" not in token
    server = await serve(nursery, FakeBackend(), token_gate(certs))
    assert (await post(server, token)).status == 201
    out = await trio.run_process([*argv, "--region", "eu-west"], capture_stdout=True)
    verifier = TokenVerifier(ClusterSettings(certs=str(certs)).token_keys())
    assert verifier.verify(out.stdout.decode().strip()).region == "eu-west"
    bad = await trio.run_process([*argv, "--region", "EU"], capture_stderr=True, check=False)
    assert bad.returncode == 2 and b"region" in bad.stderr


# -- ending a WHIP session ---------------------------------------------------------------------


async def test_delete_needs_the_secret_and_a_token_of_the_subject(
    nursery: trio.Nursery, certs: Path
) -> None:
    backend = FakeBackend()
    server = await serve(nursery, backend, token_gate(certs))
    alice = make_token(certs, subject="alice")
    location = (await post(server, alice)).headers["location"]
    session_id = location.split("/")[3]
    # the session id alone (public in every STUN check) controls nothing, token or not
    for headers in ([], [bearer(alice)], [bearer(make_token(certs, subject="mallory"))]):
        reply = await http(server, "DELETE", f"/v1/session/{session_id}", headers=headers)
        assert reply.status == 403
    # the session URL without a token, or with another subject's, is refused too
    refused(await http(server, "DELETE", location), 401, "token_missing")
    mallory = make_token(certs, subject="mallory")
    refused(
        await http(server, "DELETE", location, headers=[bearer(mallory)]), 403, "token_forbidden"
    )
    assert session_id in backend.senders  # still live
    assert (await http(server, "DELETE", location, headers=[bearer(alice)])).status == 200
    assert session_id not in backend.senders


# -- WebSocket -----------------------------------------------------------------------------------


async def ws_offer(
    url: str, offer: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> dict[str, Any]:
    async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
        await send(ws, offer)
        reply = await receive(ws)
        if reply["type"] == "error":
            # the socket stays open: a ping is still answered
            await send(ws, {"type": "ping"})
            assert (await receive(ws))["type"] == "pong"
        return reply


async def test_websocket_offers_need_a_token(nursery: trio.Nursery, certs: Path) -> None:
    server = await serve(nursery, FakeBackend(), token_gate(certs))
    url = server.urls()["signaling"]
    plain = {"type": "offer", "sdp": "v=0 ok"}
    reply = await ws_offer(url, plain)
    assert (reply["type"], reply["code"]) == ("error", "token_missing")
    reply = await ws_offer(url, {**plain, "token": expired(certs)})
    assert reply["code"] == "token_expired"
    reply = await ws_offer(url, {**plain, "token": make_token(certs, agent="turn-echo")})
    assert reply["code"] == "token_forbidden"
    # the token may come in the offer, in the upgrade's Authorization, or in ?token=
    assert (await ws_offer(url, {**plain, "token": make_token(certs)}))["type"] == "answer"
    reply = await ws_offer(url, plain, [(b"Authorization", f"Bearer {make_token(certs)}".encode())])
    assert reply["type"] == "answer"
    reply = await ws_offer(f"{url}?token={make_token(certs)}", plain)
    assert reply["type"] == "answer"


async def test_attach_needs_no_token(nursery: trio.Nursery, certs: Path) -> None:
    server = await serve(nursery, FakeBackend(), token_gate(certs))
    url = server.urls()["signaling"]
    async with trio_websocket.open_websocket_url(url) as first:
        await send(first, {"type": "offer", "sdp": "v=0 ok", "token": make_token(certs)})
        answer = await receive(first)
        async with trio_websocket.open_websocket_url(url) as second:
            await send(
                second, {"type": "attach", "session": answer["session"], "secret": answer["secret"]}
            )
            assert (await receive(second))["type"] == "attached"


# -- open mode, the demo token, what a node publishes --------------------------------------------


async def test_open_mode_admits_anyone(nursery: trio.Nursery) -> None:
    server = await serve(nursery, FakeBackend(), Gate.open())
    assert (await post(server)).status == 201


async def test_a_backend_without_settings_fails_closed(nursery: trio.Nursery) -> None:
    server = await serve(nursery, FakeBackend(), None)
    refused(await post(server, "anything"), 401, "token_invalid")


async def test_demo_token_only_where_minted(nursery: trio.Nursery, certs: Path) -> None:
    cluster = ClusterSettings(certs=str(certs))
    minting = Gate(
        "token",
        verifier=TokenVerifier(cluster.token_keys()),
        agent="echo",
        demo_signer=cluster.token_signer(),
    )
    server = await serve(nursery, FakeBackend(), minting)
    reply = await http(server, "GET", "/v1/demo-token")
    assert reply.status == 200 and reply.headers["cache-control"] == "no-store"
    minted = reply.json()
    assert minted["expires"] <= time.time() + 301
    assert (await post(server, minted["token"])).status == 201
    plain = await serve(nursery, FakeBackend(), token_gate(certs))
    assert (await http(plain, "GET", "/v1/demo-token")).status == 404


async def test_the_node_registration_shows_the_mode_and_counters(nursery: trio.Nursery) -> None:
    node = SimpleNamespace(addresses={}, counters_source=lambda: {"rx": 1}, config=None)
    backend = FakeBackend()
    backend.node = node  # type: ignore[attr-defined]
    server = await serve(nursery, backend, Gate.open())
    assert node.addresses == {"auth": "open"}
    await post(server)
    counters = node.counters_source()
    assert counters["rx"] == 1 and counters["signaling_sessions_opened"] == 1
