"""One executed layer as bytes: what the rank that quantized a layer sends the other ranks of a
calibrated job (qlis/quantize/reconstruct.py), or the error that stopped it.

A message is a JSON head (the plan row, the stored tensor's kind, dtypes and shapes, the
quantizer's config) followed by the raw arrays; no pickle. The head is checked before any
array is read, and the arrays must fill the message exactly.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from qlis.errors import ClusterError
from qlis.models.tensors import bit_patterns
from qlis.plan.execute import LayerPlan, StoredTensor
from qlis.quantize.quantizers import QuantizedTensor
from qlis.workers.cluster import framed, unframed

_ARRAY_DTYPES = {"uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
                 "float16", "float32", "float64"}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16, "float64": torch.float64}


def layer_message(stored: StoredTensor, layer: LayerPlan, bias: torch.Tensor | None) -> bytes:
    """``stored`` (quantized, or a float tensor), its plan row and its corrected bias."""
    arrays: list[np.ndarray] = []

    def array(value: np.ndarray) -> list:
        value = np.ascontiguousarray(value)
        arrays.append(value)
        return [value.dtype.name, list(value.shape)]

    def tensor(value: torch.Tensor) -> list:
        value = value.detach().cpu().contiguous()
        return [str(value.dtype).removeprefix("torch."), list(value.shape),
                array(bit_patterns(value))]

    if isinstance(stored, QuantizedTensor):
        kind: dict[str, Any] = {
            "quantized": array(stored.codes), "n_levels": stored.n_levels,
            "quantizer": stored.quantizer, "dtype": str(stored.dtype).removeprefix("torch."),
            "params": {key: array(value) for key, value in stored.params.items()}}
    else:
        kind = {"tensor": tensor(stored)}
    head = {"layer": asdict(layer), "stored": kind,
            "bias": tensor(bias) if bias is not None else None}
    return framed(head, (a.tobytes() for a in arrays))


def error_message(text: str) -> bytes:
    """The error that kept a rank from executing its layer."""
    return framed({"error": text})


def read_layer_message(data: bytes, rank: int,
                       ) -> tuple[StoredTensor, LayerPlan, torch.Tensor | None]:
    """What `layer_message` made (or the sender's error, raised as a ClusterError)."""
    try:
        head, offset = unframed(data)
        if "error" in head:
            raise ClusterError(f"rank {rank}: {head['error']}")
        reader = _Arrays(data, offset)
        kind = head["stored"]
        if "quantized" in kind:
            stored: StoredTensor = QuantizedTensor(
                reader.array(kind["quantized"]), int(kind["n_levels"]), dict(kind["quantizer"]),
                {str(k): reader.array(v) for k, v in kind["params"].items()},
                _TORCH_DTYPES[kind["dtype"]])
        else:
            stored = reader.tensor(kind["tensor"])
        bias = reader.tensor(head["bias"]) if head["bias"] is not None else None
        layer = LayerPlan(**head["layer"])
        if reader.offset != len(data):
            raise ValueError("the arrays do not fill the message")
        return stored, layer, bias
    except (ValueError, TypeError, KeyError, struct.error) as err:
        raise ClusterError(f"rank {rank} sent a layer that does not parse ({err})") from None


class _Arrays:
    """Reads the arrays of a message one after the other, each checked to fit."""

    def __init__(self, data: bytes, offset: int) -> None:
        self.data, self.offset = data, offset

    def array(self, spec: list) -> np.ndarray:
        dtype_name, shape = spec
        if dtype_name not in _ARRAY_DTYPES or not all(isinstance(n, int) and n >= 0
                                                      for n in shape):
            raise ValueError(f"an array of {dtype_name} {shape}")
        dtype = np.dtype(dtype_name)
        count = math.prod(shape)
        if self.offset + count * dtype.itemsize > len(self.data):
            raise ValueError("an array runs past the message")
        value = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset += count * dtype.itemsize
        return value.reshape(shape).copy()

    def tensor(self, spec: list) -> torch.Tensor:
        dtype_name, shape, patterns = spec
        dtype = _TORCH_DTYPES[dtype_name]
        raw = torch.from_numpy(self.array(patterns))
        if raw.dtype.itemsize != dtype.itemsize or list(raw.shape) != list(shape):
            raise ValueError(f"a {dtype_name} tensor stored as {patterns}")
        return raw.view(dtype)
