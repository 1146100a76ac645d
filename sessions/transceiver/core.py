"""The :class:`Transceiver`: one voice session, composed of its three sans-I/O parts.

The transport (:mod:`~sessions.transceiver.transport`) turns datagrams into the client's Opus
payloads and connection events, the voice loop (:mod:`~sessions.transceiver.voice`) turns
those payloads into the agent's reply, and the checkpoint policy
(:mod:`~sessions.transceiver.checkpoints`) says when the session must be snapshotted. The
transceiver hands each part's output to the next and merges their events, in the order they
happened, into one queue; its deadline is the earliest of the parts'.
"""

from __future__ import annotations

import collections
import secrets
from collections.abc import Sequence
from typing import Final, final

from sessions.agents import Agent, EchoAgent
from sessions.audio.opus import VoiceCodec
from sessions.audio.pacer import FRAME_TIMESTAMP
from sessions.deadlines import earlier
from sessions.snapshot import SessionSnapshot
from sessions.transceiver.barge import Duck
from sessions.transceiver.checkpoints import CheckpointPolicy
from sessions.transceiver.connection import SessionState
from sessions.transceiver.events import DtlsConnected, SessionEvent
from sessions.transceiver.handover import (
    CODE_ENDED,
    CODE_NOT_CONNECTED,
    CODE_NOT_QUIESCED,
    MoveRefused,
    frames_elapsed,
)
from sessions.transceiver.ledger import MediaLedger
from sessions.transceiver.transport import Transport, restore_state
from sessions.transceiver.voice import VoiceLoop
from sessions.turns import SpeechClassifier, TurnConfig
from sessions.webrtc.certs import Certificate
from sessions.webrtc.ice import PeerAddress
from sessions.webrtc.srtp import RTP_RESERVE

__all__ = ["Transceiver"]

# A restore moves the RTP timestamp forward with the sequence number, by at most this many
# frames: all the previous owner can have sent beyond a snapshot is one reservation.
_MAX_JUMP_FRAMES: Final = RTP_RESERVE
#: frames a crash restore's timestamp moves on beyond the time since its checkpoint: the
#: previous owner's pacer may have sent a frame or two early, and two hosts' clocks differ
_CRASH_SLACK_FRAMES: Final = 5
_TS_MOD: Final = 1 << 32


@final
class Transceiver:
    """One voice session, without I/O (see :mod:`sessions.transceiver`).

    Build it with :meth:`accept` (a new call) or :meth:`restore` (a call moved from another
    node). Not thread-safe: one task owns it.
    """

    def __init__(
        self, *, session_id: str, transport: Transport, voice: VoiceLoop, created: float
    ) -> None:
        """Use :meth:`accept` or :meth:`restore`."""
        if not isinstance(session_id, str) or not session_id:
            raise ValueError("session_id must be a non-empty string")
        #: the session's id, as the signaling layer knows it
        self.session_id: Final = session_id
        #: our ICE ufrag: the relay routes the client's first STUN packet by it
        self.local_ufrag: Final = transport.local_ufrag
        self._transport = transport
        self._voice = voice
        self._checkpoints = CheckpointPolicy()
        self._created = created
        self._events: collections.deque[SessionEvent] = collections.deque()

    def __repr__(self) -> str:
        return (
            f"Transceiver(session_id={self.session_id!r}, state={self.state.value}, "
            f"selected={self.selected_address!r})"
        )

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def accept(
        cls,
        offer_sdp: str,
        *,
        session_id: str,
        certificate: Certificate,
        candidates: Sequence[tuple[str, int]],
        now: float,
        agent: Agent | None = None,
        turn_config: TurnConfig | None = None,
        ufrag: str | None = None,
        vad: SpeechClassifier | None = None,
        codec: VoiceCodec | None = None,
    ) -> tuple[Transceiver, str]:
        """Answer a client's offer: a new session and the SDP answer to send back.

        Raises :class:`~sessions.webrtc.errors.SdpError` (its ``code`` is the signaling error
        code) for an offer we cannot answer, and :class:`ValueError` for bad local arguments
        (``candidates`` empty or not IP literals). ``candidates`` are our UDP host candidates,
        most preferred first. ``ufrag`` is our ICE ufrag if the caller minted it (in a cluster it
        carries the relays' routing hint, relay/tunnel/hint.py); otherwise a random one.
        ``vad`` replaces the turn detector's voice activity detector (for measurements).
        """
        transport, answer = Transport.accept(
            offer_sdp, certificate=certificate, candidates=candidates, now=now, ufrag=ufrag
        )
        voice = VoiceLoop(
            agent=EchoAgent() if agent is None else agent,
            may_send=transport.may_send,
            # RFC 3550 §5.1: a random initial timestamp.
            timestamp=secrets.randbits(32),
            turn_config=turn_config,
            vad=vad,
            codec=codec,
        )
        return cls(session_id=session_id, transport=transport, voice=voice, created=now), answer

    @classmethod
    def restore(
        cls,
        snapshot: SessionSnapshot,
        *,
        certificate: Certificate,
        now: float,
        agent: Agent | None = None,
        turn_config: TurnConfig | None = None,
        vad: SpeechClassifier | None = None,
        elapsed: float | None = None,
        codec: VoiceCodec | None = None,
    ) -> Transceiver:
        """Continue a session from ``snapshot``, taken ``now``: an exact snapshot from
        :meth:`quiesce` (a planned move, see :meth:`_continue`), or the newest stored
        checkpoint (after a crash).

        The result is already connected: it answers the client's consent checks with the same
        credentials, decrypts its SRTP and continues our outbound stream, without a DTLS
        handshake (the keys are in the snapshot; the DTLS association itself does not move, so
        DTLS records from the client are counted and dropped from now on). It sends no media
        until a snapshot of its own is confirmed: its first event is
        :class:`~sessions.transceiver.events.CheckpointDue`.

        Our RTP continues at the sequence number after the SRTP reservation. With ``elapsed``
        (the wall time since the checkpoint was taken, :attr:`SessionSnapshot.taken_at`) the
        timestamp keeps pace with real time: it moves on by the frames that cover ``elapsed``
        and a few more (:data:`_CRASH_SLACK_FRAMES`, for the pacer and the clocks of two
        hosts), which is past anything the previous owner can have sent, since it sent in real
        time; the client's jitter buffer sees a gap as long as the outage, not a stream tens of
        seconds ahead. Without it the timestamp jumps by as many frames as the sequence number
        (at most one reservation's worth, about 41 s). ``certificate`` is this node's; it is
        kept for completeness, as no handshake runs again.

        An exact snapshot continues with no jump at all, ``elapsed`` seconds (the wall time
        since the quiesce) after it was taken: see :meth:`quiesce`.
        """
        if snapshot.exact:
            return cls._continue(
                snapshot,
                now=now,
                elapsed=elapsed or 0.0,
                agent=agent,
                turn_config=turn_config,
                vad=vad,
                codec=codec,
            )
        transport = Transport.restore(snapshot, now)
        if elapsed is None:
            jump = min((transport.next_seq - snapshot.next_seq) & 0xFFFF, _MAX_JUMP_FRAMES)
        else:
            jump = frames_elapsed(elapsed) + _CRASH_SLACK_FRAMES
        voice = VoiceLoop(
            agent=EchoAgent() if agent is None else agent,
            may_send=transport.may_send,
            timestamp=(snapshot.next_timestamp + jump * FRAME_TIMESTAMP) % _TS_MOD,
            turn_config=turn_config,
            vad=vad,
            codec=codec,
        )
        core = cls(
            session_id=snapshot.session_id,
            transport=transport,
            voice=voice,
            created=now - snapshot.age,
        )
        return core._begin(now)

    @classmethod
    def _continue(
        cls,
        snapshot: SessionSnapshot,
        *,
        now: float,
        elapsed: float,
        agent: Agent | None,
        turn_config: TurnConfig | None,
        vad: SpeechClassifier | None,
        codec: VoiceCodec | None,
    ) -> Transceiver:
        """A planned move's second half: continue an exact snapshot ``elapsed`` seconds after
        it was taken (see :meth:`quiesce`)."""
        elapsed = max(0.0, elapsed)
        transport = Transport.restore(snapshot, now, elapsed=elapsed)
        # The media clock ran on through the blackout, in whole frames (rounded up: never
        # behind real time); the sequence number did not.
        advance = frames_elapsed(elapsed) * FRAME_TIMESTAMP
        voice = VoiceLoop(
            agent=EchoAgent() if agent is None else agent,
            may_send=transport.may_send,
            timestamp=(snapshot.next_timestamp + advance) % _TS_MOD,
            turn_config=turn_config,
            vad=vad,
            codec=codec,
            # An open turn goes on here: the new detector's first turn is that one.
            turn_offset=snapshot.turns - (snapshot.open_turn is not None),
        )
        voice.carry_in(
            playout=snapshot.playout,
            pending=snapshot.pending,
            agent_state=snapshot.agent_state,
            now=now,
            elapsed=elapsed,
            open_turn=snapshot.open_turn,
        )
        core = cls(
            session_id=snapshot.session_id,
            transport=transport,
            voice=voice,
            created=now - elapsed - snapshot.age,
        )
        # It may send at once (within the old owner's stored reservation); its own
        # checkpoint is asked for at once all the same.
        return core._begin(now)

    def _begin(self, now: float) -> Transceiver:
        """A restored core's first step: checkpoints from its keys, then what is due."""
        keys = self._transport.keys
        if not self._transport.ended and keys is not None:
            self._checkpoints.start(keys, now, state=self._transport.restore_state)
            self._take_checkpoint_events()
        self._pump(now)
        return self

    # --- observation --------------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """Where the session is."""
        return self._transport.state

    @property
    def quiesced(self) -> bool:
        """Whether the session is frozen for a planned move (:meth:`quiesce`)."""
        return self._transport.quiesced

    def on_grid(self, tick: float) -> None:
        """The owner handles this transceiver's timers only on a shared grid of ``tick``
        seconds (a node's media tick; 0: on time): its outbound audio is paced on that grid."""
        self._voice.on_grid(tick)

    @property
    def media_ready(self) -> bool:
        """SRTP is keyed and the client nominated a pair: media flows both ways."""
        return self._transport.media_ready

    @property
    def ledger(self) -> MediaLedger:
        """What this transceiver decrypted and protected, and when (transceiver/ledger.py)."""
        return self._transport.ledger

    @property
    def selected_address(self) -> PeerAddress | None:
        """The client's nominated address, where media goes; ``None`` before nomination."""
        return self._transport.selected_address

    @property
    def local_ssrc(self) -> int:
        """The SSRC of our outbound RTP stream."""
        return self._transport.local_ssrc

    @property
    def barge_ins(self) -> list[tuple[float, float]]:
        """Barge-in reactions: (first voiced frame of the interrupting turn, last agent frame)."""
        return self._voice.barge_ins

    @property
    def ducks(self) -> list[tuple[float, float]]:
        """Duck reactions: (first voiced frame of the burst, first faded agent frame sent)."""
        return self._voice.ducks

    @property
    def duck_log(self) -> list[Duck]:
        """Every duck's timing, from the first voiced frame's arrival (:class:`.barge.Duck`)."""
        return self._voice.duck_log

    @property
    def turn_latencies(self) -> list[tuple[float, float]]:
        """End-of-turn latencies: (last voiced frame, first agent frame of the reply)."""
        return self._voice.turn_latencies

    def next_event(self) -> SessionEvent | None:
        """The oldest event not yet taken, or ``None``."""
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self) -> list[tuple[bytes, PeerAddress]]:
        """Datagrams to send, in order, each with its destination."""
        return self._transport.datagrams_to_send()

    # --- input and timers ---------------------------------------------------------------------

    def receive(self, data: bytes, addr: PeerAddress, now: float) -> None:
        """Handle one UDP datagram from ``addr`` received at ``now``; never raises for it.

        The first byte says what it is (RFC 7983 §7): STUN goes to the ICE responder, DTLS to
        the DTLS server (only from an address with a successful check), SRTP and SRTCP are
        accepted only from the selected address. Everything else is counted and dropped.

        A quiesced session takes nothing: this raises :class:`RuntimeError` (its owner keeps
        what arrives, to hand it on or feed it in after :meth:`resume`).
        """
        self._transport.receive(data, addr, now)
        self._pump(now)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due, or ``None`` (an ended or quiesced session has
        none): the earliest of the transport's, the voice loop's and the checkpoint policy's
        deadlines."""
        transport = self._transport
        if not transport.timed:  # ended or quiesced
            return None
        return earlier(
            earlier(transport.get_timer(), self._voice.get_timer()),
            self._checkpoints.get_timer(),
        )

    def handle_timer(self, now: float, *, send: bool = True) -> None:
        """Run whatever is due at ``now``: consent expiry, DTLS retransmission, the connect
        timeout and RTCP (the transport), the media tick (playout, agent, pacing) unless the
        session just ended, then checkpoint requests (after the tick, whose packets may have
        used up the reservation).

        With ``send`` false the tick's frames are left for :meth:`send_due` to encode and send
        (a node's grid runs several sessions' ticks before their sends, sessions/grid.py).

        Harmless to call early or repeatedly, and while quiesced (it does nothing then).
        """
        transport = self._transport
        if not transport.timed:  # ended or quiesced
            return
        transport.handle_timer(now)
        self._pump(now)
        if transport.ended:
            return
        voice = self._voice
        voice.handle_timer(now)
        if send:
            self._send_frames(now)
        while (event := voice.next_event()) is not None:
            self._events.append(event)
        self._checkpoints.handle_timer(now)
        self._take_checkpoint_events()

    def send_due(self, now: float) -> None:
        """Encode and send at ``now`` the frames :meth:`handle_timer` left (``send`` false), then
        the checkpoint request they may call for (the reservation running low); a frame sent
        late counts in ``late_frames``. Frames of a session that ended or was quiesced
        meanwhile are dropped: nothing is protected then."""
        if not self._transport.timed:
            self._voice.drop_due()
            return
        self._send_frames(now)
        self._checkpoints.handle_timer(now)
        self._take_checkpoint_events()

    def _send_frames(self, now: float) -> None:
        send_media = self._transport.send_media
        for frame in self._voice.frames_to_send(now):
            send_media(
                frame.payload,
                timestamp=frame.timestamp,
                marker=frame.marker,
                deadline=frame.deadline,
                now=now,
            )

    # --- checkpoints --------------------------------------------------------------------------

    def snapshot(self, now: float) -> SessionSnapshot:
        """The session as a value, to store and then :meth:`confirm`.

        Reserves outbound SRTP indexes for whoever restores it (see
        :mod:`sessions.webrtc.srtp`). Raises :class:`RuntimeError` before DTLS has keyed
        SRTP: there is nothing a restore could continue, and while quiesced: the exact
        snapshot is the session's last word on this node.
        """
        if self._transport.keys is None:
            raise RuntimeError("no checkpoint before the DTLS handshake has keyed SRTP")
        if self._transport.quiesced:
            raise RuntimeError("a quiesced session takes no checkpoints")
        self._checkpoints.snapshot_taken(now)
        part = self._transport.snapshot(now)
        return SessionSnapshot(
            session_id=self.session_id,
            age=max(0.0, now - self._created),
            ice=part.ice,
            remote_fingerprint=part.remote_fingerprint,
            srtp=part.srtp,
            next_seq=part.next_seq,
            next_timestamp=self._voice.media_timestamp(now, part.last_sent),
            opus_pt=part.opus_pt,
            cname=part.cname,
            direction=part.direction,
            packets_sent=part.packets_sent,
            octets_sent=part.octets_sent,
        )

    def confirm(self, snapshot: SessionSnapshot) -> None:
        """``snapshot`` (one of ours) is durably stored as the session's newest state: the
        session may now send up to what it reserved. Raises :class:`ValueError` for a snapshot
        of another session."""
        if self._transport.keys is None:
            raise RuntimeError("no snapshot can be confirmed before SRTP is keyed")
        if snapshot.session_id != self.session_id:
            raise ValueError("not a snapshot of this session")
        self._transport.confirm(snapshot.srtp)
        srtp = snapshot.srtp
        self._checkpoints.snapshot_confirmed(
            restore_state(snapshot.ice, srtp.remote_ssrc, srtp.rtp_received, snapshot.packets_sent),
            self._created + snapshot.age,
        )

    # --- a planned move -----------------------------------------------------------------------

    def quiesce(self, now: float) -> SessionSnapshot:
        """Stop at a frame boundary and return the session's exact snapshot, for a planned move.

        What is due at ``now`` is handled first (the frame due goes out: take
        :meth:`datagrams_to_send` and the events as usual). Then the session is frozen
        (:attr:`quiesced`): it takes no datagram (:meth:`receive` raises), has no timer, sends
        nothing, takes no checkpoint, and never protects another SRTP or SRTCP packet — which is
        what lets its snapshot be exact: our next RTP sequence number, timestamp and SRTP and
        SRTCP indexes are exactly the next ones (:attr:`SessionSnapshot.exact
        <sessions.snapshot.SessionSnapshot.exact>`), and a :meth:`restore` of it continues
        with no jump. The snapshot also carries what is in flight in the session (the client's
        packets not yet played out, our frames not yet sent, the agent's state, the turn count
        and the user turn still open, which goes on on the next node). Afterwards, either the
        move goes ahead (drop this transceiver without :meth:`close`, which would send nothing
        anyway) or it is abandoned (:meth:`resume`).

        Raises :class:`~sessions.transceiver.handover.MoveRefused`: ``not_connected`` before
        DTLS has keyed SRTP (nothing could continue it: move it once connected), ``ended``
        for a session that is over (or ends at ``now``). A second quiesce is a local error
        (:class:`RuntimeError`).
        """
        transport = self._transport
        if transport.quiesced:
            raise RuntimeError("the session is already quiesced")
        if transport.ended:
            raise MoveRefused(CODE_ENDED, f"the session is {transport.state.value}")
        if transport.keys is None or transport.state is not SessionState.CONNECTED:
            raise MoveRefused(CODE_NOT_CONNECTED, "the DTLS handshake has not keyed SRTP yet")
        # A frame boundary: whatever is due now goes out from here, then nothing more.
        self.handle_timer(now)
        if transport.ended:
            raise MoveRefused(CODE_ENDED, f"the session is {transport.state.value}")
        voice = self._voice
        voice.quiesce(now)
        while (event := voice.next_event()) is not None:
            self._events.append(event)
        transport.quiesce()
        part = transport.exact_snapshot(now)
        moving = voice.moving_parts(now, part.last_sent)
        return SessionSnapshot(
            session_id=self.session_id,
            age=max(0.0, now - self._created),
            ice=part.ice,
            remote_fingerprint=part.remote_fingerprint,
            srtp=part.srtp,
            next_seq=part.next_seq,
            next_timestamp=moving.next_timestamp,
            opus_pt=part.opus_pt,
            cname=part.cname,
            direction=part.direction,
            packets_sent=part.packets_sent,
            octets_sent=part.octets_sent,
            agent_state=moving.agent_state,
            exact=True,
            turns=moving.turns,
            open_turn=moving.open_turn,
            playout=moving.playout,
            pending=moving.pending,
        )

    def hold(self, now: float) -> None:
        """Freeze at once, *without* handling what fell due: whoever runs the session may no
        longer act for it (its lease's safety deadline passed; the lease may still be alive).
        Nothing is received, sent, timed or protected from here; :meth:`resume` goes on as
        after an abandoned move. Holding a held session does nothing. Raises
        :class:`~sessions.transceiver.handover.MoveRefused` like :meth:`quiesce` for a session
        that is not connected or has ended."""
        transport = self._transport
        if transport.quiesced:
            return
        if transport.ended:
            raise MoveRefused(CODE_ENDED, f"the session is {transport.state.value}")
        if transport.keys is None or transport.state is not SessionState.CONNECTED:
            raise MoveRefused(CODE_NOT_CONNECTED, "the DTLS handshake has not keyed SRTP yet")
        voice = self._voice
        voice.quiesce(now, decide_duck=False)  # a hold resumes here: a duck goes on
        while (event := voice.next_event()) is not None:
            self._events.append(event)
        transport.quiesce()

    def resume(self, now: float) -> None:
        """The planned move was abandoned: carry on as if nothing happened. The sequence
        number goes on by one; the RTP timestamp keeps pace with the time the session stood
        still (the pacer catches up, or skips what is too late); RTCP and checkpoints that fell
        due go out at the next :meth:`handle_timer`. Feed in what arrived meanwhile, in order,
        with :meth:`receive`. Raises :class:`~sessions.transceiver.handover.MoveRefused`
        (``not_quiesced``) for a session that is not quiesced."""
        if not self._transport.quiesced:
            raise MoveRefused(CODE_NOT_QUIESCED, "the session is not quiesced")
        self._transport.resume(now)
        self._voice.resume(now)
        self._pump(now)

    # --- ending -------------------------------------------------------------------------------

    def close(self, now: float) -> None:
        """End the session from our side: RTCP BYE (RFC 3550 §6.6), DTLS close_notify (RFC
        5246 §7.2.1), then :class:`~sessions.transceiver.events.SessionClosed`. Nothing is sent
        or timed afterwards. A quiesced session ends without sending anything (it may live on
        elsewhere)."""
        self._transport.close(now)
        self._pump(now)

    # --- plumbing -----------------------------------------------------------------------------

    def _pump(self, now: float) -> None:
        """Pass on what the transport produced: the client's audio to the voice loop, its
        events to our queue (a keyed SRTP starts the checkpoint policy, whose first request
        follows ``DtlsConnected`` at once); then start or stop the other parts."""
        transport = self._transport
        for packet in transport.received_media():
            self._voice.receive(packet.sequence_number, packet.timestamp, packet.payload, packet.at)
        while (event := transport.next_event()) is not None:
            self._events.append(event)
            keys = transport.keys
            if isinstance(event, DtlsConnected) and keys is not None:
                # Before anything is sent, so the first reservation covers the whole stream.
                self._checkpoints.start(keys, now, state=self._transport.restore_state)
                self._take_checkpoint_events()
        if transport.ended:
            self._voice.stop()
            self._checkpoints.stop()
        elif transport.media_ready:
            self._voice.start(now)

    def _take_checkpoint_events(self) -> None:
        while (event := self._checkpoints.next_event()) is not None:
            self._events.append(event)

    # --- statistics ---------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """Counters and measurements for metrics and logs (plain values, JSON-friendly).

        ``packets_in``/``bytes_in`` count authentic RTP from the client, ``packets_out``/
        ``bytes_out`` the RTP we sent; ``loss_fraction`` (0..1, over the last RTCP interval),
        ``loss_cumulative`` and ``jitter_ms`` describe the client's stream as we receive it
        (RFC 3550 §6.4.1, §A.3, §A.8); ``remote_*`` the same about our stream, as the client
        reports it; ``rtt_ms`` comes from the client's reports about our SRs; ``late_frames``
        counts pacing ticks handled, or frames sent, more than 5 ms late; ``dropped`` counts
        input dropped by reason, ``ice`` the responder's own counters.
        """
        keys = self._transport.keys
        t = self._transport.stats()
        v = self._voice.stats()
        dropped = t["dropped"]
        voice_dropped = v["dropped"]
        assert isinstance(dropped, dict) and isinstance(voice_dropped, dict)
        return {
            "session_id": self.session_id,
            **{key: t[key] for key in _TRANSPORT_STATS},
            "late_frames": v["late_frames"],
            "send_blocked": t["send_blocked"],
            "rtcp_blocked": t["rtcp_blocked"],
            "frames_resized": v["frames_resized"],
            "pacer": v["pacer"],
            "jitter_buffer": v["jitter_buffer"],
            "checkpoints": {
                **self._checkpoints.stats(),
                "rtp_headroom": None if keys is None else keys.rtp_headroom,
                "srtcp_headroom": None if keys is None else keys.srtcp_headroom,
            },
            "dropped": {**dropped, **voice_dropped},
            "agent_state_rejected": self._voice.agent_state_rejected,
            "ice": t["ice"],
        }


# The transport's statistics in the order Transceiver.stats lists them first.
_TRANSPORT_STATS: Final = (
    "state",
    "selected",
    "profile",
    "packets_in",
    "bytes_in",
    "packets_out",
    "bytes_out",
    "datagrams_in",
    "datagrams_out",
    "udp_bytes_in",
    "udp_bytes_out",
    "dtls_in",
    "rtcp_in",
    "rtcp_out",
    "bye_in",
    "loss_fraction",
    "loss_cumulative",
    "jitter_ms",
    "rtt_ms",
    "remote_loss_fraction",
    "remote_loss_cumulative",
    "remote_jitter_ms",
)
