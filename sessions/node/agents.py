"""What a node gives each of its sessions: a fresh agent, the turn thresholds and a voice
activity detector and how it encodes its voice, from its settings (``node.agent``, ``[turns]``,
``node.opus_*``)."""

from __future__ import annotations

from sessions.agents import Agent, EchoAgent, TurnEchoAgent
from sessions.agents.bridge import BridgeAgent
from sessions.audio.neural_vad import make_vad
from sessions.audio.opus import VoiceCodec
from sessions.node.settings import NodeSetup
from sessions.turns import SpeechClassifier, TurnConfig

__all__ = ["make_agent", "session_vad", "turn_config", "voice_codec"]


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
    """The ``[turns]`` settings as the voice loop takes them (validated by ``ops.config``)."""
    turns = config.turns
    return TurnConfig(
        min_speech_ms=turns.min_speech_ms,
        end_silence_ms=turns.end_silence_ms,
        padding_ms=turns.padding_ms,
        resume_ms=min(TurnConfig().resume_ms, turns.min_speech_ms),
        duck_after_ms=turns.duck_after_ms,
        interrupt_ms=turns.interrupt_ms,
        release_ms=turns.release_ms,
        duck_max_ms=turns.duck_max_ms,
        ramp_ms=turns.ramp_ms,
        echo_aware=turns.echo_aware,
        echo_max_delay_ms=turns.echo_max_delay_ms,
        echo_margin_db=turns.echo_margin_db,
    )


def session_vad(config: NodeSetup) -> SpeechClassifier:
    """A fresh voice activity detector for a session's turn detector, as ``turns.vad`` says."""
    return make_vad(config.turns.vad)


def voice_codec(config: NodeSetup) -> VoiceCodec:
    """How sessions encode the agent's voice: ``node.opus_complexity`` and ``node.opus_bitrate``."""
    return VoiceCodec(complexity=config.node.opus_complexity, bitrate=config.node.opus_bitrate)
