"""Name -> class registries for strategies and codecs, open to third parties via entry points.

A package adds a strategy either by calling ``registry.register`` at import time or by
declaring an entry point in the registry's group (for example ``qlis.quantizers``), which is
loaded the first time a name is looked up and not found.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from qlis.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from a short id to a class, with lazy loading of entry points."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._classes: dict[str, type[T]] = {}
        self._entry_points_loaded = False

    def register(self, name: str, cls: type[T] | None = None) -> Callable[[type[T]], type[T]]:
        """Register ``cls`` under ``name``; usable as a decorator (``@registry.register("x")``)."""

        def add(klass: type[T]) -> type[T]:
            self._classes[name] = klass
            return klass

        if cls is not None:
            add(cls)
        return add

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; a ConfigError lists the known names otherwise."""
        if name not in self._classes:
            self._load_entry_points()
        try:
            return self._classes[name]
        except KeyError:
            known = ", ".join(sorted(self._classes)) or "none"
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        """All registered names, entry points included."""
        self._load_entry_points()
        return sorted(self._classes)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            self._classes.setdefault(ep.name, ep.load())
