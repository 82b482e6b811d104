"""Model files: reading .pt/.pth/.bin (state dicts, never unpickled code), .safetensors and
Hugging Face model folders (single or sharded); streaming a .safetensors file out."""

from __future__ import annotations

import json
import math
import pickle
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from qlis.atomic import atomic_path
from qlis.errors import InputError
from qlis.tensors import bit_patterns

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights")
_FOLDER_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


_SAFETENSORS_DTYPES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int8": "I8",
    "int16": "I16", "int32": "I32", "int64": "I64", "uint8": "U8", "bool": "BOOL",
}
_FROM_SAFETENSORS = {v: getattr(torch, k) for k, v in _SAFETENSORS_DTYPES.items()}


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors mapped copy-on-write from the file: no second copy of the model in memory."""
    try:
        with safe_open(str(path), framework="pt") as f:  # validates the header and offsets
            names = list(f.keys())
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable safetensors file ({err})") from None
    state = {}
    for name in sorted(names, key=lambda n: header[n]["data_offsets"][0]):
        info = header[name]
        dtype = _FROM_SAFETENSORS.get(info["dtype"])
        if dtype is None:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if start == end:
            state[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        raw = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + header_len + start,
                        shape=(end - start,))
        state[name] = torch.from_numpy(raw).view(dtype).reshape(info["shape"])
    return state


def _torch_load(path: Path) -> object:
    """torch.load, memory-mapped when the file is a zip checkpoint (no second copy in memory)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError:
        raise InputError(
            f"{path}: the file holds pickled Python objects that would run code when loaded "
            "(for example a whole nn.Module); save model.state_dict() instead"
        ) from None
    except Exception as err:  # torch.load raises many types on non-checkpoints
        detail = str(err).strip().splitlines()[0] if isinstance(err, RuntimeError) else ""
        raise InputError(
            f"{path}: not a PyTorch checkpoint" + (f" ({detail})" if detail else "")
        ) from None
    return _tensor_mapping(obj, path)


def _tensor_mapping(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint (also one nested under 'state_dict' & co.)."""
    if not isinstance(obj, Mapping):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if not obj:
        raise InputError(f"{path}: holds an empty state dict")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    for key in _NESTED_KEYS:
        if isinstance(obj.get(key), Mapping):
            return _tensor_mapping(obj[key], path)
    raise InputError(f"{path}: no state dict found (keys: {', '.join(map(str, list(obj)[:8]))})")


def _load_folder(path: Path) -> dict[str, torch.Tensor]:
    for name in _FOLDER_FILES:
        candidate = path / name
        if not candidate.is_file():
            continue
        if name.endswith(".index.json"):
            return _load_shards(candidate)
        if name.endswith(".safetensors"):
            return _load_safetensors(candidate)
        return _load_torch(candidate)
    looked_for = ", ".join(_FOLDER_FILES)
    raise InputError(f"{path}: a folder without a model file (looked for {looked_for})")


def _load_shards(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"{index}: not a valid shard index ({err})") from None
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise InputError(f"{index}: shard {shard} is missing")
        if shard.endswith(".safetensors"):
            state.update(_load_safetensors(shard_path))
        else:
            state.update(_load_torch(shard_path))
    return state


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a model file or folder, loaded without executing any code.

    >>> load_state_dict("missing.pt")
    Traceback (most recent call last):
    ...
    qlis.errors.InputError: missing.pt: no such file or folder
    """
    path = Path(path)
    if path.is_dir():
        state = _load_folder(path)
    elif not path.exists():
        raise InputError(f"{path}: no such file or folder")
    elif path.suffix == ".safetensors":
        state = _load_safetensors(path)
    elif path.suffix == ".qlis":
        raise InputError(f"{path}: is a qlis archive; use 'qlis unpack' or qlis.load()")
    else:
        state = _load_torch(path)
    if not state:
        raise InputError(f"{path}: holds no tensors")
    return state


def model_file_bytes(path: str | Path) -> int:
    """Bytes on disk of a model file, or of every file of a model folder."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size




def write_safetensors(
    path: str | Path,
    layout: list[tuple[str, str, list[int]]],
    read: Callable[[str], torch.Tensor],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Stream tensors into a .safetensors file, one at a time (atomically).

    ``layout`` lists (name, dtype name, shape) in file order; ``read(name)`` produces each
    tensor when its turn comes, so memory holds one tensor rather than the whole model.
    """
    header: dict[str, object] = {}
    offset = 0
    for name, dtype, shape in layout:
        size = math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": shape,
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, _, _ in layout:
            tensor = read(name).contiguous()
            f.write(bit_patterns(tensor).tobytes())
            if progress is not None:
                progress(1)
