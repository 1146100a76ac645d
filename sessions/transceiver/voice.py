"""The voice loop of one session, sans-I/O: jitter buffer, decoder, turns, agent, pacer, encoder.

The transport hands :class:`VoiceLoop` the client's Opus payloads (:meth:`VoiceLoop.receive`).
On each 20 ms tick (:meth:`VoiceLoop.handle_timer`) the jitter buffer plays a frame out
(decoded, or concealed, or recovered from FEC), the turn detector and the agent hear it, the
agent's reply is queued in the pacer, and the pacer's due frames are encoded
(:meth:`VoiceLoop.frames_to_send`) for the transport to packetize and send. The user's turns,
barge-in and the agent's own events become :class:`~sessions.transceiver.events.ClientEvent`.

Barge-in (:mod:`sessions.transceiver.barge`): when the user's voice comes in while an
interruptible agent's audio is on the air, the reply is ducked (faded out and held) at once;
once the user has spoken long enough in a turn it is dropped and the agent is told how much of
it the user heard, and if the burst was not a turn it comes back where it stopped. Inbound
audio that the session's echo estimator explains as the agent's own voice coming back is not
voiced (``TurnConfig.echo_aware``).

A planned move (:meth:`VoiceLoop.quiesce`, then :meth:`VoiceLoop.moving_parts` on the old node
and :meth:`VoiceLoop.carry_in` on the new one) carries what is in flight: the client's packets
not yet played out, our frames not yet sent, the agent's state and the turn count. The turn
detector's own state does not move; a user turn open at the quiesce goes on, on the new node:
the turn the new detector starts next is that same turn (its ``SpeechStarted`` was already
told), unless the user stays silent, and then the turn ends ``end_silence_ms`` after the move.
A duck does not move either: the quiesce decides it (see :meth:`VoiceLoop.quiesce`).
"""

from __future__ import annotations

import collections
import math
from typing import Final, final

import attrs

from sessions.agents import FRAME_BYTES, Agent, DuckAwareAgent, ReactiveAgent, StatefulAgent
from sessions.audio.echo import EchoEstimator
from sessions.audio.jitter import Frame, FrameKind, JitterBuffer
from sessions.audio.opus import CodecError, OpusDecoder, OpusEncoder, VoiceCodec
from sessions.audio.pacer import FRAME_MS, FRAME_SECONDS, FRAME_TIMESTAMP, Pacer
from sessions.audio.vad import Vad
from sessions.deadlines import earlier
from sessions.snapshot import MAX_PENDING, MAX_PLAYOUT
from sessions.transceiver.barge import (
    Action,
    BargeIn,
    Duck,
    DuckLog,
    EchoGate,
    fade_in,
    fade_out,
)
from sessions.transceiver.events import ClientEvent
from sessions.transceiver.handover import frames_elapsed
from sessions.transceiver.parts import MovingParts, OutboundFrame
from sessions.turns import (
    SpeechClassifier,
    SpeechStarted,
    SpeechStopped,
    TurnConfig,
    TurnDetector,
    TurnEvent,
)

__all__ = ["MovingParts", "OutboundFrame", "VoiceLoop"]

# Frames pulled from the agent ahead of the pacer: enough that a tick never finds the pacer
# empty while the agent has audio, little enough that barge-in can still take frames back.
_PULL_AHEAD_MS: Final = 2 * FRAME_MS
_TS_MOD: Final = 1 << 32
# A frame due this close after a tick is played out in it: a pacer tick a hair before a
# playout tick must not send a frame the voice of that playout would have ducked.
_EARLY: Final = 0.001
#: frames in a row the classifier called no speech before the jitter buffer may drop a packet
#: to shorten its delay: a pause, not the unvoiced middle of a word (one or two frames)
_PAUSE_FRAMES: Final = 3


@final
class VoiceLoop:
    """What one session hears and says (see the module docstring).

    Idle until :meth:`start` (media flows), inert after :meth:`stop`. ``may_send`` is false
    when the client will not receive (its offer was ``sendonly``): the agent still hears the
    user but is never asked for audio. ``timestamp`` is the RTP timestamp of our first frame.
    ``turn_offset`` is added to the turn detector's numbers (a moved session's turns go on).
    ``codec`` sets up the encoder of what the agent says (libopus's complexity and bitrate).
    """

    def __init__(
        self,
        *,
        agent: Agent,
        may_send: bool,
        timestamp: int,
        turn_config: TurnConfig | None = None,
        vad: SpeechClassifier | None = None,
        turn_offset: int = 0,
        codec: VoiceCodec | None = None,
    ) -> None:
        self._agent = agent
        self._may_send = may_send
        #: nothing to ask the agent while nothing plays (sessions.agents.ReactiveAgent)
        self._reactive = isinstance(agent, ReactiveAgent) and bool(agent.reactive)
        self._turn_config = TurnConfig() if turn_config is None else turn_config
        cfg = self._turn_config
        classifier: SpeechClassifier = Vad() if vad is None else vad
        #: the session's echo estimate (``None``: not echo-aware)
        self.echo: EchoEstimator | None = None
        self._gate: EchoGate | None = None
        if cfg.echo_aware:
            self.echo = EchoEstimator(
                max_delay_ms=cfg.echo_max_delay_ms, margin_db=cfg.echo_margin_db
            )
            self._gate = EchoGate(classifier, self.echo)
            classifier = self._gate
        self._turns = TurnDetector(cfg, vad=classifier)
        self._barge = BargeIn(cfg)
        # A SpeechStarted held while the agent is ducked, and the fade due on the next frame
        # sent ("out": the duck, "in": the resume).
        self._held_start: SpeechStarted | None = None
        self._fade: str | None = None
        self._duck_times = DuckLog()
        #: ducks: (first voiced frame of the burst, first faded agent frame sent)
        self.ducks: list[tuple[float, float]] = self._duck_times.ducks
        #: the same, with the voiced frame's arrival and the faded frame's RTP timestamp
        self.duck_log: list[Duck] = self._duck_times.log
        self._barge_counts: collections.Counter[str] = collections.Counter()
        self._turn_offset = turn_offset
        #: the node's media tick, seconds (0: none): the pacer's talkspurts start on it
        self._grid = 0.0
        self._pacer = Pacer(initial_timestamp=timestamp)
        # What a move carries: the pacer's queue (PCM, the pacer keeps it to itself), the
        # client's latest packets and the last one played out, and where the media clock was
        # when the pacer has not started yet (its RTP timestamp, and when).
        self._queued: collections.deque[bytes] = collections.deque()
        self._heard: collections.deque[tuple[int, int, bytes, float]] = collections.deque(
            maxlen=MAX_PLAYOUT
        )
        self._played_seq: int | None = None
        self._clock: tuple[int, float] | None = None
        self._paused = False
        self._paused_at = 0.0
        # A user turn that was open on the old node: when its first voiced frame arrived, and
        # when it ends unless the new detector finds the user still talking; once it does,
        # only the first voiced frame (for the turn's duration).
        self._carried_turn: tuple[float, float] | None = None
        self._carried_first: float | None = None
        #: agent states a restore could not use (another kind of agent, or malformed)
        self.agent_state_rejected = 0
        self._jitter = JitterBuffer()
        # libopus's state is made on the first frame each way (about 43 KiB to encode and 30
        # KiB to decode): a connected session that never talks or hears has none.
        self._codec = VoiceCodec() if codec is None else codec
        self._encoder: OpusEncoder | None = None
        self._decoder: OpusDecoder | None = None
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
        # The frames due, as PCM, with the pacer's RTP timestamp, marker and tick deadline of
        # each and when the tick was handled: encoded when taken (frames_to_send), which a
        # node's grid does for its sessions after all their ticks (sessions/grid.py)
        self._unencoded: list[tuple[bytes, int, bool, float, float]] = []
        # frames that left late though their tick was handled in time (taken late)
        self._sent_late = 0
        self._frames_resized = 0
        self._dropped: collections.Counter[str] = collections.Counter()

    @property
    def codecs(self) -> tuple[OpusEncoder | None, OpusDecoder | None]:
        """The libopus encoder and decoder made so far: each on its first frame."""
        return self._encoder, self._decoder

    # --- life ---------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Media flows both ways from ``now`` on: start ticking (idempotent)."""
        if not self._running and not self._stopped:
            self._running = True
            self._poll_at = now

    def on_grid(self, tick: float) -> None:
        """The owner handles timers only on a shared grid of ``tick`` seconds (0: on time):
        what the agent says is paced on that grid (see :class:`~sessions.audio.pacer.Pacer`)."""
        self._grid = tick
        self._pacer.grid = tick

    def stop(self) -> None:
        """The session ended: no more ticks."""
        self._running = False
        self._stopped = True
        self._poll_at = None

    # --- a planned move -----------------------------------------------------------------------

    def quiesce(self, now: float, *, decide_duck: bool = True) -> None:
        """Stop ticking for a move, after the owner handled what was due at ``now``; decide a
        duck (:meth:`_settle_duck`) unless ``decide_duck`` is false (a hold: the duck goes on
        here after it). The agent's pending events are taken now, for the client from here."""
        if decide_duck:
            self._settle_duck(now)
        self._take_agent_events(now)
        self._paused = True
        self._paused_at = now

    def resume(self, now: float) -> None:
        """The move was abandoned: tick again. A talkspurt that was on goes on at once, its RTP
        timestamp advanced by the pause in whole frames (rounded up, as after a move): the
        frames it held are sent late rather than the pause's ticks in a burst. The jitter
        buffer plays out what it missed meanwhile."""
        self._paused = False
        if self._pacer.get_timer() is not None:
            advanced = self._pacer.next_timestamp + frames_elapsed(now - self._paused_at) * (
                FRAME_TIMESTAMP
            )
            self._pacer = Pacer(initial_timestamp=advanced % _TS_MOD, grid=self._grid)
            for pcm in self._queued:
                self._pacer.push(pcm, now)
            if self._barge.ducked and self._fade is None:
                self._pacer.hold()

    def moving_parts(self, now: float, last_sent: tuple[int, float] | None) -> MovingParts:
        """What the next owner needs of this quiesced loop (``last_sent``: the RTP timestamp
        and tick deadline of our last packet)."""
        if not self._paused:
            raise RuntimeError("only a quiesced voice loop hands its parts on")
        played = self._played_seq
        playout: dict[int, tuple[int, int, bytes, float]] = {}
        for seq, timestamp, payload, at in self._heard:
            # Serial-number order (RFC 3550 §A.1): only what comes after the last played.
            if played is None or 0 < (seq - played) & 0xFFFF < 1 << 15:
                playout.setdefault(seq, (seq, timestamp, payload, max(0.0, now - at)))
        agent_state = b""
        if isinstance(self._agent, StatefulAgent):
            agent_state = self._agent.save_state(now)
        first = self._open_turn_start()
        carried = 1 if self._carried_turn is not None else 0
        return MovingParts(
            next_timestamp=self.media_timestamp(now, last_sent),
            turns=self._turn_offset + self._turns.turns + carried,
            open_turn=None if first is None else max(0.0, now - first),
            playout=tuple(playout.values()),
            pending=tuple(self._queued)[:MAX_PENDING],
            agent_state=agent_state,
        )

    def carry_in(
        self,
        *,
        playout: tuple[tuple[int, int, bytes, float], ...],
        pending: tuple[bytes, ...],
        agent_state: bytes,
        now: float,
        elapsed: float = 0.0,
        open_turn: float | None = None,
    ) -> None:
        """Continue what another node's loop had in flight (:meth:`moving_parts`), at ``now``:
        our queued frames go out first, the client's packets are played out next, and the
        agent takes up its state (an agent of another kind, or a state it cannot read, starts
        fresh: counted in :attr:`agent_state_rejected`). ``open_turn`` is the age of the open
        user turn's first voiced frame (see the module docstring); the loop was built with the
        turns before it as its ``turn_offset``."""
        if open_turn is not None:
            quiesced = now - elapsed
            end_silence = self._turn_config.end_silence_ms / 1000
            self._carried_turn = (quiesced - open_turn, quiesced + end_silence)
        if agent_state:
            try:
                if not isinstance(self._agent, StatefulAgent):
                    raise ValueError("the agent keeps no state")
                self._agent.load_state(agent_state, now)
            except ValueError:
                self.agent_state_rejected += 1
        # What reached the old owner during the move is handed on and arrives just after the
        # client's next packets, which came straight here: let it still start the stream.
        self._jitter.backfill = True
        # The client's packets, as they arrived: their lateness is what the jitter buffer
        # measures, and these were not late (``elapsed`` ago was the quiesce).
        for seq, timestamp, payload, age in playout:
            self.receive(seq, timestamp, payload, now - elapsed - age)
        for pcm in pending:
            self._pacer.push(pcm, now)
            self._queued.append(pcm)
        if not pending:
            # The pacer starts its timestamp wherever its first talkspurt begins; ours must
            # keep pace with real time from the move on (see _speak).
            self._clock = (self._pacer.next_timestamp, now)

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
        self._heard.append((seq, timestamp, payload, now))

    def drop_due(self) -> None:
        """Forget the frames due and not taken (the session ended before they went out)."""
        self._unencoded.clear()

    def frames_to_send(self, now: float | None = None) -> list[OutboundFrame]:
        """The frames due since the last call, in order, encoded now (see ``_speak``). ``now``
        is when they are sent, if later than their ticks were handled: a frame that leaves
        more than the pacer's ``late_threshold`` after its deadline counts as late
        (``late_frames``) as one whose tick came late does."""
        unencoded = self._unencoded
        if not unencoded:
            return []
        encoder = self._encoder
        if encoder is None:
            encoder = self._encoder = self._codec.encoder()
        out = []
        threshold = self._pacer.late_threshold
        for pcm, timestamp, marker, deadline, handled in unencoded:
            out.append(OutboundFrame(encoder.encode(pcm), timestamp, marker, deadline))
            if now is not None and now - deadline > threshold >= handled - deadline:
                self._sent_late += 1  # the pacer counted its tick in time
        unencoded.clear()
        return out

    def next_event(self) -> ClientEvent | None:
        """The oldest event for the client not yet taken, or ``None``."""
        return self._events.popleft() if self._events else None

    # --- timers -------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When the next tick is due: a frame to play out or send, a turn to end, or (when
        nothing else ticks and we may send) the next 20 ms poll of the agent."""
        if not self._running or self._paused:
            return None
        first = earlier(self._jitter.get_timer(), self._pacer.get_timer())
        if first is None and self._may_send and not self._reactive:
            first = self._poll_at
        first = earlier(first, self._turns.get_timer())
        carried = self._carried_turn
        return first if carried is None else earlier(first, carried[1])

    def handle_timer(self, now: float) -> None:
        """The media tick: playout, turns, the agent, pacing. Harmless to call early."""
        if not self._running or self._paused:
            return
        # Playout: every frame the jitter buffer has due, to the turn detector and the agent.
        # (The parts are looked up once: none of them is replaced while frames play out.)
        jitter, turns, gate, echo = self._jitter, self._turns, self._gate, self.echo
        while (due := jitter.get_timer()) is not None and due <= now + _EARLY:
            # (a too-long delay is shortened in a pause of the user's, not in a word)
            frame = jitter.pop(max(now, due), speech=turns.unvoiced_run < _PAUSE_FRAMES)
            if frame is None:
                break  # the stream paused
            if frame.seq is not None:
                self._played_seq = frame.seq & 0xFFFF
            self._duck_times.played(self._played_seq if frame.kind is FrameKind.AUDIO else None)
            heard = self._render(frame)
            self._agent.on_audio(heard, now)
            if gate is not None and echo is not None:
                gate.echo = echo.heard(heard, now)
            for turn in turns.push(heard, now):
                self._on_turn(turn, now)
            self._after_frame(now)
        # A client that stops sending (DTX, an outage) still ends its turn.
        for turn in self._turns.poll(now):
            self._on_turn(turn, now)
        carried = self._carried_turn
        if carried is not None and now >= carried[1] and not self._turns.in_speech:
            # The turn open at the move: the user did not go on, so it ended at the move.
            first, ends = carried
            at = ends - self._turn_config.end_silence_ms / 1000
            self._carried_turn = None
            duration = max(0, round((at - first) * 1000)) + FRAME_MS
            self._on_turn(SpeechStopped(at=at, turn=1, duration_ms=duration), now)
            self._turn_offset += 1  # the fresh detector's first turn is the next one
        self._take_agent_events(now)
        if self._may_send:
            self._speak(now)
            self._take_agent_events(now)  # what the last pull said (a reply finished)
        self._poll_at = now + FRAME_SECONDS

    def _take_agent_events(self, now: float) -> None:
        for event in self._agent.poll_events():
            name = str(event.get("event", "agent_event"))
            self._emit(ClientEvent(name, now, {k: v for k, v in event.items() if k != "event"}))

    def _speak(self, now: float) -> None:
        # The agent's reply, a little ahead of the pacer; PCM is encoded only when sent (the
        # pacer's rule), so frames the pacer drops were never encoded. A tick handled late (a
        # loaded node) finds several due: one frame is pulled for each, so that the pacer sends
        # them as the burst it allows a caller that fell behind, instead of finding its queue
        # empty (an underrun: a hole in the middle of a reply the agent had ready).
        ahead = _PULL_AHEAD_MS + max(0, self._pacer.due(now) - 1) * FRAME_MS
        while self._pacer.queued_ms < ahead:
            pcm = self._agent.pull(now)
            if pcm is None:
                break
            if len(pcm) != FRAME_BYTES:
                raise ValueError(f"the agent returned {len(pcm)} bytes, not {FRAME_BYTES}")
            if self._clock is not None:
                # The first frame since a move: the media clock ran on from the move.
                timestamp, at = self._clock
                self._clock = None
                advanced = timestamp + frames_elapsed(now - at) * FRAME_TIMESTAMP
                self._pacer = Pacer(initial_timestamp=advanced % _TS_MOD, grid=self._grid)
            self._pacer.push(pcm, now)
            self._queued.append(pcm)
        sent = False
        if self._fade == "out" and not self._queued:
            self._fade = None  # nothing left to fade: the duck is silence already
            self._pacer.hold()
            self._duck_times.sent(now, None)
        pacer = self._pacer  # not replaced from here on
        while (due := pacer.get_timer()) is not None and due <= now:
            paced = pacer.pop(now)
            if paced is not None:
                pcm = paced.payload
                ramp = self._turn_config.ramp_ms
                if self._fade == "out":
                    # The duck: this frame goes out faded and is played again on a resume.
                    pcm = fade_out(pcm, ramp)
                    pacer.give_back(paced.payload)
                    pacer.hold()
                    self._duck_times.sent(paced.deadline, paced.timestamp)
                else:
                    if self._fade == "in":
                        pcm = fade_in(pcm, ramp)
                    self._queued.popleft()
                self._fade = None
                if self.echo is not None:
                    self.echo.sent(pcm, paced.deadline)
                self._unencoded.append((pcm, paced.timestamp, paced.marker, paced.deadline, now))
                sent = True
        if sent:
            if self._turn_ended_at is not None:
                self.turn_latencies.append((self._turn_ended_at, now))
                self._turn_ended_at = None
            self._last_agent_frame_at = now
        self._agent_on_air = sent or self._pacer.queued_ms > 0 or self._barge.ducked

    def _on_turn(self, turn: TurnEvent, now: float) -> None:
        """The user's turn started or ended: tell the agent and the client; barge in."""
        if self._carried_turn is not None and isinstance(turn, SpeechStarted):
            # The user went on talking over the move: this is the turn that was open there,
            # whose start everyone already heard of.
            self._carried_first = self._carried_turn[0]
            self._carried_turn = None
            return
        if self._carried_first is not None and isinstance(turn, SpeechStopped):
            duration = max(0, round((turn.at - self._carried_first) * 1000)) + FRAME_MS
            turn = attrs.evolve(turn, duration_ms=duration)
            self._carried_first = None
        if self._turn_offset:
            turn = attrs.evolve(turn, turn=turn.turn + self._turn_offset)
        if isinstance(turn, SpeechStarted):
            self._turn_ended_at = None
            if self._agent_on_air and self._agent.interruptible and self._may_send:
                if not self._barge.ducked:
                    # Voice that never ran long enough to duck still made a turn: duck now.
                    self._duck(now, onset=turn.at, voiced=self._turns.voiced_run)
                if not self._barge.confirmed:
                    self._held_start = turn  # told once the interruption is final
                    return
                self._emit(ClientEvent("speech_started", turn.at, {"turn": turn.turn}))
                self._barge_in(now)
            else:
                self._emit(ClientEvent("speech_started", turn.at, {"turn": turn.turn}))
        else:
            if self._held_start is not None:
                # The held turn ended before the duck did: it was a turn after all, though
                # no interruption; tell it, and bring the reply back.
                held, self._held_start = self._held_start, None
                self._emit(ClientEvent("speech_started", held.at, {"turn": held.turn}))
                self._agent.on_turn(held, now)
                self._barge.end()
                self._resume(now)
            self._turn_ended_at = turn.at
            fields: dict[str, object] = {"turn": turn.turn, "duration_ms": turn.duration_ms}
            if turn.cut:
                fields["cut"] = True  # the turn hit its length limit: the user may go on
            self._emit(ClientEvent("speech_stopped", turn.at, fields))
        self._agent.on_turn(turn, now)

    def _barge_in(self, now: float) -> None:
        """The user talks over the agent: its audio stops before the next 20 ms frame.

        Whatever the pacer still holds is dropped (never encoded, so no sequence numbers are
        spent on it) and the agent is told how much of its reply the user actually heard.
        """
        played_ms = self._pacer.stats().talkspurt_ms
        dropped_ms = self._pacer.flush()
        self._queued.clear()
        self._barge.end()
        self._fade = None
        self._barge_counts["interruptions"] += 1
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

    # --- ducking --------------------------------------------------------------------------------

    def _after_frame(self, now: float) -> None:
        """The barge-in rules after each frame played out (see :mod:`.barge`)."""
        turns = self._turns
        may_duck = (
            self._agent_on_air
            and self._agent.interruptible
            and self._may_send
            and not turns.in_speech
        )
        action = self._barge.frame(turns.voiced, turns.voiced_run, now, may_duck=may_duck)
        if action is Action.DUCK:
            self._ducked(now)
        elif action is Action.RESUME:
            if self._held_start is not None:
                self._held_start = None
                turns.dismiss()  # not a turn: nobody hears of it
            self._resume(now)
        elif self._held_start is not None and self._barge.confirmed:
            held, self._held_start = self._held_start, None
            self._emit(ClientEvent("speech_started", held.at, {"turn": held.turn}))
            self._barge_in(now)
            self._agent.on_turn(held, now)

    def _duck(self, now: float, *, onset: float, voiced: int) -> None:
        self._barge.duck(onset, voiced)
        self._ducked(now)

    def _ducked(self, now: float) -> None:
        self._fade = "out"
        onset = now if self._barge.onset is None else self._barge.onset
        arrived = self._duck_times.ducked(self._turns.voiced_run, onset, self._heard)
        self._barge_counts["ducks"] += 1
        played_ms = self._pacer.stats().talkspurt_ms
        if isinstance(self._agent, DuckAwareAgent):
            self._agent.on_maybe_interrupted(played_ms, now)
        # voice_ms: how long ago the first voiced frame arrived (the barge-in promise's origin)
        fields = {"played_ms": played_ms, "voice_ms": max(0, round((now - arrived) * 1000))}
        self._emit(ClientEvent("agent_ducked", now, fields))

    def _settle_duck(self, now: float) -> None:
        """A move does not carry a duck: it is decided here. A user turn open over it makes the
        interruption final (the held reply is not handed on); a shorter burst was no turn: the
        reply comes back, its faded frame faded in here for the next node to play on."""
        if not self._barge.ducked:
            return
        if self._held_start is not None:
            held, self._held_start = self._held_start, None
            self._emit(ClientEvent("speech_started", held.at, {"turn": held.turn}))
            self._barge_in(now)
            self._agent.on_turn(held, now)
            return
        self._barge.end()
        self._resume(now)
        if self._fade == "in" and self._queued:
            self._queued[0] = fade_in(self._queued[0], self._turn_config.ramp_ms)
            self._fade = None

    def _resume(self, now: float) -> None:
        self._barge_counts["resumes"] += 1
        if self._fade == "out":
            self._fade = None  # nothing was faded yet: nothing to bring back
            self._duck_times.cancel()
        else:
            self._fade = "in"
        self._pacer.release()
        if isinstance(self._agent, DuckAwareAgent):
            self._agent.on_resumed(now)
        self._emit(ClientEvent("agent_resumed", now, {}))

    def _render(self, frame: Frame) -> bytes:
        decoder = self._decoder
        if decoder is None:
            decoder = self._decoder = OpusDecoder()
        try:
            pcm = frame.render(decoder)
        except CodecError:
            self._dropped["codec_errors"] += 1
            pcm = decoder.conceal()
        if len(pcm) != FRAME_BYTES:
            # We negotiate 20 ms packets; a client sending other durations gets them cut or
            # padded to the frame the jitter buffer's clock plays.
            self._frames_resized += 1
            pcm = pcm[:FRAME_BYTES].ljust(FRAME_BYTES, b"\0")
        return pcm

    def _open_turn_start(self) -> float | None:
        """When the open user turn's first voiced frame arrived, if a turn is open."""
        if self._carried_turn is not None:
            return self._carried_turn[0]
        if self._carried_first is not None:
            return self._carried_first
        return self._turns.first_voiced_at

    def _emit(self, event: ClientEvent) -> None:
        self._events.append(event)

    # --- snapshots and statistics -------------------------------------------------------------

    def media_timestamp(self, now: float, last_sent: tuple[int, float] | None) -> int:
        """The RTP timestamp our media clock is at: the next tick's while talking, else the
        last packet's (``last_sent``: its timestamp and tick deadline) advanced by the whole
        ticks since (the pacer does the same on its next talkspurt), so that a restore never
        goes back behind what was sent."""
        pacer_next = self._pacer.next_timestamp
        if self._clock is not None:
            # Nothing sent since a move: the clock runs on from it.
            timestamp, at = self._clock
            return (timestamp + frames_elapsed(now - at) * FRAME_TIMESTAMP) % _TS_MOD
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
            "late_frames": pacer.late + self._sent_late,
            "frames_resized": self._frames_resized,
            "pacer": attrs.asdict(pacer),
            "jitter_buffer": attrs.asdict(self._jitter.stats()),
            "dropped": dict(self._dropped),
            "barge": {
                "ducks": self._barge_counts["ducks"],
                "resumes": self._barge_counts["resumes"],
                "interruptions": self._barge_counts["interruptions"],
                "echo_frames": 0 if self.echo is None else self.echo.frames_echo,
                "echo_suppressed": 0 if self._gate is None else self._gate.suppressed,
            },
        }
