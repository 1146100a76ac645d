"""The node's media tick as one clock for every session: :func:`ride`.

Once a session's media flows, its actor does its work only on a node-wide grid of ``tick``
seconds (``node.media_tick_ms``; sessions/session.py). One task per grid sleeps until each grid
point and runs every session's step for it there, one after the other, in a fixed order; the
sessions' own tasks stay asleep while they ride the grid, and wake only when their step says
the session needs them (it paused, ended, moved, or left the grid).

Why not let each session's task wake itself: each used to sleep in a cancel scope with the grid
point as its deadline, so every tick Trio expired one deadline per session, cancelled its scope
and unwound its sleep (about an eighth of a busy node's Python time, by py-spy); and Trio runs
a batch of woken tasks in a random order (it reverses each batch half of the time, to shake
out ordering bugs), so a session served first on one tick was served last on the next: its
frames left up to a whole batch's work apart, jitter that grew with the sessions on the node
(5 ms at ten). Here a step is a plain call, and a session's place in the batch stays the same
from tick to tick, so whatever the batch costs, each session's frames leave the same time
after each grid point.

The runner is a Trio system task, started the first time a session of the run rides a grid of
that period, so a node (or a test) needs nothing set up; it ends when no one has ridden for a
while. A step that raises does not touch the runner or the other sessions: the exception is
handed to the rider's own task, which raises it (its supervisor restarts that session alone).

A step may leave the rest of its work for later (it returns that rest, a :data:`Rest`): the
grid runs the steps of all the point's riders first, then the rests of those that left one, in
the same order; a rest says where its rider goes next, as a step would. A node's session steps
up to the frames it will send (what arrived, playout, turns, the agent, pacing) and leaves
their encoding and sending for its rest. Each half of the work then runs for every session
back to back, Python and libopus alike, which is what we measured it saves: the node's CPU per
session, 40 echo sessions through a relay (ops/bench/sessions.py, alternating runs), 17.3-17.8
ms a session-second against 18.6-19.5 with each step doing all its work at once (three pairs;
18.0-18.5 against 18.8-19.3 in four earlier ones); in groups of 16 sessions (steps, then their
rests, group after group) 19.0 and 19.2.
Our reading: each half's code and tables stay in the CPU's caches from one session to the
next. What it costs: in cluster mode nothing on the wire, since the tunnel sends what the
sessions queued once the pass is over (relay/tunnel/quic.py, ``flush``), as it did before. On
a node's own port (direct mode), where each datagram leaves at once, a session's frames wait
for the first halves of the sessions after it in the pass: the first session's frames leave
later than before by up to the sum of those (a first half is about 0.14 ms of a session's 0.27
in ops/bench/frame.py: some 5 ms at 40 sessions), the last one's no later. Each session's place
in the pass, and so the time after the grid point its frames leave, is still the same at
every point.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable
from typing import Final, TypeVar, final

import trio

from sessions.audio.pacer import GRID_SLACK

__all__ = ["GRID_SLACK", "Rest", "Step", "grid_index", "ride"]

#: what a step left for after the other riders' steps: where its rider goes next, as a step
#: says (see the module docstring)
Rest = Callable[[], int | None]
#: a session's work for one grid point, given the time: the index of the next grid point it
#: wants (it stays on the grid, its task asleep), or None (its task wakes and takes over), or
#: the rest of its work, for after the other riders' steps
Step = Callable[[float], int | Rest | None]
log = logging.getLogger("parley.session")

_T = TypeVar("_T")

#: grid points with no one riding before the runner ends (it starts again on demand)
_IDLE_POINTS: Final = 250


def grid_index(at: float, tick: float) -> int:
    """The first point of the grid (multiples of ``tick`` on Trio's clock) at or after ``at``,
    or one at most :data:`GRID_SLACK` before it, by its index: point ``k`` is ``k * tick``. A
    timer computed to fall on a grid point may come out a float's rounding after it, and must
    not wait a whole tick for that."""
    return math.ceil((at - GRID_SLACK) / tick)


@final
class _Rider:
    __slots__ = ("error", "gone", "step", "task")

    def __init__(self, task: trio.lowlevel.Task, step: Step) -> None:
        self.task = task
        self.step = step
        self.error: Exception | None = None
        self.gone = False  # its task was woken (or cancelled): never run or wake it again


@final
class _Grid:
    """The riders of one grid, by the point they wait for, and the task that runs them."""

    def __init__(self, tick: float) -> None:
        self.tick = tick
        self._riders: dict[int, list[_Rider]] = {}
        self._due: list[int] = []  # a heap of the indexes in _riders
        self._running = False
        self._changed: trio.Event | None = None  # set when an earlier point is waited for

    def add(self, index: int, rider: _Rider) -> None:
        riders = self._riders.get(index)
        if riders is None:
            riders = self._riders[index] = []
            heapq.heappush(self._due, index)
            if not self._running:
                self._running = True
                trio.lowlevel.spawn_system_task(self._run, name=f"media grid {self.tick}s")
            elif self._changed is not None and self._due[0] == index:
                self._changed.set()
        riders.append(rider)

    async def _run(self) -> None:
        idle = 0
        try:
            while idle <= _IDLE_POINTS:
                self._changed = trio.Event()
                if self._due:
                    idle = 0
                    until = self._due[0] * self.tick
                else:
                    idle += 1
                    until = trio.current_time() + self.tick
                with trio.move_on_at(until):
                    await self._changed.wait()  # an earlier point came in: sleep for it
                self._changed = None
                if self._due and self._due[0] * self.tick <= trio.current_time():
                    # One point a pass: a node that fell behind (overloaded) still lets its other
                    # tasks run between points (its lease's keepalives, the tunnels' reads).
                    index = heapq.heappop(self._due)
                    self._pass(index, self._riders.pop(index))
                    await trio.lowlevel.checkpoint()
        finally:
            self._running = False
            self._changed = None

    def _pass(self, index: int, riders: list[_Rider]) -> None:
        """Every rider's step at point ``index``, then the rests; then each rider goes where
        it asked, in the order they came (which is the order at the next point too)."""
        steps = [
            (rider, self._call(rider, rider.step, trio.current_time()))
            for rider in riders
            if not rider.gone
        ]
        for rider, after in steps:
            if callable(after):
                after = None if rider.gone else self._call(rider, after)
            self._place(rider, index, after)

    def _call(self, rider: _Rider, work: Callable[..., _T], *args: float) -> _T | None:
        """``work`` for ``rider``; None (and the error kept for its task) if it raised."""
        try:
            return work(*args)
        except Exception as exc:  # the session's own failure, for its own task to raise
            if rider.gone:  # ... but its work cancelled that task: it can only be logged
                log.exception("a media grid step failed as its session was woken")
            else:
                rider.error = exc
            return None

    def _place(self, rider: _Rider, index: int, after: int | None) -> None:
        """Where ``rider`` goes after its work at point ``index``: the point it asked for (at
        least the next), or back to its own task (None)."""
        if rider.gone:
            # Its work woke its own task (it cancelled the scope around ``ride``: the session
            # stalled, say), which Trio rescheduled already: that task takes over from here.
            return
        if after is None:
            rider.gone = True
            trio.lowlevel.reschedule(rider.task)
        else:
            self.add(max(after, index + 1), rider)


_GRIDS: trio.lowlevel.RunVar[dict[float, _Grid]] = trio.lowlevel.RunVar("parley_media_grids")


async def ride(index: int, tick: float, step: Step) -> None:
    """Ride the ``tick``-second grid from point ``index`` (see :func:`grid_index`): ``step``
    runs at that point and at every point it asks for next, with every other rider of this
    Trio run, in the order they joined. Returns once a step returns None; raises what a step
    raised. Cancelling the caller takes the rider off the grid."""
    try:
        grids = _GRIDS.get()
    except LookupError:
        grids = {}
        _GRIDS.set(grids)
    grid = grids.get(tick)
    if grid is None:
        grid = grids[tick] = _Grid(tick)
    rider = _Rider(trio.lowlevel.current_task(), step)
    grid.add(index, rider)

    def abort(_: object) -> trio.lowlevel.Abort:
        rider.gone = True
        return trio.lowlevel.Abort.SUCCEEDED

    await trio.lowlevel.wait_task_rescheduled(abort)
    if rider.error is not None:
        raise rider.error
