"""What compression costs in quality, measured the same way everywhere.

- weight error: relative MSE of a layer, ``||w_hat - w||^2 / ||w||^2``, in chunks;
- output error (qlis/measure/calibrate.py): 1 - cosine or relative MSE of the model's outputs.

What it saves, the coded size of every part of an archive, is the size model of
qlis/plan/sizes.py.
"""

from __future__ import annotations

import math

import torch

CHUNK_ELEMENTS = 1 << 20
"""Large tensors are quantized, dequantized and measured this many elements at a time
(float32 copies of a chunk, never of the whole tensor): a layer's working memory stays
near its codes'."""

def relative_mse(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``||approx - reference||^2 / ||reference||^2`` (0 for an all-zero reference).

    The sums are torch's cascaded float32 sums (relative error ~1e-7, a third of float64's
    time); tensors whose peak would over- or underflow their squares are scaled first.

    >>> relative_mse(torch.tensor([1.0, -1.0]), torch.tensor([1.0, 0.0]))
    0.5
    """
    ref, out = reference.detach().reshape(-1), approx.detach().reshape(-1)
    peak = peak_abs(ref)
    scale = peak if 0 < peak < math.inf and not 1e-10 < peak < 1e10 else 1.0  # squares fit
    energy = error = 0.0
    for start in range(0, ref.numel(), CHUNK_ELEMENTS):  # float32 copies of a chunk at a time
        r = ref[start:start + CHUNK_ELEMENTS].float()
        o = out[start:start + CHUNK_ELEMENTS].float()
        if scale != 1.0:
            r, o = r / scale, o / scale
        energy += float(r.square().sum())
        error += float((o - r).square_().sum())
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
