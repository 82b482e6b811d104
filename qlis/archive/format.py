"""The ``.qlis`` format's constants, limits and header schema (specification: docs/format.md).

Everything a reader must check before it allocates or decodes anything lives here: the JSON
header is scanned for size, nesting and item count before it is parsed, then validated
against the schema of its version (2, 3 with tied tensors, 4 with row classes, 5 with the
header deflated), and the bytes the tensors
will take once decoded are summed from the declared shapes and checked against a limit the
caller can raise. The writer runs the same checks on what it is about to write, so qlis
never writes a file it would refuse.

It imports neither torch nor the codecs: the loaders pass a `ConfigLookup` that builds each
codec and quantizer config, a listing (``qlis info``) checks their form only.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
from crc32c import crc32c as _library_crc32c

from qlis.config import shown
from qlis.errors import ArchiveError, QlisError
from qlis.regular_files import open_regular_file

MAGIC = b"\x89QLIS\r\n\x1a"
VERSION = 2  # the first version this reader reads
ALIASES_VERSION = 3  # version 2 + the header's `aliases` (tied tensors stored once)
ROW_CLASSES_VERSION = 4  # version 3 + ans streams coded in row classes (docs/codecs.md)
COMPACT_VERSION = 5  # version 4, its header deflated, its records 8-byte aligned: what qlis writes
READABLE_VERSIONS = (VERSION, ALIASES_VERSION, ROW_CLASSES_VERSION, COMPACT_VERSION)
PREFIX = struct.Struct("<8sIIQQ")  # magic, version, header crc32c, header length, data length
ALIGN = 64  # where the data section starts, and where records did through version 4
RECORD_ALIGN = 8  # where records start from version 5 on

MAX_HEADER_BYTES = 64 << 20
MAX_JSON_DEPTH = 64
MAX_JSON_ITEMS = 10_000_000  # '[', '{', ',' and ':' outside strings
MAX_INT_DIGITS = 19  # every JSON integer fits in a signed 64-bit integer
MAX_DIMS = 32
MAX_ELEMENTS = 1 << 53  # product of the dimensions, zeros counted as ones
MAX_LEVELS = 1 << 16
DEFAULT_MAX_DECODED_BYTES = 64 << 30

DTYPE_SIZES: dict[str, int] = {  # the stored dtypes, by name, with their bytes per element
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8,
    "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "bool": 1,
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
PARAM_DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}

_TOP_KEYS = {
    "format", "version", "writer", "metadata", "compression", "distortion", "summary",
    "aliases", "tensors",
}
_ENTRY_KEYS = {"name", "shape", "dtype", "codec", "data", "plan"}
_QUANTIZED_KEYS = _ENTRY_KEYS | {"quantizer", "n_levels", "params"}
_ENTRY_REQUIRED = {"shape", "dtype", "codec", "data"}
_QUANTIZED_REQUIRED = _ENTRY_REQUIRED | {"n_levels", "params"}
_RECORD_KEYS = {"offset", "length", "crc32c"}
_PARAM_KEYS = _RECORD_KEYS | {"shape", "dtype"}
_PLAN_KEYS = {"k", "bits", "qlis", "pruner", "quantizer", "reconstruction"}
_SCALAR = (type(None), bool, int, float, str)
_SCAN_CHUNK = 1 << 20
# Where a number could be out of range (a run of over MAX_INT_DIGITS digits or a three-digit
# exponent, looked for everywhere, strings included): only then is each number parsed by hand.
_NUMBER_CHARS = bytes.maketrans(b"0123456789eE+-", b"0000000000ee++")
_LARGE_NUMBERS = (b"0" * (MAX_INT_DIGITS + 1), b"e000", b"e+000")


def element_size(dtype_name: str) -> int:
    """Bytes per element of a stored dtype (bool: one byte)."""
    return DTYPE_SIZES[dtype_name]


_CODE_DTYPES = (np.dtype(np.uint8), np.dtype("<u2"))


def code_dtype(n_levels: int) -> np.dtype:
    """The width of quantized codes, derived from the alphabet: uint8 up to 256 levels, else
    uint16 (up to 65536)."""
    return _CODE_DTYPES[n_levels > 256]


def aligned(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def record_alignment(version: int) -> int:
    """Where a version's records start: 64 bytes apart through version 4, 8 from version 5
    on (as safetensors' tensors), since padding a small record (a step, a zero point) to 64
    bytes had become a sixth of a small model's archive at 16x."""
    return RECORD_ALIGN if version >= COMPACT_VERSION else ALIGN


# -- JSON: scanned before it is parsed --------------------------------------------------------


def reject_constant(name: str) -> None:
    """``json.loads``' parse_constant for every JSON qlis reads: NaN and Infinity are refused."""
    raise ValueError(f"{name} is not a finite number")


def finite_float(text: str) -> float:
    """``json.loads``' parse_float for every JSON qlis reads: 1e999 is refused, not inf."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range (not a finite number)")
    return value


def _small_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer {text[:20]}... has more than {MAX_INT_DIGITS} digits")
    return int(text)


def scan_json(raw: bytes) -> int:
    """Refuse, without parsing, a header that would be costly to parse: over the size cap,
    not ASCII, nested deeper than MAX_JSON_DEPTH or with more than MAX_JSON_ITEMS items.
    Returns the number of colons outside strings: in valid JSON, the number of object
    members, which `parse_header` compares with the keys it got to find repeated keys.

    One pass in 1 MiB chunks (a few tens of MB at most, whatever the header), counting only
    the brackets, commas and colons outside strings.
    """
    if len(raw) > MAX_HEADER_BYTES:
        raise ArchiveError(f"header of {len(raw)} bytes: over the {MAX_HEADER_BYTES >> 20} MiB cap")
    if not raw.isascii():
        raise ArchiveError("corrupt header (not ASCII JSON)")
    return _scan_escaped(raw) if b"\\" in raw else _scan_plain(raw)


def _check_counts(items: int, depth: int, brackets: bytes) -> int:
    """The nesting after ``brackets`` (the brackets outside strings, in order) from ``depth``;
    ArchiveError past either cap."""
    if items > MAX_JSON_ITEMS:
        raise ArchiveError(f"header has over {MAX_JSON_ITEMS} JSON items (the cap)")
    if not brackets:
        return depth
    steps = np.frombuffer(brackets, np.uint8)
    levels = np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1)) + depth
    if int(levels.max()) > MAX_JSON_DEPTH:
        raise ArchiveError(f"header nests deeper than {MAX_JSON_DEPTH} levels")
    return int(levels[-1])


def _scan_plain(raw: bytes) -> int:
    """`scan_json` of a header without a backslash, where every quote opens or closes a
    string, so the parity of the quotes so far says "inside a string" (names seldom hold a
    backslash, and this is a few times faster than `_scan_escaped`)."""
    depth = items = members = 0
    in_string = 0
    for start in range(0, len(raw), _SCAN_CHUNK):
        chunk = np.frombuffer(raw, np.uint8, min(_SCAN_CHUNK, len(raw) - start), start)
        quotes = chunk == ord('"')
        inside = (np.cumsum(quotes, dtype=np.uint8) + in_string) & 1  # parity survives wrap
        in_string = int(inside[-1])
        outside = chunk[(inside == 0) & ~quotes]
        colons = int(np.count_nonzero(outside == ord(":")))
        members += colons
        brackets = outside[(outside == ord("[")) | (outside == ord("{")) | (outside == ord("]"))
                           | (outside == ord("}"))].tobytes()
        items += colons + int(np.count_nonzero(outside == ord(","))) + (
            brackets.count(b"[") + brackets.count(b"{"))
        depth = _check_counts(items, depth, brackets)
    return members


def _scan_escaped(raw: bytes) -> int:
    """`scan_json` of any header, vectorised: quotes not escaped by an odd run of
    backslashes toggle "inside a string"."""
    depth = items = members = 0
    in_string, backslashes = 0, 0  # carried from one chunk to the next
    for start in range(0, len(raw), _SCAN_CHUNK):
        chunk = np.frombuffer(raw, np.uint8, min(_SCAN_CHUNK, len(raw) - start), start)
        index = np.arange(chunk.size)
        is_backslash = chunk == ord("\\")
        last_other = np.maximum.accumulate(np.where(is_backslash, -1, index))
        run = np.empty(chunk.size, dtype=np.int64)  # backslashes just before each byte
        run[0] = backslashes
        run[1:] = index[:-1] - last_other[:-1]
        run[1:] += np.where(last_other[:-1] < 0, backslashes, 0)
        quotes = (chunk == ord('"')) & (run % 2 == 0)
        inside = (np.cumsum(quotes, dtype=np.int64) + in_string) % 2 == 1
        outside = ~inside & ~quotes
        colons = int(np.count_nonzero(outside & (chunk == ord(":"))))
        members += colons
        is_bracket = ((chunk == ord("[")) | (chunk == ord("{")) | (chunk == ord("]"))
                      | (chunk == ord("}")))
        brackets = chunk[outside & is_bracket].tobytes()
        items += colons + int(np.count_nonzero(outside & (chunk == ord(",")))) + (
            brackets.count(b"[") + brackets.count(b"{"))
        depth = _check_counts(items, depth, brackets)
        in_string = int(inside[-1])
        tail = int(last_other[-1])
        backslashes = backslashes + chunk.size if tail < 0 else chunk.size - 1 - tail
    return members


@contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Python's cycle collector paused: building a tree of 100,000 entries would otherwise
    run it over and over (each run walks every object made so far) and find nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def non_finite_path(value: object, path: str = "header") -> str | None:
    """Where a NaN or infinity hides in plain JSON data (the writer names it in its error)."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return where
        if isinstance(item, dict):
            stack.extend((v, f"{where}.{k}") for k, v in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
    return None


# -- the header schema ------------------------------------------------------------------------


def _fail(where: str, what: str) -> ArchiveError:
    return ArchiveError(f"{where}: {what}")


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is an int in Python, and never a valid size


def _is_number(value: object) -> bool:
    return type(value) in (int, float)


def _object(value: object, where: str, keys: set[str] | None = None) -> dict:
    if not isinstance(value, dict):
        raise _fail(where, "not a JSON object")
    if keys is not None and not keys.issuperset(value):
        raise _fail(where, f"unknown field {sorted(set(value) - keys)[0]!r}")
    return value


_MAX_INT64 = (1 << 63) - 1


def _integer(value: object, where: str, low: int = 0, high: int = _MAX_INT64) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise _fail(where, f"must be an integer in [{low}, {high}], got {shown(value)}")
    return value


def _optional_number(value: object, where: str) -> None:
    if value is not None and not _is_number(value):
        raise _fail(where, f"must be a number or null, got {type(value).__name__}")


def shape_numel(shape: object, where: str) -> int:
    """Element count of a declared shape: a list of at most MAX_DIMS non-negative integers."""
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise _fail(where, f"shape must be a list of at most {MAX_DIMS} dimensions")
    bound = 1
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= MAX_ELEMENTS:
            _integer(dim, f"{where} shape", 0, MAX_ELEMENTS)  # raises, naming the bounds
        bound *= dim or 1
        if bound > MAX_ELEMENTS:
            raise _fail(where, f"shape {shape[:8]} is too large")
    return math.prod(shape)


def _flat_config(value: object, where: str) -> dict:
    """A strategy or codec config: a string id and scalar parameters (nothing nested)."""
    config = _object(value, where)
    if not isinstance(config.get("id"), str):
        raise _fail(where, "needs a string 'id'")
    if not all(isinstance(v, _SCALAR) for v in config.values()):
        raise _fail(where, "parameters must be scalars (nested configs are not allowed)")
    return config


class Record(NamedTuple):
    """Where one record lies in the data section (relative to its start), and its CRC-32C.
    (Named tuples, here and below: a header of 100,000 tensors builds them in a fraction of
    a frozen dataclass's time.)"""

    offset: int
    length: int
    crc32c: int

    def to_json(self) -> dict[str, int]:
        """The record as the header stores it (the writer's form)."""
        return {"offset": self.offset, "length": self.length, "crc32c": self.crc32c}


class ParamRecord(NamedTuple):
    """A quantizer parameter's record, with the dtype and shape its bytes hold."""

    record: Record
    dtype: str
    shape: tuple[int, ...]


_NO_PARAMS: Mapping[str, ParamRecord] = MappingProxyType({})


class TensorEntry(NamedTuple):
    """One validated tensor entry: every reader (dequantizing loader, low-bit runtime, info)
    consumes these, never the raw JSON, so nothing unchecked reaches an allocation."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    codec: Mapping[str, Any]
    data: Record
    numel: int
    quantizer: Mapping[str, Any] | None = None
    n_levels: int | None = None
    params: Mapping[str, ParamRecord] = _NO_PARAMS
    plan: Mapping[str, Any] | None = None

    @property
    def stored_bytes(self) -> int:
        """Bytes of its records in the file (codes or values, plus parameters)."""
        if not self.params:
            return self.data.length
        return self.data.length + sum(p.record.length for p in self.params.values())

    @property
    def decoded_bytes(self) -> int:
        """Bytes decoding it allocates: the values, plus codes and parameters if quantized."""
        decoded = self.numel * element_size(self.dtype)
        if self.n_levels is not None:
            decoded += self.numel * code_dtype(self.n_levels).itemsize + sum(
                p.record.length for p in self.params.values())
        return decoded


def _size_or_none(value: object, where: str) -> int | None:
    return None if value is None else _integer(value, where)


def _ratio_or_none(value: object, where: str) -> float | None:
    if value is not None and not (_is_number(value) and value >= 0):
        raise _fail(where, f"must be a non-negative number or null, got {shown(value)}")
    return value


@dataclass(frozen=True, slots=True)
class Summary:
    """The header's ``summary``: every field optional (null or absent), stated once for the
    writer (`to_json`) and the reader (`from_json`)."""

    original_bytes: int | None = None
    source_bytes: int | None = None
    cr: float | None = None
    hcr: float | None = None

    @classmethod
    def from_json(cls, value: object) -> Summary:
        summary = _object({} if value is None else value, "header summary")
        for key, item in summary.items():  # fields of later writers: numbers, ignored
            _optional_number(item, f"header summary {key[:40]!r}")
        return cls(
            _size_or_none(summary.get("original_bytes"), "header summary original_bytes"),
            _size_or_none(summary.get("source_bytes"), "header summary source_bytes"),
            _ratio_or_none(summary.get("cr"), "header summary cr"),
            _ratio_or_none(summary.get("hcr"), "header summary hcr"),
        )

    def to_json(self) -> dict[str, int | float | None]:
        return {"original_bytes": self.original_bytes, "source_bytes": self.source_bytes,
                "cr": self.cr, "hcr": self.hcr}


DISTORTION_MEASURES = ("weight_rel_mse", "weight_rel_mse_max")


@dataclass
class Header:
    """A validated header: tensor entries by name, the informative sections, the byte bound.
    ``distortion``'s `DISTORTION_MEASURES` are non-negative numbers or null when present;
    ``aliases`` maps each further name of a tied tensor to the entry it is stored as."""

    entries: dict[str, TensorEntry]
    writer: dict
    metadata: dict[str, str]
    compression: dict | None
    distortion: dict | None
    summary: Summary
    decoded_bytes: int
    aliases: dict[str, str] = field(default_factory=dict)
    version: int = VERSION


class DataSection(NamedTuple):
    """What a record's place is checked against: the data section's length and where its
    version lets records start."""

    length: int
    align: int


def _record(value: object, where: str, section: DataSection,
            keys: set[str] = _RECORD_KEYS) -> Record:
    record = _object(value, where, keys)
    offset, length, crc = record.get("offset"), record.get("length"), record.get("crc32c")
    if not (type(offset) is int and type(length) is int and type(crc) is int  # noqa: E721
            and 0 <= offset <= _MAX_INT64 and 0 <= length <= _MAX_INT64
            and 0 <= crc <= 0xFFFFFFFF):  # one test for the common case; the message below
        if not _RECORD_KEYS.issubset(record):
            raise _fail(where, "record needs offset, length and crc32c")
        _integer(offset, f"{where} offset")
        _integer(length, f"{where} length")
        _integer(crc, f"{where} crc32c", 0, 0xFFFFFFFF)
    if offset % section.align:
        raise _fail(where, f"record offset {offset} is not a multiple of {section.align}")
    if offset + length > section.length:
        raise _fail(where, "record lies outside the file")
    return Record(offset, length, crc)


ConfigLookup = Callable[[str, dict], object]
"""Builds a codec (kind "codec") or a quantizer (kind "quantizer") from its config, raising a
QlisError for one it does not know or refuses. The loaders pass qlis' registries; a reader of
the header alone (`qlis info`) passes none and checks the configs' form only, so that it
needs neither torch nor the codecs' kernels."""


class _ConfigCheck:
    """Codec and quantizer configs, looked up (never executed) once per distinct config:
    archives repeat a handful of configs over thousands of tensors, and equal configs then
    share one validated, read-only mapping."""

    def __init__(self, lookup: ConfigLookup | None) -> None:
        self._lookup = lookup
        self._seen: dict[tuple, Mapping[str, Any]] = {}

    def __call__(self, value: object, where: str, kind: str) -> Mapping[str, Any]:
        key = None  # set below for every value `_flat_config` accepts (a dict)
        if type(value) is dict:  # types in the key: True and 1 are equal, not the same config
            key = (kind, tuple(value.items()), tuple(map(type, value.values())))
            try:
                known = self._seen.get(key)
            except TypeError:  # a nested (unhashable) value: refused below
                known = None
            if known is not None:
                return known
        config = _flat_config(value, f"{where} {kind}")
        if kind == "codec" and config["id"] == "auto":
            raise _fail(where, "codec 'auto' cannot decode; the writer must record the codec "
                        "it chose")
        if self._lookup is not None:
            try:
                self._lookup(kind, config)
            except QlisError as err:
                raise _fail(where, str(err)) from None
            except (TypeError, ValueError, KeyError, OverflowError) as err:
                raise _fail(where, f"bad {kind} parameters ({err})") from None
        self._seen[key] = MappingProxyType(dict(config))
        return self._seen[key]


def _check_plan(plan: object, where: str) -> dict:
    plan = _object(plan, f"{where} plan", _PLAN_KEYS)
    for key in ("k", "qlis"):
        _optional_number(plan.get(key), f"{where} plan {key}")
    if plan.get("bits") is not None:
        _integer(plan["bits"], f"{where} plan bits", 0, 64)
    for key in ("pruner", "quantizer"):
        if plan.get(key) is not None:
            _object(plan[key], f"{where} plan {key}")
    if "reconstruction" in plan and not (
        isinstance(plan["reconstruction"], str) and len(plan["reconstruction"]) <= 200
    ):
        raise _fail(where, "plan reconstruction must be a short string")
    return plan


def _params(value: object, where: str, section: DataSection) -> dict[str, ParamRecord]:
    params = {}
    for key, param in _object(value, f"{where} params").items():
        there = f"{where} parameter {key[:80]!r}"
        record = _record(param, there, section, _PARAM_KEYS)
        dtype = param.get("dtype")
        if not isinstance(dtype, str) or dtype not in PARAM_DTYPES:
            raise _fail(there, f"dtype must be one of {sorted(PARAM_DTYPES)}")
        shape = param.get("shape")
        if shape_numel(shape, there) * PARAM_DTYPES[dtype].itemsize != record.length:
            raise _fail(there, "length does not match its shape and dtype")
        params[key] = ParamRecord(record, dtype, tuple(shape))
    return params


def _check_entry(entry: object, section: DataSection, configs: _ConfigCheck) -> TensorEntry:
    """Validate one tensor entry into a `TensorEntry` (a hundred thousand of them in a large
    header: the common case is tested first and with few calls, the messages built only for
    what fails)."""
    if type(entry) is not dict or type(name := entry.get("name")) is not str:
        raise ArchiveError("corrupt header (tensor without a name)")
    where = f"tensor {name[:200]!r}"
    quantized = "quantizer" in entry
    if quantized:
        keys, required = _QUANTIZED_KEYS, _QUANTIZED_REQUIRED
    else:
        keys, required = _ENTRY_KEYS, _ENTRY_REQUIRED
    _object(entry, where, keys)
    if not required.issubset(entry):
        raise _fail(where, f"missing field {min(required - entry.keys())!r}")
    shape = entry["shape"]
    numel = shape_numel(shape, where)
    dtype = entry["dtype"]
    if type(dtype) is not str or dtype not in DTYPE_SIZES:
        raise _fail(where, f"unsupported dtype {str(dtype)[:40]!r}")
    data = _record(entry["data"], where, section)
    plan = _check_plan(entry["plan"], where) if "plan" in entry else None
    codec = configs(entry["codec"], where, "codec")
    if not quantized:
        return TensorEntry(name, tuple(shape), dtype, codec, data, numel, plan=plan)
    if dtype not in FLOAT_DTYPES:
        raise _fail(where, f"a quantized tensor must have a floating dtype, not {dtype}")
    n_levels = entry["n_levels"]
    if type(n_levels) is not int or not 1 <= n_levels <= MAX_LEVELS:
        _integer(n_levels, f"{where} n_levels", 1, MAX_LEVELS)  # raises, naming the bounds
    params = _params(entry["params"], where, section)
    quantizer = configs(entry["quantizer"], where, "quantizer")
    return TensorEntry(name, tuple(shape), dtype, codec, data, numel, quantizer, n_levels,
                       params or _NO_PARAMS, plan)


def _records(entry: TensorEntry) -> list[tuple[Record, str]]:
    """An entry's records with what an error calls them: the data, then each parameter."""
    where = f"tensor {entry.name[:200]!r}"
    return [(entry.data, where), *((p.record, f"{where} parameter {key[:80]!r}")
                                   for key, p in entry.params.items())]


def _check_overlaps(entries: Collection[TensorEntry], starts: list[int],
                    lengths: list[int]) -> None:
    """No two non-empty records share a byte (sorted by offset, each ends before the next).
    ``starts`` and ``lengths`` list every record in `_records` order, entry by entry; the
    names are looked up only to report a clash."""
    start, length = np.array(starts, np.int64), np.array(lengths, np.int64)
    used = np.flatnonzero(length)
    order = used[np.argsort(start[used], kind="stable")]
    ends = np.maximum.accumulate(start[order] + length[order])
    clash = np.flatnonzero(start[order][1:] < ends[:-1])
    if clash.size:
        names = [where for entry in entries for _, where in _records(entry)]
        later = int(clash[0]) + 1
        earlier = int(np.flatnonzero(ends[:later] > start[order][later])[0])
        raise _fail(names[order[later]], f"record overlaps the record of "
                    f"{names[order[earlier]]}")


def _check_distortion(value: object) -> dict | None:
    if value is None:
        return None
    distortion = _object(value, "header distortion")
    for key in DISTORTION_MEASURES:
        measure = distortion.get(key)
        if measure is not None and not (_is_number(measure) and measure >= 0):
            raise _fail(f"header distortion {key}", "must be a non-negative number or null")
    return distortion


def _check_sections(header: dict) -> tuple[dict, dict[str, str], dict | None, dict | None,
                                           Summary]:
    writer = _object(header.get("writer"), "header writer", {"name", "version"})
    if not all(isinstance(writer.get(k), str) for k in ("name", "version")):
        raise ArchiveError("header writer: needs string 'name' and 'version'")
    metadata = _object(header.get("metadata", {}), "header metadata")
    if not all(isinstance(v, str) for v in metadata.values()):
        raise ArchiveError("header metadata: values must be strings")
    compression = header.get("compression")
    if compression is not None:
        _object(compression, "header compression")
    distortion = _check_distortion(header.get("distortion"))
    return writer, metadata, compression, distortion, Summary.from_json(header.get("summary"))


def _check_aliases(value: object, entries: Mapping[str, TensorEntry]) -> dict[str, str]:
    """``aliases`` (optional): names of tied tensors stored once, each naming a stored tensor
    and none a stored tensor itself (so an alias never leads to another alias)."""
    aliases = _object(value, "header aliases")
    for alias, name in aliases.items():
        where = f"header alias {alias[:200]!r}"
        if alias in entries:
            raise _fail(where, "is also the name of a stored tensor")
        if not isinstance(name, str) or name not in entries:
            raise _fail(where, f"names no stored tensor ({str(name)[:200]!r})")
    return aliases


class _Entries:
    """The tensor list, validated entry by entry as it is parsed (its JSON is never held
    whole): the typed entries, their decoded size and where their records lie."""

    def __init__(self, section: DataSection, lookup: ConfigLookup | None) -> None:
        self.section = section
        self.configs = _ConfigCheck(lookup)
        self.entries: dict[str, TensorEntry] = {}
        self.decoded_bytes = 0
        self.starts: list[int] = []
        self.lengths: list[int] = []
        self.members = 0  # the keys of every object in the list, against repeated keys

    def add(self, item: object) -> None:
        entry = _check_entry(item, self.section, self.configs)
        self.members += _entry_members(item)
        if entry.name in self.entries:
            raise _fail(f"tensor {entry.name[:200]!r}", "appears twice")
        self.entries[entry.name] = entry
        self.decoded_bytes += entry.decoded_bytes
        self.starts.append(entry.data.offset)
        self.lengths.append(entry.data.length)
        for param in entry.params.values():
            self.starts.append(param.record.offset)
            self.lengths.append(param.record.length)


def _entry_members(entry: dict) -> int:
    """The keys of a validated entry's objects: the entry, its record and configs (flat),
    its parameter records, and its plan's objects, however nested."""
    count = len(entry) + len(entry["data"]) + len(entry["codec"])
    if "quantizer" in entry:
        params = entry["params"]
        count += len(entry["quantizer"]) + len(params) + sum(map(len, params.values()))
    return count + _members(entry.get("plan"))


def _members(value: object) -> int:
    """The keys of every object in plain JSON data."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            count += len(item)
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return count


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_STREAMED = object()  # the value `_parse_top` keeps for a tensor list it gave to `_Entries`


def _parse_top(text: str, decoder: json.JSONDecoder, entries: _Entries) -> dict:
    """The header's top-level object, member by member; the members of its "tensors" list go
    to ``entries`` one at a time. Raises ValueError where the JSON is not valid."""
    skip, scan = _WHITESPACE.match, decoder.scan_once  # scan_once: raw_decode's C scanner
    at = skip(text, 0).end()
    if text[at:at + 1] != "{":
        decoder.decode(text)  # the JSON error, if it is not JSON at all
        raise _fail("header", "not a JSON object")
    sections: dict[str, object] = {}
    at = skip(text, at + 1).end()
    try:
        while text[at:at + 1] != "}":
            key, at = scan(text, at)
            at = skip(text, at).end()
            if not isinstance(key, str) or text[at:at + 1] != ":":
                raise ValueError(f"expecting a key and ':' at character {at}")
            if key not in _TOP_KEYS:
                raise _fail("header", f"unknown field {key[:40]!r}")
            if key in sections:
                raise ArchiveError("corrupt header (an object repeats a key)")
            at = skip(text, at + 1).end()
            if key == "tensors" and text[at:at + 1] == "[":
                sections[key], at = _STREAMED, _parse_list(text, at, scan, entries.add)
            else:
                sections[key], at = scan(text, at)
            at = skip(text, at).end()
            if text[at:at + 1] == ",":
                at = skip(text, at + 1).end()
            elif text[at:at + 1] != "}":
                raise ValueError(f"expecting ',' or '}}' at character {at}")
    except StopIteration as missing:
        raise ValueError(f"expecting a value at character {missing.value}") from None
    if skip(text, at + 1).end() != len(text):
        raise ValueError(f"extra data after the header at character {at + 1}")
    return sections


def _parse_list(text: str, at: int, scan: Callable[[str, int], tuple[object, int]],
                each: Callable[[object], None]) -> int:
    """Parse the JSON list that starts at ``at``, giving each item to ``each`` as soon as it
    is parsed; returns where the list ends."""
    skip = _WHITESPACE.match
    at = skip(text, at + 1).end()
    if text[at:at + 1] == "]":
        return at + 1
    while True:
        item, at = scan(text, at)
        each(item)
        at = skip(text, at).end()
        if text[at:at + 1] == "]":
            return at + 1
        if text[at:at + 1] != ",":
            raise ValueError(f"expecting ',' or ']' at character {at}")
        at = skip(text, at + 1).end()


def parse_header(raw: bytes, data_len: int, max_decoded_bytes: int | None,
                 version: int = VERSION, lookup: ConfigLookup | None = None) -> Header:
    """Check a header's bytes (`scan_json` first) against the schema of ``version`` (the
    file prefix's) and the decoded-size limit, building typed entries as the tensor list is
    parsed: memory stays near the header's own size, however many tensors it lists.
    ``lookup`` also checks every codec and quantizer config against what qlis can build."""
    members = scan_json(raw)
    numbers = raw.translate(_NUMBER_CHARS)
    large = any(pattern in numbers for pattern in _LARGE_NUMBERS)
    checked = {"parse_float": finite_float, "parse_int": _small_int} if large else {}
    decoder = json.JSONDecoder(parse_constant=reject_constant, **checked)
    entries = _Entries(DataSection(data_len, record_alignment(version)), lookup)
    try:
        with no_cyclic_gc():  # a header is a tree: collecting while it is built finds nothing
            header = _parse_top(raw.decode("ascii"), decoder, entries)
    except (ValueError, RecursionError) as err:  # JSONDecodeError included
        raise ArchiveError(f"corrupt header (not valid JSON: {str(err)[:120]})") from None
    if entries.members + sum(map(_members, header.values())) + len(header) != members:
        raise ArchiveError("corrupt header (an object repeats a key)")
    return _validate_sections(header, entries, max_decoded_bytes, version)


def _validate_sections(header: dict, entries: _Entries, max_decoded_bytes: int | None,
                       version: int) -> Header:
    if header.get("format") != "qlis":
        raise ArchiveError("corrupt header (not a qlis header)")
    if header.get("version") != version or not _is_int(header.get("version")):
        stated = header.get("version")
        shown = json.dumps(stated)[:20] if isinstance(stated, _SCALAR) else "a JSON " + (
            "list" if isinstance(stated, list) else "object")
        raise ArchiveError(f"header version {shown} is not the file's version {version}")
    if "aliases" in header and version < ALIASES_VERSION:
        raise ArchiveError(f"header aliases: a version {version} header has none (they came "
                           f"with version {ALIASES_VERSION})")
    writer, metadata, compression, distortion, summary = _check_sections(header)
    if header.get("tensors") is not _STREAMED:
        raise ArchiveError("corrupt header (no tensor list)")
    _check_overlaps(entries.entries.values(), entries.starts, entries.lengths)
    aliases = _check_aliases(header.get("aliases", {}), entries.entries)
    # each alias is one more copy of its tensor's values wherever it cannot share them (an
    # unpacked .safetensors): a few hundred bytes of aliases named gigabytes of output
    total = entries.decoded_bytes + sum(
        entries.entries[name].numel * element_size(entries.entries[name].dtype)
        for name in aliases.values())
    if max_decoded_bytes is not None and total > max_decoded_bytes:
        raise ArchiveError(
            f"the tensors would take {_size(total)} once decoded, over the limit of "
            f"{_size(max_decoded_bytes)}; if you trust this file, raise the limit "
            "(max_decoded_bytes=)"
        )
    return Header(entries.entries, writer, metadata, compression, distortion, summary, total,
                  aliases, version)


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C of any bytes-like ``data``, without a copy. The library releases the GIL over
    a large buffer: google-crc32c, used before, held it (40 ms of a ViT-L/14 pack on two
    threads, up to a 16 MB record at a time)."""
    return _library_crc32c(data)


def positional_reader(fd: int) -> Callable[[int, int], bytes]:
    """pread where the system has it; elsewhere seek+read under a lock (thread-safe either
    way). A read the system fails (a disk error, a file that stat calls regular but cannot
    be read, such as /proc/self/mem) is an ArchiveError that says why."""
    read = _positional_read(fd)

    def checked(length: int, offset: int) -> bytes:
        try:
            return read(length, offset)
        except OSError as err:
            raise ArchiveError(f"cannot be read ({err.strerror or err})") from None

    return checked


def _positional_read(fd: int) -> Callable[[int, int], bytes]:
    if hasattr(os, "pread"):

        def pread(length: int, offset: int) -> bytes:
            chunks, done = [], 0
            while done < length:  # pread may return fewer bytes than asked
                chunk = os.pread(fd, length - done, offset + done)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
            return b"".join(chunks) if len(chunks) != 1 else chunks[0]

        return pread
    lock = threading.Lock()

    def locked_read(length: int, offset: int) -> bytes:
        with lock:
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, length)

    return locked_read


def read_header_file(path: os.PathLike, max_decoded_bytes: int | None = None) -> Header:
    """The validated header of the archive at ``path``, its configs checked for form only (no
    codec or quantizer is built, no record read): what ``qlis info`` shows, without torch."""
    fd = open_regular_file(path, expected="a .qlis archive")
    try:
        return read_header(positional_reader(fd), os.fstat(fd).st_size, max_decoded_bytes)[0]
    except ArchiveError as err:
        raise ArchiveError(f"{path}: {err}") from None
    finally:
        os.close(fd)


def planned_bits(entry: TensorEntry) -> int | None:
    """An entry's bits: its plan's, else its quantizer's ``bits`` option; None if neither."""
    bits = (entry.plan or {}).get("bits")
    if bits is None and entry.quantizer is not None:
        bits = entry.quantizer.get("bits")
        bits = bits if _is_int(bits) and bits >= 0 else None
    return bits


def describe_entries(entries: Mapping[str, TensorEntry]) -> Iterator[dict]:
    """Per tensor, for a gguf-dump-style listing: name, shape, dtype, quantizer id, levels,
    bits and k (from the plan; None where not planned), codec id, stored bytes (record +
    parameters), original bytes and stored bits per element. One row at a time: a listing
    need not hold them all."""
    for name, entry in entries.items():
        stored = entry.stored_bytes
        numel = entry.numel
        yield {
            "name": name,
            "shape": list(entry.shape),
            "dtype": entry.dtype,
            "quantizer": entry.quantizer["id"] if entry.quantizer else None,
            "n_levels": entry.n_levels,
            "bits": planned_bits(entry),
            "k": (entry.plan or {}).get("k"),
            "codec": entry.codec["id"],
            "original_bytes": numel * element_size(entry.dtype),
            "bytes": stored,
            "bits_per_weight": 8 * stored / numel if numel else None,
        }


def _size(n: int) -> str:
    """Bytes as a limit's message shows them: GiB from one, else the bytes themselves."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n:,} bytes"


def read_header(pread: Callable[[int, int], bytes], size: int, max_decoded_bytes: int | None,
                lookup: ConfigLookup | None = None) -> tuple[Header, int]:
    """The validated header of a file of ``size`` bytes read through ``pread(length, offset)``,
    and where its data section starts: the prefix is checked against the file's size and the
    header against its checksum before the header is parsed (`parse_header`)."""
    prefix = pread(PREFIX.size, 0)
    if not prefix.startswith(MAGIC[:len(prefix)]) or not prefix:
        raise ArchiveError("not a qlis archive (bad magic bytes)")
    if len(prefix) < PREFIX.size:
        raise ArchiveError(f"truncated: {len(prefix)} bytes, where a qlis archive's prefix "
                           f"alone is {PREFIX.size}")
    _, version, header_crc, header_len, data_len = PREFIX.unpack(prefix)
    if version not in READABLE_VERSIONS:
        newer = ("a newer qlis: upgrade qlis" if version > max(READABLE_VERSIONS)
                 else "an older qlis")
        raise ArchiveError(
            f"format version {version} is not supported (this reader reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); it was written by {newer}, "
            "or re-create the archive"
        )
    if header_len > size - PREFIX.size:
        raise ArchiveError("truncated or corrupt (header length exceeds the file)")
    data_start = aligned(PREFIX.size + header_len)
    if data_start + data_len != size:
        raise ArchiveError(
            f"truncated or corrupt: {size} bytes on disk, the header announces "
            f"{data_start + data_len}"
        )
    if header_len > MAX_HEADER_BYTES:
        raise ArchiveError(
            f"header of {header_len} bytes exceeds the {MAX_HEADER_BYTES >> 20} MiB cap"
        )
    raw = pread(header_len, PREFIX.size)
    if len(raw) != header_len or crc32c(raw) != header_crc:
        raise ArchiveError("corrupt header (checksum mismatch)")
    if version >= COMPACT_VERSION:
        raw = inflated_header(raw)
    return parse_header(raw, data_len, max_decoded_bytes, version, lookup), data_start


_PRESET_DICTIONARY = 0x20  # FDICT, in the second byte of a zlib stream (RFC 1950)


def deflated_header(raw: bytes) -> bytes:
    """A header's JSON as version 5 stores it: a zlib stream. Per-tensor entries repeat their
    keys and configs; deflated they take a tenth of their bytes (54 KB of a MobileNetV2's
    1.27 MB archive at 8x became 5 KB)."""
    return zlib.compress(raw, 9)


def inflated_header(stored: bytes) -> bytes:
    """The JSON of a version-5 header: ``stored`` is one zlib stream, then nothing but
    spaces (the room a writer leaves in front of the records). What it inflates to is
    bounded by MAX_HEADER_BYTES before it is made, whatever the stream claims."""
    if len(stored) >= 2 and stored[1] & _PRESET_DICTIONARY:
        raise ArchiveError("corrupt header (its zlib stream asks for a preset dictionary; "
                           "the format has none)")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(stored, MAX_HEADER_BYTES + 1)
    except zlib.error as err:
        raise ArchiveError(f"corrupt header (its zlib stream: {err})") from None
    if len(raw) > MAX_HEADER_BYTES:
        raise ArchiveError(f"header inflates past the {MAX_HEADER_BYTES >> 20} MiB cap")
    if not inflater.eof:
        raise ArchiveError("truncated or corrupt header (its zlib stream stops short)")
    if inflater.unused_data.strip(b" "):
        raise ArchiveError("corrupt header (bytes other than spaces after its zlib stream)")
    return raw
