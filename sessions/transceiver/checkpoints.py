"""When a session's snapshot is due: the checkpoint policy, sans-I/O.

The SRTP state reserves outbound indexes in each snapshot and refuses to protect beyond what a
*confirmed* snapshot reserved (see :mod:`sessions.webrtc.srtp`). So a session asks for
checkpoints with :class:`~sessions.transceiver.events.CheckpointDue`: right after DTLS keys
SRTP (or a restore), then every :data:`CHECKPOINT_INTERVAL`, sooner when the reservation runs
low, and again every :data:`CHECKPOINT_RETRY` while a request goes unanswered.

A periodic checkpoint is skipped when it would store what the newest confirmed one already
holds: the session reads its *restore state* (a value that changes when anything a crash
restore uses changes: what we sent, the client's address and SSRC, the inbound RTP index by a
step) and, when that equals the confirmed checkpoint's, waits another interval, up to
:data:`CHECKPOINT_IDLE_INTERVAL` since that checkpoint. A connected session whose agent is
silent (the node sends no packet then, see :mod:`sessions.audio.pacer`) and whose client holds
still writes one checkpoint a minute instead of six. Never skipped: the first checkpoint, an
unanswered request, and a reservation running low. What a stale checkpoint restores is what a
fresh one would: SRTP indexes come from the reservation, consent is counted from the restore,
and the RTP timestamp from the wall clock (:meth:`Transport.restore
<sessions.transceiver.transport.Transport.restore>`, :mod:`sessions.node.failover`).

:class:`CheckpointPolicy` only decides when; it reads the reservation's headroom and the
restore state, and is told when a snapshot was taken and confirmed. Its deadline is
:meth:`CheckpointPolicy.get_timer`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Final, Protocol, final

from sessions.transceiver.events import CheckpointDue

__all__ = [
    "CHECKPOINT_IDLE_INTERVAL",
    "CHECKPOINT_INTERVAL",
    "CHECKPOINT_RETRY",
    "CheckpointPolicy",
    "Reservation",
]

#: Seconds between checkpoints once connected, while the restore state changes.
CHECKPOINT_INTERVAL: Final = 10.0
#: Seconds after which a checkpoint is taken even though the restore state has not changed
#: since the newest confirmed one (a multiple of :data:`CHECKPOINT_INTERVAL`).
CHECKPOINT_IDLE_INTERVAL: Final = 60.0
#: Seconds after which an unanswered :class:`CheckpointDue` is repeated, and the least time
#: between two requests made because the SRTP reservation runs low.
CHECKPOINT_RETRY: Final = 2.0

# Slack for sums of float times that should reach CHECKPOINT_IDLE_INTERVAL exactly.
_ROUNDING: Final = 1e-3

# Ask for a checkpoint early once fewer outbound indexes than these are left in the confirmed
# reservation: 1024 RTP packets are 20 s of audio, 64 SRTCP packets a couple of minutes.
_LOW_RTP_HEADROOM: Final = 1024
_LOW_SRTCP_HEADROOM: Final = 64


class Reservation(Protocol):
    """What the policy reads of the SRTP state (:class:`~sessions.webrtc.srtp.SrtpSession`)."""

    @property
    def rtp_headroom(self) -> int | None:
        """RTP packets the confirmed reservation still allows; ``None`` before the first."""
        ...

    @property
    def srtcp_headroom(self) -> int | None:
        """SRTCP packets the confirmed reservation still allows; ``None`` before the first."""
        ...


@final
class CheckpointPolicy:
    """Asks for a checkpoint when one is due (see the module docstring).

    Idle until :meth:`start` (SRTP is keyed), inert after :meth:`stop` (the session ended).
    """

    def __init__(self) -> None:
        self._reservation: Reservation | None = None
        self._state: Callable[[float], Hashable] | None = None
        self._started_at: float | None = None
        self._stopped = False
        self._requested_at: float | None = None
        self._snapshot_at: float | None = None
        self._skipped_at: float | None = None
        # the restore state of the newest confirmed snapshot, and when that one was taken
        self._confirmed_state: Hashable | None = None
        self._confirmed_at: float | None = None
        self._events: collections.deque[CheckpointDue] = collections.deque()
        self.requested = 0
        self.snapshots = 0
        self.confirmed = 0
        self.skipped = 0

    def start(
        self, reservation: Reservation, now: float, *, state: Callable[[float], Hashable]
    ) -> None:
        """SRTP is keyed (or restored): ask for the first checkpoint at once, before anything
        is sent, so that its reservation covers the stream from its start. ``state(now)`` is
        the session's restore state (see the module docstring)."""
        self._reservation = reservation
        self._state = state
        self._started_at = now
        self._request(now)

    def stop(self) -> None:
        """The session ended: nothing more is asked."""
        self._stopped = True

    def snapshot_taken(self, now: float) -> None:
        """A snapshot was taken at ``now``: the request (if any) is answered."""
        self._snapshot_at = now
        self.snapshots += 1

    def snapshot_confirmed(self, state: Hashable, taken: float) -> None:
        """A snapshot taken at ``taken``, whose restore state was ``state``, was durably stored
        and confirmed to the SRTP state. Confirmations come in the order of the snapshots."""
        self.confirmed += 1
        if self._confirmed_at is None or taken >= self._confirmed_at:
            self._confirmed_state, self._confirmed_at = state, taken

    def next_event(self) -> CheckpointDue | None:
        """The oldest request not yet taken, or ``None``."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When the next checkpoint is due; ``None`` before :meth:`start` or after :meth:`stop`."""
        due = self._due()
        return None if due is None else due[0]

    def handle_timer(self, now: float) -> None:
        """Ask for a checkpoint if one is due at ``now``, unless it is a periodic one that
        would store what the newest confirmed one holds (see the module docstring)."""
        due = self._due()
        if due is None or now < due[0]:
            return
        if due[1] and self._unchanged(now):
            self._skipped_at = now
            self.skipped += 1
            return
        self._request(now)

    def stats(self) -> dict[str, int]:
        """Requests, snapshots and confirmations so far."""
        return {
            "requested": self.requested,
            "snapshots": self.snapshots,
            "confirmed": self.confirmed,
            "skipped": self.skipped,
        }

    def _due(self) -> tuple[float, bool] | None:
        """The next deadline and whether it is a periodic one (which may be skipped), not a
        repeated request or a reservation running low; ``None`` when nothing is due."""
        reservation, started = self._reservation, self._started_at
        if reservation is None or self._stopped or started is None:
            return None
        requested, snapshot = self._requested_at, self._snapshot_at
        if requested is not None and (snapshot is None or requested > snapshot):
            return requested + CHECKPOINT_RETRY, False  # unanswered: ask again
        base = started if snapshot is None else snapshot
        # Sooner when the reservation runs low (CHECKPOINT_RETRY < CHECKPOINT_INTERVAL, so
        # this is the earlier of the two).
        if _headroom_low(reservation):
            return base + CHECKPOINT_RETRY, False
        if self._skipped_at is not None and self._skipped_at > base:
            base = self._skipped_at
        return base + CHECKPOINT_INTERVAL, True

    def _unchanged(self, now: float) -> bool:
        """Whether the periodic checkpoint due at ``now`` would store what the newest
        confirmed one holds, and that one is younger than CHECKPOINT_IDLE_INTERVAL."""
        confirmed_at, state = self._confirmed_at, self._state
        if (
            confirmed_at is None
            or state is None
            or now - confirmed_at >= CHECKPOINT_IDLE_INTERVAL - _ROUNDING
        ):
            return False
        return state(now) == self._confirmed_state

    def _request(self, now: float) -> None:
        self._requested_at = now
        self.requested += 1
        self._events.append(CheckpointDue())


def _headroom_low(reservation: Reservation) -> bool:
    """Whether either reservation runs low. The headrooms are read afresh on every call (each
    packet sent lowers them) but the SRTCP one only when the RTP one is not low already."""
    rtp_left = reservation.rtp_headroom
    if rtp_left is not None and rtp_left < _LOW_RTP_HEADROOM:
        return True
    srtcp_left = reservation.srtcp_headroom
    return srtcp_left is not None and srtcp_left < _LOW_SRTCP_HEADROOM
