"""What a node gives each of its sessions: a fresh agent, the turn thresholds and a voice
activity detector, from its settings (``node.agent``, ``[turns]``)."""

from __future__ import annotations

from sessions.agents import Agent, EchoAgent, TurnEchoAgent
from sessions.agents.bridge import BridgeAgent
from sessions.audio.neural_vad import make_vad
from sessions.node.settings import NodeSetup
from sessions.turns import SpeechClassifier, TurnConfig

__all__ = ["make_agent", "session_vad", "turn_config"]


def make_agent(config: NodeSetup, session_id: str) -> Agent:
    """A fresh agent for a session, as ``node.agent`` says."""
    name = config.node.agent
    if name == "echo":
        return EchoAgent()
    if name == "turn-echo":
        return TurnEchoAgent()
    if name == "bridge":
        # An external agent over WebSocket (docs/agent-protocol.md); the session actor runs
        # its connection and it reconnects on its own if the agent goes away.
        return BridgeAgent(config.node.agent_url, session_id)
    raise ValueError(f"unknown agent {name!r}")


def turn_config(config: NodeSetup) -> TurnConfig:
    turns = config.turns
    return TurnConfig(
        min_speech_ms=turns.min_speech_ms,
        end_silence_ms=turns.end_silence_ms,
        padding_ms=turns.padding_ms,
    )


def session_vad(config: NodeSetup) -> SpeechClassifier:
    """A fresh voice activity detector for a session's turn detector, as ``turns.vad`` says."""
    return make_vad(config.turns.vad)
