"""GPTQ-style error feedback: round a Linear weight column by column, and push each column's
rounding error onto the columns not yet rounded, so the layer's OUTPUT error on calibration
inputs shrinks rather than its weight error (Frantar et al. 2022, "GPTQ").

The layer's output error on inputs X is ``||(W - W_hat) X^T||^2 = tr(E H E^T)`` with
``H = X^T X / n``, the layer's input covariance. Rounding column j leaves an error that the
columns after j can cancel, along the Cholesky factor of ``H^-1``; GPTQ does that greedily,
in lazy blocks. The grid (step, scale, zero point per tensor, row or group) is fixed first from
the whole weight by the quantizer itself, so the result is stored, dequantized and archived
exactly like that quantizer's own output; only the integer codes differ.

Exact zeros of the weight (pruned weights) stay exactly zero: their code is the code of 0 and
their error is compensated by the other columns, as SparseGPT does. GPTQ zeroes the weights of
dead inputs (a zero diagonal of ``H``); here they are rounded as the quantizer would, since the
calibration data says nothing about them and other inputs may not leave them at zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qlis.calibrate import Calibration
from qlis.errors import ConfigError, InputError
from qlis.quantize import (
    MAX_LEVELS,
    QuantizedTensor,
    code_dtype,
    get_quantizer,
    round_with_offset,
)

SUPPORTED_QUANTIZERS = ("affine", "group", "uniform")


def input_covariances(
    calibration: Calibration, names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """``H = X^T X / n`` (float32, (in, in)) of the inputs X of each ``nn.Linear`` weight named.

    One pass of the calibration runs the model with a hook on each of those layers that sums
    ``X^T X`` in float64 over all input rows (X reshaped to (-1, in_features)). Names that are
    not the weight of an ``nn.Linear``, and layers the model never called, are left out.

    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> h = input_covariances(Calibration(model, [torch.eye(3)]), ["0.weight", "0.bias"])
    >>> list(h), torch.allclose(h["0.weight"], torch.eye(3) / 3)
    (['0.weight'], True)
    """
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    handles = []
    try:
        for name in dict.fromkeys(names):
            module = _linear_of(calibration.model, name)
            if module is not None:
                hook = _accumulator(name, module.in_features, sums, rows)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        if handles:
            calibration._run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: (total / rows[name]).float().cpu() for name, total in sums.items()
            if rows[name]}


def _linear_of(model: torch.nn.Module, name: str) -> torch.nn.Linear | None:
    module_name, _, attr = name.rpartition(".")
    if attr != "weight":
        return None
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return module if isinstance(module, torch.nn.Linear) else None


def _accumulator(
    name: str, width: int, sums: dict[str, torch.Tensor], rows: dict[str, int]
) -> Callable[..., None]:
    rows[name] = 0

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["input"]
        x = x.detach().reshape(-1, width).to(torch.float64)
        if name not in sums:
            sums[name] = torch.zeros(width, width, dtype=torch.float64, device=x.device)
        sums[name].addmm_(x.T, x)
        rows[name] += x.shape[0]

    return hook


@dataclass
class _Grid:
    """Per element: code = rounded(w / scale + zero), clamped to [0, top] when ``top`` is set;
    value = (code - zero) * scale, which is what the quantizer's dequantize computes."""

    scale: torch.Tensor  # (in, out): one column of the weight per row, for fast column access
    zero: torch.Tensor
    top: int | None
    rounded: Callable[[torch.Tensor], torch.Tensor]

    def codes(self, column: torch.Tensor, j: int, keep_zero: torch.Tensor) -> torch.Tensor:
        code = self.rounded(column / self.scale[j] + self.zero[j])
        if self.top is not None:
            code = code.clamp(0, self.top)
        return torch.where(keep_zero, self.zero[j], code)

    def values(self, code: torch.Tensor, j: int) -> torch.Tensor:
        return (code - self.zero[j]) * self.scale[j]


def _per_row(values: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """A per-tensor (1,) or per-row (out,) parameter as float32 (in, out)."""
    column = torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(1, -1))
    return column.expand(shape[1], shape[0]).contiguous()


def _per_group(values: np.ndarray, shape: tuple[int, int], group_size: int) -> torch.Tensor:
    """A (out, groups) parameter repeated over its groups' columns, as float32 (in, out)."""
    grouped = torch.from_numpy(np.asarray(values).astype(np.float32))
    return grouped.repeat_interleave(group_size, dim=1)[:, : shape[1]].T.contiguous()


def _grid(config: dict[str, Any], reference: QuantizedTensor) -> _Grid:
    """The grid the quantizer fixed on the whole weight, from its own output's parameters."""
    shape = reference.shape
    params = reference.params
    if config["id"] == "uniform":
        rounding = float(config.get("rounding", 0.5))
        scale = _per_row(params["step"], shape)
        return _Grid(scale, torch.zeros_like(scale), None,
                     lambda x: round_with_offset(x, rounding))
    top = reference.n_levels - 1
    if config["id"] == "affine":
        scale = _per_row(params["scale"], shape)
        return _Grid(scale, _per_row(params["zero_point"], shape), top, torch.round)
    group_size = int(config["group_size"])
    scale = _per_group(params["scale"], shape, group_size)
    if "zero_point" in params:
        zero = _per_group(params["zero_point"], shape, group_size)
    else:  # symmetric: codes centred on 2**(bits-1)
        zero = torch.full_like(scale, float(1 << (int(config["bits"]) - 1)))
    return _Grid(scale, zero, top, torch.round)


def _upper_inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, dead inputs set to 1."""
    h = hessian.detach().to(device="cpu", dtype=torch.float64).clone()
    dead = torch.nonzero(torch.diagonal(h) == 0).reshape(-1)
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise InputError(
            "the input covariance is not positive definite even after damping; pass a "
            f"larger damp= (now {damp}) or more calibration data"
        )
    # cholesky_solve against I: measured ~40x faster than cholesky_inverse on CPU (1536 wide)
    inverse = torch.cholesky_solve(torch.eye(len(h), dtype=h.dtype), lower)
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info):
        raise InputError(f"the damped input covariance is too ill-conditioned; raise damp= "
                         f"(now {damp})")
    return upper.float()


def _check(weight: torch.Tensor, hessian: torch.Tensor, damp: float, block_size: int) -> None:
    if weight.ndim != 2 or not weight.is_floating_point():
        raise InputError(
            f"error feedback takes a 2-D floating-point Linear weight (out, in), got a "
            f"{weight.dtype} tensor of shape {list(weight.shape)}"
        )
    width = weight.shape[1]
    if tuple(hessian.shape) != (width, width):
        raise InputError(f"the input covariance must be ({width}, {width}) for a weight of "
                         f"shape {list(weight.shape)}, got {list(hessian.shape)}")
    if not bool(torch.isfinite(weight).all()) or not bool(torch.isfinite(hessian).all()):
        raise InputError("error feedback needs a finite weight and covariance (found inf or NaN)")
    if isinstance(damp, bool) or not isinstance(damp, int | float) or not 0 <= damp < math.inf:
        raise ConfigError(f"damp must be a finite number >= 0 (GPTQ uses 0.01), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"block_size must be a positive integer (128), got {block_size!r}")


def quantize_with_error_feedback(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: dict[str, Any] | str,
    damp: float = 0.01,
    block_size: int = 128,
) -> QuantizedTensor:
    """Quantize a Linear weight (out, in) as ``config``'s quantizer does, with GPTQ's error
    feedback along ``hessian`` (the input covariance, e.g. from ``input_covariances``).

    Supported: "affine" (tensor or channel), "group" (symmetric or not) and "uniform"; the
    result has that quantizer's exact format (config, params, code dtype). For "uniform" the
    codes' range (``n_levels``, ``offset``) is taken from the final levels, which feedback can
    move beyond the plain rounding's range. ``damp`` adds that fraction of the mean diagonal
    to ``H``; ``block_size`` columns are updated together (lazy batch updates).

    >>> w = torch.tensor([[1.0, 0.9], [-0.4, 0.2]])
    >>> h = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    >>> q = quantize_with_error_feedback(w, h, {"id": "uniform", "step": 0.5})
    >>> q.dequantize().tolist()
    [[1.0, 1.0], [-0.5, 0.5]]
    """
    config = {"id": config} if isinstance(config, str) else dict(config)
    if config.get("id") not in SUPPORTED_QUANTIZERS:
        raise ConfigError(
            f"error feedback supports the quantizers {', '.join(SUPPORTED_QUANTIZERS)} (a grid "
            f"fixed per tensor, row or group), not {config.get('id')!r}"
        )
    _check(weight, hessian, damp, block_size)
    quantizer = get_quantizer(config)
    reference = quantizer.quantize(weight)
    if weight.numel() == 0:
        return reference
    config = reference.quantizer
    grid = _grid(config, reference)
    factor = _upper_inverse_factor(hessian, damp)
    work = weight.detach().to(device="cpu", dtype=torch.float32).T.contiguous()  # (in, out)
    keep_zero = work == 0
    codes = torch.empty_like(work)
    width = work.shape[0]
    for start in range(0, width, block_size):
        stop = min(start + block_size, width)
        block = work[start:stop].clone()
        errors = torch.empty_like(block)
        inner = factor[start:stop, start:stop]
        for i in range(stop - start):
            j = start + i
            code = grid.codes(block[i], j, keep_zero[j])
            codes[j] = code
            errors[i] = (block[i] - grid.values(code, j)) / inner[i, i]
            block[i + 1:].addr_(inner[i, i + 1:], errors[i], alpha=-1.0)
        work[stop:].addmm_(factor[start:stop, stop:].T, errors, alpha=-1.0)
    return _stored(codes.T, reference)


def _stored(levels: torch.Tensor, reference: QuantizedTensor) -> QuantizedTensor:
    """The codes in the reference's format; for "uniform", shifted to the final level range."""
    params, n_levels = reference.params, reference.n_levels
    if reference.quantizer["id"] == "uniform":
        low, high = (int(v) for v in torch.aminmax(levels))
        n_levels = high - low + 1
        if n_levels > MAX_LEVELS:
            raise ConfigError(
                f"error feedback spread this layer's codes over {n_levels} levels (at most "
                f"{MAX_LEVELS}); use a larger step or rel_mse"
            )
        levels = levels - low
        params = {"step": params["step"], "offset": np.array([-low], dtype=np.float32)}
    dtype = code_dtype(n_levels)
    codes = levels.to(torch.int32).numpy().astype(dtype)
    return QuantizedTensor(codes=codes, n_levels=n_levels, quantizer=reference.quantizer,
                           params=params, dtype=reference.dtype)
