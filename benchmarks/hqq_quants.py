"""HQQ (Badri & Shaji 2023, half-quadratic quantization), re-implemented to compare against: a
calibration-free asymmetric group-wise quantizer whose zero points are fitted to an lp-norm
(p < 1) of the weight error by a half-quadratic proximal solver.

What the hqq package does by default (``HQQLinear`` with ``BaseQuantizeConfig(nbits,
group_size)``, axis=1), followed here:

- groups of ``group_size`` consecutive elements of the flattened tensor (along a row);
- per group the inverse scale s = min((2**nbits - 1) / (max - min), 2e4) (1 where
  max - min <= 1e-4) and the zero point z = -min * s, rounded to an integer at 4 bits
  (``round_zero``); codes q = clip(round(w * s + z), 0, 2**nbits - 1);
- the zero refined by ``optimize_weights_proximal_legacy`` (its defaults: p = 0.7, beta = 10
  growing x1.01 per iteration, at most 20 iterations): W_r = (q - z) / s, W_e = the lp
  shrinkage of W - W_r, z = mean over the group of q - (W - W_e) * s; it stops at the first
  iteration whose mean |W - W_r| over the tensor does not improve, keeping that iteration's
  zero update as the package does (its release 0.2.8 no longer grows beta; earlier releases
  and the paper do, as here). The scale stays the min-max one: the package's default
  solver moves only the zero (its scale search lives in the experimental, off-by-default v2
  solver). The solver runs in float32 (the package uses float16 on a GPU, float32 on CPU);
- scale (1/s) and zero stored as float16, the weights rebuilt in float16 as ``(q - z) * scale``.

Real bytes: the codes packed as the package's ``BitPack`` packs the (groups, group_size)
matrix along its rows (8 bits: 1 code per byte, 4 bits: 2, 2 bits: 4, 3 bits: 10 codes per
int32, i.e. 3.2 bits per weight; the row count padded up to a whole unit), plus one float16
scale and one float16 zero per group (4 bytes). With ``quant_meta`` (the package's
``offload_meta`` setting with ``quant_scale=quant_zero=True``) the scale and zero vectors are
themselves quantized to 8 bits, min-max without the solver, in 128 groups laid as the package
does (its axis=0: meta group j holds entries j, j + n/128, j + 2n/128, ...), each meta group
with a float16 scale and zero: 2 bytes per group plus 8 bytes per 128 groups. The package
refuses a tensor whose group count is not a multiple of 128 there; such a tensor keeps the
float16 scale and zero (its ``kind`` says so).
"""

from __future__ import annotations

import numpy as np
from gguf_quants import Quantized, fp16

F32 = np.float32
NBITS = (2, 3, 4, 8)
# BitPack: (codes per container, bytes per container)
PACKING = {8: (1, 1), 4: (2, 1), 2: (4, 1), 3: (10, 4)}
MAX_INV_SCALE = F32(2e4)  # the package clamps s there "to avoid half-precision problems"
MIN_RANGE = F32(1e-4)  # a group no wider than this gets s = 1
META_GROUP = 128


def packed_bytes(n_groups: int, group_size: int, nbits: int) -> int:
    """Bytes of the packed codes of ``n_groups`` groups (BitPack packs along the groups)."""
    per, size = PACKING[nbits]
    return -(-n_groups // per) * size * group_size


def shrink_lp(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """The generalized soft-thresholding of the lp norm (p < 1):
    sign(x) * max(|x| - |x|**(p - 1) / beta, 0), zero at zero."""
    a = np.abs(x)
    with np.errstate(divide="ignore"):
        return (np.sign(x) * np.maximum(a - F32(1 / beta) * np.power(a, F32(p - 1)), 0)).astype(F32)


def optimize_zero(
    groups: np.ndarray, scale: np.ndarray, zero: np.ndarray, top: int, p: float = 0.7,
    beta: float = 10.0, kappa: float = 1.01, iters: int = 20,
) -> np.ndarray:
    """HQQ's proximal solver for the zero points (inverse ``scale`` and ``zero`` per group,
    shape (groups, 1)) of codes in [0, top]; see the module doc for the iteration."""
    best = np.inf
    for _ in range(iters):
        q = np.clip(np.rint(groups * scale + zero), 0, top)
        rebuilt = (q - zero) / scale
        residual = shrink_lp(groups - rebuilt, beta, p)
        zero = np.mean(q - (groups - residual) * scale, axis=1, keepdims=True, dtype=F32)
        beta *= kappa
        error = float(np.mean(np.abs(groups - rebuilt), dtype=np.float64))
        if error >= best:
            break
        best = error
    return zero.astype(F32)


def _min_max(groups: np.ndarray, top: int, round_zero: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per group (rows of ``groups``): inverse scale and zero point of min-max quantization."""
    lo = groups.min(axis=1, keepdims=True)
    hi = groups.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        scale = np.where(hi - lo <= MIN_RANGE, F32(1), F32(top) / (hi - lo))
    scale = np.minimum(scale, MAX_INV_SCALE).astype(F32)
    zero = (-lo * scale).astype(F32)
    return scale, np.rint(zero) if round_zero else zero


def _dequantize(q: np.ndarray, scale16: np.ndarray, zero16: np.ndarray) -> np.ndarray:
    """(q - zero) * scale in float16 arithmetic (each operation rounded once), as float32."""
    diff = fp16(q.astype(np.float64) - zero16.astype(np.float64))
    return fp16(diff * scale16)


def _quantize_meta(v: np.ndarray) -> np.ndarray:
    """The package's 8-bit meta-data quantization of a per-group vector (min-max, float16
    scale and zero per meta group), as the float16 values the weights are rebuilt with."""
    cols = v.reshape(META_GROUP, -1).T  # meta group j: entries j, j + n/128, ...
    scale, zero = _min_max(cols, 255, round_zero=False)
    q = np.clip(np.rint(cols * scale + zero), 0, 255)
    return _dequantize(q, fp16(F32(1) / scale), fp16(zero)).T.reshape(v.shape)


def hqq(
    weight: np.ndarray, nbits: int, group_size: int, optimize: bool = True,
    quant_meta: bool = False,
) -> Quantized:
    """Round-trip ``weight`` through HQQ at ``nbits`` in groups of ``group_size`` (``optimize``:
    the zero-point solver, as the package's default; ``quant_meta``: 8-bit scale and zero)."""
    if nbits not in NBITS:
        raise ValueError(f"nbits must be one of {NBITS}, not {nbits}")
    weight = np.asarray(weight, dtype=F32)
    if group_size <= 0 or weight.size % group_size:
        raise ValueError(f"group_size {group_size} does not divide {weight.size} elements")
    top = 2**nbits - 1
    groups = weight.reshape(-1, group_size)
    scale, zero = _min_max(groups, top, round_zero=nbits == 4)
    if optimize:
        zero = optimize_zero(groups, scale, zero, top)
    q = np.clip(np.rint(groups * scale + zero), 0, top)
    n = len(groups)
    kind = f"hqq{nbits}-g{group_size}"
    scale16, zero16 = fp16(F32(1) / scale), fp16(zero)
    meta_bytes = 4 * n
    if quant_meta and n % META_GROUP == 0:
        scale16, zero16 = _quantize_meta(F32(1) / scale), _quantize_meta(zero)
        meta_bytes = 2 * n + 8 * (n // META_GROUP)
        kind += "-meta8"
    values = _dequantize(q, scale16, zero16).reshape(weight.shape)
    return Quantized(values, packed_bytes(n, group_size, nbits) + meta_bytes, kind)
