"""Deadlines that may be unset: what every sans-I/O part's ``get_timer`` combines."""

from __future__ import annotations

__all__ = ["earlier"]


def earlier(a: float | None, b: float | None) -> float | None:
    """The earlier of two deadlines, either of which may be ``None`` (none set); ``a`` on a tie.

    Two plain comparisons instead of a list of the set ones and ``min()``: the transceiver's
    parts are asked for their timers a few times per 20 ms tick of every session.
    """
    if b is None or (a is not None and a <= b):
        return a
    return b
