"""What compression costs and saves, measured the same way everywhere.

- weight error: relative MSE of a layer, ``||w_hat - w||^2 / ||w||^2``;
- coded size: the bytes an entropy coder needs for a layer's codes (the empirical entropy,
  which the ``ans`` codec reaches within a fraction of a percent) plus the bytes of the
  quantizer's parameters and a small per-record cost — real bytes, not the paper's CR;
- output error (qlis/calibrate.py): 1 - cosine or relative MSE of the model's outputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

HEADER_BYTES = 1024
"""An archive's fixed cost: prefix, header skeleton, policy options and summary."""
RECORD_OVERHEAD_BYTES = 176
"""A tensor stored as it is: its JSON header entry and its record's 64-byte alignment."""
QUANTIZED_RECORD_BYTES = 900
"""A quantized layer: its header entry (codec, quantizer, parameter records, plan), its line
in the recorded plan, and the alignment of its three records (measured: 850-950 bytes)."""

TABLE_BYTES_PER_SYMBOL = 1.5
"""An entropy-coded stream lists its alphabet and a frequency per present symbol."""


def relative_mse(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``||approx - reference||^2 / ||reference||^2`` (0 for an all-zero reference).

    The sums are torch's cascaded float32 sums (relative error ~1e-7, a third of float64's
    time); tensors whose peak would over- or underflow their squares are scaled first.

    >>> relative_mse(torch.tensor([1.0, -1.0]), torch.tensor([1.0, 0.0]))
    0.5
    """
    ref = reference.detach().reshape(-1).float()
    out = approx.detach().reshape(-1).float()
    peak = peak_abs(ref)
    if 0 < peak < math.inf and not 1e-10 < peak < 1e10:  # keep the squares within float32
        ref, out = ref / peak, out / peak
    energy = float(ref.square().sum())
    if energy == 0:
        return 0.0
    return float((out - ref).square_().sum()) / energy


def peak_abs(tensor: torch.Tensor) -> float:
    """The largest magnitude in ``tensor`` (0 when empty), from one min/max pass.

    >>> peak_abs(torch.tensor([1.0, -3.0]))
    3.0
    """
    if not tensor.numel():
        return 0.0
    low, high = torch.aminmax(tensor.detach().reshape(-1))
    return max(-float(low), float(high))


def entropy_of_counts(counts: np.ndarray) -> float:
    """Total Shannon information of symbols with these counts, in bits."""
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    total = counts.sum()
    if total == 0:
        return 0.0
    return float(-(counts * np.log2(counts / total)).sum())


def coded_code_bytes(counts: np.ndarray) -> float:
    """Bytes an entropy coder needs for codes with these symbol counts: information +
    alphabet table.

    >>> coded_code_bytes(np.array([1000])) < 10
    True
    """
    present = int(np.count_nonzero(counts))
    return entropy_of_counts(counts) / 8 + TABLE_BYTES_PER_SYMBOL * present + 8


def param_bytes(params: dict[str, np.ndarray]) -> int:
    """Bytes of a quantizer's parameters as stored."""
    return sum(int(np.asarray(v).nbytes) for v in params.values())
