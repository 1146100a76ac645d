"""The WebRTC transport of one voice session, sans-I/O: ICE-lite, DTLS-SRTP, RTP and RTCP.

Datagrams go in (:meth:`Transport.receive`, with the time they arrived); out come datagrams
(:meth:`Transport.datagrams_to_send`), the session's connection events
(:meth:`Transport.next_event`), the Opus payloads of the client's RTP
(:meth:`Transport.received_media`) and a deadline (:meth:`Transport.get_timer`, then
:meth:`Transport.handle_timer`). It packetizes, protects and sends the encoded payloads it is
given (:meth:`Transport.send_media`) and sends RTCP reports on its own schedule.

:meth:`Transport.accept` parses the client's offer, mints our ICE credentials and SSRC and
writes the answer (ICE-lite, DTLS passive, Opus only). The first byte of each datagram says
what it is (RFC 7983 §7): STUN and DTLS go to the :class:`~sessions.transceiver.connection.
Connection` (ICE-lite, the handshake that keys SRTP, the session's state); SRTP and SRTCP from
the selected address are unprotected here. RTCP SR/RR with SDES goes out every ~2 s (RFC 3550
§6.3) and the client's reports give the round-trip time (:mod:`sessions.transceiver.reports`).
:meth:`Transport.close` ends the session from our side with RTCP BYE and DTLS close_notify.

Input from the network never raises: every datagram is handled, or counted and dropped.
"""

from __future__ import annotations

import collections
import random
import secrets
from collections.abc import Hashable, Sequence
from typing import Final, NamedTuple, final

import attrs

from sessions.deadlines import earlier
from sessions.snapshot import SessionSnapshot
from sessions.transceiver.connection import Connection, SessionState
from sessions.transceiver.events import MediaStarted, SessionEvent
from sessions.transceiver.handover import continue_srtp, exact_state
from sessions.transceiver.ledger import MediaLedger
from sessions.transceiver.reports import RtcpReports
from sessions.webrtc import rtcp, rtp, sdp
from sessions.webrtc.certs import Certificate
from sessions.webrtc.demux import PacketKind, classify, is_rtcp
from sessions.webrtc.dtls import DtlsServer
from sessions.webrtc.errors import RtpError
from sessions.webrtc.ice import IceLiteResponder, IceState, PeerAddress, mint_credentials
from sessions.webrtc.srtp import RTP_RESERVE, SrtpError, SrtpIndexError, SrtpSession, SrtpState

__all__ = ["MediaPacket", "Transport", "TransportSnapshot", "restore_state"]

# The first sequence number is drawn from [_FIRST_SEQ, 2**15). Below 2**15 as
# sessions.webrtc.srtp asks: a snapshot taken before the first packet (the one at connect)
# then reserves every index the stream could have used, up to 2**15 + RTP_RESERVE - 1, and a
# restore from it continues at 2**15 + RTP_RESERVE. Not below _FIRST_SEQ, so that this jump
# stays under 2**15 from wherever the stream was: a larger one would look like a step back
# to an RTP receiver's serial-number arithmetic (RFC 3550 §A.1) and to an RFC 3711 §3.3.1
# index estimate (libsrtp special-cases ROC 0 and accepts it, others need not).
_FIRST_SEQ: Final = 2 * RTP_RESERVE

# The inbound RTP index counts in the restore state in steps of 2**11 packets (41 s at 50 a
# second): a restore primes its receiver at the checkpoint's highest index, and RFC 3711
# §3.3.1's estimate finds the client's rollover counter from there while the client is less
# than 2**15 packets ahead (the two steps a state can span stay 16 times below that).
_INBOUND_STEP_BITS: Final = 11


def restore_state(
    ice: IceState, remote_ssrc: int | None, rtp_received: int | None, packets_sent: int
) -> Hashable:
    """What a crash restore uses that time alone does not move, as one comparable value (see
    :mod:`sessions.transceiver.checkpoints`): our packets sent (with them, the sequence number
    and the SR counts), the client's SSRC, its inbound RTP index by steps, and its ICE
    addresses. Consent ages, SRTCP indexes (the reservation covers ours) and the RTP timestamp
    (moved on by the wall clock at a restore) are left out."""
    inbound = None if rtp_received is None else rtp_received >> _INBOUND_STEP_BITS
    pairs = frozenset(addr for addr, _ in ice.pairs)
    return (packets_sent, remote_ssrc, inbound, ice.selected, pairs, ice.expired)


@final
class MediaPacket(NamedTuple):
    """The Opus payload of one authentic RTP packet of the client's, and when it arrived.

    A named tuple: one is made per packet received, and a tuple is built at about half the
    cost of a frozen attrs instance (which sets each field with ``object.__setattr__``).
    """

    sequence_number: int
    timestamp: int
    payload: bytes
    at: float


@final
@attrs.frozen
class TransportSnapshot:
    """The transport's part of a :class:`~sessions.snapshot.SessionSnapshot` (same fields)."""

    ice: IceState
    remote_fingerprint: tuple[str, str]
    srtp: SrtpState
    next_seq: int
    opus_pt: int
    cname: str
    direction: str
    packets_sent: int
    octets_sent: int
    #: (RTP timestamp, tick deadline) of our last packet, for the media clock's position
    last_sent: tuple[int, float] | None


@final
class Transport:
    """ICE, DTLS, SRTP and RTCP of one session (see the module docstring).

    Build it with :meth:`accept` or :meth:`restore`. Not thread-safe: one task owns it.
    """

    def __init__(
        self,
        *,
        connection: Connection,
        opus_pt: int,
        cname: str,
        direction: str,
        ssrc: int,
        seq: int,
        now: float,
        packets_sent: int = 0,
        octets_sent: int = 0,
        remote_ssrc: int | None = None,
        media_started: bool = False,
        received_up_to: int | None = None,
    ) -> None:
        """Use :meth:`accept` or :meth:`restore`."""
        self._connection = connection
        self._opus_pt = opus_pt
        self._cname = cname
        self._direction = direction
        self._ssrc = ssrc
        self._seq = seq
        self._resume_marker = False  # a frame was held back: mark the next packet sent
        self._events: collections.deque[SessionEvent] = collections.deque()
        self._out: list[tuple[bytes, PeerAddress]] = []
        self._media: list[MediaPacket] = []
        self._media_started = media_started
        self._reports = RtcpReports(
            ssrc=ssrc,
            cname=cname,
            rng=random.Random(secrets.randbits(64)),
            packets_sent=packets_sent,
            octets_sent=octets_sent,
            remote_ssrc=remote_ssrc,
            received_up_to=received_up_to,
        )
        # Plain attributes, not a Counter: the per-packet ones are bumped for every datagram.
        self._datagrams_in = 0
        self._udp_bytes_in = 0
        self._packets_in = 0
        self._bytes_in = 0
        self._datagrams_out = 0
        self._udp_bytes_out = 0
        self._bytes_out = 0
        self._rtcp_in = 0
        self._rtcp_out = 0
        self._send_blocked = 0
        self._rtcp_blocked = 0
        self._reporting = False  # RtcpReports.start was called (see _sync)
        #: what this transport decrypted and protected, and when (transceiver/ledger.py)
        self.ledger = MediaLedger()
        self._dropped: collections.Counter[str] = collections.Counter()
        self._sync(now)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def accept(
        cls,
        offer_sdp: str,
        *,
        certificate: Certificate,
        candidates: Sequence[tuple[str, int]],
        now: float,
        ufrag: str | None = None,
    ) -> tuple[Transport, str]:
        """Answer a client's offer: a new transport and the SDP answer to send back.

        Raises :class:`~sessions.webrtc.errors.SdpError` for an offer we cannot answer and
        :class:`ValueError` for bad ``candidates`` (see ``Transceiver.accept``).
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
        connection = Connection(
            ice=ice,
            remote_fingerprint=offer.fingerprint,
            local_ssrc=ssrc,
            now=now,
            dtls=DtlsServer(certificate, offer.fingerprint),
        )
        transport = cls(
            connection=connection,
            opus_pt=offer.opus_pt,
            cname=cname,
            direction=offer.direction,
            ssrc=ssrc,
            # RFC 3550 §5.1: a random initial sequence number. See _FIRST_SEQ.
            seq=_FIRST_SEQ + secrets.randbelow((1 << 15) - _FIRST_SEQ),
            now=now,
        )
        return transport, answer

    @classmethod
    def restore(cls, snapshot: SessionSnapshot, now: float, *, elapsed: float = 0.0) -> Transport:
        """Continue the transport of ``snapshot``: already keyed, without a DTLS association
        (its keys are in the snapshot). A snapshot whose consent had expired gives a failed
        transport.

        Our RTP continues at the sequence number after the SRTP reservation; or, for an exact
        snapshot (a planned move, :mod:`sessions.transceiver.handover`), at the very next one.
        ``elapsed`` is how long ago the exact snapshot was taken, in seconds: consent keeps
        counting over it (RFC 7675 §5.1).
        """
        if snapshot.exact:
            srtp = continue_srtp(snapshot.srtp, snapshot.next_seq)
            seq: int | None = snapshot.next_seq
            taken = now - max(0.0, elapsed)
        else:
            srtp = SrtpSession.restore(snapshot.srtp)
            seq = srtp.next_rtp_seq
            taken = now
        if seq is None:  # cannot happen: a restored session always has a reservation
            raise ValueError("the snapshot reserves no outbound SRTP indexes")
        connection = Connection.restored(
            ice=IceLiteResponder.restore(snapshot.ice, taken),
            remote_fingerprint=snapshot.remote_fingerprint,
            srtp=srtp,
            now=now,
        )
        return cls(
            connection=connection,
            opus_pt=snapshot.opus_pt,
            cname=snapshot.cname,
            direction=snapshot.direction,
            ssrc=snapshot.local_ssrc,
            seq=seq,
            now=now,
            packets_sent=snapshot.packets_sent,
            octets_sent=snapshot.octets_sent,
            remote_ssrc=snapshot.remote_ssrc,
            media_started=snapshot.srtp.rtp_received is not None,
            # A planned move: the old owner received exactly up to there (not a crash restore)
            received_up_to=snapshot.srtp.rtp_received if snapshot.exact else None,
        )

    # --- observation --------------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """Where the session is."""
        return self._connection.state

    @property
    def ended(self) -> bool:
        """Whether the session is over (failed or closed): inert from then on."""
        return self._connection.ended

    @property
    def quiesced(self) -> bool:
        """Whether the session is frozen for a planned move (see :meth:`quiesce`)."""
        return self._connection.quiesced

    @property
    def local_ufrag(self) -> str:
        """Our ICE ufrag."""
        return self._connection.ice.local_ufrag

    @property
    def selected_address(self) -> PeerAddress | None:
        """The client's nominated address, where media goes; ``None`` before nomination."""
        return self._connection.selected_address

    @property
    def local_ssrc(self) -> int:
        """The SSRC of our outbound RTP stream."""
        return self._ssrc

    @property
    def next_seq(self) -> int:
        """The sequence number our next RTP packet will carry."""
        return self._seq

    @property
    def may_send(self) -> bool:
        """Whether we send media: RFC 3264 §6.1, unless the offer said the client will not
        receive."""
        return self._direction in ("sendrecv", "recvonly")

    @property
    def keys(self) -> SrtpSession | None:
        """The SRTP state once DTLS keyed it (or a restore brought it), else ``None``."""
        return self._connection.keys

    @property
    def media_ready(self) -> bool:
        """SRTP is keyed and the client nominated a pair: media flows both ways."""
        return self._connection.ready

    def next_event(self) -> SessionEvent | None:
        """The oldest event not yet taken, or ``None``."""
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self) -> list[tuple[bytes, PeerAddress]]:
        """Datagrams to send, in order, each with its destination."""
        out, self._out = self._out, []
        return out

    def received_media(self) -> Sequence[MediaPacket]:
        """The client's Opus payloads received since the last call, in arrival order."""
        media = self._media
        if not media:
            return ()  # most calls (timer ticks) find none: no new list for them
        self._media = []
        return media

    # --- input --------------------------------------------------------------------------------

    def receive(self, data: bytes, addr: PeerAddress, now: float) -> None:
        """Handle one UDP datagram from ``addr`` received at ``now``; never raises for it.

        The first byte says what it is (RFC 7983 §7): STUN goes to the ICE responder, DTLS to
        the DTLS server (only from an address with a successful check), SRTP and SRTCP are
        accepted only from the selected address. Everything else is counted and dropped.

        A quiesced transport takes nothing (:class:`RuntimeError`, a local error): its owner
        keeps the datagrams for whoever continues the session.
        """
        connection = self._connection
        if connection.quiesced:
            raise RuntimeError(
                "a quiesced session takes no datagrams: buffer them, then hand them on or resume"
            )
        self._datagrams_in += 1
        self._udp_bytes_in += len(data)
        if connection.ended:
            self._dropped["after_end"] += 1
            return
        data = bytes(data)
        kind = classify(data)
        if kind is PacketKind.RTP_RTCP:  # media first: nearly every datagram
            self._receive_srtp(data, addr, now)
        elif kind is PacketKind.STUN:
            connection.receive_stun(data, addr, now)
        elif kind is PacketKind.DTLS:
            connection.receive_dtls(data, addr, now)
        else:
            # ZRTP, TURN ChannelData (we are no TURN server), QUIC, empty: not ours.
            self._dropped["unknown_kind"] += 1
        self._sync(now)

    def _receive_srtp(self, data: bytes, addr: PeerAddress, now: float) -> None:
        connection = self._connection
        srtp = connection.keys
        if srtp is None:
            self._dropped["srtp_before_keys"] += 1
            return
        if not connection.accepts_media_from(addr):
            self._dropped["srtp_wrong_address"] += 1
            return
        # RFC 5761 §4: RTCP packet types 192..223 in the second byte.
        if is_rtcp(data):
            self._receive_rtcp(srtp, data, now)
        else:
            self._receive_rtp(srtp, data, now)

    def _receive_rtp(self, srtp: SrtpSession, data: bytes, now: float) -> None:
        try:
            # The header fields and payload only: no RtpPacket built per packet.
            payload_type, seq, timestamp, ssrc, payload = rtp.parse_media(srtp.unprotect_rtp(data))
        except SrtpError:
            self._dropped["srtp_rejected"] += 1
            return
        except RtpError:
            self._dropped["rtp_malformed"] += 1
            return
        self.ledger.decrypted_rtp(srtp.last_rtp_in, now)
        self._packets_in += 1
        self._bytes_in += len(data)
        self._reports.on_rtp(ssrc, seq, timestamp, now)
        if not self._media_started:
            self._media_started = True
            self._events.append(MediaStarted())
        if payload_type != self._opus_pt:
            self._dropped["rtp_other_payload_type"] += 1
            return
        self._media.append(MediaPacket(seq, timestamp, payload, now))

    def _receive_rtcp(self, srtp: SrtpSession, data: bytes, now: float) -> None:
        try:
            packets = rtcp.parse(srtp.unprotect_rtcp(data))
        except SrtpError:
            self._dropped["srtcp_rejected"] += 1
            return
        except RtpError:
            self._dropped["rtcp_malformed"] += 1
            return
        self._rtcp_in += 1
        self._reports.on_rtcp(packets, now)

    # --- output -------------------------------------------------------------------------------

    def send_media(
        self,
        payload: bytes,
        *,
        timestamp: int,
        marker: bool,
        deadline: float,
        now: float | None = None,
    ) -> None:
        """Packetize (RFC 7587), protect and send one encoded Opus frame, due at ``deadline``,
        to the selected address. Only while :attr:`media_ready`.

        Beyond the confirmed SRTP reservation the frame is lost (counted ``send_blocked``) and
        its sequence number is not used, so the client sees a timestamp gap only.
        """
        connection = self._connection
        srtp, addr = connection.keys, connection.selected_address
        assert srtp is not None and addr is not None, "send_media before media_ready"
        # serialize_media: the bytes rtp.serialize(rtp.RtpPacket(...)) gives, without the
        # packet object.
        packet = rtp.serialize_media(
            self._opus_pt,
            self._seq,
            timestamp,
            self._ssrc,
            payload,
            # RFC 3551 §4.1: the first packet after a silence, ours or a held-back frame.
            marker or self._resume_marker,
        )
        try:
            protected = srtp.protect_rtp(packet)
        except SrtpIndexError:
            # The checkpoint is late.
            self._send_blocked += 1
            self._resume_marker = True
            return
        self.ledger.protected_rtp(srtp.last_rtp_out, deadline if now is None else now)
        self._seq = (self._seq + 1) & 0xFFFF
        self._resume_marker = False
        self._reports.on_sent(len(payload), timestamp, deadline)
        self._bytes_out += len(protected)
        self._send(protected, addr)

    def _send_rtcp(self, now: float, extra: Sequence[rtcp.RtcpPacket] = ()) -> None:
        srtp, addr = self._connection.keys, self._connection.selected_address
        assert srtp is not None and addr is not None
        compound, lsr = self._reports.compound(now, extra)
        try:
            protected = srtp.protect_rtcp(compound)
        except SrtpIndexError:
            self._rtcp_blocked += 1
            return
        self.ledger.protected_rtcp(srtp.last_srtcp_out, now)
        if lsr is not None:
            self._reports.sent(lsr)
        self._rtcp_out += 1
        self._send(protected, addr)

    def _send(self, data: bytes, addr: PeerAddress) -> None:
        self._datagrams_out += 1
        self._udp_bytes_out += len(data)
        self._out.append((data, addr))

    def _sync(self, now: float) -> None:
        """After the connection was called: take its datagrams and events, and start or stop
        RTCP as media becomes possible or the session ends."""
        connection = self._connection
        if not connection.idle:  # usually idle: a media packet or tick leaves nothing there
            for data, addr in connection.datagrams_to_send():
                self._send(data, addr)
            while (event := connection.next_event()) is not None:
                self._events.append(event)
        if connection.ended:
            self._reports.stop()
        elif not self._reporting and connection.ready:
            # Once started, start() does nothing until stop(), which only an end (final)
            # calls: so it is called once, not on every datagram.
            self._reports.start(now)
            self._reporting = True

    # --- timers -------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due, or ``None`` (an ended or quiesced session has
        none)."""
        connection = self._connection
        if not connection.timed:
            return None
        deadline = connection.get_timer()
        if not connection.ready:
            return deadline
        return earlier(deadline, self._reports.get_timer())

    @property
    def timed(self) -> bool:
        """Whether the transport has timers and takes datagrams: neither ended nor quiesced."""
        return self._connection.timed

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now``: consent expiry, DTLS retransmission, the connect
        timeout, RTCP. Harmless to call early or repeatedly, and while quiesced."""
        connection = self._connection
        if not connection.timed:
            return
        connection.handle_timer(now)
        self._sync(now)
        if not connection.ended and connection.ready and self._reports.due(now):
            self._send_rtcp(now)
            self._reports.reschedule(now)

    # --- snapshots ----------------------------------------------------------------------------

    def snapshot(self, now: float) -> TransportSnapshot:
        """The transport as a value; reserves outbound SRTP indexes for whoever restores it
        (see :mod:`sessions.webrtc.srtp`). Raises :class:`RuntimeError` before SRTP is keyed."""
        srtp = self._connection.keys
        if srtp is None:
            raise RuntimeError("no checkpoint before the DTLS handshake has keyed SRTP")
        return self._snapshot(now, srtp.snapshot())

    def exact_snapshot(self, now: float) -> TransportSnapshot:
        """The quiesced transport as a value, its outbound indexes exact and unreserved (see
        :mod:`sessions.transceiver.handover`): it never protects another packet."""
        srtp = self._connection.keys
        if srtp is None or not self.quiesced:
            raise RuntimeError("only a quiesced, keyed session has an exact snapshot")
        return self._snapshot(now, exact_state(srtp))

    def _snapshot(self, now: float, srtp: SrtpState) -> TransportSnapshot:
        reports = self._reports
        return TransportSnapshot(
            ice=self._connection.ice_snapshot(now),
            remote_fingerprint=self._connection.remote_fingerprint,
            srtp=srtp,
            next_seq=self._seq,
            opus_pt=self._opus_pt,
            cname=self._cname,
            direction=self._direction,
            packets_sent=reports.packets_sent,
            octets_sent=reports.octets_sent,
            last_sent=reports.last_sent,
        )

    def restore_state(self, now: float) -> Hashable:
        """:func:`restore_state` of the transport as it is at ``now`` (equal to that of a
        snapshot taken now). Raises :class:`RuntimeError` before SRTP is keyed."""
        srtp = self._connection.keys
        if srtp is None:
            raise RuntimeError("no restore state before the DTLS handshake has keyed SRTP")
        return restore_state(
            self._connection.ice_snapshot(now),
            srtp.remote_ssrc,
            srtp.rtp_received,
            self._reports.packets_sent,
        )

    def confirm(self, srtp: SrtpState) -> None:
        """``srtp`` (from one of our snapshots) is durably stored: send up to what it reserved."""
        keys = self._connection.keys
        if keys is None:
            raise RuntimeError("no snapshot can be confirmed before SRTP is keyed")
        keys.confirm(srtp)

    # --- a planned move -----------------------------------------------------------------------

    def quiesce(self) -> None:
        """Freeze for a move: from now on nothing is received, sent or timed (see
        :meth:`Connection.quiesce <sessions.transceiver.connection.Connection.quiesce>`)."""
        self._connection.quiesce()

    def resume(self, now: float) -> None:
        """The move was abandoned: carry on (an RTCP report that fell due is sent at once)."""
        self._connection.resume()
        self._sync(now)

    # --- ending -------------------------------------------------------------------------------

    def close(self, now: float) -> None:
        """End the session from our side: RTCP BYE (RFC 3550 §6.6), DTLS close_notify (RFC
        5246 §7.2.1), then :class:`~sessions.transceiver.events.SessionClosed`. Nothing is sent
        or timed afterwards. A quiesced session ends without sending anything: its SRTCP
        indexes and its client's DTLS association belong to whoever continues it."""
        if self.ended:
            return
        if self.quiesced:
            self._connection.close()
            self._sync(now)
            return
        if self.media_ready and not self._connection.consent_expired(now):
            self._send_rtcp(now, (rtcp.Bye((self._ssrc,)),))
        self._connection.close()
        self._sync(now)

    # --- statistics ---------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """The transport's counters (see ``Transceiver.stats``)."""
        connection = self._connection
        srtp = connection.keys
        ice = connection.ice
        return {
            "state": connection.state.value,
            "selected": ice.selected,
            "profile": None if srtp is None else srtp.profile.value,
            "packets_in": self._packets_in,
            "bytes_in": self._bytes_in,
            "packets_out": self._reports.packets_sent,
            "bytes_out": self._bytes_out,
            "datagrams_in": self._datagrams_in,
            "datagrams_out": self._datagrams_out,
            "udp_bytes_in": self._udp_bytes_in,
            "udp_bytes_out": self._udp_bytes_out,
            "dtls_in": connection.dtls_in,
            "rtcp_in": self._rtcp_in,
            "rtcp_out": self._rtcp_out,
            "bye_in": self._reports.bye_in,
            **self._reports.stats(),
            "send_blocked": self._send_blocked,
            "rtcp_blocked": self._rtcp_blocked,
            "dropped": {**self._dropped, **connection.dropped},
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
