"""The sans-I/O core of one voice session: ICE-lite, DTLS-SRTP, Opus and an agent.

A :class:`Transceiver` is everything one WebRTC client's call is, except the socket and the
clock. The owner (a Trio task on a node) feeds it datagrams with :meth:`Transceiver.receive`,
sends what :meth:`Transceiver.datagrams_to_send` returns, drains :meth:`Transceiver.next_event`
and sleeps until :meth:`Transceiver.get_timer`, when :meth:`Transceiver.handle_timer` is due.
Time is always passed in (seconds on one monotonic clock); nothing here reads a clock, sleeps
or touches the network, so the whole call can be driven by a test's virtual clock.

It is made of three parts, each sans-I/O with its own deadline:

* :mod:`~sessions.transceiver.transport`: ICE, DTLS, SRTP and RTCP — datagrams in; the
  client's Opus payloads and the connection's events out; our encoded frames sent;
* :mod:`~sessions.transceiver.voice`: jitter buffer, decoder, turn detection, the agent, the
  pacer and the encoder;
* :mod:`~sessions.transceiver.checkpoints`: when a snapshot is due;

and :mod:`~sessions.transceiver.events` holds what the owner is told,
:mod:`~sessions.transceiver.handover` what a planned move hands over.

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

Its :class:`SessionState` moves only as :data:`~sessions.transceiver.connection.TRANSITIONS`
allows.

Checkpoints. The SRTP state reserves outbound indexes in each snapshot and refuses to protect
beyond what a *confirmed* snapshot reserved (see :mod:`sessions.webrtc.srtp`). So the
transceiver asks for checkpoints with :class:`CheckpointDue`: right after DTLS completes (or a
restore), then every :data:`CHECKPOINT_INTERVAL` (every :data:`CHECKPOINT_IDLE_INTERVAL` while
nothing a restore uses changes), sooner when the reservation runs low, and again every
:data:`CHECKPOINT_RETRY` while a request goes unanswered. The owner answers with
:meth:`Transceiver.snapshot`, stores :meth:`SessionSnapshot.to_bytes
<sessions.snapshot.SessionSnapshot.to_bytes>` durably, then calls :meth:`Transceiver.confirm`.
:meth:`Transceiver.restore` continues the session from the newest stored snapshot on any node:
the client notices a gap of a few hundred milliseconds and a jump in sequence numbers, and
renegotiates nothing.

Planned moves. :meth:`Transceiver.quiesce` stops the session at a frame boundary for good and
returns its *exact* snapshot; :meth:`Transceiver.restore` of that snapshot on another node
continues with the very next sequence number, SRTP and SRTCP indexes, the same SSRC, and a
timestamp advanced by the blackout in whole frames: the client sees a short gap, no jump, and
no index is ever used twice. If the move is abandoned, :meth:`Transceiver.resume` carries on
where it stopped. Before DTLS has keyed SRTP, or after the session ended, the quiesce is
refused (:class:`~sessions.transceiver.handover.MoveRefused`).

Input from the network never raises: every datagram is handled, or counted (see
:meth:`Transceiver.stats`) and dropped.
"""

from __future__ import annotations

from sessions.snapshot import SessionSnapshot
from sessions.transceiver.checkpoints import (
    CHECKPOINT_IDLE_INTERVAL,
    CHECKPOINT_INTERVAL,
    CHECKPOINT_RETRY,
)
from sessions.transceiver.connection import CONNECT_TIMEOUT, SessionState
from sessions.transceiver.core import Transceiver
from sessions.transceiver.events import (
    CODE_CONNECT_TIMEOUT,
    CODE_CONSENT_EXPIRED,
    CODE_DTLS_FAILED,
    CheckpointDue,
    ClientEvent,
    DtlsConnected,
    IceConnected,
    MediaStarted,
    SessionClosed,
    SessionEvent,
    SessionFailed,
)
from sessions.transceiver.handover import (
    CODE_ENDED,
    CODE_NOT_CONNECTED,
    CODE_NOT_QUIESCED,
    CODE_STALLED,
    MoveRefused,
    frames_elapsed,
)
from sessions.transceiver.reports import RTCP_IDLE_INTERVAL, RTCP_INTERVAL

__all__ = [
    "CHECKPOINT_IDLE_INTERVAL",
    "CHECKPOINT_INTERVAL",
    "CHECKPOINT_RETRY",
    "CODE_CONNECT_TIMEOUT",
    "CODE_CONSENT_EXPIRED",
    "CODE_DTLS_FAILED",
    "CODE_ENDED",
    "CODE_NOT_CONNECTED",
    "CODE_NOT_QUIESCED",
    "CODE_STALLED",
    "CONNECT_TIMEOUT",
    "RTCP_IDLE_INTERVAL",
    "RTCP_INTERVAL",
    "CheckpointDue",
    "ClientEvent",
    "DtlsConnected",
    "IceConnected",
    "MediaStarted",
    "MoveRefused",
    "SessionClosed",
    "SessionEvent",
    "SessionFailed",
    "SessionSnapshot",
    "SessionState",
    "Transceiver",
    "frames_elapsed",
]
