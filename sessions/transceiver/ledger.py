"""What one transceiver processed: the SRTP and SRTCP indexes it decrypted and protected, and when.

A session that moves or is adopted is processed by several transceivers over its life, one per
ownership epoch. The rules that make that safe are about indexes and time: a client's SRTP index
is decrypted by exactly one owner, an index of ours is protected (sent) once under its key, and
two owners never process one session at the same time. Each transceiver keeps this record of its
own share so that the node can publish it (sessions/node/ledger.py) and a checker outside every
node can hold the owners to those rules.

Indexes are kept as sorted, inclusive ranges: a stream in order is one range however long it
runs, and each lost or late packet costs at most one more. The core's clock (``now``) stamps the
first and the last datagram processed.
"""

from __future__ import annotations

import bisect
from typing import Final, final

__all__ = ["IndexRanges", "MediaLedger"]

#: ranges kept per stream before the oldest are merged (a pathological loss pattern must not
#: grow memory without bound; a merged gap only makes the checker stricter, never laxer)
MAX_RANGES: Final = 4096


@final
class IndexRanges:
    """A set of integers as sorted, disjoint, inclusive ``[lo, hi]`` ranges."""

    __slots__ = ("_his", "_los", "duplicates")

    def __init__(self) -> None:
        self._los: list[int] = []
        self._his: list[int] = []
        #: indexes added that were already in the set (never expected: replay protection)
        self.duplicates = 0

    def add(self, index: int) -> None:
        los, his = self._los, self._his
        if his and his[-1] + 1 == index:  # the usual case: the next packet in order
            his[-1] = index
            return
        if not his or index > his[-1] + 1:
            los.append(index)
            his.append(index)
            if len(los) > MAX_RANGES:
                los.pop(1)
                his.pop(0)
            return
        at = bisect.bisect_right(los, index) - 1
        if at >= 0 and index <= his[at]:
            self.duplicates += 1
            return
        joins_left = at >= 0 and his[at] + 1 == index
        joins_right = at + 1 < len(los) and los[at + 1] - 1 == index
        if joins_left and joins_right:
            his[at] = his[at + 1]
            del los[at + 1], his[at + 1]
        elif joins_left:
            his[at] = index
        elif joins_right:
            los[at + 1] = index
        else:
            los.insert(at + 1, index)
            his.insert(at + 1, index)

    def __contains__(self, index: int) -> bool:
        at = bisect.bisect_right(self._los, index) - 1
        return at >= 0 and index <= self._his[at]

    def __len__(self) -> int:
        """How many integers the set holds."""
        return sum(hi - lo + 1 for lo, hi in zip(self._los, self._his, strict=True))

    def ranges(self) -> list[list[int]]:
        return [[lo, hi] for lo, hi in zip(self._los, self._his, strict=True)]

    def update(self, other: IndexRanges) -> None:
        """Add every index of ``other`` (in time linear in the ranges, not the indexes)."""
        merged: list[list[int]] = []
        for lo, hi in sorted(self.ranges() + other.ranges()):
            if merged and lo <= merged[-1][1] + 1:
                if lo <= merged[-1][1]:
                    self.duplicates += min(hi, merged[-1][1]) - lo + 1
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self._los = [lo for lo, _ in merged]
        self._his = [hi for _, hi in merged]
        self.duplicates += other.duplicates


@final
class MediaLedger:
    """The indexes one transceiver decrypted and protected, and the time span it did so."""

    __slots__ = ("changes", "first", "last", "rtp_in", "rtp_out", "srtcp_out")

    def __init__(self) -> None:
        self.rtp_in = IndexRanges()
        self.rtp_out = IndexRanges()
        self.srtcp_out = IndexRanges()
        #: the core's time of the first and the last datagram processed
        self.first: float | None = None
        self.last: float | None = None
        #: bumped on every record, so that a publisher writes only what changed
        self.changes = 0

    def _at(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now
        self.changes += 1

    def decrypted_rtp(self, index: int, now: float) -> None:
        self.rtp_in.add(index)
        self._at(now)

    def protected_rtp(self, index: int, now: float) -> None:
        self.rtp_out.add(index)
        self._at(now)

    def protected_rtcp(self, index: int, now: float) -> None:
        self.srtcp_out.add(index)
        self._at(now)
