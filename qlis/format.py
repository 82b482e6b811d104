"""The ``.qlis`` format's constants, limits and header schema (specification: docs/format.md).

Everything a reader must check before it allocates or decodes anything lives here: the JSON
header is scanned for size, nesting and item count before it is parsed, then validated
against the version-2 schema, and the bytes the tensors will take once decoded are summed
from the declared shapes and checked against a limit the caller can raise. The writer runs
the same checks on what it is about to write, so qlis never writes a file it would refuse.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qlis.codecs import get_codec
from qlis.errors import ArchiveError, QlisError
from qlis.quantize import get_quantizer

MAGIC = b"\x89QLIS\r\n\x1a"
VERSION = 2
PREFIX = struct.Struct("<8sIIQQ")  # magic, version, header crc32c, header length, data length
ALIGN = 64

MAX_HEADER_BYTES = 64 << 20
MAX_JSON_DEPTH = 64
MAX_JSON_ITEMS = 4_000_000  # '[', '{', ',' and ':' outside strings
MAX_INT_DIGITS = 19  # every JSON integer fits in a signed 64-bit integer
MAX_DIMS = 32
MAX_ELEMENTS = 1 << 53  # product of the dimensions, zeros counted as ones
MAX_LEVELS = 1 << 16
DEFAULT_MAX_DECODED_BYTES = 64 << 30

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
PARAM_DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}

_TOP_KEYS = {
    "format", "version", "writer", "metadata", "compression", "distortion", "summary", "tensors"
}
_ENTRY_KEYS = {"name", "shape", "dtype", "codec", "data", "plan"}
_QUANTIZED_KEYS = _ENTRY_KEYS | {"quantizer", "n_levels", "params"}
_RECORD_KEYS = {"offset", "length", "crc32c"}
_PARAM_KEYS = _RECORD_KEYS | {"shape", "dtype"}
_PLAN_KEYS = {"k", "bits", "qlis", "pruner", "quantizer", "reconstruction"}
_SCALAR = (type(None), bool, int, float, str)
_SCAN_CHUNK = 1 << 20


def element_size(dtype_name: str) -> int:
    """Bytes per element of a stored dtype (bool: one byte)."""
    return torch.empty((), dtype=DTYPES[dtype_name]).element_size()


def code_dtype(n_levels: int) -> np.dtype:
    """The width of quantized codes, derived from the alphabet: uint8 up to 256 levels, else
    uint16 (up to 65536)."""
    return np.dtype(np.uint8) if n_levels <= 256 else np.dtype("<u2")


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


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


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("an object has a duplicate key")
    return obj


def scan_json(raw: bytes) -> None:
    """Refuse, without parsing, a header that would be costly to parse: over the size cap,
    not ASCII, nested deeper than MAX_JSON_DEPTH or with more than MAX_JSON_ITEMS items.

    One vectorised pass in 1 MiB chunks (a few tens of MB at most, whatever the header):
    quotes not escaped by an odd run of backslashes toggle "inside a string", and only the
    brackets, commas and colons outside strings count.
    """
    if len(raw) > MAX_HEADER_BYTES:
        raise ArchiveError(f"header of {len(raw)} bytes: over the {MAX_HEADER_BYTES >> 20} MiB cap")
    if not raw.isascii():
        raise ArchiveError("corrupt header (not ASCII JSON)")
    depth = items = 0
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
        opens = outside & ((chunk == ord("[")) | (chunk == ord("{")))
        closes = outside & ((chunk == ord("]")) | (chunk == ord("}")))
        items += int(np.count_nonzero(opens))
        items += int(np.count_nonzero(outside & ((chunk == ord(",")) | (chunk == ord(":")))))
        if items > MAX_JSON_ITEMS:
            raise ArchiveError(f"header has over {MAX_JSON_ITEMS} JSON items (the cap)")
        if opens.any() or closes.any():
            levels = np.cumsum(opens.astype(np.int64) - closes) + depth
            if int(levels.max()) > MAX_JSON_DEPTH:
                raise ArchiveError(f"header nests deeper than {MAX_JSON_DEPTH} levels")
            depth = int(levels[-1])
        in_string = int(inside[-1])
        tail = int(last_other[-1])
        backslashes = backslashes + chunk.size if tail < 0 else chunk.size - 1 - tail


def parse_json(raw: bytes) -> object:
    """The header's JSON after `scan_json`: finite numbers, 64-bit integers, unique keys."""
    scan_json(raw)
    try:
        return json.loads(
            raw,
            parse_float=finite_float,
            parse_int=_small_int,
            parse_constant=reject_constant,
            object_pairs_hook=_unique_keys,
        )
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError included
        raise ArchiveError(f"corrupt header (not valid JSON: {str(err)[:120]})") from None


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


def _integer(value: object, where: str, low: int = 0, high: int = (1 << 63) - 1) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise _fail(where, f"must be an integer in [{low}, {high}], got {str(value)[:40]}")
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
        bound *= max(_integer(dim, f"{where} shape", 0, MAX_ELEMENTS), 1)
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


@dataclass
class Header:
    """A validated header: tensor entries by name, the informative sections, the byte bound."""

    entries: dict[str, dict]
    writer: dict
    metadata: dict[str, str]
    compression: dict | None
    distortion: dict | None
    summary: dict
    decoded_bytes: int


def _record(value: object, where: str, data_len: int, keys: set[str] = _RECORD_KEYS) -> dict:
    record = _object(value, where, keys)
    if not _RECORD_KEYS.issubset(record):
        raise _fail(where, "record needs offset, length and crc32c")
    offset = _integer(record["offset"], f"{where} offset")
    length = _integer(record["length"], f"{where} length")
    _integer(record["crc32c"], f"{where} crc32c", 0, 0xFFFFFFFF)
    if offset % ALIGN:
        raise _fail(where, f"record offset {offset} is not a multiple of {ALIGN}")
    if offset + length > data_len:
        raise _fail(where, "record lies outside the file")
    return record


def _check_config_ids(entry: dict, where: str) -> None:
    """Refuse codecs and quantizers this reader does not know (looked up, never executed)."""
    codec = _flat_config(entry["codec"], f"{where} codec")
    if codec["id"] == "auto":
        raise _fail(where, "codec 'auto' cannot decode; the writer must record the codec it chose")
    try:
        get_codec(codec)
        if "quantizer" in entry:
            get_quantizer(_flat_config(entry["quantizer"], f"{where} quantizer"))
    except QlisError as err:
        raise _fail(where, str(err)) from None
    except (TypeError, ValueError, KeyError, OverflowError) as err:
        raise _fail(where, f"bad codec or quantizer parameters ({err})") from None


def _check_plan(plan: object, where: str) -> None:
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


def _check_entry(entry: object, data_len: int, records: list) -> tuple[str, dict, int]:
    """Validate one tensor entry; returns its name, the entry and its decoded byte count."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ArchiveError("corrupt header (tensor without a name)")
    name = entry["name"]
    where = f"tensor {name[:200]!r}"
    quantized = "quantizer" in entry
    _object(entry, where, _QUANTIZED_KEYS if quantized else _ENTRY_KEYS)
    missing = sorted(k for k in ("shape", "dtype", "codec", "data") if k not in entry)
    if quantized:
        missing += sorted(k for k in ("n_levels", "params") if k not in entry)
    if missing:
        raise _fail(where, f"missing field {missing[0]!r}")
    numel = shape_numel(entry["shape"], where)
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(where, f"unsupported dtype {str(dtype)[:40]!r}")
    records.append((*_offset_length(_record(entry["data"], where, data_len)), where))
    decoded = numel * element_size(dtype)
    if quantized:
        if dtype not in FLOAT_DTYPES:
            raise _fail(where, f"a quantized tensor must have a floating dtype, not {dtype}")
        n_levels = _integer(entry["n_levels"], f"{where} n_levels", 1, MAX_LEVELS)
        decoded += numel * code_dtype(n_levels).itemsize
        for key, param in _object(entry["params"], f"{where} params").items():
            there = f"{where} parameter {key[:80]!r}"
            record = _record(param, there, data_len, _PARAM_KEYS)
            width = record.get("dtype")
            width = PARAM_DTYPES.get(width) if isinstance(width, str) else None
            if width is None:
                raise _fail(there, f"dtype must be one of {sorted(PARAM_DTYPES)}")
            if shape_numel(record.get("shape"), there) * width.itemsize != record["length"]:
                raise _fail(there, "length does not match its shape and dtype")
            records.append((*_offset_length(record), there))
            decoded += record["length"]
    if "plan" in entry:
        _check_plan(entry["plan"], where)
    _check_config_ids(entry, where)
    return name, entry, decoded


def _offset_length(record: dict) -> tuple[int, int]:
    return record["offset"], record["length"]


def _check_overlaps(records: list[tuple[int, int, str]]) -> None:
    end, previous = 0, ""
    for offset, length, where in sorted(r for r in records if r[1]):
        if offset < end:
            raise _fail(where, f"record overlaps the record of {previous}")
        end, previous = offset + length, where


def _check_sections(header: dict) -> tuple[dict, dict[str, str], dict | None, dict | None, dict]:
    writer = _object(header.get("writer"), "header writer", {"name", "version"})
    if not all(isinstance(writer.get(k), str) for k in ("name", "version")):
        raise ArchiveError("header writer: needs string 'name' and 'version'")
    metadata = _object(header.get("metadata", {}), "header metadata")
    if not all(isinstance(v, str) for v in metadata.values()):
        raise ArchiveError("header metadata: values must be strings")
    sections = []
    for key in ("compression", "distortion"):
        value = header.get(key)
        sections.append(None if value is None else _object(value, f"header {key}"))
    summary = _object(header.get("summary", {}), "header summary")
    for key, value in summary.items():
        _optional_number(value, f"header summary {key[:40]!r}")
    return writer, metadata, sections[0], sections[1], summary


def validate_header(header: object, data_len: int, max_decoded_bytes: int | None) -> Header:
    """Check a parsed header against the version-2 schema and the decoded-size limit."""
    header = _object(header, "header", _TOP_KEYS)
    if header.get("format") != "qlis":
        raise ArchiveError("corrupt header (not a qlis header)")
    if header.get("version") != VERSION or not _is_int(header.get("version")):
        raise ArchiveError(f"header version {str(header.get('version'))[:20]} is not {VERSION}")
    writer, metadata, compression, distortion, summary = _check_sections(header)
    tensors = header.get("tensors")
    if not isinstance(tensors, list):
        raise ArchiveError("corrupt header (no tensor list)")
    entries: dict[str, dict] = {}
    records: list[tuple[int, int, str]] = []
    total = 0
    for item in tensors:
        name, entry, decoded = _check_entry(item, data_len, records)
        if name in entries:
            raise _fail(f"tensor {name[:200]!r}", "appears twice")
        entries[name] = entry
        total += decoded
    _check_overlaps(records)
    if max_decoded_bytes is not None and total > max_decoded_bytes:
        raise ArchiveError(
            f"the tensors would take {total / 2**30:.2f} GiB once decoded, over the limit of "
            f"{max_decoded_bytes / 2**30:.2f} GiB; if you trust this file, raise the limit "
            "(max_decoded_bytes=)"
        )
    return Header(entries, writer, metadata, compression, distortion, summary, total)
