"""The voice loop of one session, sans-I/O: jitter buffer, decoder, turns, agent, pacer, encoder.

The transport hands :class:`VoiceLoop` the client's Opus payloads (:meth:`VoiceLoop.receive`).
On each 20 ms tick (:meth:`VoiceLoop.handle_timer`) the jitter buffer plays a frame out
(decoded, or concealed, or recovered from FEC), the turn detector and the agent hear it, the
agent's reply is queued in the pacer, and the pacer's due frames are encoded
(:meth:`VoiceLoop.frames_to_send`) for the transport to packetize and send. The user's turns,
barge-in and the agent's own events become :class:`~sessions.transceiver.events.ClientEvent`.

Barge-in: when the user starts a turn while the agent's audio is on the air and the agent is
interruptible, what the pacer still holds is dropped before the next frame and the agent is
told how much of its reply the user heard.
"""

from __future__ import annotations

import collections
import math
from typing import Final, final

import attrs

from sessions.agents import FRAME_BYTES, Agent
from sessions.audio.jitter import Frame, JitterBuffer
from sessions.audio.opus import CodecError, OpusDecoder, OpusEncoder
from sessions.audio.pacer import FRAME_MS, FRAME_SECONDS, FRAME_TIMESTAMP, Pacer
from sessions.transceiver.events import ClientEvent
from sessions.turns import SpeechClassifier, SpeechStarted, TurnConfig, TurnDetector, TurnEvent

__all__ = ["OutboundFrame", "VoiceLoop"]

# Frames pulled from the agent ahead of the pacer: enough that a tick never finds the pacer
# empty while the agent has audio, little enough that barge-in can still take frames back.
_PULL_AHEAD_MS: Final = 2 * FRAME_MS
_TS_MOD: Final = 1 << 32


@final
@attrs.frozen
class OutboundFrame:
    """One encoded Opus frame for the transport to send now (RFC 7587): its RTP timestamp,
    whether it starts a talkspurt (RFC 3551 §4.1 marker) and the tick deadline it was due at."""

    payload: bytes
    timestamp: int
    marker: bool
    deadline: float


@final
class VoiceLoop:
    """What one session hears and says (see the module docstring).

    Idle until :meth:`start` (media flows), inert after :meth:`stop`. ``may_send`` is false
    when the client will not receive (its offer was ``sendonly``): the agent still hears the
    user but is never asked for audio. ``timestamp`` is the RTP timestamp of our first frame.
    """

    def __init__(
        self,
        *,
        agent: Agent,
        may_send: bool,
        timestamp: int,
        turn_config: TurnConfig | None = None,
        vad: SpeechClassifier | None = None,
    ) -> None:
        self._agent = agent
        self._may_send = may_send
        self._turns = TurnDetector(TurnConfig() if turn_config is None else turn_config, vad=vad)
        self._pacer = Pacer(initial_timestamp=timestamp)
        self._jitter = JitterBuffer()
        self._encoder = OpusEncoder()
        self._decoder = OpusDecoder()
        #: the agent's audio is on the air (sent on the last tick); barge-in stops it
        self._agent_on_air = False
        #: barge-in reactions: (first voiced frame of the interrupting turn, last agent frame)
        self.barge_ins: list[tuple[float, float]] = []
        #: end-of-turn latencies: (last voiced frame, first agent frame of the reply)
        self.turn_latencies: list[tuple[float, float]] = []
        self._turn_ended_at: float | None = None
        self._last_agent_frame_at: float | None = None
        self._running = False
        self._stopped = False
        self._poll_at: float | None = None
        self._events: collections.deque[ClientEvent] = collections.deque()
        self._out: list[OutboundFrame] = []
        self._frames_resized = 0
        self._dropped: collections.Counter[str] = collections.Counter()

    # --- life ---------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Media flows both ways from ``now`` on: start ticking (idempotent)."""
        if not self._running and not self._stopped:
            self._running = True
            self._poll_at = now

    def stop(self) -> None:
        """The session ended: no more ticks."""
        self._running = False
        self._stopped = True
        self._poll_at = None

    @property
    def detector(self) -> TurnDetector:
        """The turn detector the loop feeds."""
        return self._turns

    @detector.setter
    def detector(self, detector: TurnDetector) -> None:
        # Swapping the detector is for measurements (another classifier, before any audio).
        self._turns = detector

    # --- input and output ---------------------------------------------------------------------

    def receive(self, seq: int, timestamp: int, payload: bytes, now: float) -> None:
        """One Opus payload of the client's (RTP sequence number and timestamp), arrived at
        ``now``, for the jitter buffer."""
        self._jitter.push(seq, timestamp, payload, now)

    def frames_to_send(self) -> list[OutboundFrame]:
        """Encoded frames due since the last call, in order."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> ClientEvent | None:
        """The oldest event for the client not yet taken, or ``None``."""
        return self._events.popleft() if self._events else None

    # --- timers -------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When the next tick is due: a frame to play out or send, a turn to end, or (when
        nothing else ticks and we may send) the next 20 ms poll of the agent."""
        if not self._running:
            return None
        jitter = self._jitter.get_timer()
        pacer = self._pacer.get_timer()
        deadlines = [jitter, pacer, self._turns.get_timer()]
        if jitter is None and pacer is None and self._may_send:
            deadlines.append(self._poll_at)
        present = [d for d in deadlines if d is not None]
        return min(present) if present else None

    def handle_timer(self, now: float) -> None:
        """The media tick: playout, turns, the agent, pacing. Harmless to call early."""
        if not self._running:
            return
        # Playout: every frame the jitter buffer has due, to the turn detector and the agent.
        while (due := self._jitter.get_timer()) is not None and due <= now:
            frame = self._jitter.pop(now)
            if frame is None:
                break  # the stream paused
            heard = self._render(frame)
            self._agent.on_audio(heard, now)
            for turn in self._turns.push(heard, now):
                self._on_turn(turn, now)
        # A client that stops sending (DTX, an outage) still ends its turn.
        for turn in self._turns.poll(now):
            self._on_turn(turn, now)
        for event in self._agent.poll_events():
            name = str(event.get("event", "agent_event"))
            self._emit(ClientEvent(name, now, {k: v for k, v in event.items() if k != "event"}))
        if self._may_send:
            self._speak(now)
        self._poll_at = now + FRAME_SECONDS

    def _speak(self, now: float) -> None:
        # The agent's reply, a little ahead of the pacer; PCM is encoded only when sent (the
        # pacer's rule), so frames the pacer drops were never encoded.
        while self._pacer.queued_ms < _PULL_AHEAD_MS:
            pcm = self._agent.pull(now)
            if pcm is None:
                break
            if len(pcm) != FRAME_BYTES:
                raise ValueError(f"the agent returned {len(pcm)} bytes, not {FRAME_BYTES}")
            self._pacer.push(pcm, now)
        sent = False
        while (due := self._pacer.get_timer()) is not None and due <= now:
            paced = self._pacer.pop(now)
            if paced is not None:
                payload = self._encoder.encode(paced.payload)
                self._out.append(
                    OutboundFrame(payload, paced.timestamp, paced.marker, paced.deadline)
                )
                sent = True
        if sent:
            if self._turn_ended_at is not None:
                self.turn_latencies.append((self._turn_ended_at, now))
                self._turn_ended_at = None
            self._last_agent_frame_at = now
        self._agent_on_air = sent or self._pacer.queued_ms > 0

    def _on_turn(self, turn: TurnEvent, now: float) -> None:
        """The user's turn started or ended: tell the agent and the client; barge in."""
        if isinstance(turn, SpeechStarted):
            self._turn_ended_at = None
            self._emit(ClientEvent("speech_started", turn.at, {"turn": turn.turn}))
            if self._agent_on_air and self._agent.interruptible:
                self._barge_in(now)
        else:
            self._turn_ended_at = turn.at
            self._emit(
                ClientEvent(
                    "speech_stopped", turn.at, {"turn": turn.turn, "duration_ms": turn.duration_ms}
                )
            )
        self._agent.on_turn(turn, now)

    def _barge_in(self, now: float) -> None:
        """The user talks over the agent: its audio stops before the next 20 ms frame.

        Whatever the pacer still holds is dropped (never encoded, so no sequence numbers are
        spent on it) and the agent is told how much of its reply the user actually heard.
        """
        played_ms = self._pacer.stats().talkspurt_ms
        dropped_ms = self._pacer.flush()
        self._agent.on_interrupted(played_ms, now)
        self._agent_on_air = False
        first_voiced = self._turns.first_voiced_at
        if first_voiced is not None and self._last_agent_frame_at is not None:
            self.barge_ins.append((first_voiced, self._last_agent_frame_at))
        self._emit(
            ClientEvent(
                "agent_interrupted", now, {"played_ms": played_ms, "dropped_ms": dropped_ms}
            )
        )

    def _render(self, frame: Frame) -> bytes:
        try:
            pcm = frame.render(self._decoder)
        except CodecError:
            self._dropped["codec_errors"] += 1
            pcm = self._decoder.conceal()
        if len(pcm) != FRAME_BYTES:
            # We negotiate 20 ms packets; a client sending other durations gets them cut or
            # padded to the frame the jitter buffer's clock plays.
            self._frames_resized += 1
            pcm = pcm[:FRAME_BYTES].ljust(FRAME_BYTES, b"\0")
        return pcm

    def _emit(self, event: ClientEvent) -> None:
        self._events.append(event)

    # --- snapshots and statistics -------------------------------------------------------------

    def media_timestamp(self, now: float, last_sent: tuple[int, float] | None) -> int:
        """The RTP timestamp our media clock is at: the next tick's while talking, else the
        last packet's (``last_sent``: its timestamp and tick deadline) advanced by the whole
        ticks since (the pacer does the same on its next talkspurt), so that a restore never
        goes back behind what was sent."""
        pacer_next = self._pacer.next_timestamp
        if self._pacer.get_timer() is not None or last_sent is None:
            return pacer_next
        timestamp, deadline = last_sent
        ticks = max(1, math.ceil((now - deadline) / FRAME_SECONDS))
        estimate = (timestamp + ticks * FRAME_TIMESTAMP) % _TS_MOD
        # whichever is later in RTP's modular order (RFC 3550 §5.1)
        return estimate if (estimate - pacer_next) % _TS_MOD < 1 << 31 else pacer_next

    def stats(self) -> dict[str, object]:
        """The loop's counters (see ``Transceiver.stats``)."""
        pacer = self._pacer.stats()
        return {
            "late_frames": pacer.late,
            "frames_resized": self._frames_resized,
            "pacer": attrs.asdict(pacer),
            "jitter_buffer": attrs.asdict(self._jitter.stats()),
            "dropped": dict(self._dropped),
        }
