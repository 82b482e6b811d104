"""The ``.qlis`` container: write, read lazily, verify (specification: docs/format.md).

Layout: a 32-byte prefix (magic, version, header CRC, header length, data length), a JSON
header, then 64-byte-aligned data records. Every record and the header carry a CRC-32C. All
sizes in the header are checked against the file before anything is allocated, and nothing
in the file is executed: strategies and codecs are looked up by id in their registries.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import torch

from qlis.atomic import atomic_path
from qlis.codecs import BitPack, Codec, Raw, get_codec
from qlis.codecs.auto import Auto
from qlis.codecs.sparse import Sparse
from qlis.compress import CompressionResult
from qlis.errors import ArchiveError, ConfigError, InputError, QlisError
from qlis.quantize import QuantizedTensor, get_quantizer
from qlis.tensors import bit_patterns

MAGIC = b"\x89QLIS\r\n\x1a"
VERSION = 1
PREFIX = struct.Struct("<8sIIQQ")  # magic, version, header crc32c, header length, data length
ALIGN = 64
MAX_HEADER_BYTES = 256 << 20
MAX_EXPANSION = 4096  # decoded bytes per encoded byte a record may claim
EXPANSION_SLACK = 1 << 20
CRC_PIECE = 1 << 24

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
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_PATTERN = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SIGNED = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}

Progress = Callable[[int], None]


def _crc(data: bytes | memoryview) -> int:
    """CRC-32C; a memoryview is checksummed in 16 MiB pieces (the library takes bytes only)."""
    if isinstance(data, bytes):
        return google_crc32c.value(data)
    crc = 0
    for start in range(0, len(data), CRC_PIECE):
        crc = google_crc32c.extend(crc, bytes(data[start : start + CRC_PIECE]))
    return crc


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise InputError(f"tensors of dtype {dtype} cannot be stored in a .qlis archive") from None


class _Writer:
    """Collects encoded records and their header entries, then writes them atomically."""

    def __init__(self) -> None:
        self.records: list[bytes | memoryview] = []
        self.offset = 0

    def add(self, data: bytes | memoryview) -> dict:
        entry = {"offset": self.offset, "length": len(data), "crc32c": _crc(data)}
        self.records.append(data)
        self.offset = _aligned(self.offset + len(data))
        return entry


def _encode_codes(codes: np.ndarray, code_bits: int, codec: str) -> tuple[Codec, bytes]:
    flat = np.ascontiguousarray(codes).reshape(-1)
    if codec == "auto":
        chosen, data = Auto().select(flat)
    else:
        chosen = BitPack(bits=code_bits) if codec == "bitpack" else get_codec(codec)
        data = chosen.encode(flat)
    if len(data) * MAX_EXPANSION + EXPANSION_SLACK < flat.nbytes:
        chosen = BitPack(bits=code_bits)  # keep every record within the reader's expansion cap
        data = chosen.encode(flat)
    return chosen, data


def _encode_plain(tensor: torch.Tensor, try_sparse: bool) -> tuple[Codec, bytes | memoryview]:
    patterns = bit_patterns(tensor).reshape(-1)
    if try_sparse and patterns.size and np.count_nonzero(patterns) < 0.9 * patterns.size:
        sparse = Sparse().encode(patterns)
        if len(sparse) < patterns.nbytes:
            return Sparse(), sparse
    return Raw(), memoryview(patterns).cast("B").toreadonly()  # raw stream, no copy


def _param_entry(writer: _Writer, array: np.ndarray) -> dict:
    values = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
    return {"shape": list(np.shape(array)), **writer.add(values.astype("<f4").tobytes())}


def save(
    result: CompressionResult,
    path: str | os.PathLike,
    codec: str = "huffman",
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = True,
    source_bytes: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write ``result`` as a .qlis archive (atomically: a crash never leaves a half file).

    ``codec`` codes the quantized layers: "huffman" (the paper's), "ans", "bitpack", "auto"
    (smallest per tensor) or any registered codec id. ``source_bytes`` is the size of the
    file the model came from, for the real compression ratio. ``progress`` gets the number of
    parameters done after each tensor.

    >>> import qlis, torch, tempfile, os
    >>> result = qlis.compress(torch.nn.Linear(16, 16), policy="quant", bits=4)
    >>> path = save(result, os.path.join(tempfile.mkdtemp(), "m.qlis"))
    >>> sorted(qlis.load(path)) == ["bias", "weight"]
    True
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; pass overwrite=True (CLI: --force) to replace it")
    if codec != "auto":
        get_codec(codec if codec != "bitpack" else {"id": "bitpack", "bits": 8})
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError("archive metadata must map strings to strings")
    plans = {layer.name: layer for layer in result.layers}
    writer = _Writer()
    entries = []
    for name, stored in result.tensors.items():
        entry: dict[str, Any] = {"name": name}
        if isinstance(stored, QuantizedTensor):
            chosen, data = _encode_codes(stored.codes, stored.code_bits, codec)
            entry.update(
                shape=list(stored.shape),
                dtype=_dtype_name(stored.dtype),
                quantizer=stored.quantizer,
                n_levels=stored.n_levels,
                params={k: _param_entry(writer, v) for k, v in sorted(stored.params.items())},
            )
        else:
            chosen, data = _encode_plain(stored, try_sparse=name in plans)
            entry.update(shape=list(stored.shape), dtype=_dtype_name(stored.dtype))
        entry["codec"] = chosen.get_config()
        entry["data"] = writer.add(data)
        if name in plans:
            plan = plans[name]
            entry["plan"] = {"k": plan.k, "bits": plan.bits, "qlis": plan.qlis}
        entries.append(entry)
        if progress is not None:
            progress(math.prod(entry["shape"]))
    header = {
        "format": "qlis",
        "version": VERSION,
        "metadata": metadata,
        "policy": {"name": result.policy.name},
        "summary": {
            "original_bytes": result.original_bytes,
            "source_bytes": source_bytes,
            "cr": result.cr,
            "hcr": result.hcr,
        },
        "tensors": entries,
    }
    _write_atomically(path, json.dumps(header, separators=(",", ":")).encode(), writer, overwrite)
    return path


def _write_atomically(path: Path, header: bytes, writer: _Writer, overwrite: bool) -> None:
    data_start = _aligned(PREFIX.size + len(header))
    prefix = PREFIX.pack(MAGIC, VERSION, _crc(header), len(header), writer.offset)
    with atomic_path(path, overwrite=overwrite) as tmp, builtins.open(tmp, "wb") as f:
        f.write(prefix)
        f.write(header)
        f.write(b" " * (data_start - PREFIX.size - len(header)))
        position = 0
        for record in writer.records:
            f.write(b"\0" * (_aligned(position) - position))
            position = _aligned(position)
            f.write(record)
            position += len(record)
        f.write(b"\0" * (writer.offset - position))


class Archive:
    """A .qlis file opened for lazy, verified, per-tensor reads (use as a context manager).

    >>> import qlis, torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "m.qlis")
    >>> _ = qlis.save(qlis.compress(torch.nn.Linear(4, 4), policy="quant", bits=8), path)
    >>> with qlis.open(path) as archive:
    ...     archive.names(), archive.read("weight").shape
    (['weight', 'bias'], torch.Size([4, 4]))
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file")
        self._file = builtins.open(self.path, "rb")  # noqa: SIM115 - kept open for lazy reads
        try:
            self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, what: str) -> ArchiveError:
        return ArchiveError(f"{self.path}: {what}")

    def _read_header(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(PREFIX.size)
        if len(prefix) < PREFIX.size or not prefix.startswith(MAGIC):
            raise self._fail("not a qlis archive (bad magic bytes)")
        _, version, header_crc, header_len, data_len = PREFIX.unpack(prefix)
        if version != VERSION:
            raise self._fail(f"format version {version} is not supported (this reader: {VERSION})")
        if header_len > min(MAX_HEADER_BYTES, size - PREFIX.size):
            raise self._fail("truncated or corrupt (header length exceeds the file)")
        self._data_start = _aligned(PREFIX.size + header_len)
        if self._data_start + data_len != size:
            raise self._fail(
                f"truncated or corrupt: {size} bytes on disk, the header announces "
                f"{self._data_start + data_len}"
            )
        raw_header = self._file.read(header_len)
        if _crc(raw_header) != header_crc:
            raise self._fail("corrupt header (checksum mismatch)")
        try:
            header = json.loads(raw_header)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise self._fail("corrupt header (not JSON)") from None
        self._data_len = data_len
        self._entries = self._validate(header, size)
        self.metadata: dict[str, str] = self._section(header, "metadata")
        if not all(isinstance(v, str) for v in self.metadata.values()):
            raise self._fail("corrupt header (metadata values must be strings)")
        self.summary: dict = self._section(header, "summary")
        if not all(v is None or isinstance(v, int | float) for v in self.summary.values()):
            raise self._fail("corrupt header (summary values must be numbers)")
        self.policy: dict = self._section(header, "policy")

    def _section(self, header: dict, key: str) -> dict:
        value = header.get(key, {})
        if not isinstance(value, dict):
            raise self._fail(f"corrupt header ({key} is not an object)")
        return dict(value)

    def _check_record(self, record: object, where: str) -> dict:
        if not isinstance(record, dict):
            raise self._fail(f"{where}: missing record")
        offset, length, crc = record.get("offset"), record.get("length"), record.get("crc32c")
        if not all(isinstance(v, int) and v >= 0 for v in (offset, length, crc)):
            raise self._fail(f"{where}: bad record location")
        if offset + length > self._data_len:
            raise self._fail(f"{where}: record lies outside the file")
        return record

    def _validate(self, header: object, size: int) -> dict[str, dict]:
        if not isinstance(header, dict) or header.get("format") != "qlis":
            raise self._fail("corrupt header (not a qlis header)")
        tensors = header.get("tensors")
        if not isinstance(tensors, list):
            raise self._fail("corrupt header (no tensor list)")
        entries: dict[str, dict] = {}
        total = 0
        for entry in tensors:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise self._fail("corrupt header (tensor without a name)")
            name = entry["name"]
            if name in entries:
                raise self._fail(f"tensor {name!r} appears twice")
            shape, dtype = entry.get("shape"), entry.get("dtype")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise self._fail(f"tensor {name!r}: bad shape")
            if dtype not in DTYPES:
                raise self._fail(f"tensor {name!r}: unsupported dtype {dtype!r}")
            if not isinstance(entry.get("codec"), dict):
                raise self._fail(f"tensor {name!r}: no codec")
            record = self._check_record(entry.get("data"), f"tensor {name!r}")
            numel = math.prod(shape)
            decoded = numel if "quantizer" in entry else numel * _element_size(dtype)
            if decoded > record["length"] * MAX_EXPANSION + EXPANSION_SLACK:
                raise self._fail(f"tensor {name!r}: declared size is implausible for its record")
            total += decoded
            if not isinstance(entry.get("plan", {}), dict):
                raise self._fail(f"tensor {name!r}: bad plan")
            if "quantizer" in entry:
                self._validate_quantized(entry, name)
            entries[name] = entry
        if total > size * MAX_EXPANSION + 64 * EXPANSION_SLACK:
            raise self._fail("declared tensor sizes are implausible for the file size")
        return entries

    def _validate_quantized(self, entry: dict, name: str) -> None:
        n_levels, params = entry.get("n_levels"), entry.get("params")
        if not isinstance(n_levels, int) or not 1 <= n_levels <= 256:
            raise self._fail(f"tensor {name!r}: bad code alphabet size")
        if not isinstance(entry.get("quantizer"), dict) or not isinstance(params, dict):
            raise self._fail(f"tensor {name!r}: bad quantizer description")
        for key, param in params.items():
            record = self._check_record(param, f"tensor {name!r} parameter {key!r}")
            shape = record.get("shape")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise self._fail(f"tensor {name!r} parameter {key!r}: bad shape")
            if math.prod(shape) * 4 != record["length"]:
                raise self._fail(f"tensor {name!r} parameter {key!r}: length mismatch")

    # -- reading -----------------------------------------------------------------------------

    def _read_record(self, record: dict, where: str) -> bytes:
        self._file.seek(self._data_start + record["offset"])
        data = self._file.read(record["length"])
        if len(data) != record["length"]:
            raise self._fail(f"{where}: truncated record")
        if _crc(data) != record["crc32c"]:
            raise self._fail(f"{where}: checksum mismatch (the file is corrupt)")
        return data

    def _decode(self, entry: dict, out: np.ndarray) -> np.ndarray:
        name = entry["name"]
        data = self._read_record(entry["data"], f"tensor {name!r}")
        try:
            codec = get_codec(entry["codec"])
            return codec.decode(data, out)
        except ArchiveError as err:
            raise self._fail(f"tensor {name!r}: {err}") from None
        except (ConfigError, TypeError, ValueError, KeyError) as err:
            raise self._fail(f"tensor {name!r}: cannot decode ({err})") from None

    def names(self) -> list[str]:
        """Tensor names in stored order."""
        return list(self._entries)

    def entry(self, name: str) -> dict:
        """The header entry of one tensor (shape, dtype, codec, quantizer, record)."""
        try:
            return self._entries[name]
        except KeyError:
            raise InputError(f"{self.path}: no tensor named {name!r}") from None

    def read_quantized(self, name: str) -> QuantizedTensor | None:
        """The integer codes and parameters of a quantized tensor (None for a plain one)."""
        entry = self.entry(name)
        if "quantizer" not in entry:
            return None
        shape = entry["shape"]
        codes = self._decode(entry, np.empty(math.prod(shape), dtype=np.uint8))
        if codes.size and int(codes.max()) >= entry["n_levels"]:
            raise self._fail(f"tensor {name!r}: a code exceeds the alphabet")
        params = {
            key: np.frombuffer(self._read_record(rec, f"tensor {name!r} parameter {key!r}"), "<f4")
            .reshape(rec["shape"])
            .astype(np.float32)
            for key, rec in entry["params"].items()
        }
        return QuantizedTensor(
            codes=codes.reshape(shape),
            n_levels=entry["n_levels"],
            quantizer=entry["quantizer"],
            params=params,
            dtype=DTYPES[entry["dtype"]],
        )

    def read(self, name: str) -> torch.Tensor:
        """One tensor, dequantized, exactly as ``CompressionResult.state_dict()`` had it."""
        entry = self.entry(name)
        quantized = self.read_quantized(name)
        if quantized is not None:
            try:
                return get_quantizer(quantized.quantizer).dequantize(quantized)
            except QlisError as err:
                raise self._fail(f"tensor {name!r}: {err}") from None
            except (RuntimeError, ValueError, IndexError, KeyError, TypeError) as err:
                raise self._fail(f"tensor {name!r}: inconsistent parameters ({err})") from None
        dtype = DTYPES[entry["dtype"]]
        size = _element_size(entry["dtype"])
        patterns = self._decode(entry, np.empty(math.prod(entry["shape"]), dtype=_PATTERN[size]))
        signed = torch.from_numpy(patterns.view(_SIGNED[size]))
        tensor = signed.to(torch.bool) if dtype == torch.bool else signed.view(dtype)
        return tensor.reshape(entry["shape"])

    def load(self, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        """Every tensor, dequantized, in stored order."""
        state = {}
        for name in self._entries:
            state[name] = self.read(name)
            if progress is not None:
                progress(state[name].numel())
        return state

    def verify(self) -> None:
        """Read and check every record; raises ArchiveError naming the first bad tensor."""
        for name in self._entries:
            self.read(name)

    def tensor_info(self) -> list[dict]:
        """Per tensor: name, shape, dtype, bits (None: stored exactly), codec and bytes."""
        rows = []
        for name, entry in self._entries.items():
            stored = entry["data"]["length"] + sum(
                p["length"] for p in entry.get("params", {}).values()
            )
            plan = entry.get("plan") or {}
            rows.append(
                {
                    "name": name,
                    "shape": entry["shape"],
                    "dtype": entry["dtype"],
                    "bits": plan.get("bits") if "quantizer" in entry else None,
                    "k": plan.get("k"),
                    "codec": entry["codec"].get("id"),
                    "original_bytes": math.prod(entry["shape"]) * _element_size(entry["dtype"]),
                    "bytes": stored,
                }
            )
        return rows

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _element_size(dtype_name: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype_name]).element_size()


def open(path: str | os.PathLike) -> Archive:  # noqa: A001 - the public name is qlis.open
    """Open an archive for lazy per-tensor reads (see Archive)."""
    return Archive(path)


def load(path: str | os.PathLike, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """All tensors of an archive; with ``model``, also load them into it (strictly)."""
    with Archive(path) as archive:
        state = archive.load()
    if model is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise InputError(f"{path} does not fit the model: {str(err).splitlines()[0]}") from None
    return state
