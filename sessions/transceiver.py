"""The sans-I/O core of one voice session: ICE-lite, DTLS-SRTP, Opus and an agent.

A :class:`Transceiver` is everything one WebRTC client's call is, except the socket and the
clock. The owner (a Trio task on a node) feeds it datagrams with :meth:`Transceiver.receive`,
sends what :meth:`Transceiver.datagrams_to_send` returns, drains :meth:`Transceiver.next_event`
and sleeps until :meth:`Transceiver.get_timer`, when :meth:`Transceiver.handle_timer` is due.
Time is always passed in (seconds on one monotonic clock); nothing here reads a clock, sleeps
or touches the network, so the whole call can be driven by a test's virtual clock.

Life of a session:

1. :meth:`Transceiver.accept` parses the client's offer, mints our ICE credentials and SSRC and
   writes the answer (ICE-lite, DTLS passive, Opus only).
2. The client checks connectivity; the ICE-lite responder answers (RFC 8445 §7.3) and follows
   its nomination (:class:`IceConnected`).
3. The client, always the DTLS client (RFC 8842 §5.3), runs the handshake from an address whose
   check succeeded; its certificate must match the offer's fingerprint (RFC 8827 §6.5). The
   exported keys key SRTP (RFC 5764 §4.2): we are the server, so we protect with the server
   key and salt and unprotect with the client's (:class:`DtlsConnected`).
4. Media: SRTP from the selected address is unprotected, parsed and put in the jitter buffer.
   On each 20 ms tick the jitter buffer plays a frame out (decoded, or concealed, or
   recovered from FEC), the agent hears it, the agent's reply is queued in the pacer, and the
   pacer's frame is encoded, packetized (RFC 7587), protected and sent to the selected address
   (:class:`MediaStarted` when the client's first packet arrives). RTCP SR/RR with SDES goes
   out every ~2 s (RFC 3550 §6.3) and the client's reports give the round-trip time.
5. The client's consent checks keep the session alive; 30 s without one ends it
   (:class:`SessionFailed` ``consent_expired``, RFC 7675 §5.1). :meth:`Transceiver.close` ends
   it from our side with RTCP BYE and DTLS close_notify (:class:`SessionClosed`).

Checkpoints. The SRTP state reserves outbound indexes in each snapshot and refuses to protect
beyond what a *confirmed* snapshot reserved (see :mod:`sessions.webrtc.srtp`). So the
transceiver asks for checkpoints with :class:`CheckpointDue`: right after DTLS completes (or a
restore), then every :data:`CHECKPOINT_INTERVAL`, sooner when the reservation runs low, and
again every :data:`CHECKPOINT_RETRY` while a request goes unanswered. The owner answers with
:meth:`Transceiver.snapshot`, stores :meth:`SessionSnapshot.to_bytes
<sessions.snapshot.SessionSnapshot.to_bytes>` durably, then calls :meth:`Transceiver.confirm`.
:meth:`Transceiver.restore` continues the session from the newest stored snapshot on any node:
the client notices a gap of a few hundred milliseconds and a jump in sequence numbers, and
renegotiates nothing.

Input from the network never raises: every datagram is handled, or counted (see
:meth:`Transceiver.stats`) and dropped.
"""

from __future__ import annotations

import collections
import enum
import math
import random
import secrets
from collections.abc import Sequence
from typing import Any, Final, final

import attrs

from sessions.agents import FRAME_BYTES, Agent, EchoAgent
from sessions.audio.jitter import Frame, JitterBuffer
from sessions.audio.opus import CLOCK_RATE, CodecError, OpusDecoder, OpusEncoder
from sessions.audio.pacer import FRAME_MS, FRAME_SECONDS, FRAME_TIMESTAMP, PacedFrame, Pacer
from sessions.snapshot import SessionSnapshot
from sessions.turns import SpeechStarted, TurnConfig, TurnDetector, TurnEvent
from sessions.webrtc import rtcp, rtp, sdp
from sessions.webrtc.certs import Certificate
from sessions.webrtc.demux import PacketKind, classify, is_rtcp
from sessions.webrtc.dtls import (
    Closed,
    DtlsError,
    DtlsServer,
    DtlsState,
    HandshakeComplete,
    HandshakeFailed,
)
from sessions.webrtc.errors import RtpError
from sessions.webrtc.ice import (
    Address,
    ConsentExpired,
    IceLiteResponder,
    PairNominated,
    ResponderState,
    mint_credentials,
)
from sessions.webrtc.srtp import (
    RTP_RESERVE,
    SrtpError,
    SrtpIndexError,
    SrtpProfile,
    SrtpSession,
)

__all__ = [
    "CHECKPOINT_INTERVAL",
    "CHECKPOINT_RETRY",
    "CODE_CONNECT_TIMEOUT",
    "CODE_CONSENT_EXPIRED",
    "CODE_DTLS_FAILED",
    "CONNECT_TIMEOUT",
    "RTCP_INTERVAL",
    "CheckpointDue",
    "ClientEvent",
    "DtlsConnected",
    "EchoAgent",
    "IceConnected",
    "MediaStarted",
    "SessionClosed",
    "SessionEvent",
    "SessionFailed",
    "SessionSnapshot",
    "SessionState",
    "Transceiver",
]

#: A session that is not keyed and nominated this long after the offer was accepted fails.
CONNECT_TIMEOUT: Final = 30.0
#: Seconds between checkpoints once connected.
CHECKPOINT_INTERVAL: Final = 10.0
#: Seconds after which an unanswered :class:`CheckpointDue` is repeated, and the least time
#: between two requests made because the SRTP reservation runs low.
CHECKPOINT_RETRY: Final = 2.0
#: Mean seconds between our RTCP compound packets (randomized by 0.5..1.5, RFC 3550 §6.3.1).
RTCP_INTERVAL: Final = 2.0

# Ask for a checkpoint early once fewer outbound indexes than these are left in the confirmed
# reservation: 1024 RTP packets are 20 s of audio, 64 SRTCP packets a couple of minutes.
_LOW_RTP_HEADROOM: Final = 1024
_LOW_SRTCP_HEADROOM: Final = 64
# Frames pulled from the agent ahead of the pacer: enough that a tick never finds the pacer
# empty while the agent has audio, little enough that barge-in can still take frames back.
_PULL_AHEAD_MS: Final = 2 * FRAME_MS
# SR NTP timestamps remembered to recognize the LSR echoed in the client's reports.
_SR_MEMORY: Final = 16
# The first sequence number is drawn from [_FIRST_SEQ, 2**15). Below 2**15 as
# sessions.webrtc.srtp asks: a snapshot taken before the first packet (the one at connect)
# then reserves every index the stream could have used, up to 2**15 + RTP_RESERVE - 1, and a
# restore from it continues at 2**15 + RTP_RESERVE. Not below _FIRST_SEQ, so that this jump
# stays under 2**15 from wherever the stream was: a larger one would look like a step back
# to an RTP receiver's serial-number arithmetic (RFC 3550 §A.1) and to an RFC 3711 §3.3.1
# index estimate (libsrtp special-cases ROC 0 and accepts it, others need not).
_FIRST_SEQ: Final = 2 * RTP_RESERVE
# A restore moves the RTP timestamp forward with the sequence number, by at most this many
# frames: all the previous owner can have sent beyond a snapshot is one reservation.
_MAX_JUMP_FRAMES: Final = RTP_RESERVE
_U32: Final = 0xFFFF_FFFF
_TS_MOD: Final = 1 << 32
_REASON_LIMIT: Final = 200

#: ``SessionFailed.code`` values.
CODE_CONSENT_EXPIRED: Final = "consent_expired"
CODE_DTLS_FAILED: Final = "dtls_failed"
CODE_CONNECT_TIMEOUT: Final = "connect_timeout"


# --- events ---------------------------------------------------------------------------------


@final
@attrs.frozen
class IceConnected:
    """The client nominated the pair from ``addr`` (RFC 8445 §7.3.1.5): media goes there.

    Emitted again if the client nominates another address later (a NAT rebinding, a network
    change); the latest nomination wins.
    """

    addr: Address


@final
@attrs.frozen
class DtlsConnected:
    """The DTLS handshake completed with the offered certificate and keyed SRTP."""

    profile: SrtpProfile


@final
@attrs.frozen
class MediaStarted:
    """The client's first authentic RTP packet arrived."""


@final
@attrs.frozen
class SessionFailed:
    """The session is over because something went wrong; ``code`` is machine-readable.

    Codes: ``consent_expired`` (RFC 7675 §5.1), ``dtls_failed`` (handshake failed, e.g. a
    certificate that does not match the offer, or the association ended by a fatal alert),
    ``connect_timeout`` (not connected within :data:`CONNECT_TIMEOUT`). The transceiver is
    inert afterwards: it sends nothing and has no timer.
    """

    reason: str
    code: str


@final
@attrs.frozen
class SessionClosed:
    """The session ended cleanly, by :meth:`Transceiver.close` or the client's close_notify."""

    reason: str


@final
@attrs.frozen
class CheckpointDue:
    """Take :meth:`Transceiver.snapshot`, store it durably, then :meth:`Transceiver.confirm`."""


@final
@attrs.frozen
class ClientEvent:
    """Something the client is told on its signaling socket: the user's turns
    (``speech_started``/``speech_stopped``), the agent's replies (``agent_started``,
    ``agent_finished``, ``agent_interrupted``) and whatever the agent emits itself. ``at`` is on
    the transceiver's clock (the owner converts it to wall time)."""

    name: str
    at: float
    fields: dict[str, Any] = attrs.field(factory=dict)


SessionEvent = (
    IceConnected
    | DtlsConnected
    | MediaStarted
    | SessionFailed
    | SessionClosed
    | CheckpointDue
    | ClientEvent
)


class SessionState(enum.Enum):
    """Where a session is; ``FAILED`` and ``CLOSED`` are final and inert."""

    #: waiting for the client's first valid connectivity check
    NEW = "new"
    #: ICE checks succeeded; waiting for nomination and the DTLS handshake
    CONNECTING = "connecting"
    #: SRTP is keyed (media flows once a pair is nominated)
    CONNECTED = "connected"
    FAILED = "failed"
    CLOSED = "closed"


_ENDED: Final = (SessionState.FAILED, SessionState.CLOSED)


def _clip(reason: str) -> str:
    return reason[:_REASON_LIMIT]


# --- the transceiver ------------------------------------------------------------------------


@final
class Transceiver:
    """One voice session, without I/O (see the module docstring).

    Build it with :meth:`accept` (a new call) or :meth:`restore` (a call moved from another
    node). Not thread-safe: one task owns it.
    """

    def __init__(
        self,
        *,
        session_id: str,
        certificate: Certificate,
        ice: IceLiteResponder,
        remote_fingerprint: tuple[str, str],
        opus_pt: int,
        cname: str,
        direction: str,
        ssrc: int,
        seq: int,
        timestamp: int,
        agent: Agent | None,
        created: float,
        now: float,
        turn_config: TurnConfig | None = None,
    ) -> None:
        """Use :meth:`accept` or :meth:`restore`."""
        if not isinstance(session_id, str) or not session_id:
            raise ValueError("session_id must be a non-empty string")
        #: the session's id, as the signaling layer knows it
        self.session_id: Final = session_id
        #: our ICE ufrag: the relay routes the client's first STUN packet by it
        self.local_ufrag: Final = ice.local_ufrag
        self._certificate = certificate
        self._ice = ice
        self._remote_fingerprint = remote_fingerprint
        self._dtls: DtlsServer | None = None
        self._dtls_addr: Address | None = None
        self._srtp: SrtpSession | None = None
        self._opus_pt = opus_pt
        self._cname = cname
        self._direction = direction
        # RFC 3264 §6.1: we send unless the offer said the client will not receive.
        self._may_send = direction in ("sendrecv", "recvonly")
        self._ssrc = ssrc
        self._seq = seq
        self._agent: Agent = EchoAgent() if agent is None else agent
        self._turns = TurnDetector(TurnConfig() if turn_config is None else turn_config)
        #: the agent's audio is on the air (sent on the last tick); barge-in stops it
        self._agent_on_air = False
        #: barge-in reactions: (first voiced frame of the interrupting turn, last agent frame)
        self.barge_ins: list[tuple[float, float]] = []
        #: end-of-turn latencies: (last voiced frame, first agent frame of the reply)
        self.turn_latencies: list[tuple[float, float]] = []
        self._turn_ended_at: float | None = None
        self._last_agent_frame_at: float | None = None
        self._pacer = Pacer(initial_timestamp=timestamp)
        self._jitter = JitterBuffer()
        self._encoder = OpusEncoder()
        self._decoder = OpusDecoder()
        self._receiver: rtcp.ReceiverStatistics | None = None
        self._rng = random.Random(secrets.randbits(64))

        self._state = SessionState.NEW
        self._events: collections.deque[SessionEvent] = collections.deque()
        self._out: list[tuple[bytes, Address]] = []
        self._created = created
        self._connect_deadline: float | None = now + CONNECT_TIMEOUT
        self._media_started = False

        # outbound media
        self._packets_sent = 0
        self._octets_sent = 0
        self._last_sent: tuple[int, float] | None = None  # (RTP timestamp, tick deadline)
        self._resume_marker = False  # a frame was held back: mark the next packet sent
        self._poll_at: float | None = None

        # RTCP
        self._rtcp_at: float | None = None
        self._sr_sent: collections.deque[int] = collections.deque(maxlen=_SR_MEMORY)
        # packets sent as of the last two reports: RFC 3550 §6.4 sends an SR only if we sent
        # RTP since the report before last
        self._sent_marks: collections.deque[int] = collections.deque([0], maxlen=2)
        self._rtt: float | None = None
        self._our_report: rtcp.ReportBlock | None = None  # our last block about the client
        self._their_report: rtcp.ReportBlock | None = None  # the client's about our stream

        # checkpoints
        self._connected_at: float | None = None
        self._last_request_at: float | None = None
        self._last_snapshot_at: float | None = None

        self._counts: collections.Counter[str] = collections.Counter()
        self._dropped: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return (
            f"Transceiver(session_id={self.session_id!r}, state={self._state.value}, "
            f"selected={self._ice.selected!r})"
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
    ) -> tuple[Transceiver, str]:
        """Answer a client's offer: a new session and the SDP answer to send back.

        Raises :class:`~sessions.webrtc.errors.SdpError` (its ``code`` is the signaling error
        code) for an offer we cannot answer, and :class:`ValueError` for bad local arguments
        (``candidates`` empty or not IP literals). ``candidates`` are our UDP host candidates,
        most preferred first. ``ufrag`` is our ICE ufrag if the caller minted it (in a cluster it
        carries the relays' routing hint, relay/tunnel/hint.py); otherwise a random one.
        """
        offer = sdp.parse_offer(offer_sdp)
        minted, pwd = mint_credentials()
        ufrag = ufrag or minted
        ice = IceLiteResponder(ufrag, pwd, offer.ice_ufrag, offer.ice_pwd)
        # RFC 3550 §8.1: a random SSRC; avoid the one the client announced.
        ssrc = secrets.randbits(32)
        while ssrc == offer.ssrc:
            ssrc = secrets.randbits(32)
        cname = secrets.token_urlsafe(12)  # RFC 7022 §4.1: a random, short-term CNAME
        answer = sdp.write_answer(
            offer,
            sdp.AnswerParams(
                ice_ufrag=ufrag,
                ice_pwd=pwd,
                fingerprint_sha256=certificate.fingerprint_sha256,
                candidates=tuple(candidates),
                ssrc=ssrc,
                cname=cname,
                session_id=secrets.randbelow(1 << 62),
            ),
        )
        core = cls(
            session_id=session_id,
            certificate=certificate,
            ice=ice,
            remote_fingerprint=offer.fingerprint,
            opus_pt=offer.opus_pt,
            cname=cname,
            direction=offer.direction,
            ssrc=ssrc,
            # RFC 3550 §5.1: random initial sequence number and timestamp. See _FIRST_SEQ.
            seq=_FIRST_SEQ + secrets.randbelow((1 << 15) - _FIRST_SEQ),
            timestamp=secrets.randbits(32),
            agent=agent,
            turn_config=turn_config,
            created=now,
            now=now,
        )
        core._dtls = DtlsServer(certificate, offer.fingerprint)
        return core, answer

    @classmethod
    def restore(
        cls,
        snapshot: SessionSnapshot,
        *,
        certificate: Certificate,
        now: float,
        agent: Agent | None = None,
        turn_config: TurnConfig | None = None,
    ) -> Transceiver:
        """Continue a session from ``snapshot`` (the newest stored one), taken ``now``.

        The result is already connected: it answers the client's consent checks with the same
        credentials, decrypts its SRTP and continues our outbound stream, without a DTLS
        handshake (the keys are in the snapshot; the DTLS association itself does not move, so
        DTLS records from the client are counted and dropped from now on). It sends no media
        until a snapshot of its own is confirmed: its first event is :class:`CheckpointDue`.

        Our RTP continues at the sequence number after the SRTP reservation, and the timestamp
        jumps by as many 20 ms frames as the sequence number does (at most one reservation's
        worth, about 41 s), so the client sees a consistent gap (a loss burst, marker bit set)
        ahead of what the previous owner sent. ``certificate`` is this node's; it is kept for
        completeness, as no handshake runs again.
        """
        ice = IceLiteResponder.restore(snapshot.ice, now)
        srtp = SrtpSession.restore(snapshot.srtp)
        seq = srtp.next_rtp_seq
        if seq is None:  # cannot happen: a restored session always has a reservation
            raise ValueError("the snapshot reserves no outbound SRTP indexes")
        jump = min((seq - snapshot.next_seq) & 0xFFFF, _MAX_JUMP_FRAMES)
        core = cls(
            session_id=snapshot.session_id,
            certificate=certificate,
            ice=ice,
            remote_fingerprint=snapshot.remote_fingerprint,
            opus_pt=snapshot.opus_pt,
            cname=snapshot.cname,
            direction=snapshot.direction,
            ssrc=snapshot.local_ssrc,
            seq=seq,
            timestamp=(snapshot.next_timestamp + jump * FRAME_TIMESTAMP) % _TS_MOD,
            agent=agent,
            turn_config=turn_config,
            created=now - snapshot.age,
            now=now,
        )
        core._srtp = srtp
        core._state = SessionState.CONNECTED
        core._connected_at = now
        core._media_started = snapshot.srtp.rtp_received is not None
        core._packets_sent = snapshot.packets_sent
        core._octets_sent = snapshot.octets_sent
        core._sent_marks = collections.deque([snapshot.packets_sent], maxlen=2)
        if snapshot.remote_ssrc is not None:
            core._receiver = rtcp.ReceiverStatistics(snapshot.remote_ssrc, CLOCK_RATE)
        if ice.state is ResponderState.EXPIRED:
            core._fail("consent expired before the restore", CODE_CONSENT_EXPIRED)
            return core
        core._request_checkpoint(now)
        core._on_ready(now)
        return core

    # --- observation --------------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """Where the session is."""
        return self._state

    @property
    def selected_address(self) -> Address | None:
        """The client's nominated address, where media goes; ``None`` before nomination."""
        return self._ice.selected

    @property
    def local_ssrc(self) -> int:
        """The SSRC of our outbound RTP stream."""
        return self._ssrc

    def next_event(self) -> SessionEvent | None:
        """The oldest event not yet taken, or ``None``."""
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """Datagrams to send, in order, each with its destination."""
        out, self._out = self._out, []
        return out

    # --- input --------------------------------------------------------------------------------

    def receive(self, data: bytes, addr: Address, now: float) -> None:
        """Handle one UDP datagram from ``addr`` received at ``now``; never raises for it.

        The first byte says what it is (RFC 7983 §7): STUN goes to the ICE responder, DTLS to
        the DTLS server (only from an address with a successful check), SRTP and SRTCP are
        accepted only from the selected address. Everything else is counted and dropped.
        """
        self._counts["datagrams_in"] += 1
        self._counts["udp_bytes_in"] += len(data)
        if self._state in _ENDED:
            self._dropped["after_end"] += 1
            return
        data = bytes(data)
        kind = classify(data)
        if kind is PacketKind.STUN:
            self._receive_stun(data, addr, now)
        elif kind is PacketKind.DTLS:
            self._receive_dtls(data, addr, now)
        elif kind is PacketKind.RTP_RTCP:
            self._receive_srtp(data, addr, now)
        else:
            # ZRTP, TURN ChannelData (we are no TURN server), QUIC, empty: not ours.
            self._dropped["unknown_kind"] += 1

    def _receive_stun(self, data: bytes, addr: Address, now: float) -> None:
        for reply, to in self._ice.receive_stun(data, addr, now):
            self._send(reply, to)
        if self._state is SessionState.NEW and self._ice.state is not ResponderState.NEW:
            self._state = SessionState.CONNECTING
        self._drain_ice(now)

    def _receive_dtls(self, data: bytes, addr: Address, now: float) -> None:
        dtls = self._dtls
        if dtls is None:
            # A restored session has keys but no DTLS association: nothing can read this.
            self._dropped["dtls_no_association"] += 1
            return
        if not self._ice.is_valid(addr):
            # RFC 8826 §4.2 / RFC 8445 §7.3: only a peer that proved it knows the ICE password
            # from this address may use it; anything else could make us a reflector.
            self._dropped["dtls_unvalidated"] += 1
            return
        self._dtls_addr = addr
        # Well-framed records OpenSSL then discards (stale epochs, bad MACs, RFC 6347
        # §4.1.2.7) leave no trace but this count.
        self._counts["dtls_in"] += 1
        try:
            dtls.receive(data, now)
        except DtlsError:
            self._dropped["dtls_malformed"] += 1
        self._flush_dtls()
        self._drain_dtls(now)

    def _receive_srtp(self, data: bytes, addr: Address, now: float) -> None:
        srtp = self._srtp
        if srtp is None:
            self._dropped["srtp_before_keys"] += 1
            return
        if addr != self._ice.selected and not (
            self._ice.selected is None and self._ice.is_valid(addr)
        ):
            # Media is bound to the nominated pair. Before any nomination, a pair whose check
            # succeeded may already carry media (RFC 8445 §12.1: browsers start sending on
            # it before they nominate); any other address has no business here, even with
            # valid SRTP (a replay from elsewhere).
            self._dropped["srtp_wrong_address"] += 1
            return
        # RFC 5761 §4: RTCP packet types 192..223 in the second byte.
        if is_rtcp(data):
            self._receive_rtcp(srtp, data, now)
        else:
            self._receive_rtp(srtp, data, now)

    def _receive_rtp(self, srtp: SrtpSession, data: bytes, now: float) -> None:
        try:
            packet = rtp.parse(srtp.unprotect_rtp(data))
        except SrtpError:
            self._dropped["srtp_rejected"] += 1
            return
        except RtpError:
            self._dropped["rtp_malformed"] += 1
            return
        self._counts["packets_in"] += 1
        self._counts["bytes_in"] += len(data)
        receiver = self._receiver
        if receiver is None or receiver.ssrc != packet.ssrc:
            receiver = self._receiver = rtcp.ReceiverStatistics(packet.ssrc, CLOCK_RATE)
        # Every packet of the SSRC counts for loss, telephone-event too: they share its
        # sequence numbers (RFC 3550 §6.4.1, RFC 4733 §2.1).
        receiver.record_packet(packet.sequence_number, packet.timestamp, now)
        if not self._media_started:
            self._media_started = True
            self._emit(MediaStarted())
        if packet.payload_type != self._opus_pt:
            self._dropped["rtp_other_payload_type"] += 1
            return
        self._jitter.push(packet.sequence_number, packet.timestamp, packet.payload, now)

    def _receive_rtcp(self, srtp: SrtpSession, data: bytes, now: float) -> None:
        try:
            packets = rtcp.parse(srtp.unprotect_rtcp(data))
        except SrtpError:
            self._dropped["srtcp_rejected"] += 1
            return
        except RtpError:
            self._dropped["rtcp_malformed"] += 1
            return
        self._counts["rtcp_in"] += 1
        for packet in packets:
            blocks: tuple[rtcp.ReportBlock, ...] = ()
            if isinstance(packet, rtcp.SenderReport):
                if self._receiver is not None and packet.ssrc == self._receiver.ssrc:
                    # For the LSR/DLSR of our next report (RFC 3550 §6.4.1).
                    self._receiver.record_sender_report(packet.ntp_timestamp, now)
                blocks = packet.reports
            elif isinstance(packet, rtcp.ReceiverReport):
                blocks = packet.reports
            elif isinstance(packet, rtcp.Bye):
                self._counts["bye_in"] += 1
            for block in blocks:
                if block.ssrc == self._ssrc:
                    self._on_report(block, now)

    def _on_report(self, block: rtcp.ReportBlock, now: float) -> None:
        """A report block about our stream (RFC 3550 §6.4.1)."""
        self._their_report = block
        # RTT = arrival - LSR - DLSR, only for an LSR that echoes one of our own SRs: after a
        # restore, reports may still echo the previous owner's, stamped on another clock.
        if block.lsr in self._sr_sent:
            rtt = rtcp.rtt_seconds(block, rtcp.ntp_middle32(self._ntp(now)))
            if rtt is not None:
                self._rtt = rtt

    # --- timers -------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due, or ``None`` (an ended session has none)."""
        if self._state in _ENDED:
            return None
        deadlines = [
            self._ice.get_timer(),
            self._connect_deadline,
            self._checkpoint_deadline(),
        ]
        if self._dtls is not None:
            deadlines.append(self._dtls.get_timer())
        if self._media_ready():
            jitter = self._jitter.get_timer()
            pacer = self._pacer.get_timer()
            deadlines += [jitter, pacer, self._rtcp_at, self._turns.get_timer()]
            if jitter is None and pacer is None and self._may_send:
                # Nothing else ticks: keep asking the agent every 20 ms for something to say.
                deadlines.append(self._poll_at)
        present = [d for d in deadlines if d is not None]
        return min(present) if present else None

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now``: consent expiry, DTLS retransmission, the media tick
        (playout, agent, pacing), RTCP, the connect timeout and checkpoint requests.

        Harmless to call early or repeatedly.
        """
        if self._state in _ENDED:
            return
        self._ice.handle_timer(now)
        self._drain_ice(now)
        if self._dtls is not None and self._state not in _ENDED:
            self._dtls.handle_timer(now)
            self._flush_dtls()
            self._drain_dtls(now)
        if self._state in _ENDED:
            return
        if self._connect_deadline is not None and now >= self._connect_deadline:
            self._fail(
                f"not connected within {CONNECT_TIMEOUT:g} s of the offer", CODE_CONNECT_TIMEOUT
            )
            return
        if self._media_ready():
            self._media_tick(now)
            if self._rtcp_at is not None and now >= self._rtcp_at:
                self._send_rtcp(now)
                self._rtcp_at = now + RTCP_INTERVAL * self._rng.uniform(0.5, 1.5)
        deadline = self._checkpoint_deadline()
        if deadline is not None and now >= deadline:
            self._request_checkpoint(now)

    # --- media --------------------------------------------------------------------------------

    def _media_ready(self) -> bool:
        return self._srtp is not None and self._ice.selected is not None

    def _media_tick(self, now: float) -> None:
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
            # The agent's reply, a little ahead of the pacer; PCM is encoded only when sent
            # (the pacer's rule), so frames the pacer drops were never encoded.
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
                    self._send_rtp(paced)
                    sent = True
            if sent:
                if self._turn_ended_at is not None:
                    self.turn_latencies.append((self._turn_ended_at, now))
                    self._turn_ended_at = None
                self._last_agent_frame_at = now
            self._agent_on_air = sent or self._pacer.queued_ms > 0
        self._poll_at = now + FRAME_SECONDS

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
            self._counts["frames_resized"] += 1
            pcm = pcm[:FRAME_BYTES].ljust(FRAME_BYTES, b"\0")
        return pcm

    def _send_rtp(self, paced: PacedFrame) -> None:
        srtp, addr = self._srtp, self._ice.selected
        assert srtp is not None and addr is not None  # _media_ready()
        payload = self._encoder.encode(paced.payload)
        packet = rtp.serialize(
            rtp.RtpPacket(
                payload_type=self._opus_pt,
                sequence_number=self._seq,
                timestamp=paced.timestamp,
                ssrc=self._ssrc,
                payload=payload,
                # RFC 3551 §4.1: the first packet after a silence, ours or a held-back frame.
                marker=paced.marker or self._resume_marker,
            )
        )
        try:
            protected = srtp.protect_rtp(packet)
        except SrtpIndexError:
            # Beyond the confirmed reservation: the checkpoint is late. The frame is lost
            # (the sequence number is not used, so the client sees a timestamp gap only).
            self._counts["send_blocked"] += 1
            self._resume_marker = True
            return
        self._seq = (self._seq + 1) & 0xFFFF
        self._resume_marker = False
        self._packets_sent += 1
        self._octets_sent += len(payload)
        self._counts["bytes_out"] += len(protected)
        self._last_sent = (paced.timestamp, paced.deadline)
        self._send(protected, addr)

    # --- RTCP -----------------------------------------------------------------------------------

    def _ntp(self, now: float) -> int:
        # RFC 3550 §6.4.1 allows a sender without wallclock time to stamp SRs from another
        # clock it uses consistently; the client only echoes the middle bits back (for RTT)
        # and audio-only sessions need no lip sync.
        return rtcp.ntp_from_seconds(now)

    def _rtcp_compound(
        self, now: float, extra: Sequence[rtcp.RtcpPacket] = ()
    ) -> tuple[bytes, int | None]:
        """SR or RR, then SDES CNAME (RFC 3550 §6.1), then ``extra``; and the SR's LSR key."""
        blocks: tuple[rtcp.ReportBlock, ...] = ()
        if self._receiver is not None:
            block = self._receiver.report_block(now)
            if block is not None:
                self._our_report = block
                blocks = (block,)
        first: rtcp.RtcpPacket
        lsr: int | None = None
        if self._packets_sent > self._sent_marks[0] and self._last_sent is not None:
            ntp = self._ntp(now)
            timestamp, deadline = self._last_sent
            # The RTP timestamp of the same instant as the NTP one (RFC 3550 §6.4.1).
            rtp_timestamp = (timestamp + round((now - deadline) * CLOCK_RATE)) % _TS_MOD
            first = rtcp.SenderReport(
                ssrc=self._ssrc,
                ntp_timestamp=ntp,
                rtp_timestamp=rtp_timestamp,
                packet_count=self._packets_sent & _U32,
                octet_count=self._octets_sent & _U32,
                reports=blocks,
            )
            lsr = rtcp.ntp_middle32(ntp)
        else:
            first = rtcp.ReceiverReport(ssrc=self._ssrc, reports=blocks)
        self._sent_marks.append(self._packets_sent)
        sdes = rtcp.SourceDescription(
            (rtcp.SdesChunk(self._ssrc, ((rtcp.SdesItem.CNAME, self._cname.encode("ascii")),)),)
        )
        return rtcp.serialize([first, sdes, *extra]), lsr

    def _send_rtcp(self, now: float, extra: Sequence[rtcp.RtcpPacket] = ()) -> None:
        srtp, addr = self._srtp, self._ice.selected
        assert srtp is not None and addr is not None
        compound, lsr = self._rtcp_compound(now, extra)
        try:
            protected = srtp.protect_rtcp(compound)
        except SrtpIndexError:
            self._counts["rtcp_blocked"] += 1
            return
        if lsr is not None:
            self._sr_sent.append(lsr)
        self._counts["rtcp_out"] += 1
        self._send(protected, addr)

    # --- checkpoints --------------------------------------------------------------------------

    def _headroom_low(self) -> bool:
        srtp = self._srtp
        if srtp is None:
            return False
        rtp_left, srtcp_left = srtp.rtp_headroom, srtp.srtcp_headroom
        return (rtp_left is not None and rtp_left < _LOW_RTP_HEADROOM) or (
            srtcp_left is not None and srtcp_left < _LOW_SRTCP_HEADROOM
        )

    def _checkpoint_deadline(self) -> float | None:
        if self._srtp is None or self._state in _ENDED or self._connected_at is None:
            return None
        requested, snapshot = self._last_request_at, self._last_snapshot_at
        if requested is not None and (snapshot is None or requested > snapshot):
            return requested + CHECKPOINT_RETRY  # unanswered: ask again
        base = self._connected_at if snapshot is None else snapshot
        deadline = base + CHECKPOINT_INTERVAL
        if self._headroom_low():
            deadline = min(deadline, base + CHECKPOINT_RETRY)
        return deadline

    def _request_checkpoint(self, now: float) -> None:
        self._last_request_at = now
        self._counts["checkpoints_requested"] += 1
        self._emit(CheckpointDue())

    def snapshot(self, now: float) -> SessionSnapshot:
        """The session as a value, to store and then :meth:`confirm`.

        Reserves outbound SRTP indexes for whoever restores it (see
        :mod:`sessions.webrtc.srtp`). Raises :class:`RuntimeError` before DTLS has keyed
        SRTP: there is nothing a restore could continue.
        """
        srtp = self._srtp
        if srtp is None:
            raise RuntimeError("no checkpoint before the DTLS handshake has keyed SRTP")
        self._last_snapshot_at = now
        self._counts["snapshots"] += 1
        return SessionSnapshot(
            session_id=self.session_id,
            age=max(0.0, now - self._created),
            ice=self._ice.snapshot(now),
            remote_fingerprint=self._remote_fingerprint,
            srtp=srtp.snapshot(),
            next_seq=self._seq,
            next_timestamp=self._media_timestamp(now),
            opus_pt=self._opus_pt,
            cname=self._cname,
            direction=self._direction,
            packets_sent=self._packets_sent,
            octets_sent=self._octets_sent,
        )

    def _media_timestamp(self, now: float) -> int:
        """The RTP timestamp our media clock is at: the next tick's while talking, else the
        last packet's advanced by the whole ticks since (the pacer does the same on its next
        talkspurt), so that a restore never goes back behind what was sent."""
        pacer_next = self._pacer.next_timestamp
        if self._pacer.get_timer() is not None or self._last_sent is None:
            return pacer_next
        timestamp, deadline = self._last_sent
        ticks = max(1, math.ceil((now - deadline) / FRAME_SECONDS))
        estimate = (timestamp + ticks * FRAME_TIMESTAMP) % _TS_MOD
        # whichever is later in RTP's modular order (RFC 3550 §5.1)
        return estimate if (estimate - pacer_next) % _TS_MOD < 1 << 31 else pacer_next

    def confirm(self, snapshot: SessionSnapshot) -> None:
        """``snapshot`` (one of ours) is durably stored as the session's newest state: the
        session may now send up to what it reserved. Raises :class:`ValueError` for a snapshot
        of another session."""
        if self._srtp is None:
            raise RuntimeError("no snapshot can be confirmed before SRTP is keyed")
        if snapshot.session_id != self.session_id:
            raise ValueError("not a snapshot of this session")
        self._srtp.confirm(snapshot.srtp)
        self._counts["confirmed"] += 1

    # --- ending -------------------------------------------------------------------------------

    def close(self, now: float) -> None:
        """End the session from our side: RTCP BYE (RFC 3550 §6.6), DTLS close_notify (RFC
        5246 §7.2.1), then :class:`SessionClosed`. Nothing is sent or timed afterwards."""
        if self._state in _ENDED:
            return
        if self._media_ready() and not self._ice.consent_expired(now):
            self._send_rtcp(now, (rtcp.Bye((self._ssrc,)),))
        dtls = self._dtls
        if dtls is not None and dtls.state in (DtlsState.HANDSHAKING, DtlsState.CONNECTED):
            dtls.close()
            self._flush_dtls()
            while dtls.next_event() is not None:
                pass  # our own Closed("local")
        self._end(SessionState.CLOSED, SessionClosed("closed locally"))

    def _fail(self, reason: str, code: str) -> None:
        self._end(SessionState.FAILED, SessionFailed(_clip(reason), code))

    def _end(self, state: SessionState, event: SessionEvent) -> None:
        self._state = state
        self._connect_deadline = None
        self._rtcp_at = None
        self._poll_at = None
        self._emit(event)

    # --- plumbing -----------------------------------------------------------------------------

    def _emit(self, event: SessionEvent) -> None:
        self._events.append(event)

    def _send(self, data: bytes, addr: Address) -> None:
        self._counts["datagrams_out"] += 1
        self._counts["udp_bytes_out"] += len(data)
        self._out.append((data, addr))

    def _on_ready(self, now: float) -> None:
        """Called when SRTP is keyed or a pair nominated: start media once both are there."""
        if not self._media_ready():
            return
        self._connect_deadline = None
        if self._rtcp_at is None:
            # RFC 3550 §6.3.6 starts with half the interval; randomized like every other.
            self._rtcp_at = now + RTCP_INTERVAL / 2 * self._rng.uniform(0.5, 1.5)
        if self._poll_at is None:
            self._poll_at = now

    def _drain_ice(self, now: float) -> None:
        while (event := self._ice.next_event()) is not None:
            if isinstance(event, PairNominated):
                self._emit(IceConnected(event.addr))
                self._on_ready(now)
            elif isinstance(event, ConsentExpired):
                # RFC 7675 §5.1: stop sending at once; the responder answers nothing more.
                self._fail("consent expired", CODE_CONSENT_EXPIRED)
                return

    def _flush_dtls(self) -> None:
        dtls = self._dtls
        if dtls is None:
            return
        # DTLS answers go where the client's DTLS came from (its handshake may precede nomination).
        to = self._dtls_addr or self._ice.selected
        for datagram in dtls.datagrams_to_send():
            if to is not None:
                self._send(datagram, to)

    def _drain_dtls(self, now: float) -> None:
        dtls = self._dtls
        while dtls is not None and (event := dtls.next_event()) is not None:
            if self._state in _ENDED:
                continue
            if isinstance(event, HandshakeComplete):
                self._keyed(event, now)
            elif isinstance(event, HandshakeFailed):
                self._fail(f"DTLS handshake failed: {event.reason}", CODE_DTLS_FAILED)
            elif isinstance(event, Closed) and event.reason != "local":
                if event.reason == "close_notify":
                    self._end(SessionState.CLOSED, SessionClosed("the client sent close_notify"))
                else:
                    self._fail(f"DTLS association ended: {event.reason}", CODE_DTLS_FAILED)

    def _keyed(self, event: HandshakeComplete, now: float) -> None:
        # RFC 5764 §4.2: as the DTLS server we send with the server key and salt and receive
        # with the client's.
        profile = SrtpProfile(event.profile.value)
        self._srtp = SrtpSession.create(
            profile,
            local_key=event.keys.server_master,
            remote_key=event.keys.client_master,
            local_ssrc=self._ssrc,
        )
        self._state = SessionState.CONNECTED
        self._connected_at = now
        self._emit(DtlsConnected(profile))
        # Before anything is sent, so the first reservation covers the stream from its start.
        self._request_checkpoint(now)
        self._on_ready(now)

    # --- statistics ---------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """Counters and measurements for metrics and logs (plain values, JSON-friendly).

        ``packets_in``/``bytes_in`` count authentic RTP from the client, ``packets_out``/
        ``bytes_out`` the RTP we sent; ``loss_fraction`` (0..1, over the last RTCP interval),
        ``loss_cumulative`` and ``jitter_ms`` describe the client's stream as we receive it
        (RFC 3550 §6.4.1, §A.3, §A.8); ``remote_*`` the same about our stream, as the client
        reports it; ``rtt_ms`` comes from the client's reports about our SRs; ``late_frames``
        counts pacing ticks handled more than 5 ms late; ``dropped`` counts input dropped by
        reason, ``ice`` the responder's own counters.
        """
        c = self._counts
        receiver = self._receiver
        ours, theirs = self._our_report, self._their_report
        srtp = self._srtp
        pacer = self._pacer.stats()
        jitter = self._jitter.stats()
        ice = self._ice
        return {
            "session_id": self.session_id,
            "state": self._state.value,
            "selected": self._ice.selected,
            "profile": None if srtp is None else srtp.profile.value,
            "packets_in": c["packets_in"],
            "bytes_in": c["bytes_in"],
            "packets_out": self._packets_sent,
            "bytes_out": c["bytes_out"],
            "datagrams_in": c["datagrams_in"],
            "datagrams_out": c["datagrams_out"],
            "udp_bytes_in": c["udp_bytes_in"],
            "udp_bytes_out": c["udp_bytes_out"],
            "dtls_in": c["dtls_in"],
            "rtcp_in": c["rtcp_in"],
            "rtcp_out": c["rtcp_out"],
            "bye_in": c["bye_in"],
            "loss_fraction": 0.0 if ours is None else ours.fraction_lost / 256,
            "loss_cumulative": 0 if receiver is None else receiver.lost,
            "jitter_ms": 0.0 if receiver is None else receiver.jitter / CLOCK_RATE * 1000,
            "rtt_ms": None if self._rtt is None else self._rtt * 1000,
            "remote_loss_fraction": None if theirs is None else theirs.fraction_lost / 256,
            "remote_loss_cumulative": None if theirs is None else theirs.cumulative_lost,
            "remote_jitter_ms": None if theirs is None else theirs.jitter / CLOCK_RATE * 1000,
            "late_frames": pacer.late,
            "send_blocked": c["send_blocked"],
            "rtcp_blocked": c["rtcp_blocked"],
            "frames_resized": c["frames_resized"],
            "pacer": attrs.asdict(pacer),
            "jitter_buffer": attrs.asdict(jitter),
            "checkpoints": {
                "requested": c["checkpoints_requested"],
                "snapshots": c["snapshots"],
                "confirmed": c["confirmed"],
                "rtp_headroom": None if srtp is None else srtp.rtp_headroom,
                "srtcp_headroom": None if srtp is None else srtp.srtcp_headroom,
            },
            "dropped": dict(self._dropped),
            "ice": {
                "state": ice.state.value,
                "malformed": ice.malformed,
                "bad_fingerprint": ice.bad_fingerprint,
                "bad_integrity": ice.bad_integrity,
                "wrong_username": ice.wrong_username,
                "bad_requests": ice.bad_requests,
                "unknown_attributes": ice.unknown_attributes,
                "role_conflicts": ice.role_conflicts,
                "retransmissions": ice.retransmissions,
                "ignored": ice.ignored,
                "responses_sent": ice.responses_sent,
            },
        }
