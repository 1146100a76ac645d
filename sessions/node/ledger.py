"""The node's media ledger: what it processed for each session at each epoch, for checking.

Every transceiver keeps a :class:`~sessions.transceiver.ledger.MediaLedger` (the SRTP indexes it
decrypted, the SRTP and SRTCP indexes it protected, the time span it did so). A node with
``node.ledger`` set writes them to that file as JSON lines, one *segment* per (session, epoch):
every :data:`INTERVAL` seconds for segments that changed, and a final line when the session
leaves the node (it ended, moved, or the lease was lost). Lines are cumulative; the latest line
of a segment wins, so a node killed mid-segment leaves at most the last interval unwritten.

:func:`check_ledgers` holds a cluster's ledgers, read from outside every node, to the rules of
single ownership (issue #13's and #14's invariants):

* two epochs of one session never process media in overlapping time;
* a client's SRTP index is decrypted under at most one epoch;
* an SRTP or SRTCP index of ours is protected at most once (all epochs of a session share its
  keys: a repeat anywhere would repeat keystream).

Off by default: it costs one range update per packet in the core (always) and a write of
changed segments per interval here.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, Final, final

import attrs
import trio

from sessions.transceiver.ledger import IndexRanges, MediaLedger

__all__ = ["INTERVAL", "LedgerWriter", "Segment", "check_ledgers", "read_ledgers"]

log = logging.getLogger("parley.ledger")

#: seconds between two writes of the segments that changed
INTERVAL: Final = 0.5


@final
@attrs.frozen
class Segment:
    """One session at one epoch on one node, as its latest ledger line says."""

    node: str
    session: str
    epoch: int
    first: float | None
    last: float | None
    rtp_in: tuple[tuple[int, int], ...]
    rtp_out: tuple[tuple[int, int], ...]
    srtcp_out: tuple[tuple[int, int], ...]
    final: bool = False
    at: float = 0.0

    @classmethod
    def from_json(cls, value: Any) -> Segment:
        def ranges(key: str) -> tuple[tuple[int, int], ...]:
            return tuple((int(lo), int(hi)) for lo, hi in value.get(key, []))

        first, last = value.get("first"), value.get("last")
        return cls(
            node=str(value["node"]),
            session=str(value["session"]),
            epoch=int(value["epoch"]),
            first=None if first is None else float(first),
            last=None if last is None else float(last),
            rtp_in=ranges("rtp_in"),
            rtp_out=ranges("rtp_out"),
            srtcp_out=ranges("srtcp_out"),
            final=bool(value.get("final", False)),
            at=float(value.get("at", 0.0)),
        )


@attrs.define
class _Open:
    """A segment being written: the ledgers of its cores (an actor restarted after a crash runs
    a new core at the same epoch), and what was last written."""

    session: str
    epoch: int
    ledgers: list[MediaLedger]
    #: wall time minus the cores' clock (Trio's), to write unix times
    offset: float
    written: int = -1

    def changes(self) -> int:
        return sum(ledger.changes for ledger in self.ledgers)


@final
class LedgerWriter:
    """Writes one node's media ledger to ``path`` (JSON lines, appended)."""

    def __init__(self, path: Path, node: str) -> None:
        self.path = path
        self.node = node
        self._open: dict[tuple[str, int], _Open] = {}
        self._file: IO[str] | None = None
        #: lines written, and writes that failed (a full disk must not stop a call)
        self.lines = 0
        self.failures = 0

    def track(self, session: str, epoch: int, ledger: MediaLedger) -> None:
        """Record ``ledger`` (a core's) under the session's segment at ``epoch``."""
        key = (session, epoch)
        segment = self._open.get(key)
        offset = time.time() - trio.current_time()
        if segment is None:
            self._open[key] = _Open(session, epoch, [ledger], offset)
        elif all(known is not ledger for known in segment.ledgers):
            segment.ledgers.append(ledger)

    def close(self, session: str) -> None:
        """The session left this node: write its segments' final lines."""
        for key in [k for k in self._open if k[0] == session]:
            self._write(self._open.pop(key), final=True)
        self._flush()

    def flush_changed(self) -> None:
        for segment in self._open.values():
            if segment.changes() != segment.written:
                self._write(segment, final=False)
        self._flush()

    async def run(self) -> None:
        try:
            while True:
                await trio.sleep(INTERVAL)
                self.flush_changed()
        finally:
            for key in list(self._open):
                self._write(self._open.pop(key), final=True)
            self._flush()
            if self._file is not None:
                self._file.close()
                self._file = None

    def _write(self, segment: _Open, *, final: bool) -> None:
        merged = {name: IndexRanges() for name in ("rtp_in", "rtp_out", "srtcp_out")}
        firsts = [x.first for x in segment.ledgers if x.first is not None]
        lasts = [x.last for x in segment.ledgers if x.last is not None]
        for ledger in segment.ledgers:
            merged["rtp_in"].update(ledger.rtp_in)
            merged["rtp_out"].update(ledger.rtp_out)
            merged["srtcp_out"].update(ledger.srtcp_out)
        line = {
            "node": self.node,
            "session": segment.session,
            "epoch": segment.epoch,
            "first": min(firsts) + segment.offset if firsts else None,
            "last": max(lasts) + segment.offset if lasts else None,
            **{name: ranges.ranges() for name, ranges in merged.items()},
            "final": final,
            "at": time.time(),
        }
        segment.written = segment.changes()
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
            self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
            self.lines += 1
        except OSError as exc:
            self.failures += 1
            log.warning("ledger not written", extra={"path": str(self.path), "error": str(exc)})

    def _flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except OSError:
                self.failures += 1


def read_ledgers(directory: Path) -> list[Segment]:
    """The latest line of every segment in the ``*.jsonl`` ledgers under ``directory``; a
    line that does not parse (a node killed mid-write) is skipped."""
    latest: dict[tuple[str, str, int], Segment] = {}
    for path in sorted(Path(directory).glob("*.jsonl")):
        for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                segment = Segment.from_json(json.loads(text))
            except (ValueError, KeyError, TypeError):
                continue
            key = (segment.node, segment.session, segment.epoch)
            known = latest.get(key)
            if known is None or segment.at >= known.at:
                latest[key] = segment
    return list(latest.values())


def _overlap(a: Iterable[tuple[int, int]], b: Iterable[tuple[int, int]]) -> tuple[int, int] | None:
    """The first range two sorted range lists share, or None."""
    left, right = list(a), list(b)
    i = j = 0
    while i < len(left) and j < len(right):
        lo = max(left[i][0], right[j][0])
        hi = min(left[i][1], right[j][1])
        if lo <= hi:
            return lo, hi
        if left[i][1] < right[j][1]:
            i += 1
        else:
            j += 1
    return None


def check_ledgers(segments: Iterable[Segment], *, tolerance: float = 0.0) -> list[str]:
    """Every breach of single ownership in a cluster's ledgers, in words (empty: none).

    ``tolerance`` (seconds) forgives that much apparent time overlap, for ledgers written on
    hosts whose clocks differ; on one host, 0.
    """
    violations: list[str] = []
    by_session: dict[str, list[Segment]] = {}
    for segment in segments:
        by_session.setdefault(segment.session, []).append(segment)
    for session, found in sorted(by_session.items()):
        found.sort(key=lambda s: s.epoch)
        for a, b in itertools.combinations(found, 2):
            where = f"session {session}: epoch {a.epoch} ({a.node}) and {b.epoch} ({b.node})"
            if a.epoch == b.epoch:
                violations.append(f"{where}: one epoch on two nodes")
            if None not in (a.first, a.last, b.first, b.last):
                assert a.first is not None and a.last is not None
                assert b.first is not None and b.last is not None
                if a.first < b.last - tolerance and b.first < a.last - tolerance:
                    violations.append(
                        f"{where}: processed media at the same time "
                        f"({max(a.first, b.first):.3f} to {min(a.last, b.last):.3f})"
                    )
            for name, what in (
                ("rtp_in", "client SRTP index decrypted twice"),
                ("rtp_out", "SRTP index protected twice"),
                ("srtcp_out", "SRTCP index protected twice"),
            ):
                shared = _overlap(getattr(a, name), getattr(b, name))
                if shared is not None:
                    violations.append(f"{where}: {what} ({shared[0]}..{shared[1]})")
    return violations
