"""aiortc asks, then talks over the turn-echo agent's replies through a real node, three times:
the node ducks each reply within 3 frames of the first voiced frame, and the client hears the
duck soon after that frame reached the node (measured at the client, real time, loopback)."""

from __future__ import annotations

import asyncio
import functools
import time

import attrs
import pytest

from ops.config import Config
from sessions.audio import speech
from sessions.audio.vad import level_dbfs
from tests.interop.conftest import RunningNode, open_websocket_session
from tests.peers import AiortcCall, loopback_ice  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("loopback_ice")]

FRAME = 0.020
#: the user talks over each reply this long after the utterance before it ended (the reply,
#: that utterance played back, starts after end_silence_ms, 600 ms, and lasts as long as it)
BARGE_AFTER = 1.6
INTERRUPTIONS = (
    "wait, stop, that is not what I meant",
    "no no, hold on a second",
    "sorry, let me say that again",
)
#: the issue's aim for the reaction at the client, and what this test allows on top of it for
#: a loaded 2-core machine (aiortc decodes in the same process as the test's event loop)
AIM = 0.060
SLACK = 0.040


@functools.cache
def script() -> bytes:
    """The question, then each interruption 1.6 s after the utterance before it ended."""
    gap = bytes(round(BARGE_AFTER * 48_000) * 2)
    pcm = speech.speak("what is the weather like in Paris today", rate=190)
    for text in INTERRUPTIONS:
        pcm += gap + speech.speak(text, rate=190)
    return pcm + bytes(3 * 96_000)


@pytest.fixture
def node_config(node_config: Config) -> Config:
    return attrs.evolve(node_config, node=attrs.evolve(node_config.node, agent="turn-echo"))


def test_aiortc_talking_over_the_reply_is_ducked_within_60ms_of_reaching_the_node(
    running_node: RunningNode,
) -> None:
    pcm = script()

    async def scenario() -> tuple[list[dict[str, object]], list[float], float]:
        call = AiortcCall(pcm, pause=10.0)
        try:
            offer = await call.offer()
            client = await asyncio.to_thread(open_websocket_session, running_node, offer)
            await call.answer(client.answer)
            await asyncio.sleep(len(pcm) / 96_000 + 1.0)
            # the node's events are on the wall clock, the arrivals on the monotonic one
            offset = time.time() - asyncio.get_running_loop().time()
            loud = [at for at, frame in call.received if level_dbfs(frame) > -50]
            return list(client.events), loud, offset
        finally:
            await call.close()

    events, loud, offset = asyncio.run(scenario())
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
    ducks = [e for e in events if e["event"] == "agent_ducked"]
    assert names.count("agent_interrupted") == len(INTERRUPTIONS) == len(ducks), turn
    starts = [e for e in events if e["event"] == "speech_started"][1:]
    at_node, at_client = [], []
    for ducked, started in zip(ducks, starts, strict=True):
        # At the node (its wall clock): the held speech_started is back-dated to the first
        # voiced frame; the duck came within 3 frames of it.
        node_reaction = float(ducked["at"]) - float(started["at"])  # type: ignore[arg-type]
        assert 0 <= node_reaction <= 3 * FRAME + 0.001, node_reaction
        at_node.append(node_reaction)
        # At the client: the first voiced frame reached the node voice_ms before the duck;
        # the ducked (faded) frame is the last audible one of the reply, the rest being held
        # until the interruption drops it.
        voice_ms = ducked["voice_ms"]
        assert isinstance(voice_ms, int)
        arrived = float(ducked["at"]) - voice_ms / 1000 - offset  # type: ignore[arg-type]
        heard = [at for at in loud if arrived - 0.3 <= at <= arrived + 0.5]
        assert heard, (arrived, loud)
        at_client.append(max(heard) - arrived)
    print(
        "reaction: node "
        + ", ".join(f"{r * 1000:.0f}" for r in at_node)
        + " ms; first voiced frame at the node -> ducked frame at the client "
        + ", ".join(f"{r * 1000:.0f}" for r in at_client)
        + " ms"
    )
    # Three barge-ins: their maximum is their p99, held to the aim with some slack for a
    # loaded machine; their median to the aim itself (measured: 19-28 ms, all three).
    assert max(at_client) <= AIM + SLACK, at_client
    assert sorted(at_client)[1] <= AIM, at_client
