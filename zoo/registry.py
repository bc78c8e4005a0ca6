"""One registry type for everything found by name: architectures, data sets, metric families,
benchmark methods and protocols. A registry reads like the dict it replaces (`name in R`,
`R[name]`, `R.values()`), and refuses a second definition under a name already taken, naming
both, so a task hook cannot silently replace a built-in method."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from .errors import ZooError

T = TypeVar("T")


def definition_site(function: Callable) -> str:
    """Where `function` is defined: `module.name (file:line)`."""
    code = getattr(function, "__code__", None)
    place = f" ({code.co_filename}:{code.co_firstlineno})" if code else ""
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}{place}"


class Registry(Mapping[str, T], Generic[T]):
    """Entries of one `kind` ("architecture", "method", ...) by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._sites: dict[str, str] = {}

    def add(self, name: str, entry: T, definition: Callable) -> None:
        """Register `entry` under `name`; `definition` is the function that defines it."""
        site = definition_site(definition)
        if name in self._entries:
            raise ZooError(f"{self.kind} {name!r} is defined twice: by {self._sites[name]} and by {site}")
        self._entries[name] = entry
        self._sites[name] = site

    def find(self, name: str, where: str = "") -> T:
        """The entry `name`, or one line naming the known ones."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            prefix = f"{where}: " if where else ""
            raise ZooError(f"{prefix}unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}") from None

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
