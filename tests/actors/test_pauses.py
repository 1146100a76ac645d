"""The collector's pauses are timed by generation, and startup objects can be frozen out of them."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from actors.pauses import Pauses, freeze_startup


@pytest.fixture
def pauses() -> Iterator[Pauses]:
    timed = Pauses()
    timed.install()
    try:
        yield timed
    finally:
        timed.remove()


def test_every_collection_is_timed_under_its_generation(pauses: Pauses) -> None:
    gc.collect(0)
    gc.collect(2)
    gc.collect(2)
    by = pauses.by_generation
    assert by["2"].count >= 2 and by["0"].count >= 1
    assert by["2"].sum > 0.0
    pauses.install()  # twice: still one observer
    gc.collect(1)
    assert by["1"].count >= 1 and gc.callbacks.count(pauses._observe) == 1


def test_nothing_is_timed_once_removed(pauses: Pauses) -> None:
    pauses.remove()
    gc.collect(2)
    assert all(series.count == 0 for series in pauses.by_generation.values())


def test_a_full_collection_walks_only_what_came_after_the_freeze() -> None:
    # A process' worth of long-lived objects (a daemon's modules and descriptors) ...
    startup = [[i] for i in range(200_000)]
    try:
        assert freeze_startup() >= len(startup)
        assert not any(obj is startup for obj in gc.get_objects(2))  # frozen: no walk sees it
        later = [[i] for i in range(1000)]
        tracked = gc.get_objects()
        assert len(tracked) < len(startup)  # a collection now walks the later objects only
        assert any(obj is later for obj in tracked)
    finally:
        gc.unfreeze()
