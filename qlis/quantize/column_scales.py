"""Steps per input column from the calibration's activations (AWQ's scaling, on the grid).

A weight's rounding error in input column j reaches the outputs multiplied by that input, so
a column whose inputs carry more energy deserves a finer step. AWQ scales the weight's columns
by s_j and the inputs by 1/s_j before rounding to one step; that is rounding to a step per
column, step / s_j, which needs no change to the model: only a grid with a step per input
column (`Quantizer.with_column_scales`). Here a column's factor f_j = 1/s_j multiplies its
step: the weight with its columns divided by f is quantized as the quantizer would (its step
from that matrix), then each column's step is multiplied back. rd measures its candidates and
the layers' gains on that divided weight, so the allocation sees what the steps do.

The factors: h_j the mean square of input j on the float model's calibration inputs (rd
measures them for linear layers: qlis/measure/column_energy.py), f_j = (h_j / geometric mean
of h)^(-POWER/2) within 1/RANGE..RANGE. On MiniLM calibrated at 2.75 and 3.25 bits/weight
they leave 8% less output error at equal bytes (docs/method.md, "Steps per input column").
"""

from __future__ import annotations

import numpy as np
import torch

from qlis.quantize.grid import matrix_shape
from qlis.quantize.quantizers import QuantizedTensor, Quantizer

POWER = 0.75
"""How strongly the steps follow the inputs' energy (0: one step; 1: steps by the inputs'
RMS). MiniLM calibrated at 2.76 b/w kept 0.98840 with 0.75, 0.98831 with 0.5, 0.98804 with 1.0
(docs/method.md)."""
RANGE = 4.0
"""A column's step is at most this many times finer or coarser than the layer's."""


def column_factors(energy: torch.Tensor) -> np.ndarray | None:
    """Each input column's step factor (float64) from ``energy``, its inputs' mean squares:
    (h_j / geometric mean)^(-POWER/2) within 1/RANGE..RANGE, the geometric mean over the
    columns with energy (a column whose inputs are all zero takes the coarsest step). None
    where no input carries energy or a mean square is not finite."""
    energy = energy.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
    live = energy > 0
    if not live.any() or not np.isfinite(energy).all():
        return None
    log_energy = np.log(np.where(live, energy, 1.0))
    relative = np.where(live, log_energy - log_energy[live].mean(), -np.inf)
    return np.clip(np.exp(-POWER / 2 * relative), 1 / RANGE, RANGE)


def divided_columns(weight: torch.Tensor, factors: np.ndarray, transposed: bool,
                    ) -> torch.Tensor:
    """``weight`` (float32, its shape) with input column j divided by ``factors[j]``: the
    matrix view's columns, or its rows where the weight is stored ``transposed`` (in, out)."""
    matrix = weight.detach().to(device="cpu", dtype=torch.float32).reshape(
        matrix_shape(weight.shape))
    along = torch.from_numpy(np.asarray(factors, dtype=np.float64)).float()
    return (matrix / (along[:, None] if transposed else along[None, :])).reshape(weight.shape)


def column_stepped(quantizer: Quantizer, q: QuantizedTensor, factors: np.ndarray,
                   transposed: bool) -> QuantizedTensor | None:
    """``q`` (quantized from `divided_columns`) with each input column's step times its
    factor: the values of the undivided weight, the codes kept; None where ``quantizer``'s
    grid cannot carry a step per input column."""
    if transposed:
        return quantizer.with_row_scales(q, factors)
    return quantizer.with_column_scales(q, factors)
