"""Named registries: noises, architectures, datasets, training objectives, attacks and stages.

Each entry is declared next to its code (``NOISES.register("Gaussian", Gaussian)``, or as a
decorator); parameter validation, the command line, ``rslib status`` and the docs read the registry
instead of keeping their own lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

T = TypeVar("T")


class UnknownName(ValueError):
    """A name that no entry of the registry has; the message names the registry and the choices."""


class Registry(Generic[T]):
    """An ordered mapping of names to entries of one kind, filled by ``register``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str, entry: T) -> T: ...

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    def register(self, name: str, entry: T | None = None) -> T | Callable[[T], T]:
        """Add ``entry`` under ``name`` (or, without ``entry``, return a decorator that does);
        a name already taken is an error, so two entries never shadow each other."""
        if entry is None:
            return lambda decorated: self.register(name, decorated)
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register a temporary one)."""
        del self._entries[name]

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownName(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._entries)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs, in registration order."""
        return list(self._entries.items())

    def values(self) -> list[T]:
        """The entries, in registration order."""
        return list(self._entries.values())
