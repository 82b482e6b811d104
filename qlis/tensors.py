"""Small facts about tensors that several modules need: state-dict input, bit patterns, widths."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

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


def as_state_dict(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict:
    """A plain name -> tensor dict (detached, CPU) from a module or a state dict."""
    if isinstance(model_or_state_dict, torch.nn.Module):
        items = model_or_state_dict.state_dict().items()
    elif isinstance(model_or_state_dict, Mapping):
        items = model_or_state_dict.items()
    else:
        raise InputError(
            f"expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}"
        )
    state = {}
    for name, value in items:
        if not isinstance(value, torch.Tensor):
            raise InputError(f"entry {name!r} is a {type(value).__name__}, not a tensor")
        state[str(name)] = value.detach().cpu()
    if not state:
        raise InputError("the model has no tensors")
    return state
