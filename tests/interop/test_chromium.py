"""An unmodified headless Chromium holds a voice session with a node, from the node's own page.

``chromium_scenario.py`` does the work in a private network namespace whose only interface up is
``lo`` (and a private PID namespace, so nothing it starts can outlive it): etcd, a node, and
Chromium with a fake microphone playing espeak-ng speech. These tests run it, bounded, and judge
the JSON it writes: once with the immediate echo agent, once as the demo (the node's default
turn-echo agent, the page showing the voice loop's events).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

SCENARIO = Path(__file__).with_name("chromium_scenario.py")
#: a new network namespace (only ``lo``); the PID namespace dies with the scenario, and with it
#: whatever the scenario started (``--kill-child``: even if ``unshare`` itself is killed)
UNSHARE = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--"]
TIMEOUT = 90.0
#: the demo must go round one whole turn within this (seconds from parleyStart)
DEMO_BOUND = 40.0


def namespace_problem() -> str | None:
    """Why we cannot create the namespaces (not root, no CAP_SYS_ADMIN, no unshare), or None."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) not found"
    try:
        probe = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if probe.returncode != 0:
        return f"cannot create network and PID namespaces: {probe.stderr.strip()}"
    return None


def run_scenario(outfile: Path, log: Path, mode: str = "echo") -> None:
    """Run the scenario in its namespaces; on timeout, stop its whole process group."""
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [*UNSHARE, sys.executable, str(SCENARIO), str(outfile), mode],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            # SIGTERM lets the scenario stop Chromium, the node and etcd and write its JSON.
            for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                os.killpg(process.pid, sig)
                try:
                    process.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            pytest.fail(f"the Chromium scenario took over {TIMEOUT:.0f} s\n{tail(log)}")


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def explain(result: dict[str, Any]) -> str:
    """What a failing assertion prints: the outcome without the node's full stats."""
    brief = {
        k: v for k, v in result.items() if k not in ("node_stats", "chromium_log_tail", "samples")
    }
    return (
        json.dumps(brief, indent=1, default=str) + "\n" + str(result.get("chromium_log_tail", ""))
    )


def scenario_result(tmp_path: Path, mode: str) -> tuple[dict[str, Any], str]:
    """Run the scenario in ``mode``; its completed result, and what to print if a check fails.

    Also checks what every mode shares: Chromium had loopback and nothing else, and used only
    loopback candidates."""
    problem = namespace_problem()
    if problem is not None:
        pytest.skip(f"needs root (or CAP_SYS_ADMIN) for a private network namespace: {problem}")
    if not (os.environ.get("PARLEY_CHROMIUM") or shutil.which("chromium")):
        pytest.fail("chromium not found: install chromium (bash ops/bootstrap.sh test does)")

    outfile, log = tmp_path / "result.json", tmp_path / "scenario.log"
    run_scenario(outfile, log, mode)
    assert outfile.is_file(), f"the scenario wrote no result\n{tail(log)}"
    result: dict[str, Any] = json.loads(outfile.read_text())
    why = explain(result)
    assert result["completed"], f"{result.get('error')}\n{why}\n{tail(log)}"
    assert result["mode"] == mode, why

    assert result["interfaces_up"] == ["lo"], why
    assert result["signaling"].startswith("ws://127.0.0.1:"), why
    ice = result["ice"]
    assert ice["local"] and all(c["address"] == "127.0.0.1" for c in ice["local"]), why
    assert [c["address"] for c in ice["remote"]] == ["127.0.0.1"], why
    return result, why


def in_order(names: list[str], *steps: tuple[str, ...]) -> bool:
    """Whether ``names`` holds one of each step's names, in the steps' order."""
    position = 0
    for step in steps:
        try:
            position = next(i for i in range(position, len(names)) if names[i] in step) + 1
        except StopIteration:
            return False
    return True


def test_headless_chromium_calls_the_node_page_and_hears_its_echo(tmp_path: Path) -> None:
    result, why = scenario_result(tmp_path, "echo")
    assert result["agent"] == "echo", why

    # The page: the node's events arrived on its socket, the call connected, the echo played.
    page = result["page"]
    assert not result.get("media_timed_out"), why
    assert page["state"]["error"] is None, why
    assert page["state"]["connection"] == "connected", why
    assert page["state"]["ice"] in ("connected", "completed"), why
    assert {"ice_connected", "dtls_connected", "media_started"} <= set(page["events"]), why
    stats = page["stats"]
    assert stats["packetsReceived"] > 50, why
    assert result["max_audio_level"] > 0 and stats["totalAudioEnergy"] > 0, why

    # The node: the same session, authentic SRTP both ways on a loopback pair.
    session = page["state"]["session"]
    assert result["node_sessions"] == [session], why
    node = result["node_stats"][session]
    assert node["state"] == "connected", why
    assert node["selected"][0] == "127.0.0.1", why
    assert node["packets_in"] > 0 and node["packets_out"] > 0, why

    # Hanging up (closing the page's socket) ended the session on the node.
    assert result["node_sessions_after_hangup"] == [], why


def test_demo_page_shows_a_whole_turn_and_plays_the_turn_back(tmp_path: Path) -> None:
    """The demo: the node's default agent (turn-echo), a fake microphone that says a sentence
    and pauses, over and over. The page sees the user's turn start and end, the reply start
    and what follows it, and hears the reply."""
    result, why = scenario_result(tmp_path, "demo")
    assert result["agent"] == "turn-echo", why
    assert not result.get("media_timed_out"), why
    assert result["turns_s"] <= DEMO_BOUND, why
    page = result["page"]
    assert page["state"]["error"] is None, why
    assert page["state"]["connection"] == "connected", why
    names = page["events"]
    assert {"ice_connected", "dtls_connected", "media_started"} <= set(names), why
    assert in_order(
        names,
        ("speech_started",),
        ("speech_stopped",),
        ("agent_started",),
        ("agent_finished", "speech_started", "agent_interrupted"),
    ), why
    # The reply was heard: the agent's audio reached the page after it started, not before.
    assert result["level_after_agent_started"] > 0, why
    # The node's own clock: the reply follows the end of the turn by about end_silence_ms.
    gaps = result["figures"]["end_of_turn_to_reply_s"]
    assert gaps and all(0.5 <= gap <= 2.0 for gap in gaps), why

    session = page["state"]["session"]
    assert result["node_sessions"] == [session], why
    assert result["node_stats"][session]["packets_out"] > 0, why
    assert result["node_sessions_after_hangup"] == [], why
