"""The media ledger: index ranges, the node's writer, and the single-ownership checker."""

from __future__ import annotations

import json
import random
from pathlib import Path

import trio
import trio.testing

from sessions.node.ledger import LedgerWriter, Segment, check_ledgers, read_ledgers
from sessions.transceiver.ledger import IndexRanges, MediaLedger


def test_index_ranges_merge_in_any_order_and_count_duplicates() -> None:
    indexes = list(range(100, 200)) + list(range(300, 310))
    shuffled = indexes[:]
    random.Random(7).shuffle(shuffled)
    ranges = IndexRanges()
    for index in shuffled:
        ranges.add(index)
    assert ranges.ranges() == [[100, 199], [300, 309]]
    assert len(ranges) == 110 and 150 in ranges and 250 not in ranges
    ranges.add(150)
    assert ranges.duplicates == 1
    other = IndexRanges()
    for index in (198, 199, 200, 201, 299):
        other.add(index)
    ranges.update(other)
    assert ranges.ranges() == [[100, 201], [299, 309]] and ranges.duplicates == 3


def segment(node: str, epoch: int, first: float, last: float, rtp_in: list[list[int]]) -> Segment:
    return Segment.from_json(
        {"node": node, "session": "s", "epoch": epoch, "first": first, "last": last,
         "rtp_in": rtp_in, "rtp_out": [[epoch * 1000, epoch * 1000 + 10]]}
    )  # fmt: skip


def test_check_ledgers_finds_overlapping_owners_and_indexes_used_twice() -> None:
    clean = [segment("a", 1, 0.0, 1.0, [[0, 49]]), segment("b", 2, 1.01, 2.0, [[50, 99]])]
    assert check_ledgers(clean) == []
    # b started processing before a stopped
    late = [segment("a", 1, 0.0, 1.0, [[0, 49]]), segment("b", 2, 0.9, 2.0, [[50, 99]])]
    assert "at the same time" in check_ledgers(late)[0]
    assert check_ledgers(late, tolerance=0.2) == []
    # index 49 decrypted under both epochs
    twice = [segment("a", 1, 0.0, 1.0, [[0, 49]]), segment("b", 2, 1.1, 2.0, [[49, 99]])]
    assert check_ledgers(twice) == ["session s: epoch 1 (a) and 2 (b): client SRTP index "
                                    "decrypted twice (49..49)"]  # fmt: skip
    # one epoch claimed by two nodes
    assert (
        "one epoch on two nodes"
        in check_ledgers([segment("a", 1, 0, 1, []), segment("b", 1, 2, 3, [])])[0]
    )


async def test_the_writer_writes_what_changed_and_a_final_line(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    writer = LedgerWriter(tmp_path / "n1.jsonl", "n1")
    ledger = MediaLedger()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        writer.track("s", 7, ledger)
        for index in range(10):
            ledger.decrypted_rtp(index, trio.current_time())
            ledger.protected_rtp(500 + index, trio.current_time())
            await trio.sleep(0.02)
        await trio.sleep(2)  # several intervals: one line, nothing changed afterwards
        lines = (tmp_path / "n1.jsonl").read_text().splitlines()
        assert len(lines) == 1
        # An actor restarted at the same epoch runs a new core: one segment still.
        again = MediaLedger()
        writer.track("s", 7, again)
        again.decrypted_rtp(10, trio.current_time())
        writer.close("s")
        nursery.cancel_scope.cancel()
    [found] = read_ledgers(tmp_path)
    assert found.final and (found.node, found.session, found.epoch) == ("n1", "s", 7)
    assert found.rtp_in == ((0, 10),) and found.rtp_out == ((500, 509),)
    assert found.first is not None and found.last is not None and found.last > found.first
    last = json.loads((tmp_path / "n1.jsonl").read_text().splitlines()[-1])
    assert last["final"] is True
