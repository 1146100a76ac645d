"""aiortc speaks a sentence through a node's signaling WebSocket, waits, and hears the same
sentence back from the turn-echo agent, with the turn and agent events in order."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import math

import attrs
import pytest

from ops.config import Config
from sessions.audio import speech
from sessions.audio.neural_vad import VADS, HybridVad, SileroVad, available, make_vad
from sessions.audio.vad import Vad
from sessions.node import agents as node_agents
from sessions.turns import SpeechClassifier
from tests.interop.conftest import RunningNode, open_websocket_session
from tests.peers import AiortcCall, loopback_ice  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("loopback_ice")]


#: the user's silence between repeats of the sentence: the whole reply must fit in it, also when a
#: loaded machine ends the turn late (the test waits only until the reply is over)
PAUSE = 6.0
#: the user's silence before the first sentence, as on a call. (It was added when the node's
#: jitter buffer shortened a delay by dropping whatever packet came next: a client that starts
#: late, as a busy test process does, sends its first packets in a burst, and with the sentence
#: from the first packet each drop was a 20 ms hole in it; the reply scored 0.34 in ci36 and
#: ci37. The buffer now drops only in the user's pauses, which
#: tests/sessions/test_voice_loop.py checks with a burst and no lead; this keeps the call
#: realistic.)
LEAD = 1.5
#: what is correlated starts this long before the reply's agent_started event came. It used to
#: start one sentence after the test's own start, taken after the answer: when the answer came
#: late, the reply had begun before that point and its first part was cut off
REPLY_LEAD = 0.3


@functools.cache
def sentence() -> bytes:
    return speech.speak("please repeat what I just said", rate=190)


@pytest.fixture(params=VADS)
def node_config(node_config: Config, request: pytest.FixtureRequest) -> Config:
    # Once with each voice activity detector a node can run (turns.vad).
    if not available(request.param):
        pytest.skip(f"turns.vad = {request.param} needs pip install 'parley[vad]'")
    return attrs.evolve(
        node_config,
        node=attrs.evolve(node_config.node, agent="turn-echo"),
        turns=attrs.evolve(node_config.turns, vad=request.param),
    )


@pytest.fixture
def vads_built(monkeypatch: pytest.MonkeyPatch) -> list[SpeechClassifier]:
    """Every detector the node builds for its sessions (it follows turns.vad)."""
    built: list[SpeechClassifier] = []

    def make(name: str) -> SpeechClassifier:
        built.append(make_vad(name))
        return built[-1]

    monkeypatch.setattr(node_agents, "make_vad", make)
    return built


def node_figures(running_node: RunningNode) -> str:
    """The node's figures of its sessions that tell a reply cut short from one sent late."""
    source = running_node.node.stats_source
    if source is None:
        return "no stats"
    stats = running_node.call(source)
    keys = ("late_frames", "pacer", "dropped", "jitter_buffer", "packets_out")
    return json.dumps([{k: one.get(k) for k in keys} for one in stats.values()])


def test_aiortc_hears_its_turn_played_back_with_events_in_order(
    vads_built: list[SpeechClassifier], running_node: RunningNode, node_config: Config
) -> None:
    sent = sentence()
    seconds = len(sent) / 96_000

    async def scenario() -> tuple[float, list[str], str]:
        # Speak, then stay silent long enough for the whole reply: the sentence comes again
        # after the pause, and talking over the end of the reply would duck it (20 ms of voice).
        call = AiortcCall(bytes(round(LEAD * 96_000)) + sent, pause=PAUSE)
        loop = asyncio.get_running_loop()
        try:
            offer = await call.offer()
            client = await asyncio.to_thread(open_websocket_session, running_node, offer)
            await call.answer(client.answer)
            start = loop.time()
            # The reply ends about LEAD + 2 * seconds + 1.4 s from here (the turn's end, its
            # padding); on a loaded machine setup and the turn's end come later: wait for the
            # agent to say it finished (bounded, and before the sentence comes again), then a
            # little.
            await asyncio.sleep(LEAD + 2 * seconds + 1.0)
            until = start + LEAD + seconds + PAUSE
            # client.events fills from the WebSocket's own thread: polled, not awaited
            while loop.time() < until and not any(  # noqa: ASYNC110
                e["event"] == "agent_finished" for e in list(client.events)
            ):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            # What the client heard from a little before the reply began (the node's event says
            # when; it comes with the reply's first frame), or after the user's turn if no such
            # event came: the reply is then near the start of what is correlated, whatever the
            # turn's timing (the search looks at lags up to half of what was heard).
            began = next(
                (e["_received"] for e in list(client.events) if e["event"] == "agent_started"),
                start + LEAD + seconds + REPLY_LEAD,
            )
            heard = call.pcm_between(began - REPLY_LEAD, math.inf)
            score, lag = speech.correlation(sent, heard, len(heard) // 2 - 1)
            # what a failure needs to be understood: when each event came, where the reply was
            timeline = ", ".join(
                f"{e['event']}@{e['_received'] - start:+.2f}s" for e in list(client.events)
            )
            seen = f"lag {lag}, {len(heard) / 96_000:.2f} s heard, sentence {seconds:.2f} s"
            # and whether the reply's frames left the node late or were held (the node's own
            # figures) or reached the client in bursts (the longest wait between two frames)
            arrivals = [at for at, _ in call.received if at >= began - REPLY_LEAD]
            gap = max((b - a for a, b in itertools.pairwise(arrivals)), default=0.0)
            node = await asyncio.to_thread(node_figures, running_node)
            why = f"{seen}; {timeline}; longest wait between frames {gap:.3f} s; node: {node}"
            return score, [e["event"] for e in client.events], why
        finally:
            await call.close()

    score, events, why = asyncio.run(scenario())
    print(why)  # whole in the report of a failure (pytest shortens a long assertion message)
    assert score > 0.6, (score, why)
    turn = [e for e in events if e.startswith(("speech_", "agent_"))]
    assert turn[:4] == ["speech_started", "speech_stopped", "agent_started", "agent_finished"]
    assert set(events[:3]) == {"ice_connected", "dtls_connected", "media_started"}
    kind = {"energy": Vad, "silero": SileroVad, "hybrid": HybridVad}[node_config.turns.vad]
    assert vads_built and all(type(vad) is kind for vad in vads_built)
