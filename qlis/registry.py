"""Name -> class registries for strategies and codecs, open to third parties via entry points.

A package adds a strategy either by calling ``registry.register`` at import time or by
declaring an entry point in the registry's group (for example ``qlis.quantizers``).

Entry points are other people's code, so they load lazily and fail alone: listing the names
reads only the installed packages' metadata, and an entry point is imported the first time
its name is looked up. One that cannot be imported, or does not give a subclass of the
registry's base class, is a ConfigError for that name only; every other name and command
keeps working. What qlis ignores (a package whose metadata cannot be read, an entry point
hidden by a registered name or by another package's) is a `PluginWarning`.
"""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import Distribution, EntryPoint, distributions
from typing import Any, Generic, Literal, TypeVar

from qlis.config import shown
from qlis.errors import ConfigError, QlisError, first_line

T = TypeVar("T")


class PluginWarning(UserWarning):
    """An entry point qlis ignores: unreadable, or hidden by a registered or earlier one."""


@dataclass
class _Plugin:
    """The entry points that declare one name (the first is used) and what loading it gave."""

    entry_points: list[EntryPoint]
    cls: type | None = None
    error: str | None = None
    warned: bool = False


class Registry(Generic[T]):
    """A mapping from a short id to a class, with lazy loading of entry points.

    ``base`` is the class every entry point must give a subclass of, so that a plugin with
    the wrong interface is refused by name when it loads, not deep inside a compression.
    ``builtins`` names qlis' own modules that register classes here from outside the
    registry's module (which cannot import them: they import it); they are imported at the
    first lookup, as the entry points are.
    """

    def __init__(self, kind: str, group: str, base: type[Any] = object,
                 builtins: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.group = group
        self.base = base
        self._builtins = builtins
        self._classes: dict[str, type[T]] = {}
        # False until the group is read; then its entry points by name. Setting it back to
        # False reads them afresh.
        self._entry_points_loaded: dict[str, _Plugin] | Literal[False] = False

    def register(self, name: str, cls: type[T] | None = None) -> Callable[[type[T]], type[T]]:
        """Register ``cls`` under ``name``; usable as a decorator (``@registry.register("x")``).

        Archives name what made them by id, so a name is never taken from qlis' own class
        (its archives would be read by another): that is a ConfigError, and another package's
        class replaced by a third is a PluginWarning.
        """

        def add(klass: type[T]) -> type[T]:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{_qualname(klass)} needs a non-empty string id to be "
                                  f"registered as a {self.kind}, got {name!r}")
            if not is_builtin(klass):  # qlis' own first: a plugin cannot take their names
                self._import_builtins()
            old = self._classes.get(name)
            if old is not None and old is not klass:
                if is_builtin(old):
                    raise ConfigError(f"{self.kind} {name!r} is qlis' own ({_qualname(old)}); "
                                      f"register {_qualname(klass)} under another id")
                warnings.warn(f"{self.kind} {name!r}: {_qualname(klass)} replaces "
                              f"{_qualname(old)}", PluginWarning, stacklevel=3)
            self._classes[name] = klass
            return klass

        if cls is not None:
            add(cls)
        return add

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``, else the one its entry point gives.

        A ConfigError names the package and entry point that cannot be loaded, or lists the
        known names when nothing declares ``name``.
        """
        self._import_builtins()
        plugin = self._entry_points().get(name)
        if name in self._classes:
            if plugin is not None:
                self._warn_once(plugin, f"{self.kind} {name!r} is registered by qlis or an "
                                        f"imported module; ignoring "
                                        f"{_describe_all(plugin.entry_points)}")
            return self._classes[name]
        if plugin is None:
            known = ", ".join(self.names()) or "none"
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}")
        if len(plugin.entry_points) > 1:
            first, *others = plugin.entry_points
            self._warn_once(plugin, f"{self.kind} {name!r} is declared more than once: using "
                                    f"{_describe(first)}, ignoring {_describe_all(others)}")
        return self._load(name, plugin)

    def names(self) -> list[str]:
        """All registered names and entry-point names, without importing any entry point."""
        self._import_builtins()
        return sorted({*self._classes, *self._entry_points()})

    def _import_builtins(self) -> None:
        builtins, self._builtins = self._builtins, ()
        for module in builtins:
            importlib.import_module(module)

    def _entry_points(self) -> dict[str, _Plugin]:
        if self._entry_points_loaded is False:
            found: dict[str, _Plugin] = {}
            for ep in entry_points(group=self.group):
                found.setdefault(ep.name, _Plugin([])).entry_points.append(ep)
            self._entry_points_loaded = found
        return self._entry_points_loaded

    def _load(self, name: str, plugin: _Plugin) -> type[T]:
        """The class the first entry point gives: imported once, a failure kept and repeated."""
        if plugin.cls is None and plugin.error is None:
            ep = plugin.entry_points[0]
            found = self._import(ep)
            if isinstance(found, str):
                plugin.error = f"{self.kind} {name!r}: cannot use {_describe(ep)}: {found}"
            else:
                plugin.cls = found
        if plugin.error is not None:
            raise ConfigError(plugin.error)
        return plugin.cls

    def _import(self, ep: EntryPoint) -> type[T] | str:
        """The subclass of the registry's base that ``ep`` gives, or why it cannot be used."""
        try:
            obj = ep.load()
        except Exception as err:  # any failure of third-party code, but not Ctrl-C
            return f"importing it raised {_exception_text(err)}"
        if not isinstance(obj, type):
            return f"it gives {_qualname(obj)}, a {type(obj).__name__}, not a class"
        if not issubclass(obj, self.base):
            return f"{_qualname(obj)} is not a subclass of {_qualname(self.base)}"
        return obj

    def _warn_once(self, plugin: _Plugin, message: str) -> None:
        if not plugin.warned:
            plugin.warned = True
            warnings.warn(message, PluginWarning, stacklevel=3)


def entry_points(*, group: str) -> list[EntryPoint]:
    """The installed packages' entry points in ``group``, sorted by package name, so which of
    two packages declaring a name wins does not depend on sys.path.

    Unlike ``importlib.metadata.entry_points``, each package's metadata is read on its own:
    one that cannot be read is a PluginWarning, and the other packages still count. A
    package installed twice counts once, as the first on sys.path (the one Python imports).
    """
    dists = list(distributions())
    if not any(_may_declare(dist, group) for dist in dists):
        return []  # the common case, settled without reading any package's METADATA
    found: list[tuple[str, EntryPoint]] = []
    seen: set[str] = set()
    for dist in dists:
        name = _package_name(dist)
        key = re.sub(r"[-_.]+", "-", name).casefold()
        if key in seen:
            continue
        seen.add(key)
        try:
            eps = list(dist.entry_points.select(group=group))
        except Exception as err:  # a malformed entry_points.txt, for one
            # The same text from the same line for every registry: Python shows it once.
            warnings.warn(f"ignoring the entry points of package {name!r}: its metadata "
                          f"cannot be read: {_exception_text(err)}", PluginWarning, stacklevel=2)
        else:
            found.extend((key, ep) for ep in eps)
    return [ep for _, ep in sorted(found, key=lambda pair: pair[0])]


def _may_declare(dist: Distribution, group: str) -> bool:
    """Whether ``dist`` declares entry points in ``group``, or cannot say (then the full scan
    warns about it): entry_points.txt alone, a tenth of the time of reading every name."""
    try:
        return bool(dist.entry_points.select(group=group))
    except Exception:  # a malformed entry_points.txt: the scan that names the package says so
        return True


def _package_name(dist: Distribution) -> str:
    try:
        return dist.name or "?"
    except Exception:  # unreadable METADATA must not stop the other packages
        return "?"


def _describe(ep: EntryPoint) -> str:
    # getattr: an entry point made by hand, or a stand-in with only name and load, is fine.
    dist = getattr(ep, "dist", None)
    package = f"package {_package_name(dist)!r}" if dist is not None else "an unknown package"
    return f"entry point '{ep.name} = {getattr(ep, 'value', '?')}' of {package}"


def _describe_all(eps: list[EntryPoint]) -> str:
    return " and ".join(_describe(ep) for ep in eps)


def _qualname(obj: object) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    module = getattr(obj, "__module__", None)
    if module and name:
        return f"{module}.{name}"
    return name or repr(obj)


def _exception_text(err: Exception) -> str:
    """``Type: message`` on one line (the CLI prints an error as a single line)."""
    return " ".join(f"{type(err).__name__}: {err}".split())


def construct(cls: type[T], params: dict[str, Any], label: str, unfit: str) -> T:
    """``cls(**params)`` for a config read from an archive or a command line: parameters the
    class does not take are a ConfigError (``unfit`` says for what), and whatever a plugin's
    ``__init__`` raises is one ConfigError naming it (``label``); qlis' own classes' failures
    are bugs, shown as they are."""
    try:
        return cls(**params)
    except TypeError as err:
        raise ConfigError(f"{unfit}: {err}") from None
    except QlisError:
        raise
    except Exception as err:
        if is_builtin(cls):
            raise
        raise ConfigError(f"{label} cannot be built from {shown(params)} "
                          f"({type(err).__name__}: {first_line(err)})") from None


def is_builtin(strategy: object) -> bool:
    """Whether a registered class, or its instance (a codec, quantizer, pruner), is qlis' own,
    whose failures are bugs to show as they are, not a plugin's, whose failures are named as
    its."""
    cls = strategy if isinstance(strategy, type) else type(strategy)
    return cls.__module__.split(".")[0] == "qlis"
