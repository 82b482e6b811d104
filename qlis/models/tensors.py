"""Small facts about tensors that several modules need: state-dict input, bit patterns, widths."""

from __future__ import annotations

import math
import re
import threading
import weakref
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch

from qlis.archive.format import MAX_ELEMENTS
from qlis.errors import InputError

_PATTERN_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NUMPY_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def storage_bits(dtype: torch.dtype) -> int:
    """Bits per stored element (B in the paper): 32 for float32, 16 for float16/bfloat16."""
    if dtype == torch.bool:
        return 8
    return torch.empty((), dtype=dtype).element_size() * 8


def smallest_at_least(value: float, dtype: torch.dtype) -> torch.Tensor:
    """The smallest ``dtype`` value >= ``value`` (0-dim): ``x >= it`` iff ``x >= value`` exactly.

    Comparing a float16/bfloat16 tensor with a Python float rounds the float to the tensor's
    dtype, which can move a threshold across stored values; this keeps such comparisons exact.
    """
    t = torch.tensor(value, dtype=torch.float64).to(dtype)
    if float(t) < value:
        t = torch.nextafter(t, torch.tensor(float("inf"), dtype=dtype))
    return t


def bit_patterns(tensor: torch.Tensor) -> np.ndarray:
    """The stored bits of ``tensor`` as an unsigned numpy array of the same width (no copy)."""
    t = tensor.detach().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    size = t.element_size()
    return t.view(_PATTERN_DTYPES[size]).numpy().view(_NUMPY_UNSIGNED[size])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and stored bits (so NaN equals itself and -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(np.array_equal(bit_patterns(a), bit_patterns(b)))


# What the archive stores; anything else is refused by name (no silent conversions).
STORED_DTYPES = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
)
MAX_NDIM = 64  # numpy's limit: a tensor with more dimensions cannot be processed
# Views that repeat elements (expand(), stride 0) and storages shared by many names let a few
# bytes stand for terabytes. The tensors of one input may describe at most twice the bytes
# their storages hold, plus this slack (tied weights and small expanded buffers stay fine).
VIEW_SLACK_BYTES = 16 << 20


def renormed_tables(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tables of the model's embeddings with ``max_norm``: each lookup rescales the rows
    it reads in place, so the model's weights change as it runs."""
    return [module.weight for module in model.modules()
            if isinstance(module, torch.nn.Embedding | torch.nn.EmbeddingBag)
            and module.max_norm is not None]


def tensor_label(name: str) -> str:
    """A tensor name for a message: quoted, escaped (control characters, surrogates), short."""
    text = ascii(name)
    return text if len(text) <= 80 else text[:77] + "..."


def _dtype_hint(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "torch.view_as_real(tensor)"
    if dtype in (torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4):
        return "tensor.dequantize()"
    if "float8" in str(dtype):
        return "tensor.to(torch.float16), which is exact for float8"
    return "tensor.to(torch.float32)"


def view_key(tensor: torch.Tensor) -> tuple:
    """What makes two tensors one view of one memory (a tie): device, storage, offset, shape,
    strides and dtype."""
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.shape), tensor.stride(), tensor.dtype)


def _may_overlap(tensor: torch.Tensor) -> bool:
    """Whether two indices of a strided tensor may address one element (stride 0, expand)."""
    reach = 0  # the farthest element offset the smaller-stride dimensions address
    dims = zip(tensor.stride(), tensor.shape, strict=True)
    for stride, size in sorted((st, sz) for st, sz in dims if sz > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def _byte_span(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage a (non-empty, strided) tensor addresses, first to past last."""
    size = tensor.element_size()
    first = tensor.storage_offset() * size
    last = first + size * sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride(),
                                                                strict=True))
    return first, last + size


def _shared_pair(tensors: list[tuple[str, torch.Tensor]]) -> tuple[str, str] | None:
    """Two of ``tensors`` (views of one storage whose byte spans overlap) that address a
    common byte, found by marking each one's bytes in turn (views side by side, as a fused
    weight's column slices, share none)."""
    low = min(_byte_span(t)[0] for _, t in tensors)
    high = max(_byte_span(t)[1] for _, t in tensors)
    marks = torch.zeros(high - low, dtype=torch.uint8)

    def bytes_of(tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.element_size()
        return marks.as_strided((*tensor.shape, size), (*(s * size for s in tensor.stride()), 1),
                                tensor.storage_offset() * size - low)

    for i, (name, tensor) in enumerate(tensors):
        if bool(bytes_of(tensor).any()):
            for earlier, other in tensors[:i]:  # which one: an error path, once
                marks.zero_()
                bytes_of(other).fill_(1)
                if bool(bytes_of(tensor).any()):
                    return earlier, name
        bytes_of(tensor).fill_(1)
    return None


def shared_memory(state: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """Two names of ``state`` whose tensors share memory without being one view of it (a
    weight tied to another's transpose, one tensor a slice of another), or None. A model
    holding them computes with one set of values where an archive stores two; tied names
    (one view under two names, `split_aliases`) and views side by side in one buffer (a
    flat parameter's) are fine."""
    views: dict[tuple, str] = {}
    by_storage: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in state.items():
        if tensor.is_meta or not tensor.numel():
            continue
        view = view_key(tensor)
        storage = view[:2]
        if view not in views:
            views[view] = name
            by_storage.setdefault(storage, []).append((name, tensor))
    for tensors in by_storage.values():
        tensors.sort(key=lambda item: _byte_span(item[1]))
        cluster: list[tuple[str, torch.Tensor]] = []
        end = 0
        for item in [*tensors, None]:  # clusters of overlapping byte spans, then the end
            if item is None or (cluster and _byte_span(item[1])[0] >= end):
                pair = _shared_pair(cluster) if len(cluster) > 1 else None
                if pair is not None:
                    return pair
                cluster, end = [], 0
            if item is not None:
                cluster.append(item)
                end = max(end, _byte_span(item[1])[1])
    return None


def check_unshared(model: torch.nn.Module, what: str) -> None:
    """Refuse a model two of whose state tensors share memory without being one tensor (see
    `shared_memory`): compressed apart they are rounded apart, so the model, which holds one
    set of values, could never compute with what the result and its quality describe, and
    loading both into it writes one over the other."""
    pair = shared_memory(model.state_dict(keep_vars=True))
    if pair is not None:
        first, second = (tensor_label(name) for name in pair)
        raise InputError(
            f"{what}: tensors {first} and {second} of the model share memory (one is a view "
            "of the other, e.g. a weight tied to another's transpose) without being one "
            "tensor, so no values stored for each apart can be written into both; tie them "
            "as one Parameter, or give each its own memory (clone one); the model is unchanged")


def check_loadable(model: torch.nn.Module, what: str) -> None:
    """Refuse, before anything is written, a model whose tensors cannot be written into in
    place (what ``load_state_dict`` does, tensor by tensor: one that fails leaves the ones
    before it overwritten): an inference tensor, one that repeats its elements, or two that
    share memory (`check_unshared`)."""
    check_unshared(model, what)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta:
            continue
        if tensor.is_inference():
            raise InputError(
                f"{what}: tensor {tensor_label(name)} of the model is an inference tensor "
                "(made under torch.inference_mode()), which cannot be written into; build or "
                "load the model outside inference mode; the model is unchanged")
        if _may_overlap(tensor):
            raise InputError(
                f"{what}: tensor {tensor_label(name)} of the model repeats its elements (a "
                "stride-0 view, e.g. from expand()), which cannot be written into; make it "
                "contiguous first; the model is unchanged")


def _checked_tensor(name: object, value: object, where: str) -> torch.Tensor:
    if not isinstance(name, str):
        raise InputError(f"{where}a key is a {type(name).__name__}; tensor names must be strings")
    label = tensor_label(name)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"{where}tensor name {label} is not valid Unicode text (a lone surrogate); rename it"
        ) from None
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{where}entry {label} is a {type(value).__name__}, not a tensor")
    if type(value) not in (torch.Tensor, torch.nn.Parameter):  # before any call on it
        lazy = isinstance(value, torch.nn.parameter.UninitializedTensorMixin)
        raise InputError(
            f"{where}tensor {label} is a {type(value).__name__} (a tensor subclass); "
            + ("run the lazy module once to initialise it" if lazy
               else "convert it to a plain tensor first")
        )
    if value.is_nested:  # before detach, which makes a nested tensor anew (and warns)
        raise InputError(
            f"{where}tensor {label} is a nested tensor (parts of different shapes); qlis "
            "reads dense tensors: pad it into one, e.g. torch.nested.to_padded_tensor(t, 0.0)"
        )
    if value.layout != torch.strided:
        raise InputError(
            f"{where}tensor {label} has layout {value.layout}; qlis reads dense tensors: "
            "use tensor.to_dense()"
        )
    tensor = value.detach()
    if tensor.device.type == "meta":
        raise InputError(
            f"{where}tensor {label} is on the meta device (it holds no values); "
            "give the model with its weights loaded"
        )
    if tensor.dtype not in STORED_DTYPES:
        raise InputError(
            f"{where}tensor {label} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
            f"which qlis does not store; convert it first, e.g. {_dtype_hint(tensor.dtype)}"
        )
    if tensor.ndim > MAX_NDIM:
        raise InputError(
            f"{where}tensor {label} has {tensor.ndim} dimensions (at most {MAX_NDIM})"
        )
    check_storable_shape(tensor.shape, label, where)
    return tensor


def check_storable_shape(shape: Iterable[int], label: str, where: str = "") -> None:
    """Refuse a shape no archive holds: its dimensions, zeros counted as ones, multiply past
    2**53 (an empty tensor too: numpy cannot even describe [1, 0, 2**62])."""
    shape = list(shape)
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise InputError(
            f"{where}tensor {label} has shape {shape}: an archive holds shapes whose "
            "dimensions multiply to at most 2**53, zeros counted as ones"
        )


def checked_state(items: Iterable[tuple[object, object]], where: str = "") -> dict:
    """Validate name -> tensor pairs into a dict, refusing what qlis cannot read or store.

    Each value must be a dense, plain (not subclassed), non-meta tensor of a stored dtype under
    a string name encodable as UTF-8. Views are kept as they are (no copy), but the tensors
    together may describe at most twice the bytes their storages hold plus VIEW_SLACK_BYTES,
    so a tiny stride-0 view cannot make later steps allocate gigabytes; a tied tensor (one
    view under several names, `split_aliases`) counts once, as it is compressed and stored
    once (a block registered in each of a model's 12 layers). ``where`` prefixes messages
    (e.g. the file name and ': ').
    """
    state: dict[str, torch.Tensor] = {}
    storages: dict[int, int] = {}
    views: set[tuple] = set()
    described = 0
    for name, value in items:
        tensor = _checked_tensor(name, value, where)
        state[name] = tensor
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        storages[ptr] = max(storages.get(ptr, 0), storage.nbytes())
        view = view_key(tensor)
        if view not in views:  # a tie (one view under many names) is processed once
            views.add(view)
            described += tensor.numel() * tensor.element_size()
    held = sum(storages.values())
    if described > 2 * held + VIEW_SLACK_BYTES:
        _refuse_expansion(state, described, held, where)
    return state


def _refuse_expansion(state: dict[str, torch.Tensor], described: int, held: int,
                      where: str) -> None:
    overlapping = [(t.numel() * t.element_size(), n) for n, t in state.items()
                   if _may_overlap(t)]
    if overlapping:
        size, name = max(overlapping)
        held_by = state[name].untyped_storage().nbytes()
        raise InputError(
            f"{where}tensor {tensor_label(name)} repeats its elements (a stride-0 or "
            f"overlapping view, e.g. from expand()): it stands for {size:,} bytes held in "
            f"{held_by:,} bytes; save or pass tensor.contiguous() if that size is meant"
        )
    raise InputError(
        f"{where}tensors sharing storages stand for {described:,} bytes held in {held:,} bytes "
        "(more than twice); store each shared tensor once"
    )


class ValidatedState(Mapping[str, torch.Tensor]):
    """Tensors validated as `checked_state` would (from a file's header) and read lazily,
    on access: `as_state_dict` takes them as they are, without reading them all."""

    @abstractmethod
    def layout(self) -> Mapping[str, torch.Tensor]:
        """Every tensor's shape and dtype as a tensor on the meta device, from the header."""


def tensor_layout(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """What sizes, dtypes and shapes are read from: a lazily read state's `layout`, without
    reading a tensor (a pass that sums sizes read all of a file's tensors again: 15 reads per
    tensor in a pack of 10,000 small ones), or the tensors themselves."""
    if isinstance(state, ValidatedState):
        return state.layout()
    return state


def split_aliases(
    state: Mapping[str, torch.Tensor],
) -> tuple[Mapping[str, torch.Tensor], dict[str, str]]:
    """Tied tensors kept once: ``state`` without the names that repeat an earlier tensor (the
    same storage, offset, shape, strides and dtype, as a language model's output projection
    tied to its input embedding), and each such name's first name. Compressing a tied tensor
    twice would store it twice and could round the two copies differently.

    >>> shared = torch.ones(4, 2)
    >>> split_aliases({"embed": shared, "head": shared, "bias": torch.zeros(4)})[1]
    {'head': 'embed'}
    """
    if isinstance(state, ValidatedState):  # a file's tensors: read apart, never tied
        return state, {}
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        if not tensor.numel():
            continue
        key = view_key(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    if not aliases:
        return state, {}
    return {name: t for name, t in state.items() if name not in aliases}, aliases


def with_aliases(state: dict[str, torch.Tensor],
                 aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``state`` with each tied name of `split_aliases` back, sharing its first name's tensor.

    >>> shared = torch.ones(2)
    >>> with_aliases({"embed": shared}, {"head": "embed"})["head"] is shared
    True
    """
    return {**state, **{alias: state[name] for alias, name in aliases.items()}}


_MODEL_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = (
    weakref.WeakKeyDictionary())
_MODEL_LOCKS_GUARD = threading.Lock()


@contextmanager
def model_in_use(model: object) -> Iterator[None]:
    """Within the block, no other thread's qlis call uses ``model`` (a module; anything else
    is not held). A calibrated compression swaps quantized weights into the module's
    parameters, hooks its layers and puts it in eval mode for the length of the call: two at
    once on one module (two threads) ran into each other's hooks, failed, and left the model
    in eval mode holding quantized weights; a state read (or a load) beside one saw (or was
    undone by) the weights swapped in. The same thread may enter again."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
    with lock:
        yield


def as_state_dict(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
) -> Mapping[str, torch.Tensor]:
    """A plain name -> tensor dict (detached, CPU) from a module or a state dict.

    Validated as by `checked_state`: views from Python memory are accepted within its bound.
    A `ValidatedState` is returned as it is.
    """
    if isinstance(model_or_state_dict, ValidatedState):
        if not model_or_state_dict:
            raise InputError("the model has no tensors")
        return model_or_state_dict
    if isinstance(model_or_state_dict, torch.nn.Module):
        with model_in_use(model_or_state_dict):  # not while a calibration swaps its weights
            items = model_or_state_dict.state_dict().items()
    elif isinstance(model_or_state_dict, Mapping):
        items = model_or_state_dict.items()
    else:
        raise InputError(
            f"expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}"
        )
    on_cpu: dict[tuple, torch.Tensor] = {}  # a tie on the GPU is one CPU tensor, still tied
    state = {}
    for name, tensor in checked_state(items).items():
        view = view_key(tensor)
        if view not in on_cpu:
            on_cpu[view] = tensor.cpu()
        state[name] = on_cpu[view]
    if not state:
        raise InputError("the model has no tensors")
    return state


_RENORMALIZED = re.compile(r"((^|\.)weight_(v|orig)|\.parametrizations\.[^.]+\.original1?)$")


def renormalized(name: str) -> bool:
    """Whether ``name`` is a tensor its module divides by its own norm before use: the
    direction of weight normalization (``weight_v``; ``parametrizations.weight.original1``)
    and the weight of spectral normalization (``weight_orig``; ``...original``). Rounded to
    zeros, a row of it makes the layer's output NaN where an ordinary weight gives zeros."""
    return bool(_RENORMALIZED.search(name))
