"""Helpers for testing the protocol state machines' transition tables (ICE, DTLS)."""

from __future__ import annotations

import ast
import enum
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Any, TypeVar

import pytest

S = TypeVar("S", bound=enum.Enum)


def edges(table: Mapping[S, frozenset[S]]) -> set[tuple[S, S]]:
    """Every ``(from, to)`` a transition table allows."""
    return {(old, new) for old, targets in table.items() for new in targets}


def forbidden(table: Mapping[S, frozenset[S]]) -> list[tuple[S, S]]:
    """Every ``(from, to)`` between the table's states that it does not allow."""
    allowed = edges(table)
    return [(old, new) for old in table for new in table if (old, new) not in allowed]


def state_writers(module: ModuleType, attribute: str = "_state") -> set[str]:
    """Names of the functions in ``module`` that assign ``<something>.<attribute>``."""
    writers: set[str] = set()
    tree = ast.parse(inspect.getsource(module))
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        for node in ast.walk(function):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            if any(isinstance(t, ast.Attribute) and t.attr == attribute for t in targets):
                writers.add(function.name)
    return writers


@contextmanager
def recording(
    monkeypatch: pytest.MonkeyPatch, cls: type[Any], state: Callable[[Any], S]
) -> Iterator[set[tuple[S, S]]]:
    """Record every ``(from, to)`` that instances of ``cls`` pass to ``_set_state``."""
    driven: set[tuple[S, S]] = set()
    original = cls._set_state

    def set_state(self: Any, new: S) -> None:
        driven.add((state(self), new))
        original(self, new)

    with monkeypatch.context() as patch:
        patch.setattr(cls, "_set_state", set_state)
        yield driven
