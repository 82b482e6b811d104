"""The ``.qlis`` container: write, read lazily, verify (specification: docs/format.md).

Layout: a 32-byte prefix (magic, version, header CRC, header length, data length), an ASCII
JSON header, then 64-byte-aligned data records. Every record and the header carry a CRC-32C.
The reader validates the whole header (qlis.archive.format) and bounds the memory the tensors will
take before it allocates anything; nothing in the file is executed: codecs and quantizers
are looked up by id in their registries. Reads are positional, so one open Archive can be
shared by threads.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from qlis import version
from qlis.archive.atomic import new_temporary, publish
from qlis.archive.codecs import BitPack, Codec, Raw, get_codec
from qlis.archive.codecs.ans import in_row_classes
from qlis.archive.codecs.auto import Auto
from qlis.archive.codecs.sparse import Sparse, sparse_bytes
from qlis.archive.format import (
    COMPACT_VERSION,
    DEFAULT_MAX_DECODED_BYTES,
    DTYPE_SIZES,
    MAGIC,
    MAX_DIMS,
    MAX_LEVELS,
    PARAM_DTYPES,
    PREFIX,
    RECORD_ALIGN,
    ROW_CLASSES_VERSION,
    Record,
    Summary,
    TensorEntry,
    aligned,
    code_dtype,
    crc32c,
    deflated_header,
    describe_entries,
    element_size,
    non_finite_path,
    parse_header,
    positional_reader,
    read_header,
)
from qlis.archive.front_room import ROOM_BLOCK, make_room
from qlis.config import Param, check_callback
from qlis.errors import ArchiveError, ConfigError, InputError, QlisError, first_line
from qlis.models.tensors import bit_patterns, check_loadable, model_in_use, with_aliases
from qlis.quantize.grid import Grid, matrix_shape
from qlis.quantize.quantizers import QuantizedTensor, Quantizer, get_quantizer
from qlis.registry import is_builtin
from qlis.regular_files import open_regular_file
from qlis.runtime import lowbit
from qlis.workers.memory import allocation_failed, available_memory
from qlis.workers.threads import ordered_map
from qlis.write_behind import WriteBehind

if TYPE_CHECKING:
    from qlis.plan.execute import LayerPlan

_PATH = Param("path")
BLOCK_FRONT_BYTES = 1 << 24
"""Archives with this much data (16 MiB) or more get a header padded to a `ROOM_BLOCK`
boundary, so that its room can be inserted in front of the records without copying them
(at most 4 KiB more, under 0.03%): the padding depends on the data's size alone, so the
same input gives the same bytes on any file system."""

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_SIZES}
_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
_PATTERN = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SIGNED = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}

Progress = Callable[[int], None]
Stored = QuantizedTensor | torch.Tensor

_ASK_FROM_BYTES = 1 << 26  # a decode needing this much first asks what is free


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise InputError(f"tensors of dtype {dtype} cannot be stored in a .qlis archive") from None


def check_codec_name(codec: str) -> None:
    """Refuse an unknown codec before any work is done."""
    if not isinstance(codec, str):
        raise ConfigError(f"codec must be a codec id (a string), got {codec!r}")
    if codec not in ("auto", "bitpack"):
        get_codec(codec)


def _codes(stored: QuantizedTensor, name: str) -> np.ndarray:
    """The codes, flat, in the width the format derives from n_levels (uint8 or uint16)."""
    n_levels = stored.n_levels
    if not isinstance(n_levels, int) or not 1 <= n_levels <= MAX_LEVELS:
        raise InputError(f"{name}: a quantizer gave {n_levels!r} levels; archives hold 1..65536")
    codes = np.asarray(stored.codes).reshape(-1)
    if codes.dtype.kind not in "ui":
        raise InputError(f"{name}: quantized codes must be integers, got {codes.dtype}")
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= n_levels):
        raise InputError(f"{name}: a quantized code lies outside 0..{n_levels - 1}")
    return np.ascontiguousarray(codes, dtype=code_dtype(n_levels))


def _check_params(stored: QuantizedTensor, name: str) -> None:
    """Refuse a quantizer config or parameters a reader would refuse (qlis never writes a
    file it would refuse)."""
    try:
        get_quantizer(stored.quantizer).check_params(stored.shape, stored.n_levels,
                                                     stored.params)
    except (ArchiveError, ConfigError) as err:
        raise InputError(f"{name}: cannot write its quantizer parameters: {err}") from None


def _encode_codes(codes: np.ndarray, n_levels: int, codec: str, row_length: int,
                  name: str) -> tuple[Codec, bytes | memoryview]:
    """Encode with exactly the codec asked for ("auto": the smallest; it says which), the
    codes as rows of the layer's matrix."""
    if codec == "auto":
        return Auto().select(codes, row_length)
    chosen = BitPack(bits=max(1, (n_levels - 1).bit_length())) if codec == "bitpack" else (
        get_codec(codec)
    )
    if is_builtin(chosen):
        return chosen, chosen.encode_rows(codes, row_length)
    try:  # a third-party codec: what it raises or returns is named
        data = chosen.encode_rows(codes, row_length)
    except QlisError:
        raise
    except Exception as err:
        raise ConfigError(f"{name}: codec {chosen.codec_id!r} failed to encode "
                          f"({type(err).__name__}: {first_line(err)})") from None
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ConfigError(f"{name}: codec {chosen.codec_id!r} encoded to a {type(data).__name__}, "
                          "not bytes")
    _check_round_trip(chosen, data, codes, name)
    return chosen, data


def _check_round_trip(codec: Codec, data: bytes | bytearray | memoryview, codes: np.ndarray,
                      name: str) -> None:
    """Refuse a third-party codec whose stream does not decode back to the codes it encoded:
    the archive would load other values than compress reported, and nothing would say so."""
    try:
        back = codec.decode(data, np.empty_like(codes))
    except Exception as err:
        raise ConfigError(f"{name}: codec {codec.codec_id!r} cannot decode the stream it "
                          f"encoded ({type(err).__name__}: {first_line(err)})") from None
    if not (isinstance(back, np.ndarray) and back.dtype == codes.dtype
            and back.size == codes.size and np.array_equal(back.reshape(-1), codes)):
        raise ConfigError(f"{name}: codec {codec.codec_id!r} does not decode its stream back "
                          "to the codes it encoded")


def _encode_plain(tensor: torch.Tensor, try_sparse: bool) -> tuple[Codec, bytes | memoryview]:
    patterns = bit_patterns(tensor).reshape(-1)
    if try_sparse and sparse_bytes(patterns) is not None:
        return Sparse(), Sparse().encode(patterns)
    return Raw(), memoryview(patterns).cast("B").toreadonly()  # raw stream, no copy


def _param_record(name: str, key: str, array: np.ndarray) -> tuple[dict, bytes]:
    values = np.asarray(array)
    dtype = values.dtype.name
    if dtype not in PARAM_DTYPES:
        raise InputError(f"{name}: parameter {key!r} is {dtype}; archives store float32/float16")
    data = np.ascontiguousarray(values, dtype=PARAM_DTYPES[dtype]).reshape(-1).tobytes()
    return {"shape": list(values.shape), "dtype": dtype}, data


def plan_entry(plan: LayerPlan) -> dict:
    """A layer's plan as its header entry records it."""
    return {
        "k": plan.k,
        "bits": plan.bits,
        "qlis": plan.qlis,
        "pruner": plan.pruner,
        "quantizer": plan.quantizer,
        **({"reconstruction": plan.reconstruction} if plan.reconstruction else {}),
    }


class Savable(Protocol):
    """What `save` writes: a compression result (`qlis.CompressionResult`), its tensors as
    stored, its layers' plan rows and the header fields that describe it."""

    tensors: Mapping[str, Stored]
    layers: list[LayerPlan]

    def header(self, source_bytes: int | None) -> dict[str, Any]: ...

    def check_written_size(self, path: Path, codec: str) -> None: ...


def save(
    result: Savable,
    path: str | os.PathLike,
    codec: str = "ans",
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = True,
    source_bytes: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write ``result`` as a .qlis archive (atomically: a crash never leaves a half file).

    ``codec`` codes the quantized layers: "ans" (entropy-bound, the default), "huffman" (the
    paper's), "bitpack", "raw",
    "auto" (smallest per tensor) or any registered codec id; the archive stores exactly that
    codec (auto records the one it chose). ``source_bytes`` is the size of the file the model
    came from, for the real compression ratio. ``progress`` gets the number of parameters done
    after each tensor. The header records the writer, ``result.config`` (the full plan and
    policy) and ``result.distortion``.

    >>> import qlis, torch, tempfile, os
    >>> result = qlis.compress(torch.nn.Linear(16, 16), policy="quant", bits=4)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = save(result, os.path.join(folder, "m.qlis"))
    ...     sorted(qlis.load(path))
    ['bias', 'weight']
    """
    if not all(hasattr(result, field) for field in ("tensors", "layers", "header",
                                                    "check_written_size")):
        raise InputError(f"save writes a compression result (qlis.compress(...)), not a "
                         f"{type(result).__name__}: compress a state dict first")
    check_callback(progress, "progress")
    written = write_tensors(
        path,
        result.tensors,
        codec=codec,
        metadata=metadata,
        plans={layer.name: plan_entry(layer) for layer in result.layers},
        overwrite=overwrite,
        progress=progress,
        **result.header(source_bytes),
    )
    result.check_written_size(written, codec)
    return written


@dataclass
class EncodedTensor:
    """One tensor ready to be written: its header entry without record positions, and its
    records (parameters in key order, then the data), each with its CRC-32C."""

    entry: dict
    records: list[tuple[str | None, bytes | memoryview, int]]  # (parameter key | None, data, crc)


def encode_tensor(name: str, stored: Stored, codec: str = "ans",
                  plan: dict | None = None) -> EncodedTensor:
    """Encode one tensor as the archive stores it (thread-safe: pure work on its arguments).

    A plain tensor with a ``plan`` is stored with the ``sparse`` codec when that is smaller (a
    pruned layer), every other plain tensor as ``raw`` bytes; codes go with ``codec`` unless
    their quantizer names its own (`Quantizer.codes_codec`)."""
    if not isinstance(name, str):
        raise InputError(f"tensor names must be strings, got {name!r}")
    if len(stored.shape) > MAX_DIMS:
        raise InputError(f"{name}: {len(stored.shape)} dimensions; archives hold {MAX_DIMS}")
    entry: dict[str, Any] = {"name": name, "shape": list(stored.shape)}
    records: list[tuple[str | None, bytes | memoryview, int]] = []
    if isinstance(stored, QuantizedTensor):
        _check_params(stored, name)
        codes = _codes(stored, name)
        row_length = matrix_shape(stored.shape)[1]
        own_codec = get_quantizer(stored.quantizer).codes_codec
        chosen, data = _encode_codes(codes, stored.n_levels, own_codec or codec, row_length,
                                     name)
        params = {}
        for key, value in sorted(stored.params.items()):
            params[key], raw = _param_record(name, key, value)
            records.append((key, raw, crc32c(raw)))
        entry.update(dtype=_dtype_name(stored.dtype), quantizer=stored.quantizer,
                     n_levels=stored.n_levels, params=params)
    else:
        chosen, data = _encode_plain(stored, try_sparse=plan is not None)
        entry["dtype"] = _dtype_name(stored.dtype)
    entry["codec"] = chosen.get_config()
    if plan is not None:
        entry["plan"] = plan
    records.append((None, data, crc32c(data)))
    return EncodedTensor(entry, records)


class ArchiveWriter:
    """Writes an archive tensor by tensor: records go to a temporary file beside the target
    as they come (to the disk as they are written, `WriteBehind`), so memory holds one
    tensor's records, not the archive's; `finish` puts the header in front of them
    (`make_room`) and publishes the file under the target name, atomically. Leaving the
    ``with`` block without `finish` (an error, an interrupt) leaves nothing behind."""

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = True) -> None:
        self.path = _PATH.check(path, "archive path")
        self.overwrite = Param("bool").check(overwrite, "overwrite")
        self._tmp: Path | None = new_temporary(self.path, self.overwrite)
        try:
            self._fd: int | None = os.open(self._tmp, os.O_RDWR | getattr(os, "O_BINARY", 0))
        except OSError as err:
            self._tmp.unlink(missing_ok=True)
            raise InputError(f"{self.path}: cannot write beside it ({err.strerror or err})")\
                from None
        self._out = WriteBehind(self._fd)
        self._entries: list[dict] = []
        self._offset = 0
        self._gathered = bytearray()  # short records not written yet, from _gathered_at
        self._gathered_at = 0

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()
        if self._tmp is not None:  # not published
            self._tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _record(self, data: bytes | memoryview, crc: int) -> dict:
        self._offset = aligned(self._offset, RECORD_ALIGN)  # the gap reads as zeros
        entry = Record(self._offset, len(data), crc).to_json()
        end = self._gathered_at + len(self._gathered)
        if self._offset + len(data) - self._gathered_at > GATHER_BYTES:
            self._write_gathered()
            end = self._gathered_at = self._offset
        if len(data) >= GATHER_BYTES:
            self._out.write(np.frombuffer(data, dtype=np.uint8), self._offset)
            self._gathered_at = self._offset + len(data)
        else:
            self._gathered += bytes(self._offset - end)
            self._gathered += data
        self._offset += len(data)
        return entry

    def _write_gathered(self) -> None:
        if self._gathered:
            self._out.write(np.frombuffer(self._gathered, dtype=np.uint8), self._gathered_at)
            self._gathered = bytearray()

    def add(self, encoded: EncodedTensor) -> None:
        """Append one encoded tensor (its records and its header entry)."""
        entry = dict(encoded.entry)
        params = {key: dict(value) for key, value in entry.get("params", {}).items()}
        try:
            for key, data, crc in encoded.records:
                if key is None:
                    entry["data"] = self._record(data, crc)
                else:
                    params[key].update(self._record(data, crc))
        except OSError as err:
            raise InputError(f"{self.path}: could not be written ({err.strerror or err}); "
                             "free space or write elsewhere") from None
        if params:
            entry["params"] = params
        if "plan" in entry:
            entry["plan"] = entry.pop("plan")  # after "data", where the format puts it
        self._entries.append(entry)

    def finish(self, *, metadata: Mapping[str, str] | None = None,
               compression: dict | None = None, distortion: dict | None = None,
               summary: Mapping[str, Any] | None = None,
               aliases: Mapping[str, str] | None = None) -> Path:
        """Write the header and the records as the archive, atomically. ``aliases`` names
        tied tensors stored once (each further name -> the name it is stored under); the
        header has the section only when there are some."""
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InputError(f"archive metadata must map strings to strings, got "
                             f"{type(metadata).__name__}")
        metadata = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise InputError("archive metadata must map strings to strings")
        data_len = aligned(self._offset)
        header = {
            "format": "qlis",
            "version": COMPACT_VERSION,
            "writer": {"name": "qlis", "version": version.__version__},
            "metadata": metadata,
            "compression": compression,
            "distortion": distortion,
            "summary": dict(summary or {}),
            **({"aliases": dict(aliases)} if aliases else {}),
            "tensors": self._entries,
        }
        raw_header = deflated_header(_header_bytes(header, data_len))
        front = aligned(PREFIX.size + len(raw_header))
        if data_len >= BLOCK_FRONT_BYTES:  # spaces after the stream, where the reader finds records
            front = -(-front // ROOM_BLOCK) * ROOM_BLOCK
            raw_header += b" " * (front - PREFIX.size - len(raw_header))
        prefix = PREFIX.pack(MAGIC, COMPACT_VERSION, crc32c(raw_header),
                             len(raw_header), data_len)
        room = prefix + raw_header + b" " * (front - PREFIX.size - len(raw_header))
        try:
            self._write_gathered()
            os.ftruncate(self._fd, data_len)  # the last record's padding reads as zeros
            make_room(self._fd, front, data_len)
            self._out.write(np.frombuffer(room, dtype=np.uint8), 0)
            self._close()
            tmp, self._tmp = self._tmp, None
            publish(tmp, self.path, self.overwrite)  # removes tmp where it fails
        except OSError as err:
            raise InputError(f"{self.path}: could not be written ({err.strerror or err}); "
                             "free space or write elsewhere") from None
        return self.path


GATHER_BYTES = 1 << 20
"""Records shorter than this are gathered and written together, up to this much: a write is
a system call (~35 us on the benchmarks' VM), a 100,000-tensor archive's 3.5 s of 31."""


def write_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Stored],
    *,
    codec: str = "ans",
    metadata: Mapping[str, str] | None = None,
    plans: Mapping[str, dict] | None = None,
    compression: dict | None = None,
    distortion: dict | None = None,
    summary: Mapping[str, Any] | None = None,
    aliases: Mapping[str, str] | None = None,
    overwrite: bool = True,
    progress: Progress | None = None,
    jobs: int | None = None,
) -> Path:
    """Write quantized and plain tensors as an archive (what `save` does with a result),
    encoding ``jobs`` tensors at a time (see `encode_tensor`)."""
    check_codec_name(codec)
    plans = dict(plans or {})

    def encode(item: tuple[str, Stored]) -> EncodedTensor:
        return encode_tensor(item[0], item[1], codec, plans.get(item[0]))

    with ArchiveWriter(path, overwrite=overwrite) as writer:
        for encoded in ordered_map(encode, tensors.items(), jobs):
            writer.add(encoded)
            if progress is not None:
                progress(math.prod(encoded.entry["shape"]))
        return writer.finish(metadata=metadata, compression=compression,
                             distortion=distortion, summary=summary, aliases=aliases)


def _header_bytes(header: dict, data_len: int) -> bytes:
    """The header as ASCII JSON, checked by the reader's own rules (never write what we refuse)."""
    try:
        raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as err:
        where = non_finite_path(header)  # searched only then: a path a value, 5 s at 100,000
        if where is not None:
            raise InputError(
                f"cannot write the archive: {where} is not a finite number (JSON has no "
                "inf/nan); fix the setting that produced it"
            ) from None
        raise InputError(f"cannot write the archive header: {err}") from None
    try:
        parse_header(raw, data_len, max_decoded_bytes=None, version=header["version"],
                     lookup=build_config)
    except ArchiveError as err:
        raise InputError(f"cannot write this archive: {err}") from None
    return raw


def build_config(kind: str, config: dict) -> Codec | Quantizer:
    """The codec or quantizer a header's config names (the loaders' `ConfigLookup`: a config
    qlis cannot build is refused when the archive is opened, not when a tensor is read)."""
    return get_codec(config) if kind == "codec" else get_quantizer(config)


class Archive:
    """A .qlis file opened for lazy, verified, per-tensor reads (use as a context manager).

    ``max_decoded_bytes`` bounds the memory all tensors may take once decoded (the sum over
    tensors of elements x (dtype width + code width) plus parameters), computed from the
    header before anything is allocated; raise it for models larger than 64 GiB. One open
    Archive may be read from several threads at once.

    >>> import qlis, torch, tempfile, os
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "m.qlis")
    ...     _ = qlis.save(qlis.compress(torch.nn.Linear(4, 4), policy="quant", bits=8), path)
    ...     with qlis.open(path) as archive:
    ...         archive.names(), archive.read("weight").shape
    (['weight', 'bias'], torch.Size([4, 4]))
    """

    def __init__(
        self, path: str | os.PathLike, *, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    ) -> None:
        if not _is_size(max_decoded_bytes):
            raise ConfigError(
                f"max_decoded_bytes must be a non-negative int, got {max_decoded_bytes!r}"
            )
        self.path = _PATH.check(path, "archive path")
        self._fd = open_regular_file(self.path, expected="a .qlis archive")
        self._pread = positional_reader(self._fd)
        try:
            self._read_header(max_decoded_bytes)
        except ArchiveError as err:
            os.close(self._fd)
            raise ArchiveError(f"{self.path}: {err}") from None
        except BaseException:
            os.close(self._fd)
            raise

    def _fail(self, what: str) -> ArchiveError:
        return ArchiveError(f"{self.path}: {what}")

    def _read_header(self, max_decoded_bytes: int) -> None:
        size = os.fstat(self._fd).st_size
        header, self._data_start = read_header(self._pread, size, max_decoded_bytes,
                                               build_config)
        self._entries = header.entries
        self.aliases: dict[str, str] = header.aliases
        self.version: int = header.version
        self._quantizers: dict[int, Quantizer] = {}
        self.writer: dict = header.writer
        self.metadata: dict[str, str] = header.metadata
        self.compression: dict | None = header.compression
        self.distortion: dict | None = header.distortion
        self.summary: Summary = header.summary
        self.decoded_bytes: int = header.decoded_bytes

    # -- reading -----------------------------------------------------------------------------

    def _read_record(self, record: Record, where: str) -> bytes:
        try:
            data = self._pread(record.length, self._data_start + record.offset)
        except ArchiveError as err:
            raise self._fail(f"{where}: {err}") from None
        if len(data) != record.length:
            raise self._fail(f"{where}: truncated record")
        if crc32c(data) != record.crc32c:
            raise self._fail(f"{where}: checksum mismatch (the file is corrupt)")
        return data

    def _empty(self, name: str, numel: int, dtype: np.dtype, then: int = 0) -> np.ndarray:
        """The buffer a tensor's record decodes into, once the memory it and the ``then``
        bytes that reading it goes on to need (its dequantized values) are free to take
        (asked of the system from _ASK_FROM_BYTES on: reading /proc per small tensor would
        cost more than the tensor)."""
        needed = numel * np.dtype(dtype).itemsize + then
        free = available_memory() if needed >= _ASK_FROM_BYTES else None
        if free is not None and needed > free:
            raise InputError(f"{self.path}: tensor {name!r} needs {needed:,} bytes to decode, "
                             f"more than the {free:,} this machine has free")
        try:
            return np.empty(numel, dtype=dtype)
        except MemoryError:
            raise InputError(
                f"{self.path}: not enough memory to decode tensor {name!r} ({needed:,} bytes)"
            ) from None

    def _unreadable(self, name: str, err: Exception) -> QlisError:
        """The error of a tensor whose parameters do not fit its codes, or that memory could
        not hold once dequantized (under a process limit the system's free memory hides)."""
        if allocation_failed(err):
            entry = self.entry(name)
            return InputError(f"{self.path}: not enough memory to dequantize tensor {name!r} "
                              f"({entry.numel * element_size(entry.dtype):,} bytes)")
        return self._fail(f"tensor {name!r}: inconsistent parameters ({err})")

    def _plugin_failed(self, name: str, err: Exception) -> ArchiveError:
        """What a third-party quantizer raised while dequantizing, named as its failure (a
        built-in's is a bug, shown as it is)."""
        quantizer = self.quantizer(name)
        return self._fail(f"tensor {name!r}: quantizer {quantizer.strategy_id!r} failed to "
                          f"dequantize ({type(err).__name__}: {first_line(err)})")

    def _decode(self, entry: TensorEntry, out: np.ndarray) -> np.ndarray:
        name = entry.name
        data = self._read_record(entry.data, f"tensor {name!r}")
        if self.version < ROW_CLASSES_VERSION and in_row_classes(entry.codec, data):
            raise self._fail(f"tensor {name!r}: an ans stream in row classes, which format "
                             f"version {ROW_CLASSES_VERSION} brought, in a version "
                             f"{self.version} file")
        codec = get_codec(dict(entry.codec))
        try:
            decoded = codec.decode(data, out)
        except ArchiveError as err:
            raise self._fail(f"tensor {name!r}: {err}") from None
        except (ConfigError, TypeError, ValueError, KeyError, IndexError) as err:
            raise self._fail(f"tensor {name!r}: cannot decode ({err})") from None
        except Exception as err:
            if is_builtin(codec):
                raise
            raise self._fail(f"tensor {name!r}: codec {codec.codec_id!r} failed to decode "
                             f"({type(err).__name__}: {first_line(err)})") from None
        if not (isinstance(decoded, np.ndarray) and decoded.size == out.size
                and decoded.dtype == out.dtype):
            raise self._fail(f"tensor {name!r}: codec {codec.codec_id!r} did not decode "
                             f"{out.size} values of {out.dtype}")
        return decoded

    def names(self) -> list[str]:
        """Tensor names in stored order, then the further names of tied tensors (`aliases`)."""
        return [*self._entries, *self.aliases]

    def entry(self, name: str) -> TensorEntry:
        """The validated header entry of one tensor (shape, dtype, codec, quantizer, records,
        plan); an alias gives the entry of the tensor it names."""
        try:
            return self._entries[self.aliases.get(name, name)]
        except KeyError:
            raise InputError(f"{self.path}: no tensor named {name!r}") from None

    def quantizer(self, name: str) -> Quantizer | None:
        """The quantizer of a tensor (None for a plain one), built once per distinct config:
        the header's validation shares one mapping between equal configs."""
        config = self.entry(name).quantizer
        if config is None:
            return None
        if id(config) not in self._quantizers:
            self._quantizers[id(config)] = get_quantizer(dict(config))
        return self._quantizers[id(config)]

    def shape(self, name: str) -> tuple[int, ...]:
        """The declared shape of one tensor (no data is read)."""
        return self.entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """The dtype `read` returns for one tensor (no data is read)."""
        return TORCH_DTYPES[self.entry(name).dtype]

    def read_quantized(self, name: str, then: int = 0) -> QuantizedTensor | None:
        """The integer codes and checked parameters of a quantized tensor (None for a plain
        one). The parameters are checked before the codes are decoded, and every code must lie
        on the grid they describe. ``then``: the bytes the caller goes on to allocate from
        them (its dequantized values), asked for with the codes' (`_empty`)."""
        entry, params, _ = self._checked(name)
        if entry.quantizer is None:
            return None
        shape, n_levels = entry.shape, entry.n_levels
        codes = self._decode(entry, self._empty(name, entry.numel, code_dtype(n_levels), then))
        if codes.size and int(codes.max()) >= n_levels:
            raise self._fail(f"tensor {name!r}: code {int(codes.max())} is outside the grid's "
                             f"{n_levels} levels")
        return QuantizedTensor(
            codes=codes.reshape(shape),
            n_levels=n_levels,
            quantizer=dict(entry.quantizer),
            params=params,
            dtype=TORCH_DTYPES[entry.dtype],
        )

    def read_params(self, name: str) -> dict[str, np.ndarray]:
        """The quantizer parameters of a tensor (empty for a plain one), checked by its
        quantizer (`Quantizer.check_params`), without its codes."""
        return self._checked(name)[1]

    def read_grid(self, name: str) -> Grid | None:
        """The grid a quantized tensor's checked parameters describe, without its codes (None
        for a plain tensor, a quantizer without a grid, or an empty tensor)."""
        return self._checked(name)[2]

    def _checked(self, name: str) -> tuple[TensorEntry, dict[str, np.ndarray], Grid | None]:
        """A tensor's entry, parameters and grid: the one path by which parameters leave the
        file, checked against the tensor's shape and n_levels before anything is built from
        them (the records' sizes were bounded by the file when the header was read)."""
        entry = self.entry(name)
        params = {}
        for key, param in entry.params.items():
            data = self._read_record(param.record, f"tensor {name!r} parameter {key!r}")
            params[key] = np.frombuffer(data, PARAM_DTYPES[param.dtype]).reshape(
                param.shape
            ).astype(param.dtype)
        if entry.quantizer is None:
            return entry, params, None
        try:
            grid = self.quantizer(name).check_params(
                entry.shape, entry.n_levels, params)
        except ArchiveError as err:
            raise self._fail(f"tensor {name!r}: {err}") from None
        return entry, params, grid

    def read(self, name: str) -> torch.Tensor:
        """One tensor, dequantized, exactly as ``CompressionResult.state_dict()`` had it."""
        entry = self.entry(name)
        quantized = self.read_quantized(name, then=entry.numel * element_size(entry.dtype))
        if quantized is not None:
            try:
                tensor = self.quantizer(name).dequantize(quantized)
            except QlisError as err:
                raise self._fail(f"tensor {name!r}: {err}") from None
            except (MemoryError, RuntimeError, ValueError, IndexError, KeyError,
                    TypeError) as err:
                raise self._unreadable(name, err) from None
            except Exception as err:
                if is_builtin(self.quantizer(name)):
                    raise
                raise self._plugin_failed(name, err) from None
            if not (isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == entry.shape
                    and tensor.dtype == quantized.dtype):
                raise self._fail(f"tensor {name!r}: the quantizer returned the wrong shape/dtype")
            return tensor
        return self._read_plain(entry)

    def _read_plain(self, entry: TensorEntry) -> torch.Tensor:
        dtype = TORCH_DTYPES[entry.dtype]
        size = element_size(entry.dtype)
        patterns = self._decode(entry, self._empty(entry.name, entry.numel, _PATTERN[size]))
        if dtype == torch.bool and patterns.size and int(patterns.max()) > 1:
            raise self._fail(f"tensor {entry.name!r}: a bool tensor holds bytes other than "
                             "0 and 1 (docs/format.md)")
        signed = torch.from_numpy(patterns.view(_SIGNED[size]))
        tensor = signed.to(torch.bool) if dtype == torch.bool else signed.view(dtype)
        return tensor.reshape(entry.shape)

    def read_pieces(self, name: str) -> Iterator[torch.Tensor]:
        """One tensor's values as `read` gives them, flat and in order, a piece at a time: a
        large quantized tensor a range of rows at a time (`Quantizer.dequantized_rows`, of
        which ``dequantize`` is made), other tensors in one piece. A writer that streams the
        pieces out never holds the tensor's dequantized copy (`write_safetensors`)."""
        entry = self.entry(name)
        quantized = self.read_quantized(name, then=entry.numel * element_size(entry.dtype))
        if quantized is None:
            yield self._read_plain(entry).reshape(-1)
            return
        width = matrix_shape(entry.shape)[1]
        rows = self.quantizer(name).dequantized_rows(quantized)
        done = 0
        while True:
            try:
                start, stop, values = next(rows)
            except StopIteration:
                break
            except QlisError as err:
                raise self._fail(f"tensor {name!r}: {err}") from None
            except (MemoryError, RuntimeError, ValueError, IndexError, KeyError,
                    TypeError) as err:
                raise self._unreadable(name, err) from None
            except Exception as err:
                if is_builtin(self.quantizer(name)):
                    raise
                raise self._plugin_failed(name, err) from None
            if (start != done or tuple(values.shape) != (stop - start, width)
                    or values.dtype != quantized.dtype):
                raise self._fail(f"tensor {name!r}: the quantizer returned the wrong rows")
            done = stop
            yield values.reshape(-1)
        if done != (matrix_shape(entry.shape)[0] if entry.numel else 0):
            raise self._fail(f"tensor {name!r}: the quantizer returned the wrong rows")

    def load(self, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        """Every tensor, dequantized, in stored order; a tied tensor's further names (`aliases`)
        then share the one tensor, as in the model it came from."""
        state = {}
        for name in self._entries:
            state[name] = self.read(name)
            if progress is not None:
                progress(state[name].numel())
        return with_aliases(state, self.aliases)

    def verify(self) -> None:
        """Read and check every record; raises ArchiveError naming the first bad tensor. Each
        tensor is decoded and dequantized a piece at a time (`read_pieces`): its float copy is
        never held (a few-KB archive of one constant tensor of 2^29 values took 3 GB)."""
        for name in self._entries:
            for _ in self.read_pieces(name):
                pass

    def tensor_info(self) -> list[dict]:
        """Per tensor, for a gguf-dump-style listing (see `format.describe_entries`)."""
        return list(describe_entries(self._entries))

    def close(self) -> None:
        """Close the file; a later read is an ArchiveError: reading on through the closed
        descriptor's number read whatever file the process opened next under it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._pread = _closed

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _closed(length: int, offset: int) -> bytes:
    raise ArchiveError("the archive is closed; open it again to read it")


def _is_size(value: object) -> bool:
    return type(value) is int and value >= 0


def open(  # noqa: A001 - the public name is qlis.open
    path: str | os.PathLike, *, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> Archive:
    """Open an archive for lazy per-tensor reads (see Archive)."""
    return Archive(path, max_decoded_bytes=max_decoded_bytes)


def _check_fits(archive: Archive, model: torch.nn.Module) -> None:
    """Names, shapes and dtypes of the archive against the model, before anything is loaded."""
    expected = model.state_dict()
    names = archive.names()
    known = set(names)
    missing = [n for n in expected if n not in known]
    extra = [n for n in names if n not in expected]
    problem = None
    if missing:
        problem = f"the model has {missing[0]!r}, the archive does not"
    elif extra:
        problem = f"the archive has {extra[0]!r}, the model does not"
    else:
        for name, tensor in expected.items():
            shape, dtype = archive.shape(name), archive.dtype(name)
            if tuple(tensor.shape) != shape:
                problem = f"{name!r} is {list(shape)} in the archive, {list(tensor.shape)} here"
            elif tensor.dtype != dtype:
                problem = f"{name!r} is {dtype} in the archive, {tensor.dtype} in the model"
            if problem:
                break
    if problem is None:
        problem = _untied_in_archive(archive, model)
    if problem:
        raise InputError(f"{archive.path} does not fit the model ({problem}); model unchanged")
    check_loadable(model, f"{archive.path} cannot be loaded")


def _adopt_model_ties(archive: Archive, model: torch.nn.Module) -> None:
    """Read a name the model ties to one the archive holds as that one: a Hugging Face
    checkpoint leaves the tied copies out (GPT-2's lm_head.weight), and the data-free pack
    of its folder had no module to learn the ties from, so its archive did not load back."""
    known = set(archive.names())
    for names in lowbit.tied_names(model):
        held = next((name for name in names if name in known), None)
        if held is not None:
            for name in names:
                if name not in known:
                    archive.aliases[name] = archive.aliases.get(held, held)


def _untied_in_archive(archive: Archive, model: torch.nn.Module) -> str | None:
    """Names the model ties (one tensor) that the archive stores apart: loading both into
    the one tensor would keep only the last (an empty tensor has nothing to disagree on)."""
    for names in lowbit.tied_names(model):
        if math.prod(archive.shape(names[0])) == 0:
            continue
        stored = {archive.aliases.get(name, name) for name in names}
        if len(stored) > 1:
            return (f"the model ties {names[1]!r} to {names[0]!r}, one tensor; the archive "
                    "stores them apart")
    return None


def load(
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    *,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    runtime: str = "float",
) -> dict[str, torch.Tensor]:
    """All tensors of an archive; with ``model``, also load them into it (strictly).

    The model is checked against the archive's names, shapes and dtypes first, and every
    tensor is decoded before any parameter changes: on any error the model is untouched. A
    model on the meta device (``with torch.device("meta")``) takes the archive's tensors.
    ``runtime="lowbit"`` (needs ``model``, which may live on the meta device) keeps quantized
    Linear/Conv2d layers packed in memory and returns the model's new state (qlis.runtime.lowbit).
    """

    lowbit.check_runtime(runtime)
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model= takes an nn.Module to load into, got {type(model).__name__}")
    if runtime == "lowbit" and model is None:
        raise ConfigError('runtime="lowbit" loads into a model: pass model=')
    with model_in_use(model):  # not while a compression in another thread swaps its weights
        return _load(path, model, max_decoded_bytes, runtime)


def _load(path: str | os.PathLike, model: torch.nn.Module | None, max_decoded_bytes: int,
          runtime: str) -> dict[str, torch.Tensor]:
    """`load`, its arguments checked."""
    with Archive(path, max_decoded_bytes=max_decoded_bytes) as archive:
        if model is not None:
            _adopt_model_ties(archive, model)
            _check_fits(archive, model)
        if runtime == "lowbit":
            lowbit.load_lowbit(archive, model)
            return model.state_dict()
        if model is not None:
            lowbit.check_meta_buffers(model, model.state_dict())
        state = archive.load()
    if model is not None:
        # a meta tensor cannot be copied into (torch only warns, and the model stayed on the
        # meta device): the archive's tensors take its place, ties kept (aliases share one)
        on_meta = any(t.is_meta for t in model.state_dict().values())
        ties = lowbit.tied_names(model)
        try:
            model.load_state_dict(state, assign=on_meta)
        except RuntimeError as err:  # what the checks before did not foresee
            detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
            raise InputError(f"{path} does not fit the model: {detail or err}") from None
        if on_meta:
            lowbit.retie(model, ties)
    return state
