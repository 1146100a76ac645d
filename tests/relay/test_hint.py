"""The routing hint in the server ufrag: round trips, authentication, bounds, interop."""

from __future__ import annotations

import re
import secrets

import pytest
from aioice import stun as aioice_stun
from aioice.ice import validate_username
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.tunnel import hint as hint_module
from relay.tunnel.hint import MAX_UFRAG_LENGTH, Hint, mint_ufrag, read_hint
from sessions.node.host import new_session_id
from sessions.webrtc import stun

SECRET = b"cluster secret, 32 bytes long..."
OLD_SECRET = b"the previous cluster secret....."
ICE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
ID_CHARS = ICE_CHARS[:62] + "._~-"
UFRAG = re.compile(r"[A-Za-z0-9+/]{4,256}")  # RFC 8839 §5.4

ids = st.text(alphabet=ID_CHARS, min_size=1, max_size=128)
short_ids = st.text(alphabet=ID_CHARS, min_size=1, max_size=40)


def encoded_length(name: str) -> int:
    """Characters an id takes in the ufrag: 1, or 2 for . _ ~ (the escapes)."""
    return sum(2 if c in "._~" else 1 for c in name)


@given(session=short_ids, node=short_ids)
def test_round_trip(session: str, node: str) -> None:
    ufrag = mint_ufrag(session, node, SECRET)
    assert UFRAG.fullmatch(ufrag)
    assert read_hint(ufrag, SECRET) == Hint(session=session, node=node)


@given(session=ids, node=ids)
def test_long_ids_fit_or_are_refused(session: str, node: str) -> None:
    needed = 1 + encoded_length(session) + 2 + encoded_length(node) + 8 + 16
    if needed > MAX_UFRAG_LENGTH:
        with pytest.raises(ValueError, match="too long"):
            mint_ufrag(session, node, SECRET)
        return
    ufrag = mint_ufrag(session, node, SECRET)
    assert len(ufrag) == needed
    assert UFRAG.fullmatch(ufrag)
    assert read_hint(ufrag, SECRET) == Hint(session, node)


def test_typical_ids_fit_in_64_characters() -> None:
    for _ in range(100):
        ufrag = mint_ufrag(new_session_id(), "node-17-chars-abc", SECRET)
        assert 4 <= len(ufrag) <= 64
    shortest = mint_ufrag("s", "n", SECRET)
    assert len(shortest) >= 4 and read_hint(shortest, SECRET) == Hint("s", "n")


def test_special_characters_are_escaped_to_ice_chars() -> None:
    ufrag = mint_ufrag("a.b_c~d-e", "-._~", SECRET)
    assert UFRAG.fullmatch(ufrag)
    assert read_hint(ufrag, SECRET) == Hint("a.b_c~d-e", "-._~")


def test_every_single_character_mutation_is_rejected() -> None:
    ufrag = mint_ufrag("Sess.ion_1~x", "node-a", SECRET)
    assert read_hint(ufrag, SECRET) is not None
    mutants: set[str] = set()
    for i in range(len(ufrag)):
        mutants.add(ufrag[:i] + ufrag[i + 1 :])  # deletion
        for c in ICE_CHARS + ":= é\x00":
            mutants.add(ufrag[:i] + c + ufrag[i + 1 :])  # substitution
            mutants.add(ufrag[:i] + c + ufrag[i:])  # insertion
    for c in ICE_CHARS:
        mutants.add(ufrag + c)
    mutants.discard(ufrag)
    assert len(mutants) > 5_000
    accepted = [m for m in mutants if read_hint(m, SECRET) is not None]
    assert accepted == []


def test_wrong_secret_is_rejected_and_secrets_rotate() -> None:
    old = mint_ufrag("s1", "node-a", OLD_SECRET)
    new = mint_ufrag("s1", "node-a", SECRET)
    assert read_hint(old, SECRET) is None
    assert read_hint(new, OLD_SECRET) is None
    # During a rotation the relay accepts both, current first.
    assert read_hint(old, [SECRET, OLD_SECRET]) == Hint("s1", "node-a")
    assert read_hint(new, [SECRET, OLD_SECRET]) == Hint("s1", "node-a")
    assert read_hint(new, (SECRET,)) == Hint("s1", "node-a")
    assert read_hint(new, []) is None


def test_bad_local_arguments_raise() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        mint_ufrag("s1", "node-a", b"short")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        read_hint("anything", [SECRET, b""])
    with pytest.raises(ValueError, match="invalid session id"):
        mint_ufrag("a/b", "node-a", SECRET)
    with pytest.raises(ValueError, match="invalid node id"):
        mint_ufrag("s1", "", SECRET)


def test_nonces_make_every_ufrag_distinct() -> None:
    minted = {mint_ufrag("same-session", "node-a", SECRET) for _ in range(2000)}
    assert len(minted) == 2000
    assert all(read_hint(u, SECRET) == Hint("same-session", "node-a") for u in minted)


def test_rng_supplies_the_nonce() -> None:
    class Fixed:
        def token_bytes(self, nbytes: int, /) -> bytes:
            return bytes(range(nbytes))

    a = mint_ufrag("s1", "node-a", SECRET, rng=Fixed())
    b = mint_ufrag("s1", "node-a", SECRET, rng=Fixed())
    assert a == b
    # Two sessions never share a ufrag, even with the same nonce: the session is in it.
    assert mint_ufrag("s2", "node-a", SECRET, rng=Fixed()) != a
    assert mint_ufrag("s1", "node-b", SECRET, rng=Fixed()) != a


@settings(max_examples=500)
@given(st.text())
def test_arbitrary_strings_never_raise(text: str) -> None:
    assert read_hint(text, SECRET) is None


@settings(max_examples=500)
@given(st.text(alphabet=ICE_CHARS, max_size=300))
def test_arbitrary_ice_strings_never_raise(body: str) -> None:
    assert read_hint("1" + body, SECRET) is None


@settings(max_examples=500)
@given(st.text(alphabet=ICE_CHARS, max_size=120))
def test_authenticated_garbage_is_still_parsed_strictly(body: str) -> None:
    """Even a correctly MACed ufrag (a leaked secret, a bug) must not make read_hint raise."""
    authenticated = "1" + body + "AAAAAAAA"
    ufrag = authenticated + hint_module._mac(SECRET, authenticated).decode()
    result = read_hint(ufrag, SECRET)
    if len(ufrag) > MAX_UFRAG_LENGTH:
        assert result is None
    if result is not None:
        assert mint_ufrag(result.session, result.node, SECRET, rng=_Zeros()) == ufrag


class _Zeros:
    def token_bytes(self, nbytes: int, /) -> bytes:
        return bytes(nbytes)


def test_non_strings_are_rejected() -> None:
    ufrag = mint_ufrag("s1", "node-a", SECRET)
    assert read_hint(ufrag.encode(), SECRET) is None  # type: ignore[arg-type]
    assert read_hint(None, SECRET) is None  # type: ignore[arg-type]


def test_aioice_accepts_the_ufrag_in_a_binding_request() -> None:
    for session, node in [(new_session_id(), "node-a"), ("x.y_z~w-v", "n.1"), ("s" * 100, "n")]:
        ufrag = mint_ufrag(session, node, SECRET)
        validate_username(ufrag)  # aioice: 4*256ice-char
        username = f"{ufrag}:abcd"  # RFC 8445 §7.2.2: "<recipient ufrag>:<sender ufrag>"

        # Ours encodes, ours and aioice's read it back.
        request = stun.binding_request(
            secrets.token_bytes(12),
            username=username,
            priority=0x6E0001FF,
            controlling=True,
            tie_breaker=1,
        )
        data = stun.encode(request, integrity_key=b"p" * 22, fingerprint=True)
        assert stun.username_of(data) == username
        parsed = aioice_stun.parse_message(data)
        assert parsed.attributes["USERNAME"] == username
        assert parsed.attributes["USERNAME"].partition(":")[0] == ufrag

        # aioice encodes (as a client's agent would), ours reads it back.
        message = aioice_stun.Message(
            message_method=aioice_stun.Method.BINDING,
            message_class=aioice_stun.Class.REQUEST,
            transaction_id=secrets.token_bytes(12),
        )
        message.attributes["USERNAME"] = username
        message.add_message_integrity(b"p" * 22)
        message.add_fingerprint()
        got = stun.username_of(bytes(message))
        assert got is not None
        server_ufrag, _, client_ufrag = got.partition(":")
        assert client_ufrag == "abcd"
        assert read_hint(server_ufrag, SECRET) == Hint(session, node)
