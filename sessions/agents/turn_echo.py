"""The turn-echo agent: once the user's turn ends, it plays the whole turn back.

It is the demo's default: talk, stop, and hear yourself — which exercises everything a real voice
agent needs from the session (turn detection, an agent reply after the turn, barge-in).

The agent keeps the user's recent audio itself (a bounded ring of timestamped frames), because
its sync side is all an agent gets. When ``SpeechStopped`` arrives it queues the frames from a
little before ``SpeechStarted.at`` (the first voiced frame, so the onset is not cut) to a little
after ``SpeechStopped.at`` (the last voiced frame) for playback. If the user talks
over the reply (barge-in), the rest of the reply is dropped.

Moves. The agent is a :class:`~sessions.agents.StatefulAgent`: in a planned move the reply
still to be played, the user's audio of an open turn and the last moments heard travel with the
session, as Opus (RFC 6716) to keep the snapshot small — about 40 KiB for a 10 s reply — and
the agent on the new node goes on playing from the very frame this one would have played next.
Encoding costs about 0.1 ms per 20 ms frame, on the old node, at the quiesce.
"""

from __future__ import annotations

import collections
import json
import struct
from typing import Any, Final, final

from sessions.agents.echo import FRAME_BYTES
from sessions.audio.opus import CodecError, OpusDecoder, OpusEncoder
from sessions.turns import SpeechStarted, TurnEvent

__all__ = ["TurnEchoAgent"]

#: frames kept from before a turn starts
PRE_ROLL_FRAMES: Final = 50
#: the reply starts this long before the turn's first voiced frame, so no onset is cut
PRE_ROLL_SECONDS: Final = 0.2
#: after the last voiced frame, this much of the following silence is part of the reply
TAIL_SECONDS: Final = 0.2
#: a turn longer than this is cut (bounded memory); the reply is the first part
MAX_TURN_FRAMES: Final = 30 * 50

# The saved state: magic, JSON header length (4), the header, then Opus packets, each with a
# 2-byte length: the reply's first, then the recent frames'. Each stream ends with one more
# packet than it has frames: the decoder lags by the encoder's lookahead (``shift`` samples),
# so frame k is the end of decoded packet k and the start of packet k + 1.
_STATE_MAGIC: Final = b"PTE1"
_LENGTH: Final = struct.Struct("!I")
_PACKET: Final = struct.Struct("!H")
_HEADER_KEYS: Final = frozenset(
    {"speaking", "turn_start", "turns_played", "interruptions", "reply", "recent", "shift"}
)
# Recent frames carried when no turn is open: enough for the next turn's pre-roll.
_RECENT_SECONDS: Final = PRE_ROLL_SECONDS + 0.1
# Opus for the state: it is decoded once, right away or when played, so favour speed.
_STATE_BITRATE: Final = 32_000
_STATE_COMPLEXITY: Final = 0


@final
class TurnEchoAgent:
    """Plays each finished user turn back; stops when interrupted."""

    interruptible: Final = True
    #: it replies to turns only (sessions.agents.ReactiveAgent)
    reactive: Final = True

    def __init__(self) -> None:
        self._recent: collections.deque[tuple[float, bytes]] = collections.deque(
            maxlen=PRE_ROLL_FRAMES + MAX_TURN_FRAMES
        )
        self._turn_start: float | None = None
        self._reply: collections.deque[bytes] = collections.deque()
        # A reply carried over a move, still as Opus: decoded one frame at a time as it plays.
        self._moved: _OpusFrames | None = None
        self._events: list[dict[str, Any]] = []
        self._speaking = False
        self.turns_played = 0
        self.interruptions = 0

    def on_audio(self, pcm: bytes, now: float) -> None:
        if len(pcm) != FRAME_BYTES:
            raise ValueError(f"a frame is {FRAME_BYTES} bytes of PCM, got {len(pcm)}")
        self._recent.append((now, pcm))

    def on_turn(self, event: TurnEvent, now: float) -> None:
        if isinstance(event, SpeechStarted):
            self._turn_start = event.at
        elif self._turn_start is not None:
            start = self._turn_start - PRE_ROLL_SECONDS
            end = event.at + TAIL_SECONDS
            frames = [pcm for at, pcm in self._recent if start - 0.001 <= at <= end]
            self._turn_start = None
            if frames:
                self._reply.extend(frames[:MAX_TURN_FRAMES])
                self._speaking = True
                self.turns_played += 1
                self._events.append(
                    {"event": "agent_started", "turn": event.turn, "ms": 20 * len(frames)}
                )

    def on_interrupted(self, played_ms: int, now: float) -> None:
        if self._speaking or self._reply or self._moved is not None:
            self.interruptions += 1
            self._reply.clear()
            self._moved = None
            self._speaking = False

    def pull(self, now: float) -> bytes | None:
        if self._moved is not None:
            frame = self._moved.next()
            if frame is not None:
                return frame
            self._moved = None
        if self._reply:
            return self._reply.popleft()
        if self._speaking:
            self._speaking = False
            self._events.append({"event": "agent_finished"})
        return None

    def poll_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    # --- moves --------------------------------------------------------------------------------

    def save_state(self, now: float) -> bytes:
        """The reply still to play, the open turn's audio and the last moments heard, as Opus
        (see the module docstring); times as ages before ``now``."""
        if self._moved is not None:
            # A reply that came over an earlier move: it goes on as PCM, like any other.
            self._reply.extendleft(reversed(self._moved.rest()))
            self._moved = None
        since = now - _RECENT_SECONDS
        if self._turn_start is not None:
            since = min(since, self._turn_start - PRE_ROLL_SECONDS - 0.001)
        recent = [(at, pcm) for at, pcm in self._recent if at >= since]
        reply_packets, shift = _encode(list(self._reply))
        recent_packets, _ = _encode([pcm for _, pcm in recent])
        header = {
            "speaking": self._speaking,
            "turn_start": None if self._turn_start is None else now - self._turn_start,
            "turns_played": self.turns_played,
            "interruptions": self.interruptions,
            "reply": len(self._reply),
            "recent": [now - at for at, _ in recent],
            "shift": shift,
        }
        text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
        parts = [_STATE_MAGIC, _LENGTH.pack(len(text)), text]
        parts.extend(_PACKET.pack(len(p)) + p for p in (*reply_packets, *recent_packets))
        return b"".join(parts)

    def load_state(self, data: bytes, now: float) -> None:
        """Take up another node's :meth:`save_state`: the reply goes on playing from where it
        was. Raises :class:`ValueError` for anything else."""
        if not data.startswith(_STATE_MAGIC) or len(data) < len(_STATE_MAGIC) + _LENGTH.size:
            raise ValueError("not a turn-echo agent state")
        offset = len(_STATE_MAGIC)
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        try:
            header = json.loads(data[offset : offset + length])
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("malformed turn-echo agent state") from None
        offset += length
        speaking, turn_start, reply_count, ages, shift = _check_header(header)
        packets = []
        while offset < len(data):
            if offset + _PACKET.size > len(data):
                raise ValueError("truncated turn-echo agent state")
            (size,) = _PACKET.unpack_from(data, offset)
            offset += _PACKET.size
            packet = data[offset : offset + size]
            if len(packet) != size or not size:
                raise ValueError("truncated turn-echo agent state")
            offset += size
            packets.append(packet)
        reply_packets = reply_count + 1 if reply_count else 0
        if len(packets) != reply_packets + (len(ages) + 1 if ages else 0):
            raise ValueError("turn-echo agent state holds the wrong number of frames")
        recent = _OpusFrames(packets[reply_packets:], shift).rest()
        self._recent.clear()
        self._recent.extend((now - age, pcm) for age, pcm in zip(ages, recent, strict=True))
        self._turn_start = None if turn_start is None else now - turn_start
        self._reply.clear()
        self._moved = _OpusFrames(packets[:reply_packets], shift) if reply_count else None
        self._speaking = speaking
        self.turns_played = header["turns_played"]
        self.interruptions = header["interruptions"]


def _encode(frames: list[bytes]) -> tuple[list[bytes], int]:
    """``frames`` as Opus packets (one more, of silence, to flush the encoder's lookahead), and
    that lookahead in samples."""
    encoder = OpusEncoder(
        bitrate=_STATE_BITRATE, complexity=_STATE_COMPLEXITY, fec=False, expected_loss=0
    )
    if not frames:
        return [], encoder.lookahead
    return [encoder.encode(pcm) for pcm in (*frames, bytes(FRAME_BYTES))], encoder.lookahead


@final
class _OpusFrames:
    """Frames of PCM from :func:`_encode`'s packets, decoded in order one at a time, with the
    encoder's lookahead taken out (so they line up with the frames that were encoded)."""

    def __init__(self, packets: list[bytes], shift: int) -> None:
        self._packets = collections.deque(packets)
        self._decoder = OpusDecoder()
        self._cut = 2 * shift  # bytes of int16 samples
        self._carry: bytes | None = None

    def next(self) -> bytes | None:
        """The next frame, or ``None`` once all are out."""
        if self._carry is None:
            if not self._packets:
                return None
            self._carry = self._decode(self._packets.popleft())[self._cut :]
        if not self._packets:
            return None
        decoded = self._decode(self._packets.popleft())
        frame = self._carry + decoded[: self._cut]
        self._carry = decoded[self._cut :]
        return frame

    def rest(self) -> list[bytes]:
        """All the frames not yet handed out."""
        frames = []
        while (frame := self.next()) is not None:
            frames.append(frame)
        return frames

    def _decode(self, packet: bytes) -> bytes:
        try:
            pcm = self._decoder.decode(packet)
        except CodecError:
            pcm = self._decoder.conceal()
        # Our own 20 ms packets decode to a frame exactly; be strict about the size all the same.
        return pcm[:FRAME_BYTES].ljust(FRAME_BYTES, b"\0")


def _check_header(header: Any) -> tuple[bool, float | None, int, list[float], int]:
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise ValueError("turn-echo agent state has the wrong fields")
    speaking, turn_start, reply = header["speaking"], header["turn_start"], header["reply"]
    ages, shift = header["recent"], header["shift"]
    counters = (header["turns_played"], header["interruptions"], reply, shift)
    if (
        not isinstance(speaking, bool)
        or not (turn_start is None or _is_number(turn_start))
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counters)
        or reply > MAX_TURN_FRAMES
        or not isinstance(ages, list)
        or len(ages) > PRE_ROLL_FRAMES + MAX_TURN_FRAMES
        or not all(_is_number(age) for age in ages)
        or shift >= FRAME_BYTES // 2
    ):
        raise ValueError("malformed turn-echo agent state")
    return speaking, turn_start, reply, [float(age) for age in ages], shift


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
