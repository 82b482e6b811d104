"""JSON that users give, read with bounds: every entry point of both commands goes through here.

Python's ``json`` recurses once per nesting level (a deep input is a RecursionError), takes NaN
and Infinity, and ``Path.read_text`` reads whatever the path names (a huge file or /dev/zero
exhausts memory, a FIFO blocks forever). Here each of those is one InputError that names the
option and the problem, found before any work is done.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from qlis.archive.format import finite_float, reject_constant
from qlis.cli.console import escape
from qlis.errors import InputError
from qlis.regular_files import read_small_file

MAX_DEPTH = 64  # a plan nests 4 levels; the limit is far below the interpreter's recursion limit
MAX_TEXT_CHARS = 1 << 20  # an option's value (the command line itself holds a few MiB at most)
MAX_FILE_BYTES = 1 << 24  # 16 MiB: a plan of 100,000 layers

_FLOAT_DIGITS = 308  # the largest float is 1.8e308
# A JSON string, possessive so that it is matched in one pass; an unterminated one runs to the end.
_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_JSON_NAMES: dict[type, str] = {
    dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
    float: "number", type(None): "null",
}


class JSONSyntaxError(InputError):
    """Text that is not JSON at all (an option that also takes plain strings catches this one);
    JSON that breaks a limit raises a plain InputError."""


def _given(value: object) -> str:
    """What a parsed JSON value is, in JSON's words: "an array", "null"."""
    name = _JSON_NAMES[type(value)]
    return name if value is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _has_type(value: object, expected_type: type) -> bool:
    """JSON's types are exact (true is no integer); a number may be written as an integer."""
    return type(value) is expected_type or (expected_type is float and type(value) is int)


def _check_depth(text: str, subject: str, max_depth: int) -> None:
    """Refuse nesting deeper than ``max_depth`` without recursing: brackets inside strings are
    removed, the rest counted in one loop that stops at the first level too deep."""
    depth = 0
    for bracket in _NOT_BRACKET.sub("", _STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > max_depth:
            raise InputError(f"{subject} nests deeper than {max_depth} levels")


def float_sized_int(token: str) -> int:
    """``json.loads``' parse_int: an integer that a float can hold (one beyond that would be
    infinite as a number; past 4,300 digits Python's own refusal tells the user to raise its
    limit)."""
    digits = len(token.lstrip("-"))
    if digits > _FLOAT_DIGITS:
        raise ValueError(f"an integer of {digits} digits is out of range (more than "
                         f"{_FLOAT_DIGITS})")
    return int(token)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object_pairs_hook for every JSON qlis reads: an object, refusing a key
    given twice with a ValueError (json keeps the last: a plan naming a layer twice, a config
    giving ``bits`` twice or a shard index naming a tensor's shard twice lost one unseen)."""
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise ValueError(f"the key {escape(key[:200])!r} is given twice in one object: "
                             "give it once")
        value[key] = item
    return value


def _parse(text: str, subject: str, expected_type: type | None, max_depth: int,
           example: str | None) -> Any:
    _check_depth(text, subject, max_depth)
    try:
        value = json.loads(text, parse_constant=reject_constant, parse_float=finite_float,
                           parse_int=float_sized_int, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno} column {err.colno}" if "\n" in text else f"column {err.colno}"
        hint = f", e.g. '{example}'" if example else ""
        raise JSONSyntaxError(f"{subject} must be JSON ({err.msg}: {where}){hint}") from None
    except ValueError as err:  # a number or a repeated key refused by a hook
        raise InputError(f"{subject}: {err}") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{subject} holds a \\u escape that is not a character "
                         "(a lone surrogate)") from None
    if expected_type is not None and not _has_type(value, expected_type):
        raise InputError(f"{subject} must be a JSON {_JSON_NAMES[expected_type]}, "
                         f"got {_given(value)}")
    return value


def parse_json_text(text: str, what: str, expected_type: type | None = None, *,
                    max_chars: int = MAX_TEXT_CHARS, max_depth: int = MAX_DEPTH,
                    example: str | None = None) -> Any:
    """The JSON value an option's text holds (``what`` names the option in every message).

    Refused, as an InputError: text longer than ``max_chars``, nesting deeper than
    ``max_depth``, NaN, Infinity and numbers beyond a float's range, and a value that is not of
    ``expected_type``. Text that is not JSON at all is a JSONSyntaxError (``example`` is shown).
    """
    if len(text) > max_chars:
        raise InputError(f"{what} is longer than {max_chars:,} characters")
    return _parse(text, what, expected_type, max_depth, example)


def read_json_file(path: str | os.PathLike, what: str, max_bytes: int = MAX_FILE_BYTES,
                   expected_type: type | None = None, *, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value of the file ``path``, given as option ``what`` (named in every message).

    Only a regular file of at most ``max_bytes`` is read, as strict UTF-8 (a byte order mark is
    allowed); the value has the limits of `parse_json_text`.
    """
    subject = f"{what} {escape(os.fspath(path))}"
    data = read_small_file(path, max_bytes, subject, "a JSON file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{subject} is not UTF-8 text (invalid byte at offset {err.start}); "
                         "give a JSON file") from None
    return _parse(text, subject, expected_type, max_depth, None)
