"""A name → ActorRef directory for one process.

Supervisors given a registry register each child under its name once it has started,
keep it registered across restarts (the ref does not change), and unregister it when
it is stopped for good; so other code can find a session or a service by name, or wait
until it is up.
"""

from __future__ import annotations

from typing import final

import attrs
import trio

from actors.actor import ActorRef

__all__ = ["NotRegistered", "Registry"]


class NotRegistered(KeyError):
    """No actor is registered under this name."""


@final
@attrs.define(eq=False)
class Registry:
    """Names to refs; one name maps to at most one ref."""

    _refs: dict[str, ActorRef] = attrs.field(factory=dict, init=False)
    _arrivals: dict[str, trio.Event] = attrs.field(factory=dict, init=False)

    def register(self, name: str, ref: ActorRef) -> None:
        """Map `name` to `ref`; ValueError if another ref holds the name."""
        held = self._refs.get(name)
        if held is not None and held != ref:
            raise ValueError(f"name {name!r} is already registered to {held!r}")
        self._refs[name] = ref
        arrival = self._arrivals.pop(name, None)
        if arrival is not None:
            arrival.set()

    def unregister(self, name: str) -> None:
        """Forget `name`; a no-op if it is not registered (cleanup may run twice)."""
        self._refs.pop(name, None)

    def lookup(self, name: str) -> ActorRef:
        """The ref registered under `name`; raises `NotRegistered`."""
        try:
            return self._refs[name]
        except KeyError:
            raise NotRegistered(name) from None

    async def wait_for(self, name: str) -> ActorRef:
        """The ref under `name`, waiting until something registers it."""
        while True:
            ref = self._refs.get(name)
            if ref is not None:
                await trio.lowlevel.checkpoint()
                return ref
            arrival = self._arrivals.get(name)
            if arrival is None:
                arrival = self._arrivals[name] = trio.Event()
            try:
                # The name may be unregistered again before this task runs: look again.
                await arrival.wait()
            finally:
                # A waiter that gives up must not leave an event behind for a name
                # that may never come.
                lingering = self._arrivals.get(name) is arrival
                if lingering and arrival.statistics().tasks_waiting == 0:
                    del self._arrivals[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._refs)
