"""Live migration end to end (issue #13's proof): ``parley drain``, ``parley migrate`` and a
node's SIGTERM move sessions between nodes while aiortc peers and Chromium talk, and no client
notices more than a short gap: no new offer, no ICE restart, the same DTLS transport and
candidate pair, one continuous SRTP stream, and no SRTP or SRTCP index sent twice.

``migration_scenario.py`` does the work in a private network and PID namespace; this test runs
it, bounded, and judges the JSON it writes.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.interop.test_chromium import UNSHARE, namespace_problem, tail

pytestmark = pytest.mark.slow

SCENARIO = Path(__file__).with_name("migration_scenario.py")
CLIENTS = 10
MIGRATIONS = 20
#: the scenario takes about a minute on 2 cores; the bound leaves room for a loaded machine
TIMEOUT = 180.0
#: Each peer's score is the best correlation of one second of what it heard with what it said
#: (a clean echo through Opus scores ~0.9, unrelated audio ~0.1). Two cores carry etcd, 2
#: relays, 3 nodes, 10 peers and Chromium: a window right after a drain of every session at
#: once holds the odd gap, so the bound on each peer is lower than on the median.
EACH_CORRELATION = 0.3
MEDIAN_CORRELATION = 0.5
#: seconds of audio each peer must hear in each ~3.5 s window
MIN_HEARD = 2.0
#: Chromium's inbound packetsLost may grow this much over the whole call (the aim is 0)
CHROMIUM_LOST = 3
#: the nodes' lease TTL in the scenario (a SIGKILLed node's sessions come back after it)
LEASE_TTL = 3
#: how much the echo's delay (arrival minus RTP timestamp, medians of a second each side) may
#: move across a move, ms: timestamps that keep pace with real time keep it, but for the
#: difference between the two nodes' queues — on this 2-core machine the node holding ten
#: sessions sends each frame up to ~60 ms later after its tick than a node holding one (issue
#: #16), which a move undoes at once. Timestamps that did not advance would add the whole
#: blackout (100-700 ms for a drain of every session at once on 2 cores); the exact step of a
#: single move is checked in tests/sessions/test_snapshot_move.py.
DELAY_STEP_MS = 100.0
WINDOWS = ("before", "after_drain", "after_migrations", "after_sigterm")
ALL_SESSIONS = CLIENTS + 1  # and Chromium's


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    problem = namespace_problem()
    if problem is not None:
        pytest.fail(f"the migration scenario needs network namespaces: {problem}")
    work = tmp_path_factory.mktemp("migration")
    outfile, log = work / "outcome.json", work / "scenario.log"
    with open(log, "wb") as output:
        try:
            subprocess.run(
                [
                    *UNSHARE,
                    sys.executable,
                    str(SCENARIO),
                    str(outfile),
                    str(CLIENTS),
                    str(MIGRATIONS),
                ],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"the migration scenario took over {TIMEOUT:.0f} s\n{tail(log)}")
    if not outfile.is_file():
        pytest.fail(f"the migration scenario wrote no outcome\n{tail(log)}")
    result: dict[str, Any] = json.loads(outfile.read_text())
    assert "error" not in result, explain(result)
    assert not result["errors"], explain(result)
    assert len(result["calls"]) == CLIENTS, explain(result)
    return result


def explain(result: dict[str, Any]) -> str:
    # What went wrong first, whole (the scenario's error and traceback); then the rest, cut to
    # its last part (the logs' tails, where a failure's context is)
    first = {k: result[k] for k in ("error", "traceback", "errors") if k in result}
    rest = {
        k: v
        for k, v in result.items()
        if k not in first and not k.startswith(("status_", "chromium_s"))
    }
    return (
        json.dumps(first, indent=1, default=str)
        + "\n"
        + json.dumps(rest, indent=1, default=str)[-12000:]
    )


def owners(status: dict[str, Any]) -> dict[str, str]:
    return {s["id"]: s["owner"] for s in status["sessions"]}


def test_every_session_starts_on_node_1(outcome: dict[str, Any]) -> None:
    held = outcome["owners_before"]
    assert len(held) == ALL_SESSIONS and set(held.values()) == {"node-1"}, held


def test_drain_moves_every_session_off_node_1(outcome: dict[str, Any]) -> None:
    drain = outcome["drain"]
    assert drain["code"] == 0, drain
    assert drain["json"]["drained"] and drain["json"]["failed"] == [], drain
    held = owners(outcome["status_drained"])
    assert set(held) == set(outcome["owners_before"]), held  # no session ended
    assert set(held.values()) <= {"node-2", "node-3"}, held
    node1 = next(n for n in outcome["status_drained"]["nodes"] if n["id"] == "node-1")
    assert node1["sessions"] == 0 and node1["state"] == "draining", node1


def test_drain_reports_every_session_it_moved(outcome: dict[str, Any]) -> None:
    """``parley drain`` shows progress: moved, remaining, failed."""
    assert outcome["drain"]["json"]["moved"] == ALL_SESSIONS, outcome["drain"]


def test_no_client_renegotiates_restarts_ice_or_changes_transport(
    outcome: dict[str, Any],
) -> None:
    for number, call in enumerate(outcome["calls"]):
        assert call["offers"] == 1, (number, call["offers"])
        # ICE: checking, then connected/completed until the call is hung up at the end.
        ice = [state for _, state in call["ice"]]
        assert ice[0] == "checking" and ice[-1] == "closed", (number, ice)
        assert set(ice[1:-1]) <= {"connected", "completed"} and ice[1:-1], (number, ice)
        dtls = [state for _, state in call["dtls"]]
        assert dtls == ["new", "connecting", "connected", "closed"], (number, dtls)
        assert call["dtls_transports"] == 1, (number, call)
    assert outcome["transports_same"] == [True] * CLIENTS


def test_every_peer_hears_its_echo_after_every_move(outcome: dict[str, Any]) -> None:
    for window in WINDOWS:
        scores = [c["windows"][window]["correlation"] for c in outcome["calls"]]
        heard = [c["windows"][window]["heard_s"] for c in outcome["calls"]]
        assert min(heard) >= MIN_HEARD, (window, heard)
        assert min(scores) >= EACH_CORRELATION, (window, scores)
        assert statistics.median(scores) >= MEDIAN_CORRELATION, (window, scores)


def moves_of(outcome: dict[str, Any], number: int) -> list[str]:
    """The moves the session of aiortc call ``number`` went through: the drain, the
    migrations if it is the migrated session, the SIGTERM if it was on that node."""
    session = outcome["peer_sessions"][number]
    names = ["drain"]
    if session == outcome["migrated_session"]:
        names += [f"migrate-{i}" for i in range(len(outcome["migrations"]))]
    if owners(outcome["status_migrated"]).get(session) == outcome["sigterm"]["node"]:
        names.append("sigterm")
    return names


def test_the_stream_from_the_nodes_is_one_continuous_srtp_stream(
    outcome: dict[str, Any],
) -> None:
    """What the clients decrypted: one SSRC, every sequence number once and in order, none
    missing, and libsrtp (which refuses a replayed index, RFC 3711 §3.3.2) refused nothing."""
    for number, call in enumerate(outcome["calls"]):
        srtp = call["srtp"]
        assert srtp["packets"] > 500 and len(srtp["ssrcs"]) == 1, (number, srtp)
        assert srtp["repeated"] == 0 and srtp["in_order"], (number, srtp)
        assert srtp["missing"] == 0, (number, srtp)
        assert call["srtp_failed"] == 0, (number, call["srtp_failures"])
        assert call["srtcp_failed"] == 0, (number, call["srtcp_failures"])
        assert call["srtcp_ok"] > 0, (number, call)
        for move in moves_of(outcome, number):
            seen = srtp["moves"][move]
            # Across the move's gap: the next sequence number, and timestamps that kept pace
            # with real time: the echo's delay (arrival minus timestamp) did not jump by more
            # than the two nodes' load explains. (The longest gap in a move's window may be the
            # machine's jitter, not the move: its timestamp step says nothing then.)
            assert seen["seq_step_at_gap"] == 1 and seen["missing"] == 0, (number, move, seen)
            assert abs(seen["delay_step_ms"]) <= DELAY_STEP_MS, (number, move, seen)


def test_relays_never_see_an_srtp_or_srtcp_index_twice(outcome: dict[str, Any]) -> None:
    """relay/audit.py, both directions of every session, the whole scenario long."""
    relays = outcome["status_end"]["relays"]
    assert {r["id"] for r in relays} == {"relay-1", "relay-2"}
    audited = {"srtp_audited": 0, "srtcp_audited": 0}
    for relay in relays:
        counters = relay["counters"]
        assert counters["srtp_index_reused"] == 0, relay
        assert counters["srtcp_index_reused"] == 0, relay
        assert counters["fenced"] == 0, relay  # no old owner sent after the switch
        for key in audited:
            audited[key] += counters[key]
    # ~50 packets a second each way for every session, for about a minute
    assert audited["srtp_audited"] > ALL_SESSIONS * 50 * 2 * 20, audited
    assert audited["srtcp_audited"] > ALL_SESSIONS * 10, audited


def _published(outcome: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (key, s["stats"])
        for key in ("status_drained", "status_migrated", "status_sigterm", "status_end")
        for s in outcome[key]["sessions"]
        if s.get("stats")
    ]


def test_new_owners_decrypt_each_client_packet_once(outcome: dict[str, Any]) -> None:
    """The restored receiver refused no SRTP/SRTCP packet (a replay would be refused) and its
    jitter buffer saw no packet twice."""
    published = _published(outcome)
    assert published
    for key, stats in published:
        dropped = stats.get("dropped") or {}
        assert not dropped.get("srtp_rejected") and not dropped.get("srtcp_rejected"), (key, stats)
        assert stats["jitter_buffer"]["duplicate"] == 0, (key, stats)


def test_every_client_srtp_index_is_decrypted_by_exactly_one_node(
    outcome: dict[str, Any],
) -> None:
    """From the nodes' media ledgers (sessions/node/ledger.py), read after they all stopped:
    no index decrypted under two epochs, no index of ours protected twice, no two epochs of a
    session processing at the same time — and no hole: every index inside the span the nodes
    decrypted together was decrypted by one of them."""
    ledger = outcome["ledger"]
    assert "error" not in ledger, ledger
    assert ledger["violations"] == [], ledger["violations"]
    assert max(ledger["epochs"].values()) >= 3, ledger  # sessions did move (drain, migrates)
    # A hole between two epochs is a packet lost to the move itself; one inside an epoch is the
    # loaded machine's (a full socket or inbox), and rare.
    assert "between epochs" not in ledger["hole_detail"], ledger["hole_detail"]
    assert sum(ledger["holes"].values()) <= 20, ledger["hole_detail"]
    assert ledger["not_final"] == 0, ledger


def test_handed_on_packets_reach_the_new_owner_in_time(outcome: dict[str, Any]) -> None:
    """What reached the old owner after the switch is handed on, not dropped: the new owner's
    receiver must not count packets from before its first one (negative cumulative loss, RFC
    3550 §A.3), which is what handed-on packets that arrive after newer direct ones look like —
    and its jitter buffer then drops them as late."""
    for key, stats in _published(outcome):
        assert stats["loss_cumulative"] >= 0, (key, stats["session_id"], stats["jitter_buffer"])


def test_chromium_keeps_its_transport_and_candidate_pair(outcome: dict[str, Any]) -> None:
    sampled = outcome["chromium_samples"]
    # from the first sample with DTLS done (the call's setup is not what is judged) to the
    # crash failover at the end (judged below: its sequence jump counts as loss in getStats)
    first = next(i for i, s in enumerate(sampled) if s.get("dtlsState") == "connected")
    until = outcome["marks"]["planned_until"]
    samples = [s for s in sampled[first:] if s["wall"] < until]
    assert len(samples) > 20, samples
    assert len({s["pair"] for s in samples}) == 1, {s["pair"] for s in samples}
    assert len({s["transport"] for s in samples}) == 1
    assert len({s["pairChanges"] for s in samples}) == 1
    assert {s["dtlsState"] for s in samples} == {"connected"}
    assert {s["ice"] for s in samples} <= {"connected", "completed"}
    # Every state change the page saw (recorded from the first sample on): once connected,
    # ICE stayed connected (or completed) and DTLS connected, to the end.
    states = outcome["chromium_states"]
    ice = [state for _, state in states["ice"]]
    up = next(i for i, state in enumerate(ice) if state in ("connected", "completed"))
    assert set(ice[up:]) <= {"connected", "completed"}, states
    dtls = [state for _, state in states["dtls"]]
    assert "connected" in dtls and set(dtls[dtls.index("connected") :]) == {"connected"}, states
    last = samples[-1]
    assert last["offers"] == 1 and last["restarts"] == 0 and not last["error"], last
    assert last["reattached"] >= 1, last  # its signaling followed the session
    lost = [s["lost"] for s in samples if s.get("lost") is not None]
    assert lost and lost[-1] - lost[0] <= CHROMIUM_LOST, lost
    # and it kept hearing: well over 100 packets after the last move
    sigterm_at = outcome["marks"]["windows"]["after_sigterm"][0]
    after = [s["received"] for s in samples if s["wall"] > sigterm_at and s.get("received")]
    before = [s["received"] for s in samples if s["wall"] < sigterm_at and s.get("received")]
    assert after and before and after[-1] > before[-1] + 100, (before[-1:], after[-1:])


def test_migrate_back_and_forth_while_talking(outcome: dict[str, Any]) -> None:
    runs = outcome["migrations"]
    assert len(runs) == MIGRATIONS
    for run in runs:
        assert run["code"] == 0 and run["json"]["moved"], run
    session = outcome["migrated_session"]
    index = outcome["peer_sessions"].index(session)
    call = outcome["calls"][index]
    assert call["windows"]["after_migrations"]["correlation"] >= MEDIAN_CORRELATION, call
    # the migrated session's stream: no repeated or missing index over 20 moves
    assert call["srtp"]["repeated"] == 0 and call["srtp"]["missing"] == 0, call["srtp"]
    stats = next(s["stats"] for s in outcome["status_end"]["sessions"] if s["id"] == session)
    assert stats["moves"] >= MIGRATIONS + 1, stats  # the drain's move too


def test_sigterm_moves_a_nodes_sessions_instead_of_ending_them(outcome: dict[str, Any]) -> None:
    sigterm = outcome["sigterm"]
    assert sigterm["sessions"] > 0 and sigterm["handed_over"], sigterm
    held = owners(outcome["status_sigterm"])
    assert len(held) == ALL_SESSIONS, held
    assert sigterm["node"] not in held.values() and "node-1" not in held.values(), held


def test_nodes_log_every_move_with_its_blackout(outcome: dict[str, Any]) -> None:
    moved = [m["line"] for m in outcome["moves_logged"]]
    expected = ALL_SESSIONS + MIGRATIONS + outcome["sigterm"]["sessions"]
    assert len(moved) == expected, (expected, moved)
    blackouts = [float(re.search(r"blackout_ms=([\d.]+)", line)[1]) for line in moved]  # type: ignore[index]
    assert all(b >= 0 for b in blackouts), blackouts


def test_sigkill_of_a_node_its_sessions_are_adopted_and_go_on(outcome: dict[str, Any]) -> None:
    """Crash failover under the same ten aiortc clients and Chromium: the node holding most
    sessions gets SIGKILL; every one of its sessions is adopted from its checkpoint within the
    lease TTL and a little, every client hears its echo again, none renegotiates (see the ICE
    and DTLS test above: the whole call long), no SRTP index ever comes twice."""
    sigkill = outcome["sigkill"]
    assert sigkill["sessions"] and sigkill["adopted"], sigkill
    held = owners(outcome["status_after_kill"])
    assert len(held) == ALL_SESSIONS, held
    # each adopted under a new epoch by a live process (the victim's restart counts: a new
    # process with its own lease), never by the killed one
    for session, (owner, pid, _) in sigkill["owners"].items():
        assert pid != sigkill["pid"] and held[session] == owner, (session, owner, pid)
    scores = [c["windows"]["after_sigkill"]["correlation"] for c in outcome["calls"]]
    heard = [c["windows"]["after_sigkill"]["heard_s"] for c in outcome["calls"]]
    assert min(heard) >= MIN_HEARD, heard
    assert min(scores) >= EACH_CORRELATION and statistics.median(scores) >= MEDIAN_CORRELATION
    for number, call in enumerate(outcome["calls"]):
        srtp = call["srtp"]
        assert srtp["repeated_ever"] == 0 and srtp["in_order_ever"], (number, srtp)
        if outcome["peer_sessions"][number] in sigkill["sessions"]:
            seen = srtp["failovers"]["sigkill"]
            # above the dead owner's reservation, below what breaks the client's ROC estimate
            assert 0 < seen["seq_step_at_gap"] < 1 << 15, (number, seen)
            assert seen["longest_gap_ms"] < (LEASE_TTL + 4) * 1000, (number, seen)


def test_chromium_keeps_its_candidate_pair_through_the_crash_failover(
    outcome: dict[str, Any],
) -> None:
    sampled = outcome["chromium_samples"]
    first = next(i for i, s in enumerate(sampled) if s.get("dtlsState") == "connected")
    samples = sampled[first:]
    assert len({s["pair"] for s in samples}) == 1, {s["pair"] for s in samples}
    assert len({s["transport"] for s in samples}) == 1
    assert {s["dtlsState"] for s in samples} == {"connected"}
    last = samples[-1]
    assert last["offers"] == 1 and last["restarts"] == 0 and not last["error"], last
    killed_at = outcome["marks"]["windows"]["after_sigkill"][0]
    # its node was the one killed: the page re-attached its signaling once the session was
    # resumed (sessions/node/pages/echo.html, after the 1006 close)
    assert outcome["chromium_start"]["session"] in outcome["sigkill"]["sessions"]
    crashed = outcome["marks"]["failovers"]["sigkill"][0] * 1000
    events = [e for e in outcome["chromium_events"] if e["wall"] > crashed]
    assert any(e["event"] == "reattached" for e in events), events
    after = [s["received"] for s in samples if s["wall"] > killed_at and s.get("received")]
    before = [s["received"] for s in samples if s["wall"] < killed_at and s.get("received")]
    assert after and before and after[-1] > before[-1] + 100, (before[-1:], after[-1:])
