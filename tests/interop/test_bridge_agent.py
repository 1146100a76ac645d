"""An external agent over the WebSocket bridge serves a real session end to end, and killing and
restarting the agent process does not end the session."""

from __future__ import annotations

import asyncio
import functools
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest

from ops.config import Config
from ops.etcdserver import free_port
from sessions.audio import speech
from tests.interop.conftest import RunningNode, whip_post
from tests.peers import AiortcCall, loopback_ice  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("loopback_ice")]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "agent_echo.py"
AGENT_PORT = free_port()


@functools.cache
def utterance() -> bytes:
    return speech.speak("testing the agent bridge", rate=190)


def start_agent(log: Path) -> subprocess.Popen[bytes]:
    """The example agent, its log (which says when a node's connection is served) in ``log``."""
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--port", str(AGENT_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )


async def served(agent: subprocess.Popen[bytes], log: Path, session: str) -> None:
    """Until the agent says the node's connection for ``session`` is up. A fixed pause was not
    enough under load: a Python process takes several seconds to start on a machine running the
    whole suite, and a node that found no agent backs off before it tries again; a turn that
    ended before the connection came went unanswered."""
    loop = asyncio.get_running_loop()
    until = loop.time() + 30.0
    while f"session {session} connected" not in (said := await asyncio.to_thread(read, log)):
        assert agent.poll() is None, f"the agent exited with {agent.returncode}"
        assert loop.time() < until, f"the node did not reach the agent: {said[-2000:]}"
        await asyncio.sleep(0.05)


def read(log: Path) -> str:
    return log.read_text(errors="replace")


def listening(agent: subprocess.Popen[bytes]) -> None:
    """Until the agent accepts connections (so the session's first attempt finds it)."""
    until = time.monotonic() + 30.0
    while True:
        assert agent.poll() is None, f"the agent exited with {agent.returncode}"
        try:
            socket.create_connection(("127.0.0.1", AGENT_PORT), timeout=0.5).close()
            return
        except OSError:
            assert time.monotonic() < until, f"the agent did not listen on {AGENT_PORT}"
            time.sleep(0.05)


@pytest.fixture
def node_config(node_config: Config) -> Config:
    node = attrs.evolve(
        node_config.node, agent="bridge", agent_url=f"ws://127.0.0.1:{AGENT_PORT}/agent"
    )
    return attrs.evolve(node_config, node=node)


def test_external_agent_serves_a_session_and_survives_a_restart(
    running_node: RunningNode, tmp_path: Path
) -> None:
    sent = utterance()
    turn_seconds = len(sent) / 96_000
    agent = start_agent(tmp_path / "agent-1.log")
    listening(agent)
    try:

        async def scenario() -> tuple[float, float, bool]:
            # Speak, then 1.5 s of silence: the turn ends, the agent says it back.
            call = AiortcCall(sent, pause=1.5)
            loop = asyncio.get_running_loop()
            try:
                offer = await call.offer()
                status, location, answer = await asyncio.to_thread(
                    whip_post, running_node.whip, offer, running_node.access_token
                )
                assert status == 201
                session = location.split("/")[3]
                await call.answer(answer)
                await served(agent, tmp_path / "agent-1.log", session)
                start = loop.time()
                await asyncio.sleep(2 * (turn_seconds + 1.5) + 1.0)
                heard = call.pcm_between(start, math.inf)
                before, _ = speech.correlation(sent, heard, len(heard) // 2 - 1)

                agent.kill()  # the agent process dies mid-session
                agent.wait()
                await asyncio.sleep(1.0)
                alive = session in running_node.node.sessions
                restarted = start_agent(tmp_path / "agent-2.log")
                try:
                    # The node finds the new process by itself (it keeps reconnecting).
                    await served(restarted, tmp_path / "agent-2.log", session)
                    again = loop.time()
                    await asyncio.sleep(2 * (turn_seconds + 1.5) + 1.0)
                    heard = call.pcm_between(again, math.inf)
                    after, _ = speech.correlation(sent, heard, len(heard) // 2 - 1)
                finally:
                    restarted.kill()
                    restarted.wait()
                return before, after, alive and session in running_node.node.sessions
            finally:
                await call.close()

        before, after, survived = asyncio.run(scenario())
    finally:
        agent.kill()
        agent.wait()
    assert before > 0.6, before
    assert survived, "the session ended when its agent went away"
    assert after > 0.6, after
