"""A sans-I/O adaptive jitter buffer for 20 ms Opus RTP packets (RFC 7587).

Packets go in with :meth:`JitterBuffer.push` as they arrive; :meth:`JitterBuffer.pop` hands out
one :class:`Frame` per 20 ms on the playout clock, whose next tick :meth:`JitterBuffer.get_timer`
reports. Time is passed in (seconds on any monotonic clock); nothing here reads a clock, sleeps
or decodes. A frame says what the decoder should do for its 20 ms:

* ``AUDIO``: decode the packet's payload;
* ``FEC``: the packet is missing but the next one is here, so decode the frame from the next
  packet's in-band FEC (RFC 6716 §2.1.7, RFC 7587 §3.3; ``OpusDecoder.decode_fec``);
* ``CONCEAL``: nothing to decode; run packet loss concealment (RFC 6716 §4.4), which also
  covers the silences of a sender using DTX and the frames inserted to lengthen the delay.

How it works. Packets are ordered by extended sequence number (RFC 3711 §3.3.1 guess, via
:class:`~sessions.webrtc.rtp.SequenceTracker`, so the 16-bit wrap is invisible) and timed by
their RTP timestamp at 48 kHz (RFC 7587 §4.1), extended past its 32-bit wrap the same way.
For every packet the buffer notes its *transit*, arrival time minus media time; the smallest
recent transit is the best case, and a packet that took ``d`` seconds longer than that needs
a playout delay of at least ``d`` to be on time. The *target delay* is a high quantile of those
excesses over the last ``window`` packets, clamped to ``[min_delay, max_delay]``: it rises as
soon as packets come late and falls once a spike leaves the window.

The playout clock plays each packet ``min transit + delay`` after its media time. It moves
towards the target one frame at a time, without time-stretching: it lengthens the delay by
inserting one concealed frame (when the buffer runs dry this happens by itself: the clock
holds its media position while it conceals, so a delay spike is absorbed rather than turned
into losses), and shortens it by dropping one packet at most every ``shrink_interval`` seconds,
or for free by skipping a frame of a sender's silence. After ``idle_after`` dry ticks the
stream is taken to have paused (DTX, hold, outage): the buffer goes idle and :meth:`pop`
returns nothing until a packet comes, which starts a new talkspurt at the target delay.

A dropped packet is 20 ms cut out of what the user said, so the buffer drops at a quiet moment:
when the caller says the user is not speaking (``pop(now, speech=False)``: the voice loop says
so after a few frames its voice activity detector called no speech, a pause rather than the
unvoiced middle of a word) and the packet is no larger than the last one played (Opus packets
grow at a speech onset: silence is some 20 bytes at 32 kbit/s, speech 50-110). A talker who
does not pause for ``shrink_wait`` seconds after the delay became too long gets the drops
anyway, one per ``shrink_interval`` (``dropped_in_speech`` counts them): otherwise a burst at
the start of a long turn would add its delay to the whole turn.

A sender restart shows as a jump: a sequence number more than ``max_dropout`` ahead or
``max_misorder`` behind (the limits of RFC 3550 Appendix A.1), or a timestamp that disagrees
with the arrival time by more than ``jump_threshold``. As in RFC 3550 A.1, one such packet is
only a candidate; if the next packet follows it in sequence the buffer resets (a migrated or
restarted sender), otherwise it is discarded as a stray.

Counters, all in :meth:`JitterBuffer.stats`: every pushed packet is counted once as
``received`` (kept for playout), ``late`` (its turn had passed), ``duplicate`` or ``strays``
(failed the restart check), except a restart candidate still waiting for its successor; every
received packet is eventually played, ``dropped`` (to shorten the delay, or by a reset) or
still ``buffered``. ``lost`` counts sequence numbers whose turn came without their packet,
each of which was played as ``FEC`` (``fec_recovered``) or ``CONCEAL``; ``concealed`` counts
every ``CONCEAL`` frame, including the silences and the inserted frames.

With ``backfill`` (a session that just moved here), a packet older than the first of a
stream, arriving before anything of the stream has played, starts the stream instead of being
late (``backfilled``; it is also ``received``): after a session moved to another node, what
reached the old owner during the move is handed on and arrives a moment after the client's next
packets, which came the short way.
"""

from __future__ import annotations

import bisect
import collections
import enum
import math
from typing import Final, Protocol, final

import attrs

from sessions.audio.fixed import Fixed
from sessions.webrtc.rtp import SequenceTracker

__all__ = [
    "CLOCK_RATE",
    "FRAME_SECONDS",
    "FRAME_TIMESTAMP",
    "Frame",
    "FrameDecoder",
    "FrameKind",
    "JitterBuffer",
    "JitterStats",
]

#: RTP clock rate of Opus (RFC 7587 §4.1).
CLOCK_RATE: Final = 48_000
#: Duration of one packet; Parley negotiates ``a=ptime:20``.
FRAME_SECONDS: Final = 0.020
#: RTP timestamp units in one 20 ms frame.
FRAME_TIMESTAMP: Final = 960

_SEQ_MOD: Final = 1 << 16
_TS_MOD: Final = 1 << 32
_TS_HALF: Final = 1 << 31
_PLAYED_MEMORY: Final = 256  # how far back a replayed packet is still told from a late one
#: how much older than the first packet of a stream another may be, and still start it before
#: anything has played (frames: 500 ms)
MAX_BACKFILL: Final = 25
_ge = attrs.validators.ge


class FrameKind(enum.Enum):
    """What the decoder should do for one 20 ms playout slot."""

    AUDIO = "audio"
    """Decode :attr:`Frame.payload`."""
    FEC = "fec"
    """Recover the lost frame from the in-band FEC in :attr:`Frame.payload` (the next packet)."""
    CONCEAL = "conceal"
    """Run packet loss concealment; :attr:`Frame.payload` is empty."""


class FrameDecoder(Protocol):
    """What :meth:`Frame.render` needs; ``sessions.audio.opus.OpusDecoder`` is one."""

    def decode(self, payload: bytes) -> bytes: ...

    def decode_fec(self, next_payload: bytes) -> bytes: ...

    def conceal(self) -> bytes: ...


@final
@attrs.frozen
class Frame:
    """One 20 ms playout slot, as handed out by :meth:`JitterBuffer.pop`.

    ``seq`` is the extended sequence number of the packet the slot belongs to, or ``None`` for
    a frame that fills a silence or lengthens the delay. ``timestamp`` is the RTP timestamp of
    the slot's media and ``deadline`` the playout time the slot was due at.
    """

    kind: FrameKind
    timestamp: int
    deadline: float
    seq: int | None = None
    payload: bytes = b""

    def render(self, decoder: FrameDecoder) -> bytes:
        """PCM for this slot from ``decoder``; its :class:`CodecError` passes through."""
        if self.kind is FrameKind.AUDIO:
            return decoder.decode(self.payload)
        if self.kind is FrameKind.FEC:
            return decoder.decode_fec(self.payload)
        return decoder.conceal()


@final
@attrs.frozen
class JitterStats:
    """Counters and delays of a :class:`JitterBuffer` (see the module docstring)."""

    received: int
    late: int
    duplicate: int
    strays: int
    dropped: int
    dropped_in_speech: int
    """Of ``dropped``: packets dropped to shorten the delay while the user was speaking, after
    ``shrink_wait`` without a quiet moment."""
    lost: int
    fec_recovered: int
    concealed: int
    played: int
    resets: int
    buffered: int
    backfilled: int
    delay: float
    """Current playout delay over the best-case transit, seconds."""
    target: float
    """Delay the buffer is moving towards, seconds."""


@final
@attrs.frozen
class _Packet:
    seq: int  # extended
    ts: int  # extended, 48 kHz units
    timestamp: int  # as on the wire
    payload: bytes


@final
@attrs.define(on_setattr=attrs.setters.NO_OP)  # see sessions.audio.fixed.Fixed
class JitterBuffer:
    """Adaptive jitter buffer for one SSRC of 20 ms Opus packets (see the module docstring).

    Settings, fixed at construction:

    * ``min_delay``, ``max_delay``: bounds of the target delay, seconds (20 ms to 200 ms);
    * ``window``: how many recent packets the delay estimate looks at (100: two seconds);
    * ``quantile``: the share of them that must have been on time at the target delay;
    * ``idle_after``: dry ticks after which the stream is taken to have paused;
    * ``shrink_interval``: seconds between two packets dropped to shorten the delay;
    * ``shrink_wait``: seconds a too-long delay waits for a quiet moment to drop a packet in
      before it drops one in speech (see the module docstring);
    * ``max_misorder``, ``max_dropout``: how far behind or ahead of the newest packet a
      sequence number may be before it looks like a restart (RFC 3550 A.1's 100 and 3000);
    * ``jump_threshold``: how far, in seconds, a packet's transit may differ from the best
      recent one before its timestamp looks like a restart.
    """

    # Settings are read once; changing them later would lie: each is the private field (its
    # __init__ argument has the public name) behind a read-only Fixed below.
    _min_delay: float = attrs.field(default=0.020, validator=_ge(0.0))
    _max_delay: float = attrs.field(default=0.200, validator=_ge(0.0))
    _window: int = attrs.field(default=100, validator=_ge(1))
    _quantile: float = attrs.field(
        default=0.95, validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)]
    )
    _idle_after: int = attrs.field(default=10, validator=_ge(1))
    _shrink_interval: float = attrs.field(default=0.25, validator=_ge(0.0))
    _shrink_wait: float = attrs.field(default=4.0, validator=_ge(0.0))
    _max_misorder: int = attrs.field(default=100, validator=_ge(1))
    _max_dropout: int = attrs.field(default=3000, validator=_ge(1))
    #: let packets older than a stream's first one start it, until something plays (see the
    #: module docstring): for a session that just moved here; off otherwise
    backfill: bool = False
    _jump_threshold: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))

    _tracker: SequenceTracker | None = attrs.field(init=False, default=None)
    _top_seq: int = attrs.field(init=False, default=0)  # highest extended seq seen
    _top_ts: int = attrs.field(init=False, default=0)  # its extended timestamp
    _buffer: dict[int, _Packet] = attrs.field(init=False, factory=dict)
    _transits: collections.deque[float] = attrs.field(init=False, factory=collections.deque)
    _sorted_transits: list[float] = attrs.field(init=False, factory=list)
    _min_transit: float = attrs.field(init=False, default=0.0)
    _target: float = attrs.field(init=False, default=0.0)
    _next_seq: int = attrs.field(init=False, default=0)
    _media: int = attrs.field(init=False, default=0)  # extended timestamp of the next slot
    _deadline: float | None = attrs.field(init=False, default=None)  # None: idle
    _dry: int = attrs.field(init=False, default=0)  # consecutive ticks with an empty buffer
    _last_shrink: float = attrs.field(init=False, default=-math.inf)
    #: since when a drop has been due (the delay too long, the next packet there, the interval
    #: passed) without a quiet moment to make it in; None while the delay is not too long
    #: (for shrink_wait)
    _too_long_since: float | None = attrs.field(init=False, default=None)
    #: the payload size of the last packet played (None: none yet)
    _last_size: int | None = attrs.field(init=False, default=None)
    _played_seqs: set[int] = attrs.field(init=False, factory=set)
    #: the stream started and nothing has been played yet (older packets may still fit)
    _fresh: bool = attrs.field(init=False, default=False)
    _played_order: collections.deque[int] = attrs.field(init=False, factory=collections.deque)
    _candidate: tuple[int, int, bytes, float] | None = attrs.field(init=False, default=None)
    _delay: float = attrs.field(init=False, default=0.0)
    _counts: collections.Counter[str] = attrs.field(init=False, factory=collections.Counter)

    min_delay = Fixed[float]()
    max_delay = Fixed[float]()
    window = Fixed[int]()
    quantile = Fixed[float]()
    idle_after = Fixed[int]()
    shrink_interval = Fixed[float]()
    shrink_wait = Fixed[float]()
    max_misorder = Fixed[int]()
    max_dropout = Fixed[int]()
    jump_threshold = Fixed[float]()

    def __attrs_post_init__(self) -> None:
        if not self._min_delay <= self._max_delay:
            raise ValueError("min_delay must not exceed max_delay")
        self._target = self._min_delay

    # --- input --------------------------------------------------------------------------------

    def push(self, seq: int, timestamp: int, payload: bytes, now: float) -> None:
        """Take one packet: 16-bit sequence number, 32-bit RTP timestamp, Opus payload."""
        if not 0 <= seq < _SEQ_MOD or not 0 <= timestamp < _TS_MOD:
            raise ValueError("sequence number or timestamp out of range")
        if self._tracker is None:
            self._start(seq, timestamp, payload, now)
            return
        ext = self._tracker.estimate(seq)
        ts = self._top_ts + _signed32(timestamp - self._top_ts)
        transit = now - ts / CLOCK_RATE
        if (
            ext - self._top_seq > self._max_dropout
            or self._top_seq - ext > self._max_misorder
            or abs(transit - self._min_transit) > self._jump_threshold
        ):
            self._restart_candidate(seq, timestamp, payload, now)
            return
        if self._candidate is not None:
            self._candidate = None  # the old stream went on: the candidate was a stray
            self._counts["strays"] += 1

        if ext in self._buffer or ext in self._played_seqs:
            # A network duplicate; its transit says nothing about the path's jitter.
            self._counts["duplicate"] += 1
            return
        # Late packets count towards the delay estimate: they are why it has to grow.
        self._note_transit(transit)
        if ext > self._top_seq:
            self._tracker.commit(ext)
            self._top_seq, self._top_ts = ext, ts
        if ext < self._next_seq:
            if self.backfill and self._fresh and self._next_seq - ext <= MAX_BACKFILL:
                # Older than the packet that started the stream, but nothing has played yet:
                # it came by a longer path (a session's old owner handing on what reached it
                # during a move). Start from it instead of calling it late.
                self._counts["backfilled"] += 1
                self._counts["received"] += 1
                packet = _Packet(ext, ts, timestamp, payload)
                self._buffer[ext] = packet
                self._next_seq = ext
                self._anchor(packet, now)
                return
            self._counts["late"] += 1
            return
        packet = _Packet(ext, ts, timestamp, payload)
        self._buffer[ext] = packet
        self._counts["received"] += 1
        if self._deadline is None:
            # Idle: this packet starts a talkspurt. Whatever the sender skipped meanwhile
            # never arrived and is lost; DTX senders do not skip sequence numbers.
            self._counts["lost"] += ext - self._next_seq
            self._next_seq = ext
            self._anchor(packet, now)
        elif self._dry and len(self._buffer) == 1:
            self._end_hold(packet, now)

    def _start(self, seq: int, timestamp: int, payload: bytes, now: float) -> None:
        """Begin a stream (first packet, or after a reset) with this packet."""
        self._tracker = SequenceTracker()
        self._too_long_since = self._last_size = None
        ext = self._tracker.update(seq)
        self._top_seq, self._top_ts = ext, timestamp
        self._transits.clear()
        self._sorted_transits.clear()
        self._note_transit(now - timestamp / CLOCK_RATE)
        packet = _Packet(ext, timestamp, timestamp, payload)
        self._buffer = {ext: packet}
        self._played_seqs.clear()
        self._played_order.clear()
        self._next_seq = ext
        self._counts["received"] += 1
        self._fresh = True
        self._anchor(packet, now)

    def _anchor(self, packet: _Packet, now: float) -> None:
        """Schedule ``self._next_seq`` so that ``packet`` plays at the target delay."""
        self._media = packet.ts - (packet.seq - self._next_seq) * FRAME_TIMESTAMP
        ideal = self._media / CLOCK_RATE + self._min_transit + self._target
        self._deadline = max(now, ideal)
        self._dry = 0
        self._delay = self._deadline - self._media / CLOCK_RATE - self._min_transit

    def _end_hold(self, packet: _Packet, now: float) -> None:
        """The first packet since the buffer ran dry: decide what the held ticks were."""
        gap = packet.seq - self._next_seq
        if packet.ts - gap * FRAME_TIMESTAMP > self._media + FRAME_TIMESTAMP // 2:
            # Its media time is later than where the clock is holding: the sender was
            # silent (DTX), not late. Start a new talkspurt at the target delay.
            self._anchor(packet, now)
            return
        # Packets before this one are missing: the clock held for packets that were lost,
        # not late. The concealed frames played while holding already covered their slots,
        # so count them as those losses and take back the delay the hold added.
        skipped = min(self._dry, gap)
        self._counts["lost"] += skipped
        self._advance(self._next_seq + skipped, self._media + skipped * FRAME_TIMESTAMP)

    def _restart_candidate(self, seq: int, timestamp: int, payload: bytes, now: float) -> None:
        # RFC 3550 A.1: a jump is believed only when the next packet follows it in sequence.
        candidate = self._candidate
        if (
            candidate is not None
            and seq == (candidate[0] + 1) % _SEQ_MOD
            and 0 < (timestamp - candidate[1]) % _TS_MOD <= CLOCK_RATE
        ):
            self._candidate = None
            self._counts["resets"] += 1
            self._counts["dropped"] += len(self._buffer)
            self._start(*candidate)
            self.push(seq, timestamp, payload, now)
            return
        if candidate is not None:
            self._counts["strays"] += 1
        self._candidate = (seq, timestamp, payload, now)

    def _note_transit(self, transit: float) -> None:
        # The window is kept twice, in arrival order (to evict the oldest) and sorted (for the
        # minimum and the quantile), so each packet costs a bisection, not a sort.
        if len(self._transits) == self._window:
            oldest = self._transits.popleft()
            del self._sorted_transits[bisect.bisect_left(self._sorted_transits, oldest)]
        self._transits.append(transit)
        bisect.insort(self._sorted_transits, transit)
        ordered = self._sorted_transits
        self._min_transit = ordered[0]
        index = max(0, min(len(ordered) - 1, math.ceil(self._quantile * len(ordered)) - 1))
        excess = ordered[index] - self._min_transit
        self._target = min(self._max_delay, max(self._min_delay, excess))

    # --- output -------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When the next slot is due, or ``None`` while idle (no packet yet, or paused)."""
        return self._deadline

    def pop(self, now: float, *, speech: bool = False) -> Frame | None:
        """The frame for the next 20 ms slot if it is due at ``now``, else ``None``.

        Each call hands out at most one frame; a caller that fell behind calls again until it
        gets ``None``. ``None`` is also returned while the buffer is idle. ``speech``: the user
        may be speaking (the caller heard speech lately), so this is no moment to drop a packet
        to shorten the delay (see the module docstring).
        """
        deadline = self._deadline
        if deadline is None or now < deadline:
            return None
        self._fresh = False  # a slot is being played: older packets are late from now on
        media = self._media
        delay = deadline - media / CLOCK_RATE - self._min_transit
        packet = self._buffer.get(self._next_seq)

        if packet is None and not self._buffer:
            # Dry: the next packet is late, lost, or the sender paused. Hold the media
            # position while concealing, which lengthens the delay by one frame per tick,
            # until a packet comes or the stream is taken to have paused.
            self._dry += 1
            if self._dry > self._idle_after:
                self._deadline = None
                return None
            self._deadline = deadline + FRAME_SECONDS
            return self._conceal(media, deadline, None)

        self._dry = 0
        self._delay = delay  # measured on slots with packets, not on the holds
        self._deadline = deadline + FRAME_SECONDS
        if packet is None:
            # Later packets are here but not this one: it is lost (or so reordered that its
            # turn has passed). The next packet may carry its FEC.
            seq = self._next_seq
            self._counts["lost"] += 1
            self._advance(seq + 1, media + FRAME_TIMESTAMP)
            following = self._buffer.get(seq + 1)
            if following is not None:
                self._counts["fec_recovered"] += 1
                return Frame(FrameKind.FEC, media % _TS_MOD, deadline, seq, following.payload)
            return self._conceal(media, deadline, seq)

        too_long = delay >= self._target + FRAME_SECONDS
        if packet.ts > media + FRAME_TIMESTAMP // 2:
            # A silence in the sender's timeline (DTX): conceal it. Skipping one frame of it
            # shortens the delay at no cost, so do that whenever the delay is too long.
            step = 2 if too_long and packet.ts >= media + 3 * FRAME_TIMESTAMP // 2 else 1
            self._media = media + step * FRAME_TIMESTAMP
            return self._conceal(media, deadline, None)

        if delay <= self._target - FRAME_SECONDS / 2:
            # Too short: insert a concealed frame before this packet to lengthen the delay.
            return self._conceal(media, deadline, None)

        if not too_long:
            self._too_long_since = None
        elif (
            self._next_seq + 1 in self._buffer and now - self._last_shrink >= self._shrink_interval
        ):
            # Too long: drop this packet and play the next one in its slot, if this is a quiet
            # moment or none came for shrink_wait.
            since = self._too_long_since
            if since is None:
                since = self._too_long_since = now
            last = self._last_size
            quiet = not speech and last is not None and len(packet.payload) <= last
            if quiet or now - since >= self._shrink_wait:
                self._last_shrink = now
                del self._buffer[packet.seq]
                self._counts["dropped"] += 1
                if not quiet:
                    self._counts["dropped_in_speech"] += 1
                packet = self._buffer[packet.seq + 1]
        del self._buffer[packet.seq]
        self._last_size = len(packet.payload)
        self._remember_played(packet.seq)
        self._counts["played"] += 1
        self._advance(packet.seq + 1, packet.ts + FRAME_TIMESTAMP)
        return Frame(FrameKind.AUDIO, packet.timestamp, deadline, packet.seq, packet.payload)

    def _advance(self, next_seq: int, media: int) -> None:
        self._next_seq = next_seq
        self._media = media

    def _conceal(self, media: int, deadline: float, seq: int | None) -> Frame:
        self._counts["concealed"] += 1
        return Frame(FrameKind.CONCEAL, media % _TS_MOD, deadline, seq)

    def _remember_played(self, seq: int) -> None:
        self._played_seqs.add(seq)
        self._played_order.append(seq)
        if len(self._played_order) > _PLAYED_MEMORY:
            self._played_seqs.discard(self._played_order.popleft())

    # --- state --------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Whether the playout clock is stopped (no packet yet, or the stream paused)."""
        return self._deadline is None

    def stats(self) -> JitterStats:
        """A snapshot of the counters and delays."""
        c = self._counts
        return JitterStats(
            received=c["received"],
            late=c["late"],
            duplicate=c["duplicate"],
            strays=c["strays"],
            dropped=c["dropped"],
            dropped_in_speech=c["dropped_in_speech"],
            lost=c["lost"],
            fec_recovered=c["fec_recovered"],
            concealed=c["concealed"],
            played=c["played"],
            resets=c["resets"],
            buffered=len(self._buffer),
            backfilled=c["backfilled"],
            delay=self._delay,
            target=self._target,
        )


def _signed32(value: int) -> int:
    """``value`` modulo 2**32 as a signed distance, in -2**31..2**31-1."""
    return ((value + _TS_HALF) % _TS_MOD) - _TS_HALF
