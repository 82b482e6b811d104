"""The size model: what every part of a ``.qlis`` archive costs, so that compress, rd and the
plan executor estimate an archive before it is written, from one set of figures."""

from __future__ import annotations

import math

import numpy as np
import torch

from qlis.archive.codecs.ans import ANS
from qlis.archive.codecs.auto import Auto
from qlis.archive.codecs.row_classes import MIN_SYMBOLS, row_classes, stream_bytes
from qlis.archive.codecs.sparse import sparse_bytes
from qlis.archive.format import RECORD_ALIGN, aligned
from qlis.models.tensors import bit_patterns, storage_bits
from qlis.quantize.grid import matrix_shape
from qlis.quantize.quantizers import QuantizedTensor

HEADER_BYTES = 1000
"""An archive's fixed cost: prefix, header skeleton, policy options and summary, deflated,
and the padding of the data section's start and end. Fitted with the per-entry costs below
(least squares over 32 archives of MLPs, transformer encoders and convolutional networks
with BatchNorm, 2026-12-07: 845 bytes, residuals within +-270), then rounded up."""
RECORD_OVERHEAD_BYTES = 12
"""A tensor stored as it is: its header entry, deflated, and its record's 8-byte alignment
(fitted: 11 bytes)."""
KEPT_LAYER_BYTES = 4
"""A planned layer stored as it is, beyond `RECORD_OVERHEAD_BYTES`: the plan in its header
entry and its line in the recorded plan, deflated (fitted: 12 bytes in all). Uncounted, at
their size before version 5 deflated the header, the BatchNorm parameters of a MobileNetV2
planned as layers (123 kept of 266) made a 12x target an 11.66x archive."""
NARROWED_ENTRY_BYTES = 16
"""The header entry of a tensor outside the plan stored as float16 codes (name, shape,
quantizer, alphabet, codec and record; deflated) and its record's alignment (fitted: 14)."""
QUANTIZED_RECORD_BYTES = 52
"""A quantized layer: its header entry (codec, quantizer, parameter records, plan) and its
line in the recorded plan, deflated, and the alignment of its three records (fitted: 49
bytes; 850-950 before version 5)."""


def coded_code_bytes(counts: np.ndarray, codes: np.ndarray | None = None,
                     row_length: int = 0) -> float:
    """Bytes an entropy coder needs for codes with these symbol counts: information +
    alphabet table; given the ``codes`` themselves (uint8 or uint16, rows of
    ``row_length``), what coding their classes of alike rows saves is counted too, and
    fewer than `MIN_SYMBOLS` of them are encoded: there the table is most of the stream, and
    its estimate missed a 640-weight layer's 2,048-level codes by a third (a calibrated
    target_ratio=8 wrote a 7.89x archive of a small model, no warning).

    >>> coded_code_bytes(np.array([1000])) < 10
    True
    """
    if codes is not None and codes.size < MIN_SYMBOLS:
        return len(ANS().encode_view(codes))
    one_table = stream_bytes(counts, fixed=8)
    classes = None if codes is None else row_classes(codes, row_length)
    return one_table if classes is None else min(one_table, classes.estimated_bytes)


def param_bytes(params: dict[str, np.ndarray]) -> int:
    """Bytes of a quantizer's parameters as stored."""
    return sum(int(np.asarray(v).nbytes) for v in params.values())


def unplanned_bytes(tensor: torch.Tensor | QuantizedTensor) -> float:
    """Bytes of a tensor outside the plan (a bias, a norm, a buffer): the writer stores it raw
    whatever its values (only a planned layer kept as it is is tried sparse, `kept_bytes`), so
    a zero-initialised bias costs its full size. Counting it as one symbol made the budget of
    a model with zero biases too large: target_ratio=8 wrote a 7.3x archive and no warning.
    A quantized ``tensor`` (rd's float16 `stored_rest`) is stored with the smallest codec,
    and counted so, encoded: its codes at their width, entropy-coded (the high bytes of a
    norm's float16 patterns repeat) or neither, as the tables of their alphabet cost
    (counted at their width, a MobileNetV2 with its BatchNorms wrote 8.19x asked 8; at
    their entropy, 11.71x asked 12).

    >>> unplanned_bytes(torch.zeros(1000)) == unplanned_bytes(torch.ones(1000)) == 4000 + 12
    True
    """
    if isinstance(tensor, QuantizedTensor):
        codes = np.asarray(tensor.codes).reshape(-1)
        coded = len(Auto().select(codes, matrix_shape(tensor.shape)[1])[1]) if codes.size else 0
        return aligned(coded, RECORD_ALIGN) + NARROWED_ENTRY_BYTES
    return tensor.numel() * storage_bits(tensor.dtype) / 8 + RECORD_OVERHEAD_BYTES


def stored_bits(tensor: torch.Tensor | QuantizedTensor) -> int:
    """Bits of a tensor outside the plan as stored, for the paper's CR (its codes' fixed
    width where it is stored quantized)."""
    if isinstance(tensor, QuantizedTensor):
        return math.prod(tensor.shape) * tensor.code_bits
    return tensor.numel() * storage_bits(tensor.dtype)


def kept_bytes(tensor: torch.Tensor, zeros: bool | None = None) -> float:
    """Bytes of a planned layer stored as it is: its bit patterns entropy-coded, counted raw
    (the patterns of real values rarely repeat), or its non-zeros and their positions where
    the writer stores it so (the ``sparse`` codec: counted raw, a layer pruned to a tenth
    was estimated over its original size); all zeros (a zero-initialised layer or bias) code
    to one symbol: counting those raw made a size target look out of reach by the whole
    layer. ``zeros``: whether it is all zeros, when the caller knows (None: look).

    >>> kept_bytes(torch.zeros(1000)) < kept_bytes(torch.ones(1000)) == 4000 + 12 + 4
    True
    >>> kept_bytes(torch.zeros(1000).index_fill_(0, torch.arange(0, 1000, 10), 1.0))
    521.0
    """
    if zeros is None:
        zeros = not bool(tensor.any())
    overhead = RECORD_OVERHEAD_BYTES + KEPT_LAYER_BYTES
    if tensor.numel() and zeros:
        return coded_code_bytes(np.array([tensor.numel()])) + overhead
    sparse = sparse_bytes(bit_patterns(tensor).reshape(-1)) if tensor.numel() else None
    if sparse is not None:
        return float(sparse + overhead)
    return tensor.numel() * storage_bits(tensor.dtype) / 8 + overhead
