"""Supervisors: restart crashed children, stop them in order, escalate when overwhelmed.

A supervisor owns one *slot* per child: the child's name, its spec, its mailbox and the
ActorRef over that mailbox.  Each (re)start calls the spec's factory for a fresh actor
and runs it on the slot's mailbox, so the ref other code holds stays valid and messages
sent while the child was down wait for the next incarnation.

Children run in a nursery of their own, each under a cancel scope that is shielded
once the child has started: only the supervisor stops a child, and it does so one at a
time in reverse start order, each bounded by the child's ``shutdown_timeout`` (the
child's ``on_stop`` runs under that bound).  A supervisor is itself an Actor, so a
ChildSpec factory may return a Supervisor; when a supervisor exceeds its restart
intensity it stops its children and raises `Escalation`, which its own supervisor sees
as that child crashing.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import final

import attrs
import trio

from actors.actor import Actor, ActorDied, ActorRef, Mailbox
from actors.registry import NotRegistered, Registry

__all__ = ["ChildSpec", "Escalation", "Intensity", "Restart", "Strategy", "Supervisor"]

log = logging.getLogger("parley.actors")

_NON_NEGATIVE = attrs.validators.ge(0.0)


class Strategy(enum.Enum):
    """Which children restart when one has to (OTP names)."""

    ONE_FOR_ONE = "one_for_one"  # only that child
    ONE_FOR_ALL = "one_for_all"  # every child
    REST_FOR_ONE = "rest_for_one"  # that child and the ones started after it


class Restart(enum.Enum):
    """When a child that ended is started again (OTP names)."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only after a crash
    TEMPORARY = "temporary"  # never


@final
@attrs.frozen
class Intensity:
    """More than `max_restarts` restarts within `within` seconds escalates.

    Consecutive restarts of one child wait `backoff_initial * 2**n` seconds (at most
    `backoff_max`), n being that child's restarts within the last `within` seconds.
    """

    max_restarts: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    within: float = attrs.field(default=5.0, validator=attrs.validators.gt(0.0))
    backoff_initial: float = attrs.field(default=0.05, validator=_NON_NEGATIVE)
    backoff_max: float = attrs.field(default=2.0, validator=_NON_NEGATIVE)


@final
@attrs.frozen
class ChildSpec:
    """How to make, restart and stop one child.

    `factory` is called for every (re)start; the supervisor sets the actor's name to
    `name`.  `shutdown_timeout` bounds the child's `on_stop` when it is stopped.
    """

    name: str
    factory: Callable[[], Actor]
    restart: Restart = Restart.PERMANENT
    shutdown_timeout: float = attrs.field(default=5.0, validator=_NON_NEGATIVE)


class Escalation(Exception):
    """A supervisor exceeded its restart intensity; ``__cause__`` is the last crash."""


def _set_event() -> trio.Event:
    event = trio.Event()
    event.set()
    return event


@final
@attrs.define(eq=False)
class _Slot:
    """One child's identity across incarnations."""

    spec: ChildSpec
    mailbox: Mailbox
    ref: ActorRef
    generation: int = 0
    # The current incarnation: cancel `scope` to stop it; `exited` is set once it is gone.
    scope: trio.CancelScope | None = None
    exited: trio.Event = attrs.field(factory=_set_event)
    pending: trio.CancelScope | None = None  # a scheduled one-for-one restart
    stopping: bool = False  # being stopped for good: its exits are not restarts
    # This child's recent restart times, for its backoff.  A list, not a deque: an empty
    # deque costs ~600 bytes, times thousands of idle session children.
    recent: list[float] = attrs.field(factory=list)


@final
@attrs.frozen
class _Exit:
    slot: _Slot
    generation: int
    error: BaseException | None


@final
@attrs.define(eq=False)
class _Handshake:
    """The task status a child's run gets: marks it started and shields it."""

    _starter: trio.TaskStatus[BaseException | None]
    _scope: trio.CancelScope
    done: bool = False

    def started(self, value: ActorRef | None = None) -> None:
        self.done = True
        # From here on the child belongs to the children nursery, and only the
        # supervisor may stop it (in order, bounded): outer cancellation must not.
        self._scope.shield = True
        self._starter.started(None)


def _check_unregistered(registry: Registry, name: str) -> None:
    try:
        held = registry.lookup(name)
    except NotRegistered:
        return
    raise ValueError(f"name {name!r} is already registered to {held!r}")


def _restarts(policy: Restart, error: BaseException | None) -> bool:
    if policy is Restart.PERMANENT:
        return True
    return policy is Restart.TRANSIENT and error is not None


class Supervisor(Actor):
    """An Actor that starts, watches and restarts child actors.

    Children start in order, each once the previous reported started.  Stopping the
    supervisor (cancelling its run) stops them in reverse order.  `restarts` counts
    restart events (a group restart counts once).  Unknown messages sent to a
    supervisor are logged and ignored; subclasses may override `receive`.
    """

    def __init__(
        self,
        name: str,
        children: Sequence[ChildSpec] = (),
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        intensity: Intensity = Intensity(),
        registry: Registry | None = None,
    ) -> None:
        super().__init__(name)
        counts = collections.Counter(spec.name for spec in children)
        duplicates = sorted(name for name, count in counts.items() if count > 1)
        if duplicates:
            raise ValueError(f"duplicate child names: {duplicates}")
        self.strategy = strategy
        self.intensity = intensity
        self.registry = registry
        self.restarts = 0
        self._specs = tuple(children)
        self._slots: dict[str, _Slot] = {}
        self._children: trio.Nursery | None = None
        self._reports: trio.MemorySendChannel[_Exit] | None = None
        self._closing = False
        self._recent: collections.deque[float] = collections.deque()
        self._lock = trio.Lock()

    def child_names(self) -> list[str]:
        """Names of the current children, in start order."""
        return list(self._slots)

    def child_ref(self, name: str) -> ActorRef:
        """The stable ref of child `name`; KeyError if there is none."""
        return self._slots[name].ref

    async def start_child(self, spec: ChildSpec) -> ActorRef:
        """Start a child after the existing ones; returns once it reported started.

        ValueError if the name is taken (here or in the registry); a child failing to
        start raises its error here and leaves no slot behind; ActorDied if the child
        was stopped (stop_child, or the supervisor stopping) before it started.
        """
        async with self._structural():
            if self._children is None or self._closing:
                raise RuntimeError(f"supervisor {self.name!r} is not running")
            if spec.name in self._slots:
                raise ValueError(f"supervisor {self.name!r} already has a child {spec.name!r}")
            if self.registry is not None:
                _check_unregistered(self.registry, spec.name)
            actor = spec.factory()
            mailbox = Mailbox(actor.mailbox_size)
            slot = _Slot(spec, mailbox, ActorRef(spec.name, mailbox))
            self._slots[spec.name] = slot
            error = await self._launch(slot, actor)
            if error is None and not slot.stopping:
                if self.registry is not None:
                    # Registered once started, so a name found by Registry.wait_for
                    # belongs to a child that is up.
                    try:
                        self.registry.register(spec.name, slot.ref)
                    except ValueError:
                        slot.stopping = True
                        await self._halt(slot)
                        self._forget(slot)
                        raise
                return slot.ref
            self._forget(slot)
            if error is None:
                raise ActorDied(f"child {spec.name!r} was stopped while starting")
            log.error("%s: child %r failed to start", self.name, spec.name, exc_info=error)
            raise error

    async def stop_child(self, name: str) -> None:
        """Stop child `name` for good (bounded by its shutdown_timeout); KeyError if none."""
        async with self._structural():
            slot = self._slots.get(name)
            if slot is None:
                raise KeyError(name)
            slot.stopping = True
            self._unregister(slot)
            await self._halt(slot)
            self._forget(slot)

    async def receive(self, message: object) -> object:
        """Log and ignore: a stray message must not take down a whole subtree."""
        log.warning("supervisor %r ignored message %r", self.name, message)
        return None

    # -- lifecycle ---------------------------------------------------------------------

    async def _prepare(self) -> None:
        reports_in, reports_out = trio.open_memory_channel[_Exit](math.inf)
        self._reports = reports_in
        self._children = await self.nursery.start(self._host)
        self.nursery.start_soon(self._supervise, reports_out)
        for spec in self._specs:
            await self.start_child(spec)

    async def _host(self, *, task_status: trio.TaskStatus[trio.Nursery]) -> None:
        async with trio.open_nursery() as children:
            task_status.started(children)
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop_all()

    async def _stop_all(self) -> None:
        self._closing = True
        while self._slots:
            slot = next(reversed(self._slots.values()))
            slot.stopping = True
            self._unregister(slot)
            await self._halt(slot)
            self._forget(slot)

    def _structural(self) -> AbstractAsyncContextManager[object]:
        # Group strategies restart sets of children, so changes to the set must not
        # interleave with a group restart.  One-for-one children are independent; not
        # locking lets many session children start concurrently.
        if self.strategy is Strategy.ONE_FOR_ONE:
            return contextlib.nullcontext()
        return self._lock

    async def _launch(self, slot: _Slot, actor: Actor | None = None) -> BaseException | None:
        """Start one incarnation; None once started, else why it failed to start."""
        if actor is None:
            try:
                actor = slot.spec.factory()
            except Exception as exc:
                return exc
        actor.name = slot.spec.name
        slot.generation += 1
        slot.scope = scope = trio.CancelScope()
        slot.exited = exited = trio.Event()
        if self._children is None:
            exited.set()
            return RuntimeError(f"supervisor {self.name!r} is not running")
        try:
            result: BaseException | None = await self._children.start(
                self._incarnate, slot, actor, scope, exited
            )
        except BaseException:
            exited.set()
            raise
        return result

    async def _incarnate(
        self,
        slot: _Slot,
        actor: Actor,
        scope: trio.CancelScope,
        exited: trio.Event,
        *,
        task_status: trio.TaskStatus[BaseException | None],
    ) -> None:
        generation = slot.generation
        handshake = _Handshake(task_status, scope)
        error: BaseException | None = None
        try:
            with scope:
                await actor.run(
                    mailbox=slot.mailbox,
                    stop_timeout=slot.spec.shutdown_timeout,
                    task_status=handshake,
                )
        # Only Exceptions: KeyboardInterrupt and friends must take the whole tree down.
        except Exception as exc:
            error = exc
        finally:
            exited.set()
        if not handshake.done:
            # The starter reports (and decides about) failures to start.
            if error is None and not scope.cancel_called:
                error = RuntimeError(f"child {slot.spec.name!r} returned before it started")
            task_status.started(error)
            return
        stopped = scope.cancel_called
        self._log_exit(slot, error, stopped=stopped)
        if not stopped:
            self._report(_Exit(slot, generation, error))

    def _log_exit(self, slot: _Slot, error: BaseException | None, *, stopped: bool) -> None:
        name = slot.spec.name
        if error is not None:
            what = "failed while stopping" if stopped else "crashed"
            log.error("%s: child %r %s", self.name, name, what, exc_info=error)
        elif not stopped:
            log.info("%s: child %r exited", self.name, name)

    def _report(self, exit_: _Exit) -> None:
        if self._reports is None:
            return
        # Fails only once the supervisor is going away, and then _stop_all owns the slot.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._reports.send_nowait(exit_)

    async def _halt(self, slot: _Slot) -> None:
        """Stop the slot's current incarnation (if any) and wait until it is gone."""
        if slot.pending is not None:
            slot.pending.cancel()
        if slot.scope is not None:
            slot.scope.cancel()
        # Bounded: the child's on_stop runs under its own shutdown_timeout.
        with trio.CancelScope(shield=True):
            await slot.exited.wait()

    def _forget(self, slot: _Slot) -> None:
        """The slot is gone for good: drop it, unregister it, close its mailbox."""
        name = slot.spec.name
        if self._slots.get(name) is slot:
            del self._slots[name]
        self._unregister(slot)
        slot.mailbox.close()

    def _unregister(self, slot: _Slot) -> None:
        # Only our own registration: the name may belong to someone else by now.
        if self.registry is None:
            return
        name = slot.spec.name
        with contextlib.suppress(NotRegistered):
            if self.registry.lookup(name) == slot.ref:
                self.registry.unregister(name)

    # -- restarts ----------------------------------------------------------------------

    def _is_current(self, report: _Exit) -> bool:
        slot = report.slot
        return (
            self._slots.get(slot.spec.name) is slot
            and slot.generation == report.generation
            and not slot.stopping
        )

    async def _supervise(self, reports: trio.MemoryReceiveChannel[_Exit]) -> None:
        async for report in reports:
            if self.strategy is Strategy.ONE_FOR_ONE:
                self._handle_one(report)
                continue
            async with self._lock:
                # Re-checked under the lock: a group restart may have replaced the
                # incarnation that sent this report.
                if not self._is_current(report):
                    continue
                if _restarts(report.slot.spec.restart, report.error):
                    await self._restart_group(report.slot, report.error)
                else:
                    self._forget(report.slot)

    def _handle_one(self, report: _Exit) -> None:
        if not self._is_current(report):
            return
        slot = report.slot
        if not _restarts(slot.spec.restart, report.error):
            self._forget(slot)
            return
        delay = self._count_restart(slot, report.error)
        slot.pending = pending = trio.CancelScope()
        self.nursery.start_soon(self._restart_one, slot, pending, delay)

    async def _restart_one(self, slot: _Slot, pending: trio.CancelScope, delay: float) -> None:
        error: BaseException | None = None
        with pending:
            await trio.sleep(delay)
            error = await self._launch(slot)
        if slot.pending is pending:
            slot.pending = None
        if error is not None:
            log.error("%s: child %r failed to restart", self.name, slot.spec.name, exc_info=error)
            self._report(_Exit(slot, slot.generation, error))

    async def _restart_group(self, trigger: _Slot, error: BaseException | None) -> None:
        while True:
            delay = self._count_restart(trigger, error)
            slots = list(self._slots.values())
            if self.strategy is Strategy.REST_FOR_ONE:
                slots = slots[slots.index(trigger) :]
            for slot in reversed(slots):
                await self._halt(slot)
            for slot in slots:
                if slot is not trigger and slot.spec.restart is Restart.TEMPORARY:
                    self._forget(slot)
            slots = [slot for slot in slots if self._slots.get(slot.spec.name) is slot]
            await trio.sleep(delay)
            for slot in slots:
                failure = await self._launch(slot)
                if failure is not None:
                    log.error(
                        "%s: child %r failed to restart",
                        self.name,
                        slot.spec.name,
                        exc_info=failure,
                    )
                    trigger, error = slot, failure
                    break
            else:
                return

    def _count_restart(self, slot: _Slot, error: BaseException | None) -> float:
        """Record a restart of `slot`; escalate past the intensity, else return its backoff."""
        now = trio.current_time()
        horizon = now - self.intensity.within
        self._recent.append(now)
        while self._recent[0] <= horizon:
            self._recent.popleft()
        if len(self._recent) > self.intensity.max_restarts:
            log.error(
                "%s: more than %d restarts within %ss (last: %r); escalating",
                self.name,
                self.intensity.max_restarts,
                self.intensity.within,
                slot.spec.name,
            )
            raise Escalation(
                f"supervisor {self.name!r}: more than {self.intensity.max_restarts} restarts"
                f" within {self.intensity.within}s (last: child {slot.spec.name!r})"
            ) from error
        self.restarts += 1
        slot.recent = [t for t in slot.recent if t > horizon]
        # Capped exponent: a long run of restarts must not overflow the float.
        exponent = min(len(slot.recent), 32)
        slot.recent.append(now)
        return min(self.intensity.backoff_max, self.intensity.backoff_initial * 2.0**exponent)
