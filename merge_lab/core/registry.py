"""One registry class for every kind of plugin (merge strategies, evaluation suites).

A registry holds named classes of one base type. Built-ins and third-party packages register the
same way, through an entry-point group that is loaded once, the first time the registry is read;
`register()` adds one at run time (tests, notebooks). Unknown names get a did-you-mean error.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from merge_lab.errors import MergeLabError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Named classes of one kind. `check(cls)` raises TypeError for a class that does not qualify."""

    def __init__(self, group: str, kind: str, base: type, listing: str,
                 check: Callable[[type], None] | None = None) -> None:
        self.group = group  # the entry-point group third-party packages declare
        self.kind = kind  # "strategy", "suite": for messages
        self.base = base
        self.listing = listing  # the command that lists them, for messages
        self._check = check
        self._classes: dict[str, T] = {}
        self._loaded = False

    def register(self, cls: T, name: str | None = None) -> T:
        """Add `cls` under `name` (default: its `name` attribute); usable as a decorator."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{cls!r} is not a merge_lab {self.base.__name__} subclass")
        if self._check is not None:
            self._check(cls)
        self._classes[name or cls.name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Remove a class registered at run time (tests)."""
        self._classes.pop(name, None)

    def _load_plugins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for ep in entry_points(group=self.group):
            if ep.name in self._classes:
                continue
            try:
                self.register(ep.load(), ep.name)
            except Exception as e:
                raise MergeLabError(
                    f"{self.kind} plugin '{ep.name}' ({ep.value}) failed to load: {e}. "
                    "Reinstall or uninstall the package that provides it."
                ) from e

    def available(self) -> dict[str, T]:
        """Every registered class by name, sorted."""
        self._load_plugins()
        return dict(sorted(self._classes.items()))

    def __contains__(self, name: str) -> bool:
        return name in self.available()

    def get(self, name: str, where: str = "") -> T:
        """The class registered as `name`; else an error naming the closest names."""
        found = self.available()
        if name in found:
            return found[name]
        close = difflib.get_close_matches(name, found, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        prefix = f"{where}: " if where else ""
        raise MergeLabError(
            f"{prefix}unknown {self.kind} '{name}'.{hint} Available: {', '.join(found)}. "
            f"`{self.listing}` lists them."
        )
