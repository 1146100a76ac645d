"""An optional audit of SRTP and SRTCP indexes as they cross the relay (tests and diagnostics).

SRTP's keystream is a function of the key and the packet index (RFC 3711 §4.1.1; RFC 7714 §8.1
for AES-GCM): two packets sent under one key with one index share their keystream, and their
XOR reveals both plaintexts. A session that moves between nodes must therefore go on from the
index where the old owner stopped, never repeat one. The relay cannot decrypt anything, but it
does not need to: RFC 3711 leaves what identifies a packet in the clear.

* **SRTP** (§3.1): the 16-bit sequence number and the SSRC are in the RTP header. The 48-bit
  index is ``ROC * 2**16 + SEQ`` (§3.3.1); the rollover counter ROC is never sent, and the
  relay estimates it from the sequence numbers it sees the way a receiver does (§3.3.1,
  Appendix A).
* **SRTCP** (§3.4): the sender's SSRC is in the first 8 bytes, which are never encrypted, and
  the 31-bit SRTCP index travels in the clear in the word that also holds the E flag. Where that
  word is depends on the profile: with AES-CM and HMAC-SHA1-80 it precedes the 10-byte tag
  (§3.4); with AES-GCM it ends the packet, after the 16-byte tag inside the ciphertext
  (RFC 7714 §9). An RTCP compound is a whole number of 32-bit words (RFC 3550 §6.4.1) and
  neither cipher changes its length, so the trailer's length modulo 4 tells the two apart:
  4 + 10 bytes leave 2, 16 + 4 bytes leave 0.

Per (session, direction, SSRC) the auditor keeps the highest index seen and a window of the
indexes below it (like a receiver's replay list, §3.3.2) and counts every index that shows up a
second time. The session's keys are per session and direction (DTLS-SRTP, RFC 5764 §4.2), so
an index seen twice under one such stream is an index sent twice under one key. An index too
far below the window to be checked is counted apart (``audit_unchecked``), not guessed at.

The auditor is off unless ``relay.audit`` is set: it costs a dict lookup and some integer
arithmetic per packet on the relay's hot path.
"""

from __future__ import annotations

from typing import Final, Literal, final

__all__ = ["AUDIT_COUNTERS", "IndexAuditor", "rtp_or_rtcp"]

Direction = Literal["in", "out"]


def rtp_or_rtcp(data: bytes) -> bool:
    """Whether a datagram is (S)RTP or (S)RTCP by its first byte, 128 to 191 (RFC 7983 §7),
    not STUN or DTLS."""
    return bool(data) and 128 <= data[0] <= 191


#: the counters the auditor adds to the relay's
AUDIT_COUNTERS: Final = (
    "srtp_audited",  # SRTP packets whose index was checked
    "srtcp_audited",  # SRTCP packets whose index was checked
    "srtp_index_reused",  # SRTP indexes seen a second time in one stream
    "srtcp_index_reused",  # SRTCP indexes seen a second time in one stream
    "audit_unchecked",  # packets too old for the window, or too short to read
)

#: indexes remembered below the highest one, per stream (RFC 3711 §3.3.2 asks a receiver for 64)
WINDOW: Final = 4096
#: streams tracked at most; beyond, the least recently created is forgotten
MAX_STREAMS: Final = 65_536

_SEQ_HALF: Final = 1 << 15
_SEQ_SPACE: Final = 1 << 16
_INDEX_MASK: Final = 0x7FFF_FFFF  # RFC 3711 §3.4: the SRTCP index is 31 bits below the E flag
_WINDOW_MASK: Final = (1 << WINDOW) - 1


@final
class _Stream:
    """What was seen of one (session, direction, SSRC, SRTP or SRTCP) stream."""

    __slots__ = ("highest", "roc", "seen", "seq")

    def __init__(self) -> None:
        self.roc = 0  # SRTP only: the rollover counter estimate
        self.seq = -1  # SRTP only: the highest sequence number (s_l of §3.3.1); -1 none yet
        self.highest = -1  # the highest index seen
        self.seen = 0  # bit k: index ``highest - k`` was seen


def _estimate(stream: _Stream, seq: int) -> int:
    """The packet index of ``seq`` (RFC 3711 §3.3.1 and Appendix A), and the stream's ROC and
    s_l updated as a receiver updates them once the packet is authenticated."""
    if stream.seq < 0:
        stream.seq = seq
        return seq
    roc, s_l = stream.roc, stream.seq
    if s_l < _SEQ_HALF:
        v = roc - 1 if seq - s_l > _SEQ_HALF else roc
    else:
        v = roc + 1 if s_l - _SEQ_HALF > seq else roc
    if v < 0:  # before the first packet's ROC 0: cannot be an index this stream used
        v = 0
    if v == roc + 1:
        stream.roc, stream.seq = v, seq
    elif v == roc and seq > s_l:
        stream.seq = seq
    return v * _SEQ_SPACE + seq


@final
class IndexAuditor:
    """Counts SRTP and SRTCP indexes seen twice, into ``counters`` (the relay's own)."""

    def __init__(self, counters: dict[str, int], *, max_streams: int = MAX_STREAMS) -> None:
        for name in AUDIT_COUNTERS:
            counters.setdefault(name, 0)
        self.counters = counters
        self.max_streams = max_streams
        self._streams: dict[tuple[str, Direction, int, bool], _Stream] = {}

    def observe(self, session: str, direction: Direction, data: bytes) -> None:
        """Check one datagram of ``session`` (``in``: from the client, ``out``: to it).

        Only RTP and RTCP are looked at (first byte 128 to 191, RFC 7983 §7); STUN and DTLS
        are not SRTP. Never raises for the datagram's content.
        """
        if len(data) < 12 or not rtp_or_rtcp(data):
            return
        # RFC 5761 §4: RTCP packet types 192-223 sit where RTP's marker bit and payload type
        # are, and RTP must not use payload types 64-95 for that reason.
        if 192 <= data[1] <= 223:
            self._srtcp(session, direction, data)
        else:
            self._srtp(session, direction, data)

    def _stream(self, key: tuple[str, Direction, int, bool]) -> _Stream:
        stream = self._streams.get(key)
        if stream is None:
            if len(self._streams) >= self.max_streams:
                del self._streams[next(iter(self._streams))]
            stream = self._streams[key] = _Stream()
        return stream

    def _srtp(self, session: str, direction: Direction, data: bytes) -> None:
        seq = int.from_bytes(data[2:4])
        ssrc = int.from_bytes(data[8:12])
        stream = self._stream((session, direction, ssrc, False))
        index = _estimate(stream, seq)
        self._check(stream, index, "srtp")

    def _srtcp(self, session: str, direction: Direction, data: bytes) -> None:
        size = len(data)
        if size % 4 == 2:  # AES-CM + HMAC-SHA1-80: |E|index| then a 10-byte tag (§3.4)
            at = size - 14
        elif size % 4 == 0:  # AES-GCM: tag inside, then |E|index| last (RFC 7714 §9)
            at = size - 4
        else:
            self.counters["audit_unchecked"] += 1
            return
        if at < 8:
            self.counters["audit_unchecked"] += 1
            return
        ssrc = int.from_bytes(data[4:8])
        index = int.from_bytes(data[at : at + 4]) & _INDEX_MASK
        self._check(self._stream((session, direction, ssrc, True)), index, "srtcp")

    def _check(self, stream: _Stream, index: int, kind: Literal["srtp", "srtcp"]) -> None:
        counters = self.counters
        counters[f"{kind}_audited"] += 1
        if index > stream.highest:
            shift = index - stream.highest
            stream.seen = ((stream.seen << shift) | 1) & _WINDOW_MASK if shift < WINDOW else 1
            stream.highest = index
            return
        behind = stream.highest - index
        if behind >= WINDOW:
            counters["audit_unchecked"] += 1
            return
        bit = 1 << behind
        if stream.seen & bit:
            counters[f"{kind}_index_reused"] += 1
        else:
            stream.seen |= bit

    def forget(self, session: str) -> None:
        """Drop what was seen of ``session`` (it ended, or its keys changed)."""
        for key in [k for k in self._streams if k[0] == session]:
            del self._streams[key]

    def streams(self) -> int:
        """How many streams are tracked."""
        return len(self._streams)
