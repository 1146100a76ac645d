"""SRTP and SRTCP protection (RFC 3711, RFC 7714) whose whole state is a value.

:class:`SrtpSession` protects what we send and unprotects what the peer sends for one WebRTC
peer. :meth:`SrtpSession.snapshot` returns an :class:`SrtpState`, an immutable value that
serializes with :meth:`SrtpState.to_bytes`; :meth:`SrtpSession.restore` turns it back into a
live session, possibly in another process on another node, that goes on decrypting the same
inbound stream and continuing the same outbound stream. The one property everything below
serves: **no SRTP or SRTCP index is ever protected twice under one key**, even across moves
(RFC 3711 §9.1, RFC 7714 §8.4 and §9.4: a repeated index repeats the keystream, and for GCM
also gives away the authentication key).

How each direction is built, and why:

* **Outbound RTP** goes through libsrtp (pylibsrtp), which is fast. libsrtp tracks the rollover
  counter (ROC) itself but pylibsrtp offers no way to set it, so after a restore we call
  ``srtp_set_stream_roc`` of the very libsrtp pylibsrtp loaded (``ctypes`` on its
  ``_binding`` module, opened with ``RTLD_NOLOAD`` so it cannot be a second copy) on the
  ``srtp_t`` pylibsrtp created (its private ``_srtp``). We mirror libsrtp's index estimate
  (RFC 3711 §3.3.1) in Python so we know every packet's index before libsrtp sees it.
* **Outbound SRTCP** is built here with ``cryptography``: libsrtp numbers SRTCP packets
  1, 2, 3... from its own counter and has no way to start elsewhere, so a restored libsrtp
  would reuse every index the previous owner used. We derive the SRTCP session keys (RFC 3711
  §4.3, RFC 7714 §11) and write E-flag, 31-bit index and tag ourselves (RFC 3711 §3.4 with
  AES-CM and HMAC-SHA1, RFC 7714 §9 with GCM); the tests check it byte for byte against
  libsrtp.
* **Inbound RTP and SRTCP** go through libsrtp. Setting the ROC alone is not enough after a
  restore: libsrtp then takes the first packet's index as exactly ``ROC * 2**16 + SEQ``
  without guessing, so a first packet after a wrap fails, and keeps failing. Instead we
  *prime* the fresh libsrtp receiver: we protect an empty packet at the highest index received
  so far with the peer's key (a throw-away sender, the output never leaves the process) and
  unprotect it, which leaves libsrtp exactly where the old receiver was. Replay windows
  (RFC 3711 §3.3.2) are kept in Python as well and travel in the state, so a packet received
  before the move is still refused after it.

The reservation rule (why a restored session never repeats an index):

1. A snapshot *reserves* outbound indexes: up to ``rtp_reserved`` for RTP (``RTP_RESERVE``
   beyond the highest used) and ``srtcp_reserved`` for SRTCP.
2. A session never protects beyond its *fence*: before its first snapshot it has none; then
   the fence is the reservation of the newest snapshot passed to :meth:`SrtpSession.confirm`,
   or, until one is, that of its first snapshot. :meth:`SrtpSession.protect_rtp` raises
   :class:`SrtpIndexError` rather than cross it.
3. A restored session starts above the restored state's reservation, and its fence is that
   same reservation: it sends nothing until one of its own snapshots is confirmed.

So the owner calls ``confirm(state)`` once ``state`` is durably stored as the session's newest
state, and a restore always uses the newest stored state. Then whatever the old owner sent
after that snapshot (a few packets in flight during a hand-off, or everything up to a crash)
is at or below the reservation, and the new owner starts above it. A second restore of the
same state (the first new owner died before storing its own) is safe too, because that owner
could not send before its own state was stored. An RTP reservation stays well below 2**15 so
the peer's ROC guess (RFC 3711 §3.3.1) survives the jump; the peer sees a gap in sequence
numbers, which RTP tolerates as loss. :attr:`SrtpSession.next_rtp_seq` tells the packetizer
where to continue. Choose the first sequence number of a stream below 2**15 (libwebrtc does):
a snapshot taken before anything was sent reserves that whole range.

Failures caused by what the peer sent raise :class:`SrtpError` (a
:class:`~sessions.webrtc.errors.RemoteInputError`: count and drop). Refusals to protect
raise :class:`SrtpIndexError` (a local condition); malformed outbound packets raise
``ValueError``.

The package, one layer per module: :mod:`~sessions.webrtc.srtp.profile` (profiles and
errors), :mod:`~sessions.webrtc.srtp.binding` (the libsrtp symbols pylibsrtp does not expose),
:mod:`~sessions.webrtc.srtp.index` (RFC 3711 §3.3 index arithmetic and replay windows),
:mod:`~sessions.webrtc.srtp.srtcp` (SRTCP at a chosen index), :mod:`~sessions.webrtc.srtp.state`
(the value) and :mod:`~sessions.webrtc.srtp.session` (the live session).
"""

from __future__ import annotations

from sessions.webrtc.srtp.profile import SrtpError, SrtpIndexError, SrtpProfile
from sessions.webrtc.srtp.session import RTP_RESERVE, SRTCP_RESERVE, SrtpSession
from sessions.webrtc.srtp.state import SrtpState

__all__ = [
    "RTP_RESERVE",
    "SRTCP_RESERVE",
    "SrtpError",
    "SrtpIndexError",
    "SrtpProfile",
    "SrtpSession",
    "SrtpState",
]
