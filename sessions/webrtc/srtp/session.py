"""The live SRTP/SRTCP session of one peer (RFC 3711, RFC 7714), built from and turned back
into an :class:`~sessions.webrtc.srtp.state.SrtpState`.

See :mod:`sessions.webrtc.srtp` for how each direction is built and for the reservation rule
that keeps a restored session from ever protecting an index twice.
"""

from __future__ import annotations

import struct
from typing import Final, final

import pylibsrtp

from sessions.webrtc.srtp import binding
from sessions.webrtc.srtp.index import (
    HALF,
    MAX_RTP_INDEX,
    MAX_SRTCP_INDEX,
    guess_index,
    newer,
    replay_add,
    replay_reason,
)
from sessions.webrtc.srtp.profile import SrtpError, SrtpIndexError, SrtpProfile
from sessions.webrtc.srtp.srtcp import SrtcpProtector, index_of
from sessions.webrtc.srtp.state import MAX_RTCP_SOURCES, SrtpState

__all__ = ["RTP_RESERVE", "SRTCP_RESERVE", "SrtpSession"]

#: Outbound RTP indexes a snapshot reserves beyond the highest one used (the default).
RTP_RESERVE: Final = 2048
#: Outbound SRTCP indexes a snapshot reserves beyond the highest one used (the default).
SRTCP_RESERVE: Final = 1024
# A restored sender jumps ahead by up to a reservation; the peer guesses the ROC right only
# for jumps below 2**15 (RFC 3711 §3.3.1), so leave room for losses and repeated moves.
_MAX_RTP_RESERVE: Final = 1 << 14

_MAX_DATAGRAM: Final = 1500  # pylibsrtp's buffer; no WebRTC datagram is larger
_RTP_HEADER: Final = struct.Struct("!BBHII")
_RTCP_HEADER: Final = struct.Struct("!BBHI")
_U32: Final = struct.Struct("!I")


@final
class SrtpSession:
    """SRTP and SRTCP for one peer: one outbound RTP stream (ours), one inbound RTP stream.

    Build with :meth:`create` for new keys or :meth:`restore` from a snapshot. The session is
    mutable and owns two pylibsrtp sessions; :meth:`snapshot` turns it into a value. Not
    thread-safe (one Trio task owns it).
    """

    __slots__ = (
        "_in",
        "_local_ssrc",
        "_out",
        "_out_synced",
        "_profile",
        "_remote_ssrc",
        "_rtp_fence",
        "_rtp_floor",
        "_rtp_received",
        "_rtp_reserved_max",
        "_rtp_sent",
        "_rtp_window",
        "_srtcp",
        "_srtcp_fence",
        "_srtcp_floor",
        "_srtcp_received",
        "_srtcp_reserved_max",
        "_srtcp_sent",
        "_state_keys",
        "last_rtp_in",
        "last_rtp_out",
        "last_srtcp_out",
    )

    def __init__(self, state: SrtpState) -> None:
        """Prefer :meth:`create` or :meth:`restore`, which say what they mean."""
        profile = state.profile
        self._profile = profile
        self._state_keys = (state.local_key, state.remote_key)
        #: the index of the last packet decrypted, and of the last ones protected (a ledger of
        #: what this session did reads them after each call: sessions/transceiver/ledger.py)
        self.last_rtp_in = -1
        self.last_rtp_out = -1
        self.last_srtcp_out = -1
        self._local_ssrc = state.local_ssrc
        # Outbound: everything at or below the reservation may have been used by an earlier
        # owner, and the reservation is also our fence until a snapshot of ours is confirmed.
        self._rtp_floor = state.rtp_reserved
        self._rtp_fence = state.rtp_reserved
        self._rtp_reserved_max = state.rtp_reserved
        self._rtp_sent: int | None = None
        self._srtcp_floor = state.srtcp_reserved
        self._srtcp_fence = state.srtcp_reserved
        self._srtcp_reserved_max = state.srtcp_reserved
        self._srtcp_sent: int | None = None
        self._out = pylibsrtp.Session()
        self._out.add_stream(binding.policy(profile, state.local_key, state.local_ssrc))
        # libsrtp's outbound stream starts at ROC 0; after a restore it learns ours just
        # before the first packet (see protect_rtp).
        self._out_synced = self._rtp_floor is None
        self._srtcp = SrtcpProtector(profile, state.local_key)

        # Inbound: a template for SSRCs not known yet (the peer's RTP SSRC before its first
        # packet, other SSRCs of its RTCP), plus the peer's RTP stream when we know it.
        self._remote_ssrc = state.remote_ssrc
        self._rtp_received = state.rtp_received
        self._rtp_window = state.rtp_window
        self._srtcp_received = {ssrc: (high, win) for ssrc, high, win in state.srtcp_received}
        self._in = pylibsrtp.Session(binding.policy(profile, state.remote_key, None))
        if state.remote_ssrc is not None:
            self._in.add_stream(binding.policy(profile, state.remote_key, state.remote_ssrc))
            if state.rtp_received is not None:
                self._prime_inbound(state.remote_key, state.remote_ssrc, state.rtp_received)

    def _prime_inbound(self, remote_key: bytes, ssrc: int, index: int) -> None:
        # A fresh libsrtp receiver given only the ROC takes the next index to be exactly
        # ROC * 2**16 + SEQ and fails for good on a packet past a wrap. Feeding it one authentic
        # packet at the highest index received puts its RFC 3711 §3.3.1 estimate where the old
        # receiver's was. We can make that packet: we hold the peer's key. It never leaves the
        # process, so no keystream reaches the network twice.
        sender = pylibsrtp.Session()
        sender.add_stream(binding.policy(self._profile, remote_key, ssrc))
        roc = index >> 16
        binding.set_roc(sender, ssrc, roc)
        primer = sender.protect(_RTP_HEADER.pack(0x80, 0, index & 0xFFFF, 0, ssrc))
        binding.set_roc(self._in, ssrc, roc)
        self._in.unprotect(primer)
        if binding.stream_roc(self._in, ssrc) != roc:
            raise RuntimeError("libsrtp did not take the restored rollover counter")

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        profile: SrtpProfile,
        *,
        local_key: bytes,
        remote_key: bytes,
        local_ssrc: int,
        remote_ssrc: int | None = None,
    ) -> SrtpSession:
        """A session for fresh keys (``key + salt`` per direction, e.g. from DTLS-SRTP).

        ``remote_ssrc`` is the peer's RTP SSRC when the offer names it; otherwise the first
        authentic RTP packet sets it.
        """
        return cls(
            SrtpState(
                profile=profile,
                local_key=local_key,
                remote_key=remote_key,
                local_ssrc=local_ssrc,
                remote_ssrc=remote_ssrc,
            )
        )

    @classmethod
    def restore(cls, state: SrtpState) -> SrtpSession:
        """A live session from a snapshot, ready to unprotect at once.

        Outbound, it continues above ``state``'s reservations: the packetizer continues at
        :attr:`next_rtp_seq`, and nothing is protected until a snapshot of the restored
        session has been stored and passed to :meth:`confirm` (see the module docstring).
        """
        return cls(state)

    # --- outbound -------------------------------------------------------------------------

    def protect_rtp(self, packet: bytes) -> bytes:
        """SRTP-protect one RTP packet of our stream (SSRC :attr:`local_ssrc`).

        Raises ``ValueError`` for a packet that is not RTP of our SSRC and
        :class:`SrtpIndexError` if its index may have been used before or lies beyond the
        reservation (see :attr:`rtp_headroom`).
        """
        if len(packet) < _RTP_HEADER.size or packet[0] >> 6 != 2:
            raise ValueError("not an RTP version 2 packet")
        _, _, seq, _, ssrc = _RTP_HEADER.unpack_from(packet)
        if ssrc != self._local_ssrc:
            raise ValueError(f"SSRC {ssrc:#010x} is not our stream's {self._local_ssrc:#010x}")
        floor, sent, fence = self._rtp_floor, self._rtp_sent, self._rtp_fence
        index = guess_index(newer(floor, sent), seq)
        if floor is not None and index <= floor:
            raise SrtpIndexError(
                f"RTP index {index} is at or below {floor}, which an earlier owner "
                f"may have used; continue at sequence number {self.next_rtp_seq}"
            )
        if index > MAX_RTP_INDEX:
            raise SrtpIndexError("the 48-bit SRTP index is used up: rekey")
        if fence is not None and index > fence:
            raise SrtpIndexError(
                f"RTP index {index} is beyond the reservation {fence}: "
                "store a snapshot and confirm it"
            )
        if not self._out_synced:
            # libsrtp takes the first index as ROC * 2**16 + SEQ exactly; ours is a guess from
            # the floor and matches it from then on (both estimate from the same highest).
            binding.set_roc(self._out, ssrc, index >> 16)
        try:
            protected: bytes = self._out.protect(packet)
        except pylibsrtp.Error as exc:
            if "replay" in str(exc):
                raise SrtpIndexError(
                    f"RTP index {index} was already protected or is too old"
                ) from None
            raise ValueError(f"libsrtp refused the RTP packet: {exc}") from None
        self._out_synced = True
        self._rtp_sent = newer(sent, index)
        self.last_rtp_out = index
        return protected

    def protect_rtcp(self, packet: bytes) -> bytes:
        """SRTCP-protect one RTCP compound packet (always encrypted) at the next SRTCP index.

        One index counter serves every SSRC of our RTCP, so an index is never repeated even
        across SSRCs. Raises ``ValueError`` for a packet that is not RTCP and
        :class:`SrtpIndexError` beyond the reservation (see :attr:`srtcp_headroom`).
        """
        if len(packet) < _RTCP_HEADER.size or packet[0] >> 6 != 2:
            raise ValueError("not an RTCP version 2 packet")
        index = self._next_srtcp_index()
        if index > MAX_SRTCP_INDEX:
            raise SrtpIndexError("the 31-bit SRTCP index is used up: rekey")
        if self._srtcp_fence is not None and index > self._srtcp_fence:
            raise SrtpIndexError(
                f"SRTCP index {index} is beyond the reservation {self._srtcp_fence}: "
                "store a snapshot and confirm it"
            )
        protected = self._srtcp.protect(packet, index)
        self._srtcp_sent = index
        self.last_srtcp_out = index
        return protected

    def _next_srtcp_index(self) -> int:
        last = newer(self._srtcp_floor, self._srtcp_sent)
        return 0 if last is None else last + 1

    # --- inbound --------------------------------------------------------------------------

    def unprotect_rtp(self, packet: bytes) -> bytes:
        """Authenticate and decrypt one SRTP packet of the peer's stream; raise
        :class:`SrtpError` if it is malformed, forged, replayed or of another SSRC."""
        if not 12 <= len(packet) <= _MAX_DATAGRAM:
            raise SrtpError(f"SRTP packet of {len(packet)} bytes")
        first, _, seq, _, ssrc = _RTP_HEADER.unpack_from(packet)
        if first >> 6 != 2:
            raise SrtpError("SRTP packet is not RTP version 2")
        if self._remote_ssrc is not None and ssrc != self._remote_ssrc:
            raise SrtpError(f"SRTP packet from unexpected SSRC {ssrc:#010x}")
        highest = self._rtp_received
        index = guess_index(highest, seq)
        # Only an index at or below the highest can be a replay: the usual next packet skips
        # the check (replay_reason would say None).
        if highest is not None and index <= highest:
            reason = replay_reason(highest, self._rtp_window, index)
            if reason is not None:
                raise SrtpError(f"SRTP packet {reason}")
        try:
            plain: bytes = self._in.unprotect(bytes(packet))
        except pylibsrtp.Error as exc:
            raise SrtpError(f"SRTP packet refused: {exc}") from None
        # RFC 3711 §3.3.1/§3.3.2: only authentic packets move the ROC, s_l and the window.
        self._remote_ssrc = ssrc
        self._rtp_received, self._rtp_window = replay_add(highest, self._rtp_window, index)
        self.last_rtp_in = index
        return plain

    def unprotect_rtcp(self, packet: bytes) -> bytes:
        """Authenticate and decrypt one SRTCP packet; raise :class:`SrtpError` if it is
        malformed, forged or replayed."""
        tag = self._profile.tag_length
        if not _RTCP_HEADER.size + 4 + tag <= len(packet) <= _MAX_DATAGRAM:
            raise SrtpError(f"SRTCP packet of {len(packet)} bytes")
        if packet[0] >> 6 != 2:
            raise SrtpError("SRTCP packet is not RTCP version 2")
        ssrc = _U32.unpack_from(packet, 4)[0]
        index = index_of(self._profile, packet)
        known = self._srtcp_received.get(ssrc)
        if known is None and len(self._srtcp_received) >= MAX_RTCP_SOURCES:
            raise SrtpError(f"SRTCP from too many SSRCs (new: {ssrc:#010x})")
        highest, window = known if known is not None else (None, 0)
        # libsrtp's own SRTCP replay list starts empty after a restore; ours does not.
        reason = replay_reason(highest, window, index)
        if reason is not None:
            raise SrtpError(f"SRTCP packet {reason}")
        try:
            plain: bytes = self._in.unprotect_rtcp(bytes(packet))
        except pylibsrtp.Error as exc:
            raise SrtpError(f"SRTCP packet refused: {exc}") from None
        self._srtcp_received[ssrc] = replay_add(highest, window, index)
        return plain

    # --- state ----------------------------------------------------------------------------

    def snapshot(
        self, *, rtp_reserve: int = RTP_RESERVE, srtcp_reserve: int = SRTCP_RESERVE
    ) -> SrtpState:
        """The session as a value, reserving outbound indexes for whoever restores it.

        The state reserves ``rtp_reserve`` RTP and ``srtcp_reserve`` SRTCP indexes beyond the
        highest used (never less than an earlier snapshot reserved). Store it, then
        :meth:`confirm` it so this session may use the reservation; until a first
        confirmation, the first snapshot's reservation is the limit.
        """
        if not 1 <= rtp_reserve <= _MAX_RTP_RESERVE:
            raise ValueError(f"rtp_reserve must be in 1..{_MAX_RTP_RESERVE}")
        if not 1 <= srtcp_reserve <= MAX_SRTCP_INDEX:
            raise ValueError("srtcp_reserve must be positive")
        rtp_index = newer(self._rtp_floor, self._rtp_sent)
        # Nothing sent yet: the first packet may carry any sequence number below 2**15.
        rtp_base = HALF - 1 if rtp_index is None else rtp_index
        rtp_reserved = min(rtp_base + rtp_reserve, MAX_RTP_INDEX)
        srtcp_index = newer(self._srtcp_floor, self._srtcp_sent)
        srtcp_base = -1 if srtcp_index is None else srtcp_index
        srtcp_reserved = min(srtcp_base + srtcp_reserve, MAX_SRTCP_INDEX)
        # Never reserve less than before: this session may already be allowed that far.
        if self._rtp_reserved_max is not None and self._srtcp_reserved_max is not None:
            rtp_reserved = max(rtp_reserved, self._rtp_reserved_max)
            srtcp_reserved = max(srtcp_reserved, self._srtcp_reserved_max)
        self._rtp_reserved_max, self._srtcp_reserved_max = rtp_reserved, srtcp_reserved
        if self._rtp_fence is None:
            self._rtp_fence, self._srtcp_fence = rtp_reserved, srtcp_reserved
        local_key, remote_key = self._state_keys
        return SrtpState(
            profile=self._profile,
            local_key=local_key,
            remote_key=remote_key,
            local_ssrc=self._local_ssrc,
            rtp_index=rtp_index,
            rtp_reserved=rtp_reserved,
            srtcp_index=srtcp_index,
            srtcp_reserved=srtcp_reserved,
            remote_ssrc=self._remote_ssrc,
            rtp_received=self._rtp_received,
            rtp_window=self._rtp_window,
            srtcp_received=tuple(
                (ssrc, high, win) for ssrc, (high, win) in sorted(self._srtcp_received.items())
            ),
        )

    def confirm(self, state: SrtpState) -> None:
        """Record that ``state``, a snapshot of this session, is stored durably as the newest
        state: this session may now protect up to its reservations."""
        if (
            state.profile is not self._profile
            or (state.local_key, state.remote_key) != self._state_keys
            or state.local_ssrc != self._local_ssrc
        ):
            raise ValueError("not a snapshot of this session")
        rtp, srtcp = state.rtp_reserved, state.srtcp_reserved
        if (
            rtp is None
            or srtcp is None
            or self._rtp_reserved_max is None
            or self._srtcp_reserved_max is None
            or rtp > self._rtp_reserved_max
            or srtcp > self._srtcp_reserved_max
        ):
            raise ValueError("this session never reserved what the state claims")
        self._rtp_fence = newer(self._rtp_fence, rtp)
        self._srtcp_fence = newer(self._srtcp_fence, srtcp)

    # --- introspection --------------------------------------------------------------------

    @property
    def profile(self) -> SrtpProfile:
        """The negotiated protection profile."""
        return self._profile

    @property
    def local_ssrc(self) -> int:
        """The SSRC of our RTP stream."""
        return self._local_ssrc

    @property
    def remote_ssrc(self) -> int | None:
        """The peer's RTP SSRC, once known."""
        return self._remote_ssrc

    @property
    def rtp_received(self) -> int | None:
        """The highest authentic inbound RTP index, once one was received."""
        return self._rtp_received

    @property
    def next_rtp_seq(self) -> int | None:
        """The sequence number our next RTP packet should carry; ``None`` before the first
        (then choose one below 2**15)."""
        last = newer(self._rtp_floor, self._rtp_sent)
        return None if last is None else (last + 1) & 0xFFFF

    @property
    def rtp_headroom(self) -> int | None:
        """How many more RTP packets fit in the reservation (``None``: no limit yet)."""
        if self._rtp_fence is None:
            return None
        last = newer(self._rtp_floor, self._rtp_sent)
        return self._rtp_fence - (-1 if last is None else last)

    @property
    def srtcp_headroom(self) -> int | None:
        """How many more SRTCP packets fit in the reservation (``None``: no limit yet)."""
        if self._srtcp_fence is None:
            return None
        return self._srtcp_fence - self._next_srtcp_index() + 1
