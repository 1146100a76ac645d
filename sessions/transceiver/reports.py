"""RTCP reports of one session (RFC 3550 §6), sans-I/O: what the transport says and hears about
the two RTP streams.

:class:`RtcpReports` keeps the statistics both ways — the client's stream as we receive it, ours
as we sent it and as the client reports it — writes our compound packets (SR or RR, then SDES
CNAME) and schedules them (:meth:`RtcpReports.get_timer`). It neither protects nor sends:
:class:`~sessions.transceiver.transport.Transport` does, with SRTCP.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Sequence
from typing import Final, final

from sessions.audio.opus import CLOCK_RATE
from sessions.webrtc import rtcp

__all__ = ["RTCP_IDLE_INTERVAL", "RTCP_INTERVAL", "RtcpReports"]

#: Mean seconds between our RTCP compound packets while RTP flows either way (randomized by
#: 0.5..1.5, RFC 3550 §6.3.1).
RTCP_INTERVAL: Final = 2.0
#: Mean seconds between them after an interval with no RTP either way: RFC 3550 §6.2's
#: recommended minimum. Such a report says nothing new (an RR without report blocks), and a
#: node holding a thousand silent sessions sends 2.5 times fewer of them.
RTCP_IDLE_INTERVAL: Final = 5.0

# SR NTP timestamps remembered to recognize the LSR echoed in the client's reports.
_SR_MEMORY: Final = 16
_U32: Final = 0xFFFF_FFFF
_TS_MOD: Final = 1 << 32


def ntp(now: float) -> int:
    """Our NTP timestamp for ``now``.

    RFC 3550 §6.4.1 allows a sender without wallclock time to stamp SRs from another clock it
    uses consistently; the client only echoes the middle bits back (for RTT) and audio-only
    sessions need no lip sync.
    """
    return rtcp.ntp_from_seconds(now)


@final
class RtcpReports:
    """Sender and receiver statistics of one session, and its RTCP schedule."""

    def __init__(
        self,
        *,
        ssrc: int,
        cname: str,
        rng: random.Random,
        packets_sent: int = 0,
        octets_sent: int = 0,
        remote_ssrc: int | None = None,
        received_up_to: int | None = None,
    ) -> None:
        self._ssrc = ssrc
        self._cname = cname
        self._rng = rng
        #: RTP packets and payload octets we sent (RFC 3550 §6.4.1 sender info)
        self.packets_sent = packets_sent
        self.octets_sent = octets_sent
        #: (RTP timestamp, tick deadline) of the last packet we sent
        self.last_sent: tuple[int, float] | None = None
        self._receiver: rtcp.ReceiverStatistics | None = None
        if remote_ssrc is not None:
            # After a planned move, the previous owner received up to ``received_up_to``.
            self._receiver = rtcp.ReceiverStatistics(remote_ssrc, CLOCK_RATE, after=received_up_to)
        self._at: float | None = None
        # whether RTP went either way since the last report was scheduled
        self._flowing = False
        self._sr_sent: collections.deque[int] = collections.deque(maxlen=_SR_MEMORY)
        # packets sent as of the last two reports: RFC 3550 §6.4 sends an SR only if we sent
        # RTP since the report before last
        self._sent_marks: collections.deque[int] = collections.deque([packets_sent], maxlen=2)
        self._rtt: float | None = None
        self._ours: rtcp.ReportBlock | None = None  # our last block about the client
        self._theirs: rtcp.ReportBlock | None = None  # the client's about our stream
        self.bye_in = 0

    # --- schedule -----------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Media flows: schedule the first report (idempotent)."""
        if self._at is None:
            # RFC 3550 §6.3.6 starts with half the interval; randomized like every other.
            self._at = now + RTCP_INTERVAL / 2 * self._rng.uniform(0.5, 1.5)

    def stop(self) -> None:
        """The session ended: no more reports."""
        self._at = None

    def get_timer(self) -> float | None:
        """When the next periodic report is due; ``None`` before :meth:`start`."""
        return self._at

    def due(self, now: float) -> bool:
        """Whether the periodic report is due at ``now``."""
        return self._at is not None and now >= self._at

    def reschedule(self, now: float) -> None:
        """A periodic report went out (or was due and could not): the next one (RFC 3550
        §6.3.1 randomizes each interval over 0.5..1.5 of the mean), at :data:`RTCP_INTERVAL`
        if RTP went either way since the last one, else at :data:`RTCP_IDLE_INTERVAL`."""
        mean = RTCP_INTERVAL if self._flowing else RTCP_IDLE_INTERVAL
        self._flowing = False
        self._at = self._after(now, mean)

    def _after(self, now: float, mean: float) -> float:
        return now + mean * self._rng.uniform(0.5, 1.5)

    def _flows(self, now: float) -> None:
        """The first RTP packet since the last report was scheduled: a report scheduled at the
        idle pace comes at the media pace instead."""
        self._flowing = True
        at = self._at
        if at is not None and at > now + RTCP_INTERVAL * 1.5:
            self._at = self._after(now, RTCP_INTERVAL)

    # --- what we sent and received ------------------------------------------------------------

    def on_sent(self, payload_bytes: int, timestamp: int, deadline: float) -> None:
        """An RTP packet of ours with ``payload_bytes`` of payload went out."""
        self.packets_sent += 1
        self.octets_sent += payload_bytes
        self.last_sent = (timestamp, deadline)
        if not self._flowing:
            self._flows(deadline)

    def on_rtp(self, ssrc: int, seq: int, timestamp: int, now: float) -> None:
        """An authentic RTP packet of the client's arrived at ``now``."""
        receiver = self._receiver
        if receiver is None or receiver.ssrc != ssrc:
            receiver = self._receiver = rtcp.ReceiverStatistics(ssrc, CLOCK_RATE)
        # Every packet of the SSRC counts for loss, telephone-event too: they share its
        # sequence numbers (RFC 3550 §6.4.1, RFC 4733 §2.1).
        receiver.record_packet(seq, timestamp, now)
        if not self._flowing:
            self._flows(now)

    def on_rtcp(self, packets: Sequence[rtcp.RtcpPacket], now: float) -> None:
        """An authentic RTCP compound of the client's arrived at ``now``."""
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
                self.bye_in += 1
            for block in blocks:
                if block.ssrc == self._ssrc:
                    self._on_report(block, now)

    def _on_report(self, block: rtcp.ReportBlock, now: float) -> None:
        """A report block about our stream (RFC 3550 §6.4.1)."""
        self._theirs = block
        # RTT = arrival - LSR - DLSR, only for an LSR that echoes one of our own SRs: after a
        # restore, reports may still echo the previous owner's, stamped on another clock.
        if block.lsr in self._sr_sent:
            rtt = rtcp.rtt_seconds(block, rtcp.ntp_middle32(ntp(now)))
            if rtt is not None:
                self._rtt = rtt

    # --- what we say --------------------------------------------------------------------------

    def compound(
        self, now: float, extra: Sequence[rtcp.RtcpPacket] = ()
    ) -> tuple[bytes, int | None]:
        """SR or RR, then SDES CNAME (RFC 3550 §6.1), then ``extra``; and the SR's LSR key
        (to :meth:`sent` once the SR is really on its way)."""
        blocks: tuple[rtcp.ReportBlock, ...] = ()
        if self._receiver is not None:
            block = self._receiver.report_block(now)
            if block is not None:
                self._ours = block
                blocks = (block,)
        first: rtcp.RtcpPacket
        lsr: int | None = None
        if self.packets_sent > self._sent_marks[0] and self.last_sent is not None:
            stamp = ntp(now)
            timestamp, deadline = self.last_sent
            # The RTP timestamp of the same instant as the NTP one (RFC 3550 §6.4.1).
            rtp_timestamp = (timestamp + round((now - deadline) * CLOCK_RATE)) % _TS_MOD
            first = rtcp.SenderReport(
                ssrc=self._ssrc,
                ntp_timestamp=stamp,
                rtp_timestamp=rtp_timestamp,
                packet_count=self.packets_sent & _U32,
                octet_count=self.octets_sent & _U32,
                reports=blocks,
            )
            lsr = rtcp.ntp_middle32(stamp)
        else:
            first = rtcp.ReceiverReport(ssrc=self._ssrc, reports=blocks)
        self._sent_marks.append(self.packets_sent)
        sdes = rtcp.SourceDescription(
            (rtcp.SdesChunk(self._ssrc, ((rtcp.SdesItem.CNAME, self._cname.encode("ascii")),)),)
        )
        return rtcp.serialize([first, sdes, *extra]), lsr

    def sent(self, lsr: int) -> None:
        """The SR whose LSR key is ``lsr`` went out: the client's reports may echo it."""
        self._sr_sent.append(lsr)

    # --- statistics ---------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """Loss, jitter and round-trip time both ways (see ``Transceiver.stats``)."""
        receiver, ours, theirs = self._receiver, self._ours, self._theirs
        return {
            "loss_fraction": 0.0 if ours is None else ours.fraction_lost / 256,
            "loss_cumulative": 0 if receiver is None else receiver.lost,
            "jitter_ms": 0.0 if receiver is None else receiver.jitter / CLOCK_RATE * 1000,
            "rtt_ms": None if self._rtt is None else self._rtt * 1000,
            "remote_loss_fraction": None if theirs is None else theirs.fraction_lost / 256,
            "remote_loss_cumulative": None if theirs is None else theirs.cumulative_lost,
            "remote_jitter_ms": None if theirs is None else theirs.jitter / CLOCK_RATE * 1000,
        }
