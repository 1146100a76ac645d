"""Actors: one Trio task serving a bounded mailbox, addressed through a stable ActorRef.

An actor handles one message at a time, in arrival order.  `ActorRef.tell` sends and
waits for room when the mailbox is full; `ActorRef.ask` sends and waits for the value
`Actor.receive` returns.  An exception in `receive` crashes the actor: it is raised out
of `Actor.run` (a supervisor catches and logs it), and an ask being handled at the time
fails at once with `ActorDied`.

The mailbox is a separate object so that it can outlive one incarnation of an actor: a
supervisor creates it once per child slot and hands it to every incarnation's `run`,
which keeps the child's ActorRef valid across restarts and keeps messages queued while
the child was down.  An actor run on its own creates (and closes) its own mailbox.
"""

from __future__ import annotations

import logging
from typing import ClassVar, final

import attrs
import trio

__all__ = ["Actor", "ActorDied", "ActorRef", "AskTimeout", "Mailbox", "MailboxFull"]

log = logging.getLogger("parley.actors")


class MailboxFull(Exception):
    """`ActorRef.tell_nowait` found the actor's mailbox full."""


class ActorDied(Exception):
    """The actor stopped or crashed before it replied (or before it could take a message).

    When the actor crashed while handling an ask, ``__cause__`` is the crash.
    """


class AskTimeout(TimeoutError):
    """`ActorRef.ask` got no reply within its timeout."""


@final
@attrs.define(eq=False)
class _Ask:
    """A request in a mailbox, and the one-shot slot its reply lands in."""

    message: object
    _done: trio.Event = attrs.field(factory=trio.Event, init=False)
    _value: object = attrs.field(default=None, init=False)
    _error: BaseException | None = attrs.field(default=None, init=False)

    def resolve(self, value: object) -> None:
        if not self._done.is_set():
            self._value = value
            self._done.set()

    def fail(self, error: BaseException) -> None:
        if not self._done.is_set():
            self._error = error
            self._done.set()

    async def wait(self) -> object:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


@final
@attrs.define(eq=False)
class Mailbox:
    """The bounded queue behind an ActorRef; owned by whoever owns the actor's identity.

    Messages are read only by the actor's `run`; everyone else reaches it through an
    ActorRef.  `close` ends it for good: queued asks fail with `ActorDied`, later sends
    raise `ActorDied`.
    """

    capacity: int = attrs.field(validator=attrs.validators.ge(0))
    _send: trio.MemorySendChannel[object] = attrs.field(init=False, repr=False)
    _receive: trio.MemoryReceiveChannel[object] = attrs.field(init=False, repr=False)
    _closed: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[object](self.capacity)

    @property
    def closed(self) -> bool:
        """True once `close` was called."""
        return self._closed

    def close(self) -> None:
        """End the mailbox: wake blocked senders, fail queued asks; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._send.close()
        while True:
            try:
                item = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if isinstance(item, _Ask):
                item.fail(ActorDied("the actor stopped before handling this ask"))

    async def _put(self, item: object) -> None:
        await self._send.send(item)

    def _put_nowait(self, item: object) -> None:
        self._send.send_nowait(item)

    async def _get(self) -> object:
        return await self._receive.receive()


@final
@attrs.frozen
class ActorRef:
    """A stable handle to an actor; stays valid while its mailbox is open.

    Refs compare equal when they name the same mailbox.  Sending to an actor that is
    gone for good raises `ActorDied`.
    """

    name: str
    _mailbox: Mailbox = attrs.field(repr=False)

    async def tell(self, message: object) -> None:
        """Queue `message`; waits while the mailbox is full (back-pressure)."""
        try:
            await self._mailbox._put(message)
        except trio.ClosedResourceError:
            raise ActorDied(f"actor {self.name!r} is stopped") from None

    def tell_nowait(self, message: object) -> None:
        """Queue `message` or raise `MailboxFull` at once."""
        try:
            self._mailbox._put_nowait(message)
        except trio.WouldBlock:
            raise MailboxFull(f"mailbox of {self.name!r} is full") from None
        except trio.ClosedResourceError:
            raise ActorDied(f"actor {self.name!r} is stopped") from None

    async def ask(self, message: object, *, timeout: float) -> object:  # noqa: ASYNC109
        """Send `message` and return what the actor's `receive` returns for it.

        `timeout` covers waiting for mailbox room and for the reply.  Raises
        `AskTimeout`, or `ActorDied` as soon as the actor crashes or stops first.
        """
        request = _Ask(message)
        with trio.move_on_after(timeout):
            try:
                await self._mailbox._put(request)
            except trio.ClosedResourceError:
                raise ActorDied(f"actor {self.name!r} is stopped") from None
            return await request.wait()
        raise AskTimeout(f"no reply from {self.name!r} within {timeout}s")


def _sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The only leaf of a chain of one-element groups, or None if there are several."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


class Actor:
    """Base class: override `receive` (and optionally `on_start` / `on_stop`).

    One instance is one incarnation: `run` may be called once.  A supervisor calls its
    child factory for every (re)start, so state kept on the instance is fresh each time.
    """

    mailbox_size: ClassVar[int] = 64
    #: Bound on `on_stop` for an actor run on its own; a supervisor passes its own.
    stop_timeout: ClassVar[float] = 5.0

    # Class-level defaults keep the runtime working for subclasses whose __init__
    # forgets to call super().__init__().
    name: str = ""
    _mailbox: Mailbox | None = None
    _nursery: trio.Nursery | None = None
    _ran: bool = False

    def __init__(self, name: str = "") -> None:
        self.name = name or type(self).__name__

    @property
    def ref(self) -> ActorRef:
        """This actor's handle (creates its own mailbox if none was attached yet)."""
        if self._mailbox is None:
            self._mailbox = Mailbox(self.mailbox_size)
        return ActorRef(self.name or type(self).__name__, self._mailbox)

    @property
    def nursery(self) -> trio.Nursery:
        """A nursery living exactly as long as this actor, for its background tasks."""
        if self._nursery is None:
            raise RuntimeError(f"actor {self.name!r} is not running")
        return self._nursery

    async def on_start(self) -> None:
        """Hook run before the actor reports started; may start tasks in `nursery`."""

    async def receive(self, message: object) -> object:
        """Handle one message; the return value is the reply to an ask."""
        raise NotImplementedError(f"{type(self).__name__} does not handle {message!r}")

    async def on_stop(self) -> None:
        """Hook run once the actor's tasks are done, if `on_start` had completed.

        Runs shielded under a bounded timeout, on any exit: stop, cancellation or crash.
        """

    def stop(self) -> None:
        """Finish normally: cancel the actor's tasks; `run` then returns without error.

        A supervisor sees a normal exit: it restarts only a PERMANENT child.
        """
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def run(
        self,
        *,
        mailbox: Mailbox | None = None,
        stop_timeout: float | None = None,
        task_status: trio.TaskStatus[ActorRef] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run this incarnation: on_start, report started (the ref), serve the mailbox.

        Serves until cancelled, `stop` is called, the mailbox is closed, or `receive`
        raises (then that exception is raised from here).  `mailbox` attaches a mailbox
        the caller owns (a supervisor's child slot); without it the actor uses its own
        and closes it on exit.  `stop_timeout` bounds `on_stop`.
        """
        if self._ran:
            raise RuntimeError(f"actor {self.name!r} already ran; an Actor runs once")
        self._ran = True
        if not self.name:
            self.name = type(self).__name__
        if mailbox is not None:
            if self._mailbox is not None and self._mailbox is not mailbox:
                raise RuntimeError(f"actor {self.name!r} already has another mailbox")
            self._mailbox = mailbox
        owned = mailbox is None
        ref = self.ref
        started = False
        try:
            error: BaseException | None = None
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await self._prepare()
                    await self.on_start()
                    started = True
                    task_status.started(ref)
                    await self._serve(ref._mailbox)
            except BaseExceptionGroup as group:
                # Callers (and supervisors) should see the crash itself, not Trio's
                # single-exception wrapper around it.
                error = _sole_exception(group)
                if error is None:
                    raise
            if error is not None:
                raise error
        finally:
            self._nursery = None
            if started:
                timeout = self.stop_timeout if stop_timeout is None else stop_timeout
                with trio.move_on_after(timeout, shield=True) as cleanup:
                    await self.on_stop()
                if cleanup.cancelled_caught:
                    log.warning("actor %r: on_stop abandoned after %ss", self.name, timeout)
            if owned:
                ref._mailbox.close()

    async def _prepare(self) -> None:
        """Runtime hook run inside the nursery before `on_start` (used by Supervisor)."""

    async def _serve(self, mailbox: Mailbox) -> None:
        while True:
            try:
                item = await mailbox._get()
            except trio.EndOfChannel:
                self.stop()
                return
            if isinstance(item, _Ask):
                await self._answer(item)
            else:
                await self.receive(item)

    async def _answer(self, request: _Ask) -> None:
        try:
            value = await self.receive(request.message)
        except BaseException as exc:
            what = "was stopped" if isinstance(exc, trio.Cancelled) else "crashed"
            died = ActorDied(f"actor {self.name!r} {what} while handling this ask")
            died.__cause__ = exc
            request.fail(died)
            raise
        request.resolve(value)
