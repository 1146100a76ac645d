"""aiortc asks, then talks over the turn-echo agent's reply through a real node: the node ducks
the reply within 3 frames of the first voiced frame, and the client stops hearing it soon
after it started talking (measured at the client, real time, loopback)."""

from __future__ import annotations

import asyncio
import functools

import attrs
import pytest

from ops.config import Config
from sessions.audio import speech
from sessions.audio.vad import level_dbfs
from tests.interop.conftest import RunningNode, open_websocket_session
from tests.peers import AiortcCall, loopback_ice  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("loopback_ice")]

FRAME = 0.020
#: the user talks over the reply this long after the question ended (the reply starts after
#: end_silence_ms, 600 ms, and lasts as long as the question)
BARGE_AFTER = 1.6


@functools.cache
def script() -> tuple[bytes, int]:
    """The question, silence, then the interruption; and the frame index where it begins."""
    question = speech.speak("what is the weather like in Paris today", rate=190)
    interruption = speech.speak("wait, stop, that is not what I meant", rate=190)
    lead = question + bytes(round(BARGE_AFTER * 48_000) * 2)
    frames = speech.frames(interruption)
    first = next(i for i, f in enumerate(frames) if level_dbfs(f) > -40)
    return lead + interruption + bytes(3 * 96_000), len(speech.frames(lead)) + first


@pytest.fixture
def node_config(node_config: Config) -> Config:
    return attrs.evolve(node_config, node=attrs.evolve(node_config.node, agent="turn-echo"))


def test_aiortc_talking_over_the_reply_ducks_it_within_three_frames(
    running_node: RunningNode,
) -> None:
    pcm, voiced_index = script()

    async def scenario() -> tuple[list[dict[str, object]], float, list[float]]:
        call = AiortcCall(pcm, pause=10.0)
        try:
            offer = await call.offer()
            client = await asyncio.to_thread(open_websocket_session, running_node, offer)
            await call.answer(client.answer)
            await asyncio.sleep(len(pcm) / 96_000 + 1.0)
            track = call.pc.getSenders()[0].track
            started = track._start  # type: ignore[union-attr]
            assert started is not None
            # when the client sent the interruption's first voiced frame (monotonic clock,
            # as the arrivals)
            voiced_sent = started + voiced_index * FRAME
            loud = [at for at, frame in call.received if level_dbfs(frame) > -50]
            return list(client.events), voiced_sent, loud
        finally:
            await call.close()

    events, voiced_sent, loud = asyncio.run(scenario())
    names = [str(e["event"]) for e in events]
    turn = [n for n in names if n.startswith(("speech_", "agent_"))]
    assert turn[:6] == [
        "speech_started",
        "speech_stopped",
        "agent_started",
        "agent_ducked",
        "speech_started",
        "agent_interrupted",
    ], turn
    # At the node (its wall clock): the held speech_started is back-dated to the first voiced
    # frame; the duck came within 3 frames of it.
    second = [e for e in events if e["event"] == "speech_started"][1]
    ducked = next(e for e in events if e["event"] == "agent_ducked")
    node_reaction = float(ducked["at"]) - float(second["at"])  # type: ignore[arg-type]
    assert 0 <= node_reaction <= 3 * FRAME + 0.001, node_reaction
    # At the client: the last audible reply frame arrived soon after the voice was sent
    # (uplink, the node's jitter buffer, up to 2 frames, downlink, aiortc's jitter buffer).
    last_heard = max(at for at in loud if at < voiced_sent + 1.0)
    client_reaction = last_heard - voiced_sent
    print(f"reaction: node {node_reaction * 1000:.0f} ms, client {client_reaction * 1000:.0f} ms")
    assert client_reaction < 0.150, client_reaction
