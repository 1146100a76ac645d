"""A setting of a mutable attrs class that is fixed at construction, without attrs' per-assignment
hook (see :class:`Fixed`): what the per-frame state machines of :mod:`sessions.audio.pacer` and
:mod:`sessions.audio.jitter` use for their settings."""

from __future__ import annotations

from typing import Generic, TypeVar, final, overload

import attrs

__all__ = ["Fixed"]

_T = TypeVar("_T")


@final
class Fixed(Generic[_T]):
    """A setting fixed at construction (of :class:`~sessions.audio.pacer.Pacer` and
    :class:`~sessions.audio.jitter.JitterBuffer`): reads the attrs field of the same name with
    a leading underscore (whose ``__init__`` argument has the public name), and refuses an
    assignment as a frozen attrs field does.

    Why not ``on_setattr=attrs.setters.frozen``: a hook on any field (that one, or the
    validation ``attrs.define`` runs by default) makes attrs route *every* assignment to the
    instance through a Python ``__setattr__``, about 0.5 us each, and these classes change a
    few fields on every 20 ms frame of every session. They are defined with
    ``on_setattr=attrs.setters.NO_OP`` (validators run at construction) and this descriptor.
    """

    __slots__ = ("_field",)

    def __set_name__(self, owner: type, name: str) -> None:
        self._field = "_" + name

    @overload
    def __get__(self, instance: None, owner: type) -> Fixed[_T]: ...

    @overload
    def __get__(self, instance: object, owner: type) -> _T: ...

    def __get__(self, instance: object | None, owner: type) -> _T | Fixed[_T]:
        if instance is None:
            return self
        value: _T = getattr(instance, self._field)
        return value

    def __set__(self, instance: object, value: _T) -> None:
        raise attrs.exceptions.FrozenAttributeError()
