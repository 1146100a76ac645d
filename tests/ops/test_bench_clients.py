"""The sessions bench's clients do not all speak in step: each starts the loop at its own place."""

from __future__ import annotations

import asyncio
import itertools

from ops.bench.sessions_clients import _speech_track, loop_start


def test_a_load_steps_clients_start_the_loop_spread_over_it() -> None:
    packets = [bytes([i % 256]) for i in range(163)]  # the bench's loop is 163 frames
    for clients in (5, 10, 20, 40, 55):
        starts = sorted(loop_start(i, packets) for i in range(clients))
        assert len(set(starts)) == clients
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        gaps.append(len(packets) - starts[-1] + starts[0])
        # no stretch of the loop is left to a crowd: the widest gap is within 2.5x the even one
        assert max(gaps) <= 2.5 * len(packets) / clients
    assert loop_start(0, packets) == 0


def test_a_speech_track_plays_the_loop_from_its_start() -> None:
    packets = [bytes([i]) for i in range(10)]

    async def first_three(start: int) -> list[bytes]:
        track = _speech_track(packets, start)
        return [bytes(await track.recv()) for _ in range(3)]

    assert asyncio.run(first_three(7)) == [b"\x07", b"\x08", b"\x09"]
    assert asyncio.run(first_three(9)) == [b"\x09", b"\x00", b"\x01"]
