"""One small registry for every kind of pluggable thing (corruptions, noise
families, later attacks, architectures, quantizers).

Register by decorator, list with a glob filter, and an unknown name answers
with the closest registered names instead of a bare KeyError.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Generic, Iterator, TypeVar

from qrobust.shared.errors import QrobustError

T = TypeVar("T")


class UnknownNameError(QrobustError, KeyError):
    """Raised for a name that is not registered; the message suggests close names."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want plain text
        return str(self.args[0])


class Registry(Generic[T]):
    """A name -> object mapping for one kind of thing.

    >>> corruptions = Registry("corruption")
    >>> @corruptions.register("blur")
    ... def blur(x): return x
    >>> corruptions.names("bl*")
    ['blur']
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator that registers its target under ``name`` (default: its ``__name__``)."""

        def decorate(obj: T) -> T:
            self.add(name or obj.__name__, obj)
            return obj

        return decorate

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def find(self, name: str) -> T | None:
        """The item registered as ``name``, or None."""
        return self._items.get(name)

    def in_order(self) -> list[str]:
        """The registered names in the order they were registered (a catalogue's own order)."""
        return list(self._items)

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._items, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        return (f"unknown {self.kind} {name!r}.{hint} "
                f"Available: {', '.join(sorted(self._items))}")

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style glob, sorted."""
        return sorted(n for n in self._items if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
