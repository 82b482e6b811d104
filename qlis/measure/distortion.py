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

from qlis.compiled import njit

CHUNK_ELEMENTS = 1 << 20
"""Large tensors are quantized, dequantized and measured this many elements at a time
(float32 copies of a chunk, never of the whole tensor): a layer's working memory stays
near its codes'."""

@njit(cache=True, nogil=True)
def _squares(reference: np.ndarray, approx: np.ndarray, unit: float) -> tuple[float, float]:
    # (sum of (reference / unit)**2, sum of ((approx - reference) / unit)**2) in float64, in
    # one pass: the squares of float32 values neither overflow nor underflow there.
    energy, error = 0.0, 0.0
    if unit == 1.0:  # no division: the usual case, at full speed
        for i in range(reference.size):
            r = np.float64(reference[i])
            d = np.float64(approx[i]) - r
            energy += r * r
            error += d * d
        return energy, error
    for i in range(reference.size):
        r = np.float64(reference[i]) / unit
        d = np.float64(approx[i]) / unit - r
        energy += r * r
        error += d * d
    return energy, error


def squared_sums(reference: torch.Tensor, approx: torch.Tensor, unit: float = 1.0,
                 ) -> tuple[float, float]:
    """(``||reference / unit||^2``, ``||(approx - reference) / unit||^2``) from float32
    copies (float64 tensors as they are) of one chunk at a time, in one compiled pass each,
    summed in float64: the same bits whatever torch's thread count (its sums of large tensors
    round by it). ``unit`` (see `relative_unit`) keeps float64's extremes' squares finite."""
    ref, out = reference.detach().reshape(-1), approx.detach().reshape(-1)
    wide = torch.float64 if ref.dtype == out.dtype == torch.float64 else torch.float32
    energy = error = 0.0
    for start in range(0, ref.numel(), CHUNK_ELEMENTS):
        chunk_energy, chunk_error = _squares(
            ref[start:start + CHUNK_ELEMENTS].to(wide).contiguous().numpy(),
            out[start:start + CHUNK_ELEMENTS].to(wide).contiguous().numpy(), unit)
        energy += chunk_energy
        error += chunk_error
    return energy, error


def relative_unit(reference: torch.Tensor) -> float:
    """What a relative measure divides ``reference`` by before squaring: 1, or its peak for
    float64 values whose squares would overflow or underflow float64 (1e-300 squared is 0:
    such a layer rounded to zeros measured no error; the inverse of a subnormal peak is inf).
    Narrower dtypes' squares always fit: they cost no extra pass."""
    if reference.dtype != torch.float64:
        return 1.0
    peak = peak_abs(reference)
    return 1.0 if peak == 0 or 1e-140 < peak < 1e140 or not math.isfinite(peak) else peak


def relative_mse(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``||approx - reference||^2 / ||reference||^2`` (0 for an all-zero reference; see
    `squared_sums`).

    >>> relative_mse(torch.tensor([1.0, -1.0]), torch.tensor([1.0, 0.0]))
    0.5
    >>> tiny = torch.tensor([1e-300], dtype=torch.float64)
    >>> relative_mse(tiny, torch.zeros_like(tiny))
    1.0
    """
    energy, error = squared_sums(reference, approx, relative_unit(reference))
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


def population_std(flat: torch.Tensor) -> float:
    """Standard deviation (population) of a 1-D tensor; of a large one, from float32 copies of
    one chunk at a time (float64 ones of a float64 tensor, whose values may lie past float32's
    range), in two passes (mean, then squared deviations) summed in float64. Finite values
    whose squares overflow (float64 past 1e154) are measured scaled by a power of two."""
    spread = _unscaled_std(flat)
    if not math.isfinite(spread):  # inf, or nan from a sum of +-1e308 that overflowed
        largest = float(flat.abs().max())
        if math.isfinite(largest) and largest > 0:
            scale = math.ldexp(1.0, math.frexp(largest)[1] - 1)  # the values within +-2
            spread = _unscaled_std(flat / scale) * scale
    return spread


def _unscaled_std(flat: torch.Tensor) -> float:
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    if flat.numel() <= CHUNK_ELEMENTS:
        return float(flat.to(dtype).std(correction=0))
    pieces = range(0, flat.numel(), CHUNK_ELEMENTS)
    mean = sum(float(flat[c:c + CHUNK_ELEMENTS].to(dtype).sum()) for c in pieces) / flat.numel()
    deviations = sum(float((flat[c:c + CHUNK_ELEMENTS].to(dtype) - mean).square_().sum())
                  for c in pieces)
    return math.sqrt(deviations / flat.numel())
