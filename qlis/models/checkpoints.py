"""Model files: reading .pt/.pth/.bin (state dicts, never unpickled code), .safetensors and
Hugging Face model folders (single or sharded); streaming a .safetensors file out.

Everything read is treated as hostile: only regular files are opened (a FIFO or device
would block or never end), a folder's files must resolve inside it, JSON is size- and
depth-bounded, and every tensor is validated (`qlis.models.tensors.checked_state`) before use.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import pickle
import re
import stat
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from qlis.archive.atomic import atomic_path, keep_mode, signals_deferred, temporary_name
from qlis.cli.console import same_file
from qlis.errors import InputError, first_line
from qlis.json_input import float_sized_int, unique_keys
from qlis.models.tensors import (
    MAX_NDIM,
    ValidatedState,
    bit_patterns,
    check_storable_shape,
    checked_state,
    tensor_label,
)
from qlis.regular_files import file_kind, open_regular_file, read_small_file
from qlis.workers.threads import IN_FLIGHT_ELEMENTS, SMALL_TENSOR_ELEMENTS, ordered_map
from qlis.write_behind import WriteBehind

try:
    import fcntl
except ImportError:  # not POSIX: no folder lock (`_locked`)
    fcntl = None

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights")
_MAX_NESTING = 16  # levels of {"state_dict": {"model": ...}} searched for the state dict
_FOLDER_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_MAX_INDEX_BYTES = 16 << 20  # a shard index of ~100,000 tensors is about 10 MB
_MAX_JSON_CONTAINERS = 100_000
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit

_SAFETENSORS_DTYPES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int8": "I8",
    "int16": "I16", "int32": "I32", "int64": "I64", "uint8": "U8", "bool": "BOOL",
}
_FROM_SAFETENSORS = {v: getattr(torch, k) for k, v in _SAFETENSORS_DTYPES.items()}


def _stat(path: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file or folder") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the name
        raise InputError(f"{path}: cannot be read ({getattr(err, 'strerror', None) or err})")\
            from None


def _require_regular(path: Path) -> os.stat_result:
    """The status of a regular file; anything else is refused before it is opened."""
    info = _stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise InputError(
            f"{path}: is {file_kind(info.st_mode)}; give a model file or a model folder"
        )
    return info


FileIdentity = tuple[int, int, int, int]
"""A file as it was validated: device, inode, size and modification time."""


def _identity(info: os.stat_result) -> FileIdentity:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _open_unchanged(path: Path, identity: FileIdentity) -> int:
    """A descriptor of ``path`` that is still the file validated as ``identity``: tensors are
    read long after their header, and a file replaced since (a download finishing, another
    model copied over it) was read as this one, silently, or a pipe put there blocked."""
    fd = open_regular_file(path, str(path), "a model file")
    if _identity(os.fstat(fd)) != identity:
        os.close(fd)
        raise InputError(f"{path}: changed while qlis read it (replaced or rewritten since "
                         "its header was read); run again once it is complete")
    return fd


def _parse_json(data: bytes, path: Path) -> object:
    """JSON with bounded cost (the size is capped by the caller, containers and depth here),
    every object's keys different."""
    if data.count(b"[") + data.count(b"{") > _MAX_JSON_CONTAINERS:
        raise InputError(f"{path}: more than {_MAX_JSON_CONTAINERS:,} JSON arrays and objects")
    try:
        return json.loads(data, object_pairs_hook=unique_keys, parse_int=float_sized_int)
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply") from None
    except ValueError as err:  # also UnicodeDecodeError and over-long integers
        raise InputError(f"{path}: not valid JSON ({err})") from None


def _tensor_spec(path: Path, name: str, dtype_code: str, shape: list[int]) -> tuple:
    """(torch dtype, shape, bytes) of a safetensors entry, validated without allocating."""
    label = tensor_label(name)
    dtype = _FROM_SAFETENSORS.get(dtype_code)
    if dtype is None:
        raise InputError(
            f"{path}: tensor {label} has dtype {dtype_code}, which qlis does not store "
            f"(it stores {', '.join(_FROM_SAFETENSORS)}); convert it first"
        )
    if len(shape) > MAX_NDIM:
        raise InputError(f"{path}: tensor {label} has {len(shape)} dimensions (at most {MAX_NDIM})")
    check_storable_shape(shape, label, f"{path}: ")
    return dtype, shape, math.prod(shape) * dtype.itemsize


def _names_given_twice(header: bytes) -> bool:
    """Whether a safetensors header (already accepted by the library, which bounds its size and
    depth, and keeps the last entry of a name) gives a name twice. Its keys are read as JSON
    reads them: a key may be spelt with escapes (``"data_offs\\u0065ts"``), which a search of
    the bytes would miss or miscount."""
    keys = [key for key, _ in json.loads(header, object_pairs_hook=lambda pairs: pairs)]
    return len(keys) != len(set(keys))


def _safetensors_layout(path: Path) -> tuple[int, list[tuple[str, torch.dtype, list, int]],
                                              FileIdentity]:
    """(where the data starts, [(name, dtype, shape, bytes)] in file order, the file's
    identity), validated.

    The header is read through the safetensors library (which bounds its size and depth and
    checks that the tensors tile the data exactly); offsets follow from the tensors in offset
    order; the JSON is parsed here only for its names (`_names_given_twice`), from the file
    as it was first seen (`_open_unchanged`).
    """
    identity = _identity(_require_regular(path))
    file_size = identity[2]
    try:
        with safe_open(str(path), framework="pt") as f:
            entries = [(n, f.get_slice(n).get_dtype(), f.get_slice(n).get_shape())
                       for n in f.offset_keys()]
        with open(_open_unchanged(path, identity), "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = f.read(min(header_len, file_size))  # the library read it whole
    except (SafetensorError, OSError, ValueError, struct.error) as err:
        raise InputError(f"{path}: not a readable safetensors file ({err})") from None
    except MemoryError as err:  # mapping the file failed: a limit on the address space
        raise InputError(f"{path}: cannot be mapped into memory ({first_line(err)}); raise "
                         "the process's address-space limit (ulimit -v)") from None
    try:
        twice = _names_given_twice(header)
    except (ValueError, RecursionError) as err:  # what the library read, json does not
        raise InputError(f"{path}: not a readable safetensors file ({first_line(err)})") from None
    if twice:
        raise InputError(f"{path}: its header names a tensor twice (the library keeps the "
                         "last entry of a name: which one is meant is not known)")
    specs = [(name, *_tensor_spec(path, name, code, shape)) for name, code, shape in entries]
    data_start = 8 + header_len
    if data_start + sum(size for *_, size in specs) != file_size:
        raise InputError(f"{path}: tensor data does not match the file size (corrupt file)")
    return data_start, specs, identity


def _check_bool(path: Path, name: str, raw: np.ndarray) -> None:
    if raw.size and raw.max() > 1:
        raise InputError(f"{path}: bool tensor {tensor_label(name)} holds values other "
                         "than 0 and 1 (corrupt file)")


_MAPPED_FROM_BYTES = 1 << 20  # smaller tensors are read into memory, larger ones mapped


def _mapped(path: Path, fd: int, offset: int, size: int) -> np.ndarray:
    """``size`` bytes of the file at ``offset``, mapped copy-on-write (writes never reach the
    file); the mapping lives as long as the array. What ``np.memmap(mode="c")`` does, without
    its bookkeeping: a pack maps every tensor three times, and that cost a tenth of a second
    of held GIL on ViT-L/14."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mapping = mmap.mmap(fd, offset - start + size, access=mmap.ACCESS_COPY, offset=start)
    except ValueError:  # shorter than the header said: it changed since it was opened
        raise InputError(f"{path}: the file ended early (changed while reading)") from None
    return np.frombuffer(mapping, dtype=np.uint8, count=size, offset=offset - start)


class MappedState(ValidatedState):
    """The tensors of safetensors files, each read only when it is asked for.

    The headers were validated when the files were opened (names, dtypes, shapes, sizes; bool
    tensors' values are read then), so nothing here is checked again but a bool's values.
    Each access returns a new tensor: a small one read into memory, a large one mapped
    copy-on-write from the file (writes never reach it). A mapping lives as long as its
    tensor, so a pass over the model that drops each tensor after use holds a few tensors,
    not the model: memory independent of its size.
    """

    def __init__(self, specs: dict[str, tuple[Path, int, torch.dtype, list[int], int]],
                 files: dict[Path, FileIdentity]) -> None:
        self._specs = specs  # name -> (file, absolute offset, dtype, shape, bytes)
        self._files = files  # each file as it was validated (`_open_unchanged`)
        self._layout: dict[str, torch.Tensor] | None = None

    def layout(self) -> Mapping[str, torch.Tensor]:
        if self._layout is None:  # made once: ~500 bytes a tensor
            self._layout = {name: torch.empty(shape, dtype=dtype, device="meta")
                            for name, (_, _, dtype, shape, _) in self._specs.items()}
        return self._layout

    @classmethod
    def of_file(cls, path: Path) -> MappedState:
        data_start, layout, identity = _safetensors_layout(path)
        specs, offset = {}, data_start
        for name, dtype, shape, size in layout:
            specs[name] = (path, offset, dtype, shape, size)
            offset += size
        state = cls(specs, {path: identity})
        for name, dtype, *_ in layout:
            if dtype == torch.bool:  # rare and small: a bad one is refused at once
                state[name]
        return state

    def __getitem__(self, name: str) -> torch.Tensor:
        path, offset, dtype, shape, size = self._specs[name]
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        fd = _open_unchanged(path, self._files[path])
        try:
            if size < _MAPPED_FROM_BYTES or offset % dtype.itemsize:  # unaligned: a copy
                tensor = torch.empty(shape, dtype=dtype)
                raw = tensor.reshape(-1).view(torch.uint8).numpy()
                if os.preadv(fd, [memoryview(raw)], offset) != size:
                    raise InputError(f"{path}: the file ended early (changed while reading)")
            else:
                raw = _mapped(path, fd, offset, size)
                tensor = torch.from_numpy(raw).view(dtype).reshape(shape)
        finally:
            os.close(fd)
        if dtype == torch.bool:
            _check_bool(path, name, raw)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def files(self) -> list[Path]:
        """The files the tensors are read from, in order."""
        return list(dict.fromkeys(spec[0] for spec in self._specs.values()))

    def merged(self, other: MappedState) -> MappedState:
        """Both files' tensors (shards of one model, which the caller checked are disjoint)."""
        return MappedState({**self._specs, **other._specs}, {**self._files, **other._files})


def read_safetensors_into(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Read a safetensors file straight into ``tensors`` (a model's state dict: the same
    names and shapes, contiguous, on the CPU), one plain read per tensor; a tensor stored in
    another dtype is read whole, then converted as ``load_state_dict`` would.

    Unlike a loaded-then-copied state dict, the weights are never in memory twice, and unlike
    mapped tensors the model owns aligned memory that no later change to the file can reach.
    Names, dtypes and shapes are checked before anything is read; a file that turns out
    corrupt while reading (truncated, a bool that is not 0 or 1) leaves ``tensors`` partly
    overwritten, so read into a model that is being built.
    """
    path = Path(path)
    data_start, specs, identity = _safetensors_layout(path)
    names = [name for name, *_ in specs]
    if set(names) != set(tensors):
        missing = sorted(set(tensors) - set(names))
        extra = sorted(set(names) - set(tensors))
        raise InputError(f"{path}: its tensors are not the model's ({len(missing)} missing, "
                         f"{len(extra)} unexpected; first: {tensor_label((missing or extra)[0])})")
    for name, _, shape, _ in specs:
        target = tensors[name]
        if list(target.shape) != list(shape):
            raise InputError(f"{path}: tensor {tensor_label(name)} has shape {list(shape)}, "
                             f"the model's {list(target.shape)}")
        if not target.is_contiguous() or target.device.type != "cpu":
            raise InputError(f"tensor {tensor_label(name)} of the model is not contiguous "
                             "CPU memory; read the file with load_state_dict instead")
    with open(_open_unchanged(path, identity), "rb") as f:
        f.seek(data_start)
        for name, dtype, shape, size in specs:
            if size == 0:
                continue
            target = tensors[name].detach()
            stored = target if target.dtype == dtype else torch.empty(shape, dtype=dtype)
            raw = stored.reshape(-1).view(torch.uint8).numpy()
            if f.readinto(memoryview(raw)) != size:
                raise InputError(f"{path}: the file ended early (truncated while reading)")
            if dtype == torch.bool:
                _check_bool(path, name, raw)
            if stored is not target:
                target.copy_(stored)


def _torch_load(path: Path) -> object:
    """torch.load of a zip checkpoint, read into memory: mapped, a storage that claims more
    than its record read the bytes after it as weights (torch checks a record's size only
    when it reads it), and a file truncated while in use killed the process (SIGBUS).

    Warnings are silenced: a checkpoint we refuse (e.g. of quantized tensors) must give one
    clear line, not torch's deprecation notices.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _check_zip_records(path: Path) -> None:
    """Every stored record of a zip checkpoint read once against its CRC-32, which
    torch.load never checks: a damaged .pt otherwise loads (and packs) its damaged weights
    silently. One more read of the file (the page cache then serves torch.load's). A
    compressed record, which torch.save never writes, is refused: mapped, a deflated one
    loaded as garbage, silently. A file that is no zip is refused: torch's
    legacy format (before 1.6) allocates every storage its pickle claims before reading
    any (32 GB asked by a 500-byte file)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        with contextlib.suppress(OSError), open(path, "rb") as file:
            if file.read(1) == b"\x80":  # a pickle: torch's legacy format
                raise InputError(
                    f"{path}: a checkpoint of torch's legacy format (before torch 1.6), which "
                    "qlis does not read; load it and save it again with torch.save, or as "
                    ".safetensors") from None
        raise InputError(f"{path}: not a PyTorch checkpoint (its pickle data is not a state "
                         "dict's)") from None
    try:
        with archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise InputError(
                        f"{path}: its record {info.filename[:200]!r} is compressed, which "
                        "torch.save never writes and torch.load reads as raw bytes; save the "
                        "checkpoint again with torch.save")
                with archive.open(info) as record:
                    while record.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise InputError(f"{path}: damaged ({str(err) or type(err).__name__}); the file is "
                         "corrupt") from None


def _load_torch(path: Path) -> Mapping:
    _require_regular(path)
    _check_zip_records(path)
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as err:
        if "unsupported global" not in str(err).lower():  # bytes no pickle of tensors has
            raise InputError(f"{path}: not a PyTorch checkpoint (its pickle data is not a "
                             "state dict's)") from None
        raise InputError(
            f"{path}: the file holds pickled Python objects that would run code when loaded "
            "(for example a whole nn.Module); save model.state_dict() instead"
        ) from None
    except RecursionError:
        raise InputError(f"{path}: nested too deeply to be a checkpoint") from None
    except MemoryError:
        raise InputError(f"{path}: does not fit in memory") from None
    except Exception as err:  # torch.load raises many types on non-checkpoints
        detail = str(err).strip().splitlines()[0] if isinstance(err, RuntimeError) else ""
        raise InputError(
            f"{path}: not a PyTorch checkpoint" + (f" ({detail})" if detail else "")
        ) from None
    return _tensor_mapping(obj, path)


def _describe_keys(obj: Mapping) -> str:
    keys = [k if isinstance(k, str) else type(k).__name__ for k in list(obj)[:8]]
    return ", ".join(tensor_label(k) for k in keys)


def _tensor_mapping(obj: object, path: Path) -> Mapping:
    """The state dict inside a loaded checkpoint, also one nested under 'state_dict' & co.

    Searched iteratively and at most _MAX_NESTING levels deep.
    """
    if not isinstance(obj, Mapping):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for _ in range(_MAX_NESTING):
        if not obj:
            raise InputError(f"{path}: holds an empty state dict")
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            for name, tensor in obj.items():
                if (tensor.dtype == torch.bool and tensor.layout == torch.strided
                        and tensor.device.type == "cpu"):  # as a safetensors file's are
                    _check_bool(path, name,
                                tensor.detach().reshape(-1).view(torch.uint8).numpy())
            return obj
        nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            raise InputError(f"{path}: no state dict found (keys: {_describe_keys(obj)})")
        obj = nested
    raise InputError(f"{path}: the state dict is nested more than {_MAX_NESTING} levels deep")


def _folder_roots(folder: Path) -> tuple[Path, ...]:
    """Where a folder's files may resolve: inside it, or, for a Hugging Face cache snapshot
    (…/snapshots/<revision>), in the blobs folder its links point to."""
    root = folder.resolve()
    if root.parent.name == "snapshots":
        return root, root.parent.parent / "blobs"
    return (root,)


def _inside(roots: tuple[Path, ...], candidate: Path, named_by: Path) -> Path:
    """``candidate`` resolved, refused if it escapes the folder (``..``, absolute, symlink)."""
    try:
        resolved = candidate.resolve()
    except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: a symlink loop
        raise InputError(f"{named_by}: cannot resolve {candidate} ({err})") from None
    if not any(resolved.is_relative_to(root) for root in roots):
        raise InputError(
            f"{named_by}: {candidate} resolves to {resolved}, outside the model folder; "
            "refusing to read it"
        )
    return resolved


def folder_file(folder: str | Path, name: str | Path) -> Path:
    """``folder / name``, refused (an InputError) where it resolves outside the folder (or a
    Hugging Face snapshot's blobs): a file of a model folder that qlis reads, such as its
    modules.json, is read only from inside it, like the weights and config.json."""
    candidate = Path(folder) / name
    _inside(_folder_roots(Path(folder)), candidate, Path(folder))
    return candidate


_MAX_LISTED = 10_000  # entries of a folder's top level whose links are checked


def check_folder_links(folder: str | Path) -> None:
    """Refuse a folder whose top-level entries link outside it, before a library that reads
    whichever of its files it knows (a tokenizer: tokenizer.json, vocab.txt, merges.txt, ...)
    is let at it."""
    folder = Path(folder)
    roots = _folder_roots(folder)
    try:
        with os.scandir(folder) as entries:
            for _, entry in zip(range(_MAX_LISTED), entries, strict=False):
                if entry.is_symlink():
                    _inside(roots, Path(entry.path), folder)
    except OSError as err:
        raise InputError(f"{folder}: cannot list it ({err.strerror or err})") from None


def _folder_model_file(path: Path, roots: tuple[Path, ...]) -> tuple[str, Path]:
    """The file of a model folder that `load_state_dict` starts from (a checkpoint or a
    shard index: the first of `_FOLDER_FILES` present): its name, which says its kind (a
    Hugging Face cache blob's resolved name does not), and its path resolved in the folder."""
    for name in _FOLDER_FILES:
        candidate = path / name
        if os.path.lexists(candidate):
            return name, _inside(roots, candidate, path)
    looked_for = ", ".join(_FOLDER_FILES)
    raise InputError(f"{path}: a folder without a model file (looked for {looked_for})")


def _load_folder(path: Path) -> Mapping:
    roots = _folder_roots(path)
    name, file = _folder_model_file(path, roots)
    if name.endswith(".index.json"):
        return _load_shards(file, path, roots)
    if name.lower().endswith(".safetensors"):
        return MappedState.of_file(file)
    return _load_torch(file)


_MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few KiB


def read_config(folder: str | Path) -> dict:
    """A model folder's ``config.json`` as a JSON object, read with bounds (a regular file of
    at most 1 MiB, bounded nesting) before transformers parses it without any; like the
    weights, it must lie in the folder (a link out of it is refused)."""
    path = folder_file(folder, "config.json")
    parsed = _parse_json(read_small_file(path, _MAX_CONFIG_BYTES, expected="a JSON file"), path)
    if not isinstance(parsed, dict):
        raise InputError(f"{path}: holds a JSON {type(parsed).__name__}, not an object")
    return parsed


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor -> shard map, validated (strings only)."""
    parsed = _parse_json(read_small_file(index, _MAX_INDEX_BYTES, expected="a JSON file"), index)
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: not a shard index (no 'weight_map' object)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InputError(
                f"{index}: the shard of tensor {tensor_label(name)} is a "
                f"{type(shard).__name__}, not a file name"
            )
        if PurePosixPath(shard).name in ("", ".", "..") or shard.endswith("/"):
            raise InputError(f"{index}: the shard of tensor {tensor_label(name)} is "
                             f"{tensor_label(shard)}, which names no file")
    return weight_map


def _load_shards(index: Path, folder: Path, roots: tuple[Path, ...]) -> Mapping:
    """Every shard the index names, each tensor checked to be where the index puts it."""
    weight_map = _weight_map(index)
    state: Mapping = MappedState({}, {})
    for shard in sorted(set(weight_map.values())):
        shard_path = _inside(roots, folder / shard, index)
        if not os.path.lexists(shard_path):
            raise InputError(f"{index}: shard {tensor_label(shard)} is missing")
        part = (MappedState.of_file(shard_path) if shard.lower().endswith(".safetensors")
                else _load_torch(shard_path))
        for name in part:
            if weight_map.get(name) != shard:
                listed = weight_map.get(name)
                raise InputError(
                    f"{index}: tensor {tensor_label(str(name))} is in shard "
                    f"{tensor_label(shard)}, but the index "
                    + (f"puts it in {tensor_label(listed)}" if listed else "does not list it")
                )
        if isinstance(state, MappedState) and isinstance(part, MappedState):
            state = state.merged(part)
        else:  # .bin shards: loaded tensors
            state = {**state, **part}
    absent = next((n for n in weight_map if n not in state), None)
    if absent is not None:
        raise InputError(
            f"{index}: lists tensor {tensor_label(absent)} in shard "
            f"{tensor_label(weight_map[absent])}, which does not hold it"
        )
    return state


def load_state_dict(path: str | Path) -> Mapping[str, torch.Tensor]:
    """The tensors of a model file or folder, loaded without executing any code.

    Only regular files and folders are read; tensors are validated as by
    `qlis.models.tensors.checked_state` (dense, a stored dtype, no unbounded repeated views).
    Safetensors files (single or sharded) give a `MappedState`: each tensor is read when it
    is used, so a pass over a model larger than memory holds one tensor at a time.

    >>> load_state_dict("missing.pt")
    Traceback (most recent call last):
    ...
    qlis.errors.InputError: missing.pt: no such file or folder
    """
    path = Path(path)
    mode = _stat(path).st_mode
    if stat.S_ISDIR(mode):
        state = _load_folder(path)
    elif not stat.S_ISREG(mode):
        raise InputError(f"{path}: is {file_kind(mode)}; give a model file or a model folder")
    elif path.suffix.lower() == ".safetensors":
        state = MappedState.of_file(path)
    elif path.suffix.lower() == ".qlis":
        raise InputError(f"{path}: is a qlis archive; use 'qlis unpack' or qlis.load()")
    else:
        state = _load_torch(path)
    if not state:
        raise InputError(f"{path}: holds no tensors")
    if isinstance(state, MappedState):
        return state
    return checked_state(state.items(), f"{path}: ")


def read_metadata(path: str | Path) -> dict[str, str] | None:
    """The safetensors ``__metadata__`` of a model (e.g. ``{"format": "pt"}``), or None.

    For a sharded folder: the entries every .safetensors shard agrees on (`load_state_dict`
    also reads .bin shards an index names, which have none). A .pt checkpoint has none.
    """
    path = Path(path)
    if stat.S_ISDIR(_stat(path).st_mode):
        roots = _folder_roots(path)
        if os.path.lexists(path / "model.safetensors"):
            files = [_inside(roots, path / "model.safetensors", path)]
        elif os.path.lexists(path / "model.safetensors.index.json"):
            index = _inside(roots, path / "model.safetensors.index.json", path)
            shards = sorted(set(_weight_map(index).values()))  # .bin shards have none
            files = [_inside(roots, path / shard, index) for shard in shards
                     if shard.lower().endswith(".safetensors")]
        else:
            return None
    elif path.suffix.lower() == ".safetensors":
        files = [path]
    else:
        return None
    common: dict[str, str] | None = None
    for file in files:
        _require_regular(file)
        try:
            with safe_open(str(file), framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise InputError(f"{file}: not a readable safetensors file ({err})") from None
        common = metadata if common is None else {
            k: v for k, v in common.items() if metadata.get(k) == v
        }
    return common or None


def weight_files(path: str | Path) -> list[Path]:
    """The files whose tensors `load_state_dict` reads for ``path``: the file itself, or in
    a folder its one checkpoint or the shards its index names (not the index, tokenizer,
    README or other checkpoints beside them)."""
    path = Path(path)
    if not stat.S_ISDIR(_stat(path).st_mode):
        return [path]
    roots = _folder_roots(path)
    name, file = _folder_model_file(path, roots)
    if not name.endswith(".index.json"):
        return [file]
    return [_inside(roots, path / shard, file)
            for shard in sorted(set(_weight_map(file).values()))]


def model_file_bytes(path: str | Path) -> int:
    """Bytes on disk of the weight files a model is read from (`weight_files`): what a real
    ratio compares the archive with, so files that were never compressed do not inflate it."""
    return sum(_stat(file).st_size for file in weight_files(path))


def _check_text(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise InputError(f"{what} is a {type(text).__name__}, not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"{what} {tensor_label(text)} is not valid Unicode text (a lone surrogate), "
            "which safetensors cannot store; write a .pt file instead"
        ) from None
    return text


def _safetensors_header(
    layout: list[tuple[str, str, list[int]]], metadata: Mapping[str, str] | None
) -> bytes:
    """The encoded, padded header of `write_safetensors`, refusing what safetensors cannot
    represent (a tensor named __metadata__, names that are not UTF-8 text, other dtypes)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {
            _check_text(k, "a metadata key"): _check_text(v, f"metadata {tensor_label(str(k))}")
            for k, v in metadata.items()
        }
    offset = 0
    for name, dtype, shape in layout:
        _check_text(name, "the tensor name")
        if name == "__metadata__" or name in header:
            what = "is reserved by safetensors" if name == "__metadata__" else "appears twice"
            raise InputError(f"tensor name {tensor_label(name)} {what}; write a .pt file instead")
        if dtype not in _SAFETENSORS_DTYPES:
            raise InputError(f"tensor {tensor_label(name)} has dtype {dtype}, which this "
                             "writer does not support")
        size = math.prod(shape) * getattr(torch, dtype).itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    if len(encoded) > _MAX_SAFETENSORS_HEADER:
        raise InputError(f"the safetensors header would take {len(encoded):,} bytes, more than "
                         f"safetensors reads ({_MAX_SAFETENSORS_HEADER:,}); write a .pt file")
    return encoded


Read = Callable[[str], torch.Tensor | Iterable[torch.Tensor]]
"""What the safetensors writers take: a tensor by name, or its values flat and in order as
consecutive pieces (`qlis.archive.file.Archive.read_pieces`), never whole in memory."""


def write_safetensors(
    path: str | Path,
    layout: list[tuple[str, str, list[int]]],
    read: Read,
    progress: Callable[[int], None] | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
    jobs: int | None = 1,
    named: str | Path | None = None,
) -> None:
    """Stream tensors into a .safetensors file, one at a time (atomically).

    ``layout`` lists (name, dtype name, shape) in file order; ``read(name)`` produces each
    tensor, or its pieces (`Read`), when its turn comes (``jobs`` of them side by side, so
    ``read`` must be thread-safe when ``jobs`` > 1), so memory holds a few tensors rather
    than the whole model. Each tensor is written at its place in the file by the thread that
    read it: the header fixes every offset, and the threads' writes overlap the others'
    reads. The file goes to the disk as it is written and leaves the page cache behind
    (`WriteBehind`): the final fsync has little left to wait for.
    ``metadata`` becomes the file's ``__metadata__`` (e.g. the source's, see `read_metadata`);
    ``overwrite=False`` refuses an existing ``path``, also one that appears while writing.
    ``named``: the file's name in messages, where ``path`` is a stand-in for it (a shard's
    hidden partial file).
    """
    encoded = _safetensors_header(layout, metadata)
    starts = np.cumsum([8 + len(encoded)] + [_tensor_bytes(d, s) for _, d, s in layout])

    def write(index: int) -> None:
        name, dtype, shape = layout[index]
        got = read(name)
        whole = isinstance(got, torch.Tensor)
        offset, end = int(starts[index]), int(starts[index + 1])
        for piece in (got,) if whole else got:
            if piece.dtype != getattr(torch, dtype) or (whole and list(piece.shape) != list(shape)):
                raise _misread(name, dtype, shape, f"{piece.dtype} {list(piece.shape)}"
                               if whole else f"{piece.dtype} values")
            data = bit_patterns(piece).reshape(-1).view(np.uint8)
            if offset + data.size > end:
                raise _misread(name, dtype, shape, "more values")
            out.write(data, offset)
            offset += data.size
        if offset != end:
            raise _misread(name, dtype, shape, "fewer values")

    try:
        with atomic_path(path, overwrite) as tmp, open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            f.flush()
            out = WriteBehind(f.fileno())
            for _ in ordered_map(write, range(len(layout)), jobs,
                                 cost=lambda i: math.prod(layout[i][2]),
                                 budget=IN_FLIGHT_ELEMENTS, group_below=SMALL_TENSOR_ELEMENTS):
                if progress is not None:
                    progress(1)
    except OSError as err:  # a full disk (ENOSPC), a quota, a read-only file system
        raise InputError(
            f"{named or path}: could not be written ({err.strerror or err}); free space or "
            "write elsewhere"
        ) from None


def _misread(name: str, dtype: str, shape: list[int], what: str) -> InputError:
    return InputError(f"tensor {tensor_label(name)} was read as {what}, not the {dtype} "
                      f"{list(shape)} announced")


SHARD_INDEX = "model.safetensors.index.json"


def _tensor_bytes(dtype: str, shape: list[int]) -> int:
    return math.prod(shape) * getattr(torch, dtype).itemsize


def split_into_shards(layout: list[tuple[str, str, list[int]]],
                      max_shard_bytes: int) -> list[list[tuple[str, str, list[int]]]]:
    """Consecutive runs of tensors of at most ``max_shard_bytes`` each (a larger tensor
    alone), as Hugging Face's ``save_pretrained(max_shard_size=...)`` splits them.

    >>> [len(s) for s in split_into_shards([("a", "float32", [4])] * 5, 32)]
    [2, 2, 1]
    """
    shards: list[list[tuple[str, str, list[int]]]] = [[]]
    size = 0
    for entry in layout:
        nbytes = _tensor_bytes(entry[1], entry[2])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _remove(paths: list[Path]) -> None:
    """Remove files: what a failed write made, an earlier set's shards (gone already: fine)."""
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (flock, where the system has it): two unpacks into
    one folder publish one whole set each, one after the other, not a mix of both."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _check_still_free(folder: Path, names: list[str], inputs: Sequence[Path]) -> None:
    """Refuse to publish a set where a file it would replace or remove (its names, its index,
    an earlier set's shards, a single checkpoint) appeared while it was written."""
    candidates = [*(folder / name for name in names), folder / SHARD_INDEX,
                  folder / _SINGLE_CHECKPOINT, *folder.glob("model-*-of-*.safetensors")]
    for path in candidates:
        if os.path.lexists(path) and not any(same_file(path, given) for given in inputs):
            raise InputError(f"{path} appeared while the shards were being written; it was "
                             "kept. Pass --force (overwrite=True) to replace it")


def _write_index(path: Path, layout: list[tuple[str, str, list[int]]],
                 weight_map: dict[str, str]) -> None:
    index = {"metadata": {"total_size": sum(_tensor_bytes(d, s) for _, d, s in layout)},
             "weight_map": weight_map}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_SINGLE_CHECKPOINT = _FOLDER_FILES[0]  # model.safetensors
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
"""A shard of an earlier set (`write_sharded_safetensors`): removed once a new set and its
index are complete, as ``save_pretrained`` does (the index names only the new set)."""


def write_sharded_safetensors(
    folder: str | Path,
    layout: list[tuple[str, str, list[int]]],
    read: Read,
    max_shard_bytes: int,
    progress: Callable[[int], None] | None = None,
    metadata: Mapping[str, str] | None = None,
    jobs: int | None = 1,
    inputs: Sequence[Path] = (),
    overwrite: bool = True,
) -> list[Path]:
    """Tensors as Hugging Face shards in ``folder`` (an existing folder): files
    ``model-00001-of-0000N.safetensors`` of at most ``max_shard_bytes`` each and the index
    ``model.safetensors.index.json`` that ``transformers`` loads them by. Every shard is
    written under a hidden name first and takes its own name only once all are complete, the
    index last: a failure (a corrupt archive found while decoding) leaves the folder as it
    was, and files of those names are replaced only by a complete set, under a lock on the
    folder (two unpacks into it leave one whole set, not a mix); an earlier set's shards, and
    a ``model.safetensors`` that loaders would read instead of the index, are then removed.
    A file of ``inputs`` (what is being read) under one of those names or as the
    ``model.safetensors`` to remove, or an index name taken by what is not a file, is refused
    before anything is written. ``overwrite=False``
    (no --force: the folder was empty) refuses, when the set is complete, a file it would
    replace or remove that appeared meanwhile (another unpack's set), as `write_safetensors`
    does. The hidden shards are named as temporaries (`temporary_name`), which a later write
    removes if a killed unpack left them, and renamed with signals held back
    (`signals_deferred`). Returns the files written, the index last."""
    folder = Path(folder)
    shards = split_into_shards(layout, max_shard_bytes)
    names = [f"model-{number:05d}-of-{len(shards):05d}.safetensors"
             for number in range(1, len(shards) + 1)]
    for name in [*names, SHARD_INDEX]:
        if any(same_file(folder / name, given) for given in inputs):
            raise InputError(f"{folder / name}: is the input, which the shards would replace; "
                             "unpack into another folder")
    single = folder / _SINGLE_CHECKPOINT  # kept as an input, it stood in for the new set
    if any(same_file(single, given) for given in inputs):
        raise InputError(f"{single}: is the input, which loaders would read instead of the "
                         "shards (it cannot be removed); unpack into another folder")
    for target in [folder / name for name in names] + [folder / SHARD_INDEX]:
        if (target.exists() or target.is_symlink()) and not target.is_file():
            raise InputError(f"{target}: is not a file the new set can replace")
    index_path = folder / SHARD_INDEX
    weight_map, partial = {}, []
    try:
        for name, shard in zip(names, shards, strict=True):
            partial.append(temporary_name(folder / name))  # another writer's are its own
            write_safetensors(partial[-1], shard, read, progress, metadata, jobs=jobs,
                              named=folder / name)
            weight_map.update({entry[0]: name for entry in shard})
        # a set and its index published whole, one writer at a time, not cut by Ctrl-C
        with _locked(folder), signals_deferred():
            if not overwrite:
                _check_still_free(folder, names, inputs)
            for path, name in zip(partial, names, strict=True):
                keep_mode(path, folder / name)
                os.replace(path, folder / name)
            _write_index(index_path, layout, weight_map)
            # an earlier set's shards, and a single checkpoint, which loaders (qlis and
            # transformers) read before an index: it would stand in for the new set
            stale = [path for path in folder.glob("model-*-of-*.safetensors")
                     if _SHARD_NAME.fullmatch(path.name) and path.name not in names]
            _remove([path for path in [*stale, folder / _SINGLE_CHECKPOINT]
                     if not any(same_file(path, given) for given in inputs)])
    except OSError as err:
        _remove(partial)
        raise InputError(f"{folder}: the shards could not be written ({err.strerror or err})"
                         ) from None
    except BaseException:
        _remove(partial)
        raise
    written = [folder / name for name in names]
    return [*written, folder / SHARD_INDEX]
