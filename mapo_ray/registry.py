"""Name -> function registries for estimators and losses (the verl ``core_algos`` pattern).

A new variant is one function and one decorator line::

    @ADVANTAGE_ESTIMATORS.register("my_estimator")
    def my_estimator(scores, stats, generator): ...
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A named table of functions of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._table: dict[str, F] = {}

    def register(self, *names: str) -> Callable[[F], F]:
        def wrap(fn: F) -> F:
            for name in names:
                if name in self._table:
                    raise ValueError(f"{self.kind} {name!r} is already registered")
                self._table[name] = fn
            return fn

        return wrap

    def check(self, name: str, key: str | None = None) -> None:
        """Raise ``ValueError`` naming ``key``, the bad name and the valid ones."""
        if name in self._table:
            return
        close = difflib.get_close_matches(name, self._table, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        where = f"{key}: " if key else ""
        raise ValueError(f"{where}unknown {self.kind} {name!r}{hint} (registered: {', '.join(self.names())})")

    def get(self, name: str) -> F:
        self.check(name)
        return self._table[name]

    def names(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, name: str) -> bool:
        return name in self._table
