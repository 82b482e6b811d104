"""GPTQ-style error feedback: round a weight's matrix (outputs, inputs) column by column, and
push each column's rounding error onto the columns not yet rounded, so the layer's OUTPUT
error on calibration inputs shrinks rather than its weight error (Frantar et al. 2022, "GPTQ").

The layer's output error on inputs X is ``||(W - W_hat) X^T||^2 = tr(E H E^T)`` with
``H = X^T X / n``, the layer's input covariance. Rounding column j leaves an error that the
columns after j can cancel, along the Cholesky factor of ``H^-1``; GPTQ does that greedily,
in lazy blocks. The grid (qlis/quantize/grid.py: any quantizer's, affine or codebook) is fixed first
from the whole weight by the quantizer itself, so the result is stored, dequantized and
archived exactly like that quantizer's own output; only the integer codes differ.

Exact zeros of the weight (pruned weights) stay exactly zero: their code is the code of 0 and
their error is compensated by the other columns, as SparseGPT does. GPTQ zeroes the weights of
dead inputs (a zero diagonal of ``H``); here they are rounded as the quantizer would, since the
calibration data says nothing about them and other inputs may not leave them at zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.linalg import lapack

from qlis.errors import ConfigError, InputError
from qlis.quantize.column_scales import column_stepped, divided_columns
from qlis.quantize.grid import Grid, matrix_shape
from qlis.quantize.quantizers import (
    QuantizedTensor,
    Quantizer,
    checked_grid,
    get_quantizer,
    quantized,
)
from qlis.quantize.rounding import refine_codes
from qlis.workers.threads import single_threaded_ops

MAX_SWEEPS = 64
_ERROR_COLUMNS = 512  # columns of H widened to float64 at once by output_error
_REVERSE_CHUNK = 1 << 20
DEFAULT_DAMP = 0.3
"""GPTQ's damping uses 0.01 with ~250k calibration tokens. With a few hundred (what qlis'
users calibrate with), more keeps the fitted rounding from over-fitting the calibration
inputs. Measured on MiniLM with 60 prompts at 2.75 bits/weight, the held-out output error of
the reconstructed layers drops from 0.0077 (0.01) to 0.0064 (0.1 and 0.3; 1.0 is worse); the
whole calibrated rd at 2.75-4.0 bits/weight keeps 4-6% less output error on 240 held-out
prompts with 0.3 than with 0.1, and InceptionV3 at 12x as much test SRCC (docs/method.md)."""


class CovarianceNotPositive(InputError):
    """A layer's input covariance that no Cholesky factor exists for, even damped: inputs a
    layer before nearly silenced (rd zeroed it), whose sums lost their precision on the
    fixed-point grid sized for the float model's inputs. Reconstruction rounds such a layer
    as data-free quantization does."""


def _damping(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """The dead inputs of one group's covariance (a zero diagonal: set to 1) and what damping
    adds to every diagonal entry, ``damp`` times the mean diagonal once they are 1."""
    diagonal = torch.diagonal(hessian).to(device="cpu", dtype=torch.float64)
    dead = diagonal == 0
    return dead, damp * float(torch.where(dead, 1.0, diagonal).mean())


def _damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` in float64, dead inputs (zero diagonal) set to 1."""
    dead, shift = _damping(hessian, damp)
    h = hessian.detach().to(device="cpu", dtype=torch.float64).clone()
    diagonal = h.diagonal()
    diagonal[dead] = 1.0
    diagonal.add_(shift)
    return h


def _each_group(fn: Callable[[torch.Tensor], torch.Tensor], stacked: torch.Tensor,
                ) -> torch.Tensor:
    """``fn`` of each (width, width) matrix of ``stacked``, stacked, without holding the
    results twice (a list and its stack): one group's is a view of its only result."""
    if stacked.shape[0] == 1:
        return fn(stacked[0])[None]
    first = fn(stacked[0])
    out = torch.empty((stacked.shape[0], *first.shape), dtype=first.dtype)
    out[0] = first
    del first
    for g in range(1, stacked.shape[0]):
        out[g] = fn(stacked[g])
    return out


def _upper_inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U (float32) of the damped covariance's inverse, H^-1 = U^T U,
    made in ``hessian``'s own buffer (a contiguous float32 matrix on the CPU), whose values
    are then gone.

    With J the reversal, J H J = L L^T gives H = (J L J)(J L J)^T, so U = J L^-1 J: one
    Cholesky factorization of H in reversed order and one triangular inverse, both by LAPACK
    in place in one float32 buffer (potrf, trtri: n^3 / 3 flops each). Reversing a square
    matrix's memory reverses both its orders, so J H J and then U are made in place too.
    Width 4096: 64 MiB in all, where a float64 factor beside a float32 covariance held 192.
    float32 is what the column loop uses the factor in; with qlis' damping (0.1 of the mean
    diagonal) the covariance's condition is far inside float32's reach."""
    width = hessian.shape[-1]
    dead, shift = _damping(hessian, damp)
    work = hessian.numpy()
    flat = work.reshape(-1)  # a view: the buffer in memory order
    _reverse_in_place(flat)  # J H J
    diagonal = flat[:: width + 1]  # reversed too, as J H J's diagonal is
    diagonal[dead.numpy()[::-1]] = 1.0
    diagonal += np.float32(shift)
    with single_threaded_ops():  # LAPACK's results vary with its thread count
        # J H J is symmetric, so its memory read in Fortran order is J H J as well
        lower, info = lapack.spotrf(work.T, lower=1, overwrite_a=1, clean=1)
        if info == 0:
            lower, info = lapack.strtri(lower, lower=1, overwrite_c=1)
    if info:
        raise CovarianceNotPositive(
            f"the input covariance is not positive definite even after damping ({damp} of "
            "its mean diagonal): its inputs are (nearly) constant, or fewer than its width"
        )
    if not np.shares_memory(lower, work):  # LAPACK worked on a copy after all
        work.T[...] = lower
    _reverse_in_place(flat)  # L^-1 in Fortran order, reversed: U in Fortran order
    return hessian.mT


def _inverse_factors(per_group: torch.Tensor, damp: float, overwrite: bool) -> torch.Tensor:
    """`_upper_inverse_factor` of each (width, width) covariance of ``per_group``, stacked:
    in ``per_group``'s own buffer when ``overwrite`` allows it (no second stack)."""
    if not (overwrite and per_group.device.type == "cpu" and per_group.dtype == torch.float32
            and per_group.is_contiguous()):
        per_group = per_group.to(device="cpu", dtype=torch.float32, copy=True,
                                 memory_format=torch.contiguous_format)
    per_group = per_group.detach()
    for hessian in per_group:
        _upper_inverse_factor(hessian, damp)
    return per_group.mT


def _reverse_in_place(flat: np.ndarray) -> None:
    """Reverse a 1-D view in place, a bounded chunk at a time."""
    size = flat.size
    for start in range(0, size // 2, _REVERSE_CHUNK):
        stop = min(start + _REVERSE_CHUNK, size // 2)
        low = flat[start:stop].copy()
        flat[start:stop] = flat[size - stop:size - start][::-1]
        flat[size - stop:size - start] = low[::-1]


def _check(weight: torch.Tensor, hessian: torch.Tensor, damp: float, block_size: int,
           transposed: bool) -> None:
    if weight.ndim < 2 or not weight.is_floating_point():
        raise InputError(
            f"error feedback takes a floating-point weight of 2 or more dimensions, got a "
            f"{weight.dtype} tensor of shape {list(weight.shape)}"
        )
    rows, width = matrix_shape(weight.shape)
    if transposed:
        if weight.ndim != 2:
            raise InputError("only a 2-D weight stored (in, out) can be transposed")
        rows, width = width, rows
    groups = hessian.shape[0] if hessian.ndim == 3 else 1
    if hessian.ndim not in (2, 3) or tuple(hessian.shape[-2:]) != (width, width) or (
        rows % groups
    ):
        raise InputError(
            f"the input covariance must be ({width}, {width}), or (groups, {width}, {width}) "
            f"with groups dividing {rows} outputs, for a weight of shape "
            f"{list(weight.shape)}; got {list(hessian.shape)}"
        )
    if not (_finite(weight) and _finite(hessian)):
        raise InputError("error feedback needs a finite weight and covariance (found inf or NaN)")
    if isinstance(damp, bool) or not isinstance(damp, int | float) or not 0 <= damp < math.inf:
        raise ConfigError(f"damp must be a finite number >= 0 (GPTQ uses 0.01, qlis 0.3), "
                          f"got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"block_size must be a positive integer (128), got {block_size!r}")


def _finite(tensor: torch.Tensor) -> bool:
    """No inf or NaN in ``tensor``: its extremes are finite (max and min propagate NaN), with
    no elementwise temporary (a wide covariance's would be width^2)."""
    return tensor.numel() == 0 or bool(torch.isfinite(torch.stack([tensor.max(),
                                                                  tensor.min()])).all())


def output_error(difference: torch.Tensor, hessian: torch.Tensor,
                 transposed: bool = False, dtype: torch.dtype = torch.float64) -> float:
    """``tr(E H E^T)``: the mean squared output error that a weight error ``difference`` (the
    weight's shape) causes on inputs of covariance ``hessian`` (2-D, or per output group).
    The products are made in ``dtype`` (float32: half the time, to about 1e-6), `_ERROR_COLUMNS`
    columns of ``H`` at a time, and added in float64."""
    matrix = difference.detach().to(device="cpu", dtype=dtype).reshape(
        matrix_shape(difference.shape))
    if transposed:
        matrix = matrix.T
    h = (hessian if hessian.ndim == 3 else hessian[None]).detach().to(device="cpu")
    grouped = matrix.reshape(h.shape[0], -1, matrix.shape[1])
    total = 0.0
    for start in range(0, h.shape[-1], _ERROR_COLUMNS):
        columns = h[:, :, start:start + _ERROR_COLUMNS].to(dtype)
        products = torch.bmm(grouped, columns) * grouped[:, :, start:start + _ERROR_COLUMNS]
        total += float(products.sum(dtype=torch.float64))
    return total


@dataclass(frozen=True)
class FedBack:
    """A weight quantized with error feedback, and the mean squared output error it leaves on
    the calibration inputs, ``tr(E H E^T)`` (None after learned rounding, which moves codes
    after the column loop that measures it)."""

    quantized: QuantizedTensor
    output_error: float | None


def quantize_with_error_feedback(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: dict[str, Any] | str,
    damp: float = DEFAULT_DAMP,
    block_size: int = 128,
    transposed: bool = False,
    sweeps: int = 0,
) -> QuantizedTensor:
    """Quantize a weight as ``config``'s quantizer does, with GPTQ's error feedback along
    ``hessian``, the covariance of the layer's inputs (as reconstruction measures it).

    The weight is seen as its matrix (outputs, inputs): ``(out, in)`` for a Linear,
    ``(out, in / groups * kernel)`` for a convolution (its inputs unfolded), ``(in, out)``
    with ``transposed=True`` for Hugging Face's Conv1D. ``hessian`` is (inputs, inputs), or
    (groups, inputs, inputs) when the outputs split into equal groups that see different
    inputs (grouped and depthwise convolutions, separate q/k/v inputs of packed attention).
    Any quantizer that describes its grid works: the grid is fixed first from the whole
    weight by the quantizer, so the result has that quantizer's exact format (config, params,
    code dtype); only the codes differ (``Quantizer.with_codes``). ``damp`` adds that fraction
    of the mean diagonal to ``H``; ``block_size`` columns are updated together (lazy batch
    updates). ``sweeps`` > 0 then refines the codes by that many passes of coordinate descent
    on the output error plus the codes' coded length (learned rounding, qlis/quantize/rounding.py).

    >>> w = torch.tensor([[1.0, 0.9], [-0.4, 0.2]])
    >>> h = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    >>> q = quantize_with_error_feedback(w, h, {"id": "uniform", "step": 0.5})
    >>> q.dequantize().tolist()
    [[1.0, 1.0], [-0.5, 0.5]]
    """
    return fit_with_error_feedback(weight, hessian, config, damp, block_size, transposed,
                                   sweeps).quantized


def fit_with_error_feedback(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: dict[str, Any] | str,
    damp: float = DEFAULT_DAMP,
    block_size: int = 128,
    transposed: bool = False,
    sweeps: int = 0,
    overwrite_hessian: bool = False,
    label: str = "error feedback",
    column_factors: np.ndarray | None = None,
) -> FedBack:
    """`quantize_with_error_feedback`, and the output error the result leaves, which the
    column loop gives almost for free: its scaled errors d (each column's rounding error
    over its factor's diagonal) make the weight error E = d U, so ``tr(E H' E^T) = |d|^2``
    for the damped H' = (U^T U)^-1, and ``tr(E H E^T)`` is that less the damping's share.
    Measuring it by products with ``H`` instead cost a quarter of a calibrated rd run.

    ``overwrite_hessian``: a contiguous float32 ``hessian`` becomes the factor's buffer (its
    values are lost), so that a wide layer's fit holds one width^2 buffer, not two.
    ``label`` names the layer in what a third-party quantizer is refused for.
    ``column_factors`` (one per input, qlis/quantize/column_scales.py): where the quantizer
    can carry them, the fit's grid takes a step per input column, the step the quantizer
    gives the weight with its input columns divided by them, times them."""
    quantizer = get_quantizer(config)
    if not quantizer.has_grid():
        raise ConfigError(f"quantizer {quantizer.strategy_id!r} does not describe its grid "
                          "(Quantizer.grid), which error feedback needs")
    _check(weight, hessian, damp, block_size, transposed)
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or not 0 <= sweeps <= MAX_SWEEPS:
        raise ConfigError(f"sweeps must be an integer from 0 to {MAX_SWEEPS}, got {sweeps!r}")
    reference = quantized(quantizer, weight, label, measured=False)[0]
    if weight.numel() == 0:
        return FedBack(reference, 0.0)
    factors = column_factors if column_factors is not None and column_stepped(
        quantizer, reference, column_factors, transposed) is not None else None
    if factors is not None:  # AWQ's scaling: fitted on scaled columns, stored column-stepped
        weight, hessian, reference = _scaled_columns(quantizer, weight, hessian, factors,
                                                      transposed, overwrite_hessian, label)
        overwrite_hessian = True  # the scaled covariance is a copy of our own
    grid = checked_grid(quantizer, reference, label)
    matrix = weight.detach().to(device="cpu", dtype=torch.float32).reshape(
        matrix_shape(weight.shape))
    if transposed:
        matrix, grid = matrix.T, grid.transposed()
    per_group = hessian if hessian.ndim == 3 else hessian[None]
    # what the covariance says beyond the factor, taken before the factor may overwrite it
    covariances = _each_group(lambda h: _damped(h, damp), per_group) if sweeps else None
    damping = torch.stack([dead.double() + shift
                           for dead, shift in (_damping(h, damp) for h in per_group)])
    inverse_factors = _inverse_factors(per_group, damp, overwrite_hessian)
    codes, scaled, column_errors = _feed_back(matrix, grid, inverse_factors, block_size)
    del inverse_factors
    error: float | None = None
    if covariances is not None:
        codes = refine_codes(matrix, grid, codes, covariances, sweeps, frozen=matrix == 0)
    else:
        error = max(0.0, scaled - float((damping * column_errors).sum()))
    if transposed:
        codes = codes.T
    fitted = quantizer.with_codes(reference, codes.reshape(weight.shape))
    if factors is not None:  # checked above: the quantizer carries them
        fitted = column_stepped(quantizer, fitted, factors, transposed)
    return FedBack(fitted, error)


def _scaled_columns(
    quantizer: Quantizer, weight: torch.Tensor, hessian: torch.Tensor, factors: np.ndarray,
    transposed: bool, overwrite_hessian: bool, label: str,
) -> tuple[torch.Tensor, torch.Tensor, QuantizedTensor]:
    """The fit's problem with input column j divided by ``factors[j]``: the weight's columns
    (float32), the covariance's rows and columns times it (``hessian`` scaled in place when
    ``overwrite_hessian``), the grid the quantizer gives the divided weight. Its codes on
    that grid are the codes on the column-stepped grid, and its output error is the same."""
    divided = divided_columns(weight, factors, transposed)
    probe = quantized(quantizer, divided.to(weight.dtype), label, measured=False)[0]
    covariance = hessian if overwrite_hessian else hessian.clone()
    along = torch.from_numpy(factors).to(covariance.device, covariance.dtype)
    covariance.mul_(along[:, None]).mul_(along[None, :])
    return divided, covariance, probe


def _feed_back(
    matrix: torch.Tensor, grid: Grid, factors: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """GPTQ's column loop on ``matrix`` (outputs, inputs): the codes (outputs, inputs), uint8
    where the grid's codes fit it, float32 otherwise; the sum of the squared scaled errors
    |d|^2; and each output group's squared weight error per input column (groups, inputs),
    float64. ``factors`` (groups, inputs, inputs), float64: one upper inverse factor per
    output group, used in float32 a block of rows at a time."""
    groups = factors.shape[0]
    # (inputs, outputs): one column of the matrix per row; a copy even where the transpose is
    # contiguous already (a weight stored (in, out)), so the caller's weight is never touched
    work = matrix.T.clone(memory_format=torch.contiguous_format)
    width, outputs = work.shape
    per_group = outputs // groups
    columns = [grid.column(j) for j in range(width)]
    in_a_byte = grid.levels is not None and grid.levels <= 256  # a quarter of float32's
    codes = torch.empty_like(work, dtype=torch.uint8 if in_a_byte else torch.float32)
    scaled = 0.0
    column_errors = torch.empty(groups, width, dtype=torch.float64)
    for start in range(0, width, block_size):
        stop = min(start + block_size, width)
        block = work[start:stop].clone()
        keep_zero = matrix.T[start:stop] == 0
        errors = torch.empty_like(block)
        values = torch.empty_like(block)
        slab = factors[:, start:stop].float()  # the factors' rows of this block, float32
        inner = slab[:, :, start:stop]
        for i in range(stop - start):
            j = start + i
            column = torch.where(keep_zero[i], 0.0, block[i])[:, None]
            code = columns[j].encode(column)
            codes[j] = code[:, 0]
            values[i] = columns[j].decode(code)[:, 0]
            error = (block[i] - values[i]).reshape(groups, per_group)
            error = error / inner[:, i, i, None]
            errors[i] = error.reshape(-1)
            if groups == 1:
                block[i + 1:].addr_(inner[0, i, i + 1:], errors[i], alpha=-1.0)
            else:
                later = block[i + 1:].reshape(-1, groups, per_group)
                later.sub_(inner[:, i, i + 1:].T[:, :, None] * error[None])
        scaled += float(errors.double().square().sum())
        weight_error = (matrix.T[start:stop] - values).double().square()
        column_errors[:, start:stop] = weight_error.reshape(-1, groups, per_group).sum(2).T
        rest = slab[:, :, stop:]
        if groups == 1:
            work[stop:].addmm_(rest[0].T, errors, alpha=-1.0)
        else:
            update = torch.einsum("gbk,bgr->kgr", rest, errors.reshape(-1, groups, per_group))
            work[stop:].sub_(update.reshape(width - stop, outputs))
    return codes.T, scaled, column_errors
