"""What compression costs in quality, measured the same way everywhere.

- weight error: relative MSE of a layer, ``||w_hat - w||^2 / ||w||^2``, in chunks;
- output error (qlis/measure/calibrate.py): 1 - cosine or relative MSE of the model's outputs.

What it saves, the coded size of every part of an archive, is the size model of
qlis/plan/sizes.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

CHUNK_ELEMENTS = 1 << 20
"""Large tensors are quantized, dequantized and measured this many elements at a time
(float32 copies of a chunk, never of the whole tensor): a layer's working memory stays
near its codes'."""

@njit(cache=True, nogil=True)
def _squares(reference: np.ndarray, approx: np.ndarray, scale: float) -> tuple[float, float]:
    # (sum of (scale * reference)**2, sum of (scale * (approx - reference))**2) in float64,
    # in one pass: the squares of float32 values neither overflow nor underflow there.
    energy, error = 0.0, 0.0
    for i in range(reference.size):
        r = np.float64(reference[i]) * scale
        d = np.float64(approx[i]) * scale - r
        energy += r * r
        error += d * d
    return energy, error


def squared_sums(reference: torch.Tensor, approx: torch.Tensor, scale: float = 1.0,
                 ) -> tuple[float, float]:
    """(``||scale * reference||^2``, ``||scale * (approx - reference)||^2``) from float32
    copies (float64 tensors as they are) of one chunk at a time, in one compiled pass each,
    summed in float64: the same bits whatever torch's thread count (its sums of large tensors
    round by it). ``scale`` (see `relative_scale`) keeps float64's extremes' squares finite."""
    ref, out = reference.detach().reshape(-1), approx.detach().reshape(-1)
    wide = torch.float64 if ref.dtype == out.dtype == torch.float64 else torch.float32
    energy = error = 0.0
    for start in range(0, ref.numel(), CHUNK_ELEMENTS):
        chunk_energy, chunk_error = _squares(
            ref[start:start + CHUNK_ELEMENTS].to(wide).contiguous().numpy(),
            out[start:start + CHUNK_ELEMENTS].to(wide).contiguous().numpy(), scale)
        energy += chunk_energy
        error += chunk_error
    return energy, error


def relative_scale(reference: torch.Tensor) -> float:
    """What a relative measure multiplies ``reference`` by before squaring: 1, or 1 / its
    peak for float64 values whose squares would overflow or underflow float64 (1e-300
    squared is 0: such a layer rounded to zeros measured no error)."""
    peak = peak_abs(reference)
    return 1.0 if peak == 0 or 1e-140 < peak < 1e140 or not math.isfinite(peak) else 1 / peak


def relative_mse(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``||approx - reference||^2 / ||reference||^2`` (0 for an all-zero reference; see
    `squared_sums`).

    >>> relative_mse(torch.tensor([1.0, -1.0]), torch.tensor([1.0, 0.0]))
    0.5
    >>> tiny = torch.tensor([1e-300], dtype=torch.float64)
    >>> relative_mse(tiny, torch.zeros_like(tiny))
    1.0
    """
    energy, error = squared_sums(reference, approx, relative_scale(reference))
    return error / energy if energy else 0.0


def sum_of_squares(tensor: torch.Tensor) -> float:
    """``||tensor||^2`` from float32 copies of one chunk at a time (cascaded float32 sums).

    >>> sum_of_squares(torch.tensor([3.0, -4.0]))
    25.0
    """
    flat = tensor.detach().reshape(-1)
    return sum(float(flat[c:c + CHUNK_ELEMENTS].float().square().sum())
               for c in range(0, flat.numel(), CHUNK_ELEMENTS))


def peak_abs(tensor: torch.Tensor) -> float:
    """The largest magnitude in ``tensor`` (0 when empty), from one min/max pass.

    >>> peak_abs(torch.tensor([1.0, -3.0]))
    3.0
    """
    if not tensor.numel():
        return 0.0
    low, high = torch.aminmax(tensor.detach().reshape(-1))
    return max(-float(low), float(high))
