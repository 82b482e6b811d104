"""One declarative schema for the options of every configurable thing: quantizers, pruners,
codecs and policies.

Each option is declared once, as a `Param` beside the class that takes it (its type, range,
choices, whether null is allowed, whether it is a list), and `check_options` validates a whole
set of options against that declaration, as scikit-learn's parameter constraints do. Every
path into a class (the Python constructor, a config read back from an archive, a CLI option)
goes through the same check, so a value of any type gives one ConfigError that names the
option, never a TypeError from deep inside.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
import reprlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlis.errors import ConfigError

_KINDS = ("int", "float", "bool", "str", "config", "path")


@dataclass(frozen=True)
class Param:
    """One option: ``kind`` is "int", "float" (finite), "bool", "str", "config" (a strategy
    or codec config: an id or a JSON object, validated by whoever builds from it) or "path"
    (a str or os.PathLike, kept as a Path).
    ``low``/``high`` bound numbers (open with ``low_open``/``high_open``), ``choices`` lists
    the allowed values, ``optional`` allows None, ``sequence`` takes a list or tuple of such
    values (returned as a tuple; ``non_empty`` refuses an empty one, ``items_optional``
    allows None items)."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    optional: bool = False
    sequence: bool = False
    non_empty: bool = False
    items_optional: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Param kind must be one of {_KINDS}, got {self.kind!r}")

    def describe(self) -> str:
        """What the option takes, in words (for error messages and docs)."""
        words = {"int": "an integer", "float": "a finite number", "bool": "true or false",
                 "str": "a string", "config": "a config (an id or a JSON object)",
                 "path": "a file path"}[self.kind]
        if self.choices:
            words = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.low is not None or self.high is not None:
            low = "-inf" if self.low is None else self._bound(self.low)
            high = "inf" if self.high is None else self._bound(self.high)
            words += (f" in {'(' if self.low_open or self.low is None else '['}{low}, "
                      f"{high}{')' if self.high_open or self.high is None else ']'}")
        if self.sequence:
            items = (f"items each {words}" if self.choices else _plural(words)) + (
                ", each may be null" if self.items_optional else "")
            words = f"a {'non-empty ' if self.non_empty else ''}list of {items}"
        return words + (" or null" if self.optional else "")

    def _bound(self, bound: float) -> str:
        return str(int(bound)) if self.kind == "int" else f"{bound:g}"

    def check(self, value: Any, name: str) -> Any:
        """``value`` as the class keeps it (floats as float, lists as tuples), or ConfigError."""
        if value is None and self.optional:
            return None
        if self.sequence:
            if not isinstance(value, list | tuple) or (self.non_empty and not value):
                raise self._refuse(value, name)
            return tuple(None if item is None and self.items_optional
                         else self._scalar(item, value, name) for item in value)
        return self._scalar(value, value, name)

    def _scalar(self, value: Any, given: Any, name: str) -> Any:
        if self.kind == "path":
            if not isinstance(value, str | os.PathLike) or isinstance(os.fspath(value), bytes):
                raise self._refuse(given, name)
            return Path(value)
        if self.kind == "config":
            if isinstance(value, str):
                return value
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise self._refuse(given, name)
            return dict(value)
        if not _is_kind(value, self.kind):
            raise self._refuse(given, name)
        if self.kind in ("int", "float"):  # numpy scalars too, kept as plain JSON numbers
            value = int(value) if self.kind == "int" else float(value)
        if self.choices and value not in self.choices:
            raise self._refuse(given, name)
        if not self._in_range(value):
            raise self._refuse(given, name)
        return value

    def _in_range(self, value: Any) -> bool:
        if self.low is not None and (value < self.low or self.low_open and value == self.low):
            return False
        return self.high is None or not (value > self.high or self.high_open
                                         and value == self.high)

    def _refuse(self, value: Any, name: str) -> ConfigError:
        return ConfigError(f"{name} must be {self.describe()}, got {shown(value)}")


def _plural(words: str) -> str:
    for one, many in (("an integer", "integers"), ("a finite number", "finite numbers"),
                      ("a string", "strings"), ("a config (an id", "configs (ids")):
        if words.startswith(one):
            return many + words[len(one):]
    return words


def shown(value: Any) -> str:
    """A value in a message: its repr, bounded in length and depth whatever it holds."""
    return _SHOWN.repr(value)


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 60


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "bool":
        return type(value) is bool
    if kind == "str":
        return isinstance(value, str)
    if isinstance(value, bool):  # bool is an int in Python, and never a number here
        return False
    if kind == "int":
        return isinstance(value, numbers.Integral)
    if not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def check_options(schema: Mapping[str, Param], options: Mapping[str, Any],
                  what: str) -> dict[str, Any]:
    """``options`` checked against ``schema``: an unknown name or a bad value is one
    ConfigError naming ``what`` and the option; the result holds the kept forms."""
    _refuse_unknown(schema, options, what)
    return {k: schema[k].check(v, f"{what}: {k}") for k, v in options.items()}


def check_callback(callback: Any, name: str) -> None:
    """Refuse a ``callback`` (a progress report) that cannot be called, up front: called
    only after a layer or a tensor is done, it failed once the work was."""
    if callback is not None and not callable(callback):
        raise ConfigError(f"{name} takes a callable(parameters done) or None, got "
                          f"{type(callback).__name__}")


def check_instance(value: Any, kind: type, name: str) -> None:
    """Refuse a ``value`` other than None or a ``kind`` (a worker object such as a
    `Cluster`), which was used later as one: an AttributeError deep inside."""
    if value is not None and not isinstance(value, kind):
        raise ConfigError(f"{name} takes a {kind.__name__} or None, got {type(value).__name__}")


def _refuse_unknown(schema: Mapping[str, Param], names: Iterable[str], what: str) -> None:
    unknown = sorted(str(k) for k in names if k not in schema)
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r} for {what}; known: "
                          f"{', '.join(schema) or 'none'}")


def config_id(config: object, kind: str) -> tuple[str, dict[str, Any]]:
    """The id and the options of a strategy or codec config: a bare id string, or a JSON
    object with a string ``"id"``."""
    if isinstance(config, str):
        return config, {}
    if not isinstance(config, Mapping) or not isinstance(config.get("id"), str):
        raise ConfigError(f"a {kind} is a name or a config with a string 'id', got "
                          f"{shown(config)}")
    return config["id"], {k: v for k, v in config.items() if k != "id"}


@functools.cache
def init_parameters(cls: type) -> tuple[str, ...]:
    """The parameters of ``cls.__init__`` that a config records (not self, ``*args`` or
    ``**kwargs``): read once per class, since `inspect.signature` costs more than building
    the config (a data-free pack asks for hundreds)."""
    params = inspect.signature(cls.__init__).parameters
    return tuple(name for name, param in params.items() if name != "self"
                 and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD))


def checked_init(cls: type, what: Callable[[], str]) -> None:
    """Make ``cls.__init__`` check its arguments against ``cls.params`` first, so direct
    construction and `from_config` refuse the same values the same way. Every parameter of
    ``__init__`` must be declared (a class that declares none is left as it is)."""
    init = cls.__dict__.get("__init__")
    schema: Mapping[str, Param] = cls.__dict__.get("params", {})
    if init is None or not schema:
        return
    signature = inspect.signature(init)
    names = [n for n in signature.parameters if n != "self"]
    if set(names) != set(schema):
        raise TypeError(f"{cls.__name__}.params must declare exactly {names}")

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        _refuse_unknown(schema, kwargs, what())
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as err:
            raise ConfigError(f"{what()}: {err}") from None
        options = {k: v for k, v in bound.arguments.items() if k != "self"}
        init(self, **check_options(schema, options, what()))

    cls.__init__ = checked
