"""An external agent over the WebSocket bridge serves a real session end to end, and killing and
restarting the agent process does not end the session."""

from __future__ import annotations

import asyncio
import functools
import math
import subprocess
import sys
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


def start_agent() -> subprocess.Popen[bytes]:
    agent = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--port", str(AGENT_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return agent


@pytest.fixture
def node_config(node_config: Config) -> Config:
    node = attrs.evolve(
        node_config.node, agent="bridge", agent_url=f"ws://127.0.0.1:{AGENT_PORT}/agent"
    )
    return attrs.evolve(node_config, node=node)


def test_external_agent_serves_a_session_and_survives_a_restart(
    running_node: RunningNode,
) -> None:
    sent = utterance()
    turn_seconds = len(sent) / 96_000
    agent = start_agent()
    try:

        async def scenario() -> tuple[float, float, bool]:
            # Speak, then 1.5 s of silence: the turn ends, the agent says it back.
            call = AiortcCall(sent, pause=1.5)
            loop = asyncio.get_running_loop()
            try:
                await asyncio.sleep(1.0)  # the agent process is listening
                offer = await call.offer()
                status, location, answer = await asyncio.to_thread(
                    whip_post, running_node.whip, offer, running_node.access_token
                )
                assert status == 201
                session = location.split("/")[3]
                await call.answer(answer)
                start = loop.time()
                await asyncio.sleep(2 * (turn_seconds + 1.5) + 1.0)
                heard = call.pcm_between(start, math.inf)
                before, _ = speech.correlation(sent, heard, len(heard) // 2 - 1)

                agent.kill()  # the agent process dies mid-session
                agent.wait()
                await asyncio.sleep(1.0)
                alive = session in running_node.node.sessions
                restarted = start_agent()
                try:
                    again = loop.time()
                    await asyncio.sleep(2 * (turn_seconds + 1.5) + 2.0)
                    heard = call.pcm_between(again + 1.0, math.inf)
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
