"""A planned move's exact hand-over, sans-I/O: what a quiesced session's SRTP state says and how
the next owner continues it without skipping or repeating an index.

A checkpoint (:meth:`Transceiver.snapshot <sessions.transceiver.Transceiver.snapshot>`) is
taken while the session goes on sending, so it *reserves* outbound indexes and a restore from it
starts above the reservation: the client sees a jump (see :mod:`sessions.webrtc.srtp`). A
planned move does better because the old owner stops first: once
:meth:`Transceiver.quiesce <sessions.transceiver.Transceiver.quiesce>` has returned, it never
protects another packet, so its snapshot can say exactly which indexes were used, and the next
owner continues at the very next RTP sequence number and SRTCP index (RFC 3711 §3.3.1, §3.4).

What the exact state holds (:func:`exact_state`), as an :class:`~sessions.webrtc.srtp.SrtpState`:

* ``rtp_index`` / ``srtcp_index``: the highest outbound indexes used, exactly (``None`` when
  none was);
* ``rtp_reserved`` / ``srtcp_reserved``: the old owner's *fence*, the limit a durably stored
  snapshot already covers (the reservation of its last confirmed checkpoint). It adds nothing:
  the quiesce reserves no new index.

How the next owner continues (:func:`continue_srtp`): its floor is the exact index (it never
goes at or below it) and its fence is the old owner's, so it may send at once, without waiting
for a checkpoint of its own, up to what the stored checkpoint already reserved. Should it crash
before its own checkpoint is stored, a restore from that stored checkpoint starts above the same
fence: nothing the two owners sent is ever used again. And should the exact state itself be
stored as a checkpoint, a crash restore from it (a non-exact restore, see
:meth:`SessionSnapshot.as_checkpoint <sessions.snapshot.SessionSnapshot.as_checkpoint>`) also
starts above that fence.

:class:`~sessions.webrtc.srtp.SrtpSession` has no constructor for "continue right after index
``i``, fenced at ``f``", so :func:`continue_srtp` builds one from its public surface: a session
restored at reservation ``i`` (floor and fence ``i``) is then handed a reservation up to ``f``
as if a snapshot of its own had been confirmed — which is safe because ``f`` is exactly what
a stored snapshot of the old owner reserved.
"""

from __future__ import annotations

import math
from typing import Final

import attrs

from sessions.audio.pacer import FRAME_SECONDS
from sessions.webrtc.srtp import RTP_RESERVE, SRTCP_RESERVE, SrtpSession, SrtpState

__all__ = [
    "CODE_ENDED",
    "CODE_NOT_CONNECTED",
    "CODE_NOT_QUIESCED",
    "CODE_STALLED",
    "MoveRefused",
    "continue_srtp",
    "exact_state",
    "frames_elapsed",
]

#: :class:`MoveRefused` codes: the DTLS handshake has not keyed SRTP yet (a move is deferred
#: or refused until it has: there is nothing a restore could continue)
CODE_NOT_CONNECTED: Final = "not_connected"
#: the session is over (failed or closed)
CODE_ENDED: Final = "ended"
#: a hand-off or a resume asked of a session that is not quiesced
CODE_NOT_QUIESCED: Final = "not_quiesced"
#: the node's lease is stalled (sessions/session.py holds the session until it recovers)
CODE_STALLED: Final = "stalled"

# An exact state's fence may be far above the last index (the reservation made at connect
# covers the whole range a stream can start in); the next owner takes at most one ordinary
# reservation of it, and asks for a checkpoint of its own at once anyway.
_MAX_CARRIED_RTP: Final = RTP_RESERVE
_MAX_CARRIED_SRTCP: Final = SRTCP_RESERVE


class MoveRefused(Exception):
    """A session cannot be quiesced (or resumed, or handed off) now; ``code`` says why:
    :data:`CODE_NOT_CONNECTED`, :data:`CODE_ENDED` or :data:`CODE_NOT_QUIESCED`."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason

    def __reduce__(self) -> tuple[type[MoveRefused], tuple[str, str]]:
        return type(self), (self.code, self.reason)


def frames_elapsed(seconds: float) -> int:
    """Whole 20 ms frames that cover ``seconds`` of wall time, rounded up (0 for none).

    The RTP timestamp of a moved or resumed stream advances by this many frames, so that it
    keeps pace with real time and never falls behind it: a receiver then sees a short gap (it
    conceals it), never packets that seem late (which would make its jitter buffer grow).
    """
    if not math.isfinite(seconds) or seconds <= 0:
        return 0
    # A hair under a whole frame is that frame: 0.06 / 0.02 is 2.9999999999999996.
    return math.ceil(seconds / FRAME_SECONDS - 1e-9)


def exact_state(keys: SrtpSession) -> SrtpState:
    """The SRTP state of a session that will never protect another packet: its indexes exactly,
    fenced where its stored checkpoint already reserved (see the module docstring).

    A session that was never snapshotted has no fence yet; its exact state then reserves as a
    first checkpoint would (that state is the first anyone stores).
    """
    rtp_headroom, srtcp_headroom = keys.rtp_headroom, keys.srtcp_headroom
    if rtp_headroom is None or srtcp_headroom is None:
        return keys.snapshot()
    # The smallest reservation asked for: never less than one this session already made, so
    # it moves nothing unless the session stands exactly at its reservation's end.
    state = keys.snapshot(rtp_reserve=1, srtcp_reserve=1)
    rtp_last = -1 if state.rtp_index is None else state.rtp_index
    srtcp_last = -1 if state.srtcp_index is None else state.srtcp_index
    return attrs.evolve(
        state,
        rtp_reserved=max(0, rtp_last + rtp_headroom),
        srtcp_reserved=max(0, srtcp_last + srtcp_headroom),
    )


def continue_srtp(state: SrtpState, next_seq: int) -> SrtpSession:
    """A live SRTP session that continues an :func:`exact_state` with no gap: our next RTP
    packet (sequence number ``next_seq``) and SRTCP packet take the very next indexes, and the
    session may send up to the old owner's fence without a checkpoint of its own.

    Inbound it is an ordinary restore: the client's stream goes on decrypting, with its
    rollover counter and replay windows (RFC 3711 §3.3.1, §3.3.2).
    """
    if state.rtp_reserved is None or state.srtcp_reserved is None:
        raise ValueError("an exact SRTP state carries the old owner's fence")
    rtp_last = state.rtp_index
    if rtp_last is None:
        # Nothing sent yet: the stream starts at next_seq, below 2**15, with ROC 0 (see
        # sessions.webrtc.srtp); the floor is just under it.
        if not 0 < next_seq < 1 << 15:
            raise ValueError("a stream that sent nothing starts below 2**15")
        rtp_last = next_seq - 1
    elif (rtp_last + 1) & 0xFFFF != next_seq:
        raise ValueError("next_seq does not follow the last RTP index of the exact state")
    # SrtpState reserves RTP and SRTCP together, so a stream that sent no SRTCP yet starts at
    # index 1: index 0 is never used, which costs nothing (RFC 3711 §3.4 asks only that an
    # index never repeats).
    srtcp_last = 0 if state.srtcp_index is None else state.srtcp_index
    session = SrtpSession.restore(
        attrs.evolve(
            state,
            rtp_index=rtp_last,
            rtp_reserved=rtp_last,
            srtcp_index=srtcp_last,
            srtcp_reserved=srtcp_last,
        )
    )
    rtp_room = min(state.rtp_reserved - rtp_last, _MAX_CARRIED_RTP)
    srtcp_room = min(state.srtcp_reserved - srtcp_last, _MAX_CARRIED_SRTCP)
    if rtp_room >= 1 and srtcp_room >= 1:
        # The old owner's fence, covered by its stored checkpoint: usable at once.
        session.confirm(session.snapshot(rtp_reserve=rtp_room, srtcp_reserve=srtcp_room))
    # Otherwise the old owner had used its reservation up: this session sends once its own
    # first checkpoint is confirmed, as after a crash restore.
    return session
