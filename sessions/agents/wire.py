"""The ``parley.agent.v2`` wire protocol (``docs/agent-protocol.md``) as plain values, no I/O.

What :class:`~sessions.agents.bridge.BridgeAgent` says to an agent (:func:`hello`,
:func:`turn`, :func:`interrupted`, :func:`session_moved`, :func:`unsupported_protocol`) and what
it accepts back
(:func:`check_hello` for the agent's first message, :func:`parse` for the text messages after
it: an :class:`AgentEvent`, :class:`Clear`, :class:`AgentError`, or :class:`Malformed`). User
and agent audio travel as binary messages of 48 kHz mono ``pcm16le``, outside these helpers.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, TypeAlias, final

import attrs

from sessions.turns import SpeechStarted, SpeechStopped, TurnEvent

__all__ = [
    "AUDIO_FORMAT",
    "CLOSE_GOING_AWAY",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "FRAME_MS",
    "PROTOCOL",
    "RESERVED_EVENTS",
    "TURN_EVENTS",
    "AgentError",
    "AgentEvent",
    "AgentMessage",
    "Clear",
    "HandshakeFailed",
    "Malformed",
    "check_hello",
    "encode",
    "hello",
    "interrupted",
    "maybe_interrupted",
    "parse",
    "resumed",
    "session_moved",
    "turn",
    "unsupported_protocol",
]

#: the protocol this bridge speaks, sent in and expected back in ``hello``; v2 added
#: ``session_moved`` (a session that moved to another node goes on with the same conversation)
PROTOCOL: Final = "parley.agent.v2"
#: duration of one frame of user audio (FRAME_BYTES of 48 kHz mono int16)
FRAME_MS: Final = 20
AUDIO_FORMAT: Final = {"encoding": "pcm16le", "sample_rate": 48_000, "channels": 1, "frame_ms": 20}

#: turn event types (from the voice loop) and their names on the wire
TURN_EVENTS: Final[dict[type, str]] = {
    SpeechStarted: "speech_started",
    SpeechStopped: "speech_stopped",
}
#: event names the bridge emits itself
BRIDGE_EVENTS: Final = frozenset({"agent_connected", "agent_disconnected", "agent_error"})
#: event names an agent may not use: ours, and the session's own (so none can be spoofed)
RESERVED_EVENTS: Final = BRIDGE_EVENTS | {
    "agent_ducked",
    "agent_interrupted",
    "agent_resumed",
    "speech_started",
    "speech_stopped",
    "ice_connected",
    "dtls_connected",
    "media_started",
    "session_ended",
    "session_moved",
}
_EVENT_NAME: Final = re.compile(r"[a-z][a-z0-9_.\-]{0,63}")
#: close codes (RFC 6455 §7.4.1)
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002


class HandshakeFailed(Exception):
    """The agent answered our hello with something other than a matching hello; ``reason``
    is the counter's name (``bad_hello``, ``agent_error``, ``unsupported_protocol``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# --- what we say ------------------------------------------------------------------------------


def encode(message: dict[str, Any]) -> str:
    """A message as compact JSON text."""
    return json.dumps(message, separators=(",", ":"))


def hello(session: str, *, resume: bool, turn: int) -> str:
    """Our first message: who we are, the audio format, and whether this resumes a session
    (after a reconnect or a move) at turn ``turn``."""
    return encode(
        {
            "type": "hello",
            "protocol": PROTOCOL,
            "session": session,
            "audio": AUDIO_FORMAT,
            "resume": resume,
            "turn": turn,
        }
    )


def turn(event: TurnEvent, *, audio_ms: int) -> dict[str, Any]:
    """A turn event; ``audio_ms`` is where it falls in the user audio this connection carried.

    Only for the types in :data:`TURN_EVENTS`.
    """
    message: dict[str, Any] = {
        "type": "turn",
        "event": TURN_EVENTS[type(event)],
        "turn": event.turn,
        "at": round(event.at, 3),
        "audio_ms": audio_ms,
    }
    if isinstance(event, SpeechStopped):
        message["duration_ms"] = max(0, event.duration_ms)
        if event.cut:
            message["cut"] = True  # the turn hit its length limit: the user may go on
    return message


def interrupted(played_ms: int, *, turn: int) -> dict[str, Any]:
    """Barge-in: the user heard ``played_ms`` of the reply to turn ``turn``."""
    return {"type": "interrupted", "played_ms": max(0, int(played_ms)), "turn": turn}


def maybe_interrupted(played_ms: int, *, turn: int) -> dict[str, Any]:
    """The user's voice came in over the reply: the node ducked it at ``played_ms`` and holds
    the rest; ``interrupted`` or ``resumed`` follows."""
    return {"type": "maybe_interrupted", "played_ms": max(0, int(played_ms)), "turn": turn}


def resumed(*, turn: int) -> dict[str, Any]:
    """It was not a turn (a cough, an "mm-hm"): the ducked reply plays on where it stopped."""
    return {"type": "resumed", "turn": turn}


def session_moved(
    session: str,
    *,
    from_node: str,
    to_node: str,
    epoch: int,
    turn: int,
    played_ms: int | None,
) -> dict[str, Any]:
    """The session moved from ``from_node`` to ``to_node`` (ownership epoch ``epoch``): sent by
    the new node right after its resuming hello. ``played_ms``, when known, is how much of the
    agent audio sent on the previous connection since its last ``clear`` the user heard."""
    message: dict[str, Any] = {
        "type": "session_moved",
        "session": session,
        "from_node": from_node,
        "to_node": to_node,
        "epoch": epoch,
        "turn": turn,
    }
    if played_ms is not None:
        message["played_ms"] = max(0, int(played_ms))
    return message


def unsupported_protocol() -> str:
    """Our answer to a hello of another protocol, before we close with 1002."""
    error = {
        "type": "error",
        "code": "unsupported_protocol",
        "message": f"this node speaks {PROTOCOL}",
    }
    return json.dumps(error)


# --- what the agent says ----------------------------------------------------------------------


@final
@attrs.frozen
class AgentEvent:
    """An event of the agent's own, for the client (``fields`` without ``type``/``event``)."""

    name: str
    fields: dict[str, Any]


@final
@attrs.frozen
class Clear:
    """The agent dropped its queued reply (its answer to an interruption)."""


@final
@attrs.frozen
class AgentError:
    """The agent reports an error; ``code`` is at most 64 characters."""

    code: str


@final
@attrs.frozen
class Malformed:
    """A message we drop (and count by ``reason``); the connection lives on."""

    reason: str


AgentMessage: TypeAlias = AgentEvent | Clear | AgentError | Malformed


def check_hello(reply: str | bytes) -> None:
    """The agent's first message must be its hello in our protocol; raises
    :class:`HandshakeFailed` otherwise."""
    message = json_object(reply) if isinstance(reply, str) else "binary"
    if isinstance(message, str):
        raise HandshakeFailed("bad_hello", "the agent's first message is not a JSON object")
    kind = message.get("type")
    if kind == "error":
        code = message.get("code")
        raise HandshakeFailed(
            "agent_error", f"agent said {code!r}" if isinstance(code, str) else "agent error"
        )
    if kind != "hello":
        raise HandshakeFailed("bad_hello", f"expected hello, got {str(kind)[:40]!r}")
    protocol = message.get("protocol")
    if protocol != PROTOCOL:
        raise HandshakeFailed("unsupported_protocol", f"agent speaks {str(protocol)[:40]!r}")


def parse(text: str, *, max_chars: int) -> AgentMessage:
    """A text message from the agent after the handshake."""
    if len(text) > max_chars:
        return Malformed("too_large")
    message = json_object(text)
    if isinstance(message, str):
        return Malformed(message)
    kind = message.get("type")
    if kind == "event":
        name = message.get("event")
        if not isinstance(name, str) or not _EVENT_NAME.fullmatch(name):
            return Malformed("bad_event")
        if name in RESERVED_EVENTS:
            return Malformed("reserved_event")
        return AgentEvent(name, {k: v for k, v in message.items() if k not in ("type", "event")})
    if kind == "clear":
        return Clear()
    if kind == "error":
        code = message.get("code")
        return AgentError(code[:64] if isinstance(code, str) else "unknown")
    if kind == "hello":
        return Malformed("unexpected_hello")
    return Malformed("unknown_type" if isinstance(kind, str) else "no_type")


def json_object(text: str) -> dict[str, Any] | str:
    """The JSON object in ``text``, or why there is none. NaN and Infinity are not JSON."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return "bad_json"
    if not isinstance(value, dict):
        return "not_an_object"
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
