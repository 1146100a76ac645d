"""aioquic as the tunnels use it: the connection class and its configuration.

aioquic's :class:`~aioquic.quic.connection.QuicConnection` is the sans-I/O QUIC core of every
tunnel. :class:`TunnelConnection` is the one place that touches aioquic internals, each for a
reason written where it is used (the largest: short ways through aioquic's receive and packet
writer for an open tunnel's media, about a fifth of its Python per QUIC packet);
tests/relay/test_dependencies.py fails, naming the attribute, if an aioquic upgrade removes one.
:class:`LinkConfig` holds what every connection of one endpoint shares: our certificate, the
cluster CA and QUIC's limits. The protocol on top (phases, authentication policy, greeting) is
relay/tunnel/link.py.

aioquic cannot do the server half of mutual TLS on its own:

* an aioquic server only sends a CertificateRequest when the private
  ``tls.Context._request_client_certificate`` is set ("for test purposes only"); we set it in
  ``_initialize``, right after aioquic creates the TLS context;
* the server then checks the client's CertificateVerify signature (proof that the client holds
  the key) but neither verifies the client's chain nor refuses an empty Certificate message. So
  after ``HandshakeCompleted`` the link reads the peer's certificates from
  ``tls._peer_certificate`` and ``tls._peer_certificate_chain``
  (:meth:`TunnelConnection.peer_certificates`) and verifies them itself.
"""

from __future__ import annotations

import datetime
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, Final, final

import attrs
from aioquic import tls
from aioquic._buffer import Buffer, BufferReadError
from aioquic._crypto import CryptoError
from aioquic.buffer import size_uint_var
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    END_STATES,
    NetworkAddress,
    QuicConnection,
    QuicConnectionError,
    QuicConnectionState,
    QuicNetworkPath,
    QuicReceiveContext,
)
from aioquic.quic.packet import (
    NON_ACK_ELICITING_FRAME_TYPES,
    PACKET_NUMBER_MAX_SIZE,
    PACKET_SPIN_BIT,
    PROBING_FRAME_TYPES,
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
)
from aioquic.quic.packet_builder import PACKET_NUMBER_SEND_SIZE, QuicPacketBuilder
from aioquic.quic.recovery import MAX_ACK_RANGES, QuicPacketPacer
from aioquic.quic.stream import StreamFinishedError
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from relay.tunnel.certs import Credentials

__all__ = [
    "ACK_DELAY",
    "ALPN",
    "CID_LENGTH",
    "MAX_DATAGRAM_FRAME_SIZE",
    "LinkConfig",
    "TunnelConnection",
    "TunnelPacer",
]

ALPN: Final = "parley-tunnel/1"
CID_LENGTH: Final = 8
#: what we accept (RFC 9221 §3: it bounds the whole frame); media never comes close
MAX_DATAGRAM_FRAME_SIZE: Final = 65536
#: how long a tunnel waits before acknowledging what it received. aioquic acknowledges after
#: 1 ms (its timer granularity), which at media rates means one ACK-only packet, one timer and
#: one wake-up on each side for every datagram. The tunnels carry DATAGRAM frames, which nobody
#: retransmits: RFC 9221 §5.2 asks receivers to delay those ACKs within max_ack_delay (25 ms,
#: aioquic's default, RFC 9000 §18.2). An ACK due by then rides on the next packet either way.
ACK_DELAY: Final = 0.020

#: RFC 9002 §7.7: a sender that paces may still send bursts of its initial window, ten packets
BURST_PACKETS: Final = 10
#: and the pacer's bucket holds at least this long of its rate (see TunnelPacer)
BURST_SPAN: Final = 0.002

_ONE_RTT: Final = tls.Epoch.ONE_RTT
_ZERO_RTT: Final = tls.Epoch.ZERO_RTT
_CONNECTED: Final = QuicConnectionState.CONNECTED
_DATAGRAM: Final = int(QuicFrameType.DATAGRAM)
_DATAGRAM_WITH_LENGTH: Final = int(QuicFrameType.DATAGRAM_WITH_LENGTH)
#: the least room aioquic's start_frame asks of a packet's first frame (header protection samples
#: bytes after the packet number, RFC 9001 §5.4.2)
_FIRST_FRAME_ROOM: Final = PACKET_NUMBER_MAX_SIZE - PACKET_NUMBER_SEND_SIZE
#: aioquic's table of frame handlers (a name-mangled private attribute of QuicConnection)
_FRAME_HANDLERS: Final = "_QuicConnection__frame_handlers"


class TunnelPacer(QuicPacketPacer):
    """aioquic's token-bucket pacer, with a bucket that never holds less than a burst.

    aioquic sizes the bucket as up to 16 packets' worth of its rate (a quarter of the
    congestion window at most) and clamps the time per packet at 1 µs. On a fast path with a
    large window (a tunnel is application-limited, and aioquic grows the window on every
    acknowledgement regardless: 34 MB after seconds under load on loopback) the rate runs into
    the clamp, the bucket shrinks below one packet's 1 µs, and the pacer lets out one packet per
    call: every further packet of a flush waited for a timer of its own. Under load that was
    4,500 timer wake-ups a second on a relay, most of its timer task's 29 % of the relay's time,
    and the node's grid bursts left one QUIC packet per wake-up instead of one segmented send.

    The bucket here holds at least :data:`BURST_PACKETS` packets (the initial window, the
    burst RFC 9002 §7.7 allows a pacing sender) and at least :data:`BURST_SPAN` of the rate,
    so that a Trio timer, which fires tens to hundreds of microseconds late on a busy loop,
    still keeps up with the rate (quic-go sizes its bucket the same way). A slow path is still
    paced: at a packet every 5 ms the bucket is 50 ms, ten packets. Only the bucket's size
    differs from aioquic's pacer. (Measured: the relay's and the node's CPU per packet did not
    change, the packets' work only moved from timer wake-ups to the ends of receive batches;
    what changed is that a burst leaves when it is flushed. README, Benchmarks.)
    """

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window=congestion_window, smoothed_rtt=smoothed_rtt)
        packet_time = self.packet_time
        if packet_time is not None:
            self.bucket_max = max(self.bucket_max, BURST_PACKETS * packet_time, BURST_SPAN)


class TunnelConnection(QuicConnection):
    """aioquic's connection, with every aioquic internal the tunnels rely on in one place
    (tests/relay/test_dependencies.py fails, naming it, if an upgrade removes one)."""

    #: whether :meth:`receive_datagram` takes its short way for an open connection's packets
    #: (tests turn it off to compare with aioquic's own path)
    short_receive: bool = True
    #: whether :meth:`_write_application` takes its short way when only datagrams are due
    short_send: bool = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # aioquic internal: its ACK delay is fixed at 1 ms (see ACK_DELAY).
        self._ack_delay = ACK_DELAY
        # aioquic internal: the loss recovery's pacer, replaced before anything was sent
        self._loss._pacer = TunnelPacer(max_datagram_size=self._loss._pacer._max_datagram_size)
        self._handlers: dict[int, tuple[Callable[..., None], frozenset[tls.Epoch]]] = getattr(
            self, _FRAME_HANDLERS
        )
        #: packets received the short way (tests check that it was taken)
        self.short_received = 0
        #: writes that took the short way
        self.short_sent = 0

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        """aioquic's receive, with a short way for what an open tunnel nearly only receives.

        aioquic's ``receive_datagram`` is general: any packet type, coalesced packets,
        version negotiation, retries, migration, qlog, and per packet that generality costs
        several times the packet's decryption (the short way takes a fifth less time per
        packet, ACK handling and all). A datagram that is one 1-RTT packet of a connected
        connection, addressed to its current connection ID from its current, validated path,
        takes the short way: the same steps in the same order (decrypt, duplicate check,
        reserved bits, packet number and spin bit, the frames, idle timer, ACK bookkeeping),
        with DATAGRAM frames read in place and every other frame handed to aioquic's own
        handler. Anything else goes to aioquic unchanged. tests/relay/test_tunnel_short_ways.py
        runs random conversations through both ways and compares what the connections did
        after every step.
        """
        paths = self._network_paths
        cid_length = len(self.host_cid)
        if not (
            self.short_receive
            and self._state is _CONNECTED
            and self._quic_logger is None
            and len(data) > cid_length + 1
            and data[0] & 0xC0 == 0x40  # a short header with its fixed bit
            and paths
            and paths[0].addr == addr
            and paths[0].is_validated
            and data[1 : cid_length + 1] == self.host_cid
            and self._peer_cid.sequence_number is not None
        ):
            super().receive_datagram(data, addr, now)
            return
        self.short_received += 1
        network_path = paths[0]
        space = self._spaces[_ONE_RTT]
        try:
            plain_header, payload, packet_number = self._cryptos[_ONE_RTT].decrypt_packet(
                data, cid_length + 1, space.expected_packet_number
            )
        except CryptoError as exc:  # KeyUnavailableError is one too
            self._logger.debug(exc)
            return
        if packet_number in space.received_packets:
            return  # a duplicate (RFC 9000 §12.3)
        if plain_header[0] & 0x18:
            self.close(
                error_code=QuicErrorCode.PROTOCOL_VIOLATION,
                frame_type=QuicFrameType.PADDING,
                reason_phrase="Reserved bits must be zero",
            )
            return
        if packet_number > space.expected_packet_number:
            space.expected_packet_number = packet_number + 1
        if not self._is_client:
            zero_rtt = self._cryptos[_ZERO_RTT].recv
            if zero_rtt.is_valid():
                zero_rtt.teardown()
        if packet_number > self._spin_highest_pn:
            spin_bit = bool(plain_header[0] & PACKET_SPIN_BIT)
            self._spin_bit = not spin_bit if self._is_client else spin_bit
            self._spin_highest_pn = packet_number
        host_cid = self.host_cid
        is_ack_eliciting = is_probing = False
        try:
            is_ack_eliciting, is_probing = self._frames_received(
                payload, host_cid, network_path, now
            )
        except QuicConnectionError as exc:
            self._logger.warning(exc)
            self.close(
                error_code=exc.error_code,
                frame_type=exc.frame_type,
                reason_phrase=exc.reason_phrase,
            )
        if self._state in END_STATES or self._close_pending:
            return
        self._close_at = now + self._idle_timeout()
        self._ack_eliciting_sent_since_receipt = False
        if not self._is_client and not is_probing and host_cid != self.host_cid:
            # What a frame did to the connection IDs: aioquic's own handling.
            self.host_cid = host_cid
            if network_path.peer_cid is None:
                self.change_connection_id()
        if network_path not in self._network_paths:
            self._add_network_path(network_path)
        index = self._network_paths.index(network_path)
        if (
            index
            and not self._is_client
            and not is_probing
            and packet_number > space.largest_received_packet
        ):
            # What a frame did to the paths: aioquic's own promotion.
            self._network_paths.pop(index)
            self._network_paths.insert(0, network_path)
            if network_path.peer_cid is not None:
                self._use_reserved_peer_cid(network_path)
            if not network_path.is_validated:
                network_path.local_challenge_sent = False
                network_path.validation_deadline = None
        if not space.discarded:
            if packet_number > space.largest_received_packet:
                space.largest_received_packet = packet_number
                space.largest_received_time = now
            space.ack_queue.add(packet_number)
            space.received_packets.add(packet_number)
            if len(space.ack_queue) > MAX_ACK_RANGES:
                space.ack_queue.shift()
            if is_ack_eliciting and space.ack_at is None:
                space.ack_at = now + self._ack_delay

    def _write_application(
        self, builder: QuicPacketBuilder, network_path: QuicNetworkPath, now: float
    ) -> None:
        """aioquic's 1-RTT packet writer, with a short way when only DATAGRAM frames (and an
        ACK, and flow-control limits) can be due: what an open tunnel nearly always sends.

        aioquic's writer checks some fifteen kinds of pending frame for every packet, and after
        the last datagram starts one more packet only to find it empty. The short way writes
        the same frames in the same order (ACK, connection and stream limits, DATAGRAMs) and
        stops once nothing is left, after the same pacing check aioquic's next round would make.
        Anything else pending (a PING, a stream's data, a new connection ID, path validation,
        handshake leftovers) goes to aioquic's writer unchanged.
        """
        if not (self.short_send and self._only_datagrams_due(network_path)):
            super()._write_application(builder, network_path, now)
            return
        self.short_sent += 1
        crypto = self._cryptos[_ONE_RTT]
        space = self._spaces[_ONE_RTT]
        pacer = self._loss._pacer
        pending = self._datagrams_pending
        streams = self._streams
        first = True
        while True:
            # apply pacing, except if we have ACKs to send (aioquic's rule)
            if space.ack_at is None or space.ack_at >= now:
                self._pacing_at = pacer.next_send_time(now=now)
                if self._pacing_at is not None:
                    break
            if not (first or pending):
                break  # aioquic would start a packet here and find nothing to put in it
            first = False
            builder.start_packet(QuicPacketType.ONE_RTT, crypto)
            if space.ack_at is not None and space.ack_at <= now:
                self._write_ack_frame(builder=builder, space=space, now=now)
            self._write_connection_limits(builder=builder, space=space)
            for stream in streams.values():
                self._write_stream_limits(builder=builder, space=space, stream=stream)
            if pending:
                self._write_datagrams(builder, pending)
            if builder.packet_is_empty:
                break
            pacer.update_after_send(now=now)

    @staticmethod
    def _write_datagrams(builder: QuicPacketBuilder, pending: deque[bytes]) -> None:
        """As many of ``pending`` as fit into the builder's packet, as DATAGRAM frames.

        What aioquic's ``start_frame`` does for each, without the call, its three property reads
        and its four frame-type checks per frame (6 % of a loaded relay's time went there): a
        frame fits if neither the packet's buffer nor the congestion window's room for it
        (both fixed when the packet started) is short of the frame's size after the AEAD tag;
        the first frame of a packet must leave room for header protection's sample, which any
        DATAGRAM frame does unless aioquic raised that minimum; a DATAGRAM frame makes the
        packet ack-eliciting and in flight.
        """
        buf = builder._buffer
        packet = builder._packet
        assert packet is not None and builder._packet_crypto is not None
        room = (
            min(builder._buffer_capacity, builder._flight_capacity)
            - builder._packet_crypto.aead_tag_size
        )
        empty_until = builder._packet_start + builder._header_size
        while pending:
            data = pending[0]
            length = len(data)
            capacity = 1 + size_uint_var(length) + length
            position = buf.tell()
            if position <= empty_until and capacity < _FIRST_FRAME_ROOM:
                capacity = _FIRST_FRAME_ROOM
            if room - position < capacity:
                return
            buf.push_uint_var(_DATAGRAM_WITH_LENGTH)
            packet.is_ack_eliciting = True
            packet.in_flight = True
            buf.push_uint_var(length)
            buf.push_bytes(data)
            pending.popleft()

    def _only_datagrams_due(self, network_path: QuicNetworkPath) -> bool:
        """Whether aioquic's 1-RTT writer could only write an ACK, limits and DATAGRAMs now."""
        if (
            not self._handshake_complete
            or self._quic_logger is not None  # aioquic logs each frame it writes
            or not network_path.is_validated
            or network_path.remote_challenges
            or self._handshake_done_pending
            or self._retire_connection_ids
            or self._streams_blocked_pending
            or self._ping_pending
            or self._probe_pending
            or not self._cryptos[_ONE_RTT].send.is_valid()
            or not self._crypto_streams[_ONE_RTT].sender.buffer_is_empty
        ):
            return False
        for connection_id in self._host_cids:
            if not connection_id.was_sent:
                return False
        for stream in self._streams_queue:
            if (
                stream.is_finished
                or stream.receiver.stop_pending
                or stream.sender.reset_pending
                or not stream.sender.buffer_is_empty
            ):
                return False
        return True

    def _frames_received(
        self, payload: bytes, host_cid: bytes, network_path: QuicNetworkPath, now: float
    ) -> tuple[bool, bool]:
        """aioquic's ``_payload_received`` for a 1-RTT packet, DATAGRAM frames read in place:
        (ack-eliciting, probing)."""
        buf = Buffer(data=payload)
        context: QuicReceiveContext | None = None
        frame_found = is_ack_eliciting = False
        is_probing: bool | None = None
        while not buf.eof():
            try:
                frame_type = buf.pull_uint_var()
            except BufferReadError:
                raise QuicConnectionError(
                    error_code=QuicErrorCode.FRAME_ENCODING_ERROR,
                    frame_type=None,  # type: ignore[arg-type]  # as aioquic raises it
                    reason_phrase="Malformed frame type",
                ) from None
            frame_found = True
            if frame_type in (_DATAGRAM_WITH_LENGTH, _DATAGRAM):
                start = buf.tell()
                try:
                    if frame_type == _DATAGRAM_WITH_LENGTH:
                        length = buf.pull_uint_var()
                    else:
                        length = buf.capacity - start
                    data = buf.pull_bytes(length)
                except BufferReadError:
                    raise _unparsable(frame_type) from None
                limit = self._configuration.max_datagram_frame_size
                if limit is None or buf.tell() - start >= limit:
                    raise QuicConnectionError(
                        error_code=QuicErrorCode.PROTOCOL_VIOLATION,
                        frame_type=frame_type,
                        reason_phrase="Unexpected DATAGRAM frame",
                    )
                self._events.append(events.DatagramFrameReceived(data=data))
                is_ack_eliciting = True
                is_probing = False
                continue
            try:
                frame_handler, frame_epochs = self._handlers[frame_type]
            except KeyError:
                raise QuicConnectionError(
                    error_code=QuicErrorCode.FRAME_ENCODING_ERROR,
                    frame_type=frame_type,
                    reason_phrase="Unknown frame type",
                ) from None
            if _ONE_RTT not in frame_epochs:
                raise QuicConnectionError(
                    error_code=QuicErrorCode.PROTOCOL_VIOLATION,
                    frame_type=frame_type,
                    reason_phrase="Unexpected frame type",
                )
            if context is None:
                context = QuicReceiveContext(
                    epoch=_ONE_RTT,
                    host_cid=host_cid,
                    network_path=network_path,
                    quic_logger_frames=None,
                    time=now,
                    version=None,
                )
            try:
                frame_handler(context, frame_type, buf)
            except BufferReadError:
                raise _unparsable(frame_type) from None
            except StreamFinishedError:
                pass  # no state left for that stream: aioquic ignores the frame
            if frame_type not in NON_ACK_ELICITING_FRAME_TYPES:
                is_ack_eliciting = True
            if frame_type not in PROBING_FRAME_TYPES:
                is_probing = False
            elif is_probing is None:
                is_probing = True
        if not frame_found:
            raise QuicConnectionError(
                error_code=QuicErrorCode.PROTOCOL_VIOLATION,
                frame_type=QuicFrameType.PADDING,
                reason_phrase="Packet contains no frames",
            )
        return is_ack_eliciting, bool(is_probing)

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            # aioquic internal: only this private flag makes its server send a
            # CertificateRequest (RFC 8446 §4.3.2). aioquic creates ``self.tls`` in
            # ``_initialize`` (on the first Initial), so this is the earliest point to set it.
            self.tls._request_client_certificate = True

    def peer_certificates(self) -> list[x509.Certificate]:
        """The peer's certificate chain, leaf first; empty if it sent none (aioquic internal)."""
        leaf = self.tls._peer_certificate
        return [] if leaf is None else [leaf, *self.tls._peer_certificate_chain]

    @property
    def peer_max_datagram_frame_size(self) -> int | None:
        """The peer's max_datagram_frame_size transport parameter (RFC 9221 §3); None if it
        does not accept DATAGRAM frames at all."""
        return self._remote_max_datagram_frame_size

    @property
    def queued_datagrams(self) -> int:
        return len(self._datagrams_pending)

    @property
    def close_event(self) -> events.ConnectionTerminated | None:
        """Why the connection is closing, as soon as it starts to (aioquic reports
        ConnectionTerminated only after the closing or draining period, RFC 9000 §10.2)."""
        return self._close_event


def _unparsable(frame_type: int) -> QuicConnectionError:
    """What aioquic raises for a frame cut short or malformed."""
    return QuicConnectionError(
        error_code=QuicErrorCode.FRAME_ENCODING_ERROR,
        frame_type=frame_type,
        reason_phrase="Failed to parse frame",
    )


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@final
@attrs.frozen
class LinkConfig:
    """What every link of one endpoint shares: who we are, whom we trust, QUIC's limits."""

    credentials: Credentials
    idle_timeout: float = 10.0
    #: the largest UDP payload QUIC may send (RFC 9000 §14: at least 1200)
    max_datagram_size: int = 1452
    #: the wall clock, not Trio's: certificates expire in calendar time
    wall_clock: Callable[[], datetime.datetime] = _utc_now
    ca: x509.Certificate = attrs.field(init=False, repr=False)
    _cert: x509.Certificate = attrs.field(init=False, repr=False)
    _key: Any = attrs.field(init=False, repr=False)

    @ca.default
    def _load_ca(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.credentials.ca_pem)

    @_cert.default
    def _load_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.credentials.cert_pem)

    @_key.default
    def _load_key(self) -> Any:
        return load_pem_private_key(self.credentials.key_pem, password=None)

    def quic(self, *, is_client: bool) -> QuicConfiguration:
        """aioquic's configuration for one side of a link."""
        return QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            idle_timeout=self.idle_timeout,
            max_datagram_size=self.max_datagram_size,
            max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
            connection_id_length=CID_LENGTH,
            certificate=self._cert,
            private_key=self._key,
            cadata=self.credentials.ca_pem,
            # aioquic clients verify the server's chain against ``cadata``; without a
            # server_name they skip host names, which mean nothing here (we check the URI
            # identity ourselves). aioquic servers verify nothing: see Link._authenticate.
            server_name=None,
            verify_mode=ssl.CERT_REQUIRED if is_client else ssl.CERT_NONE,
        )
