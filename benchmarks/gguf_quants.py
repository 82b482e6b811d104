"""The formats people ship, re-implemented to compare against: GGUF (llama.cpp) block types and
torchao-style int4 group-wise / int8 per-channel weight quantization.

Each function maps a float32 tensor to its dequantized values and the exact number of bytes of
the tensor data in that format. The GGUF types follow llama.cpp's reference quantizers (what
``llama-quantize`` runs without an importance matrix): Q8_0, Q5_1, Q5_0, Q4_0 and IQ4_NL
(blocks of 32 along a row), Q6_K, Q5_K, Q4_K, Q3_K, Q2_K and IQ4_XS (super-blocks of 256 with
quantized sub-block scales), including the scale search of ``make_qx_quants``,
``make_q3_quants`` and ``make_qkx2_quants``, float16 rounding of the stored scales and the
re-quantization against the rounded scales. Arithmetic is float32 as in the C code; sums may
differ from it in the last bits (summation order), which can flip a rare tie. Known deviation:
this ``make_qkx2_quants`` lays every candidate grid from the min-max start, where the C code
lays each from the best (scale, min) found so far, so plain Q2_K/Q4_K/Q5_K differ from
llama.cpp's output in most super-blocks (their error by up to about 1%).

With an importance matrix (``gguf(w, name, imatrix)``: per input column, the mean squared
activation llama.cpp's imatrix tool collects) every type but Q8_0 follows the
``quantize_row_*_impl`` path llama.cpp takes with ``quant_weights``: per-value weights
``imatrix[i] * sqrt(sigma2 + x[i]**2)`` (sigma2 a mean square of the block, super-block or row,
as each C function has it; Q6_K uses the imatrix alone), the weighted searches
``make_qkx3_quants`` and ``make_qp_quants`` (Q2_K, Q4_K, Q5_K, Q5_1), weighted
``make_qx_quants`` (Q3_K, Q6_K, Q5_0, Q4_0) and the weighted IQ4_NL / IQ4_XS search. These
paths and IQ4_XS add in C order and reproduce ggml-quants.c's output bit for bit (checked
against the compiled C on random heavy-tailed matrices).

A row is the last dimension (ggml's ne[0]: a Linear weight's input features). Rows that a
K-quant cannot split into super-blocks fall back as llama.cpp's ``llama_tensor_get_type`` does
(Q2_K/Q3_K/IQ4_XS -> IQ4_NL, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0) and to F16 where even
32 does not divide the row; the fallback type takes the importance matrix like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
QK_K = 256
CHUNK = 1 << 20  # elements per vectorised pass (bounds the temporaries' memory)

# llama.cpp's non-linear 4-bit grid of IQ4_NL
KVALUES_IQ4NL = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=F32
)


@dataclass(frozen=True)
class BlockType:
    """A GGUF tensor type: elements per block, bytes per block, its quantizer, and how an
    importance matrix becomes its per-value weights (None: the type ignores it)."""

    name: str
    block: int
    block_bytes: int
    # (blocks, block) [, per-value weights of the same shape] -> dequantized, same shape
    dequantized: Callable[..., np.ndarray]
    # sigma2 of imatrix * sqrt(sigma2 + x**2): "block" (mean square of the block), "block2"
    # (twice that), "row" (mean square of the whole row), "raw" (the imatrix alone)
    weighting: str | None = None


@dataclass(frozen=True)
class Quantized:
    """A tensor after a format's round trip: its values, its data bytes, the type(s) used."""

    values: np.ndarray
    nbytes: int
    kind: str


# ---------------------------------------------------------------- helpers (as in ggml-quants.c)


def fp16(x: np.ndarray | float) -> np.ndarray:
    """float32 -> float16 -> float32 (round to nearest even), as GGML_FP32_TO_FP16 stores it."""
    return np.asarray(x, dtype=F32).astype(np.float16).astype(F32)


def bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 -> float32 (round to nearest even)."""
    bits = np.ascontiguousarray(x, dtype=F32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))))
    return (rounded & np.uint32(0xFFFF0000)).view(F32)


def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (the 1.5 * 2**23 trick), as float32."""
    return np.rint(x).astype(F32)


def _round_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero."""
    a = np.abs(x)
    fl = np.floor(a)
    return np.copysign(np.where(a - fl >= F32(0.5), fl + F32(1), fl), x).astype(F32)


def _signed_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the value of largest magnitude (the first on ties) and that magnitude."""
    idx = np.abs(x).argmax(axis=1)
    value = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]
    return value, np.abs(value)


def _csum(a: np.ndarray) -> np.ndarray:
    """Float32 row sums added left to right, the order of ggml's loops. The importance-matrix
    paths use them (bit-exact to llama.cpp); numpy's pairwise sums (``_psum``), which the
    plain paths keep, differ in the last bits, enough to flip near-ties of the searches."""
    return np.cumsum(a, axis=1, dtype=F32)[:, -1]


def _psum(a: np.ndarray) -> np.ndarray:
    """Float32 row sums in numpy's pairwise order (the plain paths)."""
    return a.sum(axis=1, dtype=F32)


def _safe(d: np.ndarray) -> np.ndarray:
    """A divisor with zeros replaced by one (their results are masked out by the caller)."""
    return np.where(d == 0, F32(1), d).astype(F32)


# ---------------------------------------------------------------- scale searches


def make_qx_quants(
    x: np.ndarray, nmax: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale per row (rmse_type 1: weights x**2 unless ``weights`` are given): a search
    over 19 candidate inverse scales around -nmax/max, keeping the weighted least-squares best.
    Returns the scale and the signed levels (in [-nmax, nmax - 1]) of the kept candidate."""
    mx, amax = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    w, add = (x * x, _psum) if weights is None else (weights, _csum)
    wx = w * x

    def levels(iscale: np.ndarray) -> np.ndarray:
        return np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = levels(iscale)
        return add(wx * q), add(w * q * q)

    kept = (F32(-nmax) / mx).astype(F32)
    sumlx, suml2 = sums(kept)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / _safe(suml2), F32(0)).astype(F32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = (-(F32(nmax) + F32(0.1) * F32(step)) / mx).astype(F32)
        sumlx, suml2 = sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = np.where(better, sumlx / _safe(suml2), scale).astype(F32)
        best = np.where(better, scale * sumlx, best).astype(F32)
        kept = np.where(better, iscale, kept)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], F32(0), levels(kept))


def make_q3_quants(x: np.ndarray, nmax: int) -> np.ndarray:
    """Q3_K's sub-block scale: start at -nmax/max, then up to 5 passes of coordinate descent
    over the levels (weights x**2), each level moved only if the fit improves."""
    mx, amax = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    level = np.clip(nearest_int((F32(-nmax) / mx)[:, None] * x), -nmax, nmax - 1)
    w = x * x
    sumlx = (w * x * level).sum(axis=1, dtype=F32)
    suml2 = (w * level * level).sum(axis=1, dtype=F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            changed = np.zeros(len(x), dtype=bool)
            for i in range(x.shape[1]):
                wi, xi, li = w[:, i], x[:, i], level[:, i]
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                movable = slx > 0
                new = np.where(movable, xi * sl2 / _safe(slx), F32(0))
                new = np.clip(nearest_int(new), -nmax, nmax - 1)
                slx_new = slx + wi * xi * new
                sl2_new = sl2 + wi * new * new
                accept = (
                    movable & (new != li) & (sl2_new > 0)
                    & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
                )
                level[:, i] = np.where(accept, new, li)
                sumlx = np.where(accept, slx_new, sumlx).astype(F32)
                suml2 = np.where(accept, sl2_new, suml2).astype(F32)
                changed |= accept
            if not changed.any():  # a pass without a change leaves every row where it is
                break
        scale = np.where(suml2 > 0, sumlx / _safe(suml2), F32(0)).astype(F32)
    return np.where(zero, F32(0), scale).astype(F32)


def make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
    use_mad: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric (scale, min) per row, values = scale * l - min with l in [0, nmax]: min-max
    start, then nstep + 1 candidate inverse scales each refitted by weighted least squares
    (min clamped to <= 0), keeping the smallest weighted error (absolute if use_mad)."""
    lo = np.minimum(x.min(axis=1), F32(0))
    hi = x.max(axis=1)
    flat = hi == lo
    span = np.where(flat, F32(1), hi - lo).astype(F32)
    sum_w = weights.sum(axis=1, dtype=F32)
    sum_x = (weights * x).sum(axis=1, dtype=F32)
    shifted = x - lo[:, None]

    def error(scale: np.ndarray, offset: np.ndarray, q: np.ndarray) -> np.ndarray:
        diff = scale[:, None] * q + offset[:, None] - x
        diff = np.abs(diff) if use_mad else diff * diff
        return (weights * diff).sum(axis=1, dtype=F32)

    iscale = (F32(nmax) / span).astype(F32)
    scale = (F32(1) / iscale).astype(F32)
    offset = lo.copy()
    best = error(scale, offset, np.clip(nearest_int(iscale[:, None] * shifted), 0, nmax))
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(nstep + 1):
            iscale = ((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span).astype(F32)
            q = np.clip(nearest_int(iscale[:, None] * shifted), 0, nmax)
            wq = weights * q
            sum_l = wq.sum(axis=1, dtype=F32)
            sum_l2 = (wq * q).sum(axis=1, dtype=F32)
            sum_xl = (wq * x).sum(axis=1, dtype=F32)
            det = sum_w * sum_l2 - sum_l * sum_l
            ok = det > 0
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / _safe(det)
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / _safe(det)
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / _safe(sum_l2), this_scale).astype(F32)
            this_min = np.where(positive, F32(0), this_min).astype(F32)
            cur = error(this_scale, this_min, q)
            better = ok & (cur < best)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale).astype(F32)
            offset = np.where(better, this_min, offset).astype(F32)
    offset = np.where(flat, lo, offset)
    return np.where(flat, F32(0), scale).astype(F32), (-offset).astype(F32)


def make_qkx3_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The importance-matrix form of make_qkx2_quants (squared error): the same min-max start
    and nstep + 1 weighted least-squares refits, but each candidate grid is laid from the best
    (scale, min) found so far. Returns (scale, -min, levels in [0, nmax]) per row."""
    lo = np.minimum(x.min(axis=1), F32(0))
    hi = x.max(axis=1)
    flat = hi <= lo
    sum_w = _csum(weights)
    sum_x = _csum(weights * x)

    def error(scale: np.ndarray, offset: np.ndarray, q: np.ndarray) -> np.ndarray:
        diff = scale[:, None] * q + offset[:, None] - x
        return _csum(weights * (diff * diff))

    iscale = (F32(nmax) / np.where(flat, F32(1), hi - lo)).astype(F32)
    scale = (F32(1) / iscale).astype(F32)
    offset = lo.copy()
    levels = np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    best = error(scale, offset, levels)
    # the best min so far may sit at or above max: iscale is then inf or negative, v nan or
    # out of range, and the C code's "v > 0 ? nearest_int(MIN(v, nmax)) : 0" decides
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in range(nstep + 1):
            iscale = ((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - offset)).astype(F32)
            v = iscale[:, None] * (x - offset[:, None])
            q = np.where(v > 0, nearest_int(np.minimum(v, F32(nmax))), F32(0))
            wq = weights * q
            sum_l = _csum(wq)
            sum_l2 = _csum(wq * q)
            sum_xl = _csum(wq * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / _safe(det)
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / _safe(det)
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / _safe(sum_l2), this_scale).astype(F32)
            this_min = np.where(positive, F32(0), this_min).astype(F32)
            cur = error(this_scale, this_min, q)
            better = ~flat & (det > 0) & (cur < best)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale).astype(F32)
            offset = np.where(better, this_min, offset).astype(F32)
            levels = np.where(better[:, None], q, levels)
    offset = np.where(flat, lo, offset)
    levels = np.where(flat[:, None], F32(0), levels)
    return np.where(flat, F32(0), scale).astype(F32), (-offset).astype(F32), levels


def make_qp_quants(
    x: np.ndarray, nmax: int, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize non-negative sub-block scales (or mins) per row to levels in [0, nmax] against
    one scale: the best of 9 inverse scales around nmax/max by weighted error, then up to 5
    passes of coordinate descent over the levels (weighted). Returns (scale, levels)."""
    mx = np.maximum(x.max(axis=1), F32(0))
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)

    def mse(scale: np.ndarray, q: np.ndarray) -> np.ndarray:
        diff = x - scale[:, None] * q
        return _csum(weights * diff * diff)

    iscale = (F32(nmax) / mx).astype(F32)
    best = mse((F32(1) / iscale).astype(F32), nearest_int(iscale[:, None] * x))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = ((F32(0.1) * F32(step) + F32(nmax)) / mx).astype(F32)
        cur = mse((F32(1) / iscale_is).astype(F32),
                  np.minimum(nearest_int(iscale_is[:, None] * x), F32(nmax)))
        better = cur < best
        best = np.where(better, cur, best)
        iscale = np.where(better, iscale_is, iscale)
    level = np.minimum(nearest_int(iscale[:, None] * x), F32(nmax))
    wx = weights * x
    sumlx = _csum(wx * level)
    suml2 = _csum(weights * level * level)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            changed = np.zeros(len(x), dtype=bool)
            for i in range(x.shape[1]):
                wi, xi, li = weights[:, i], x[:, i], level[:, i]
                slx = sumlx - wx[:, i] * li
                sl2 = suml2 - wi * li * li
                movable = (slx > 0) & (sl2 > 0)
                new = np.minimum(nearest_int(xi * sl2 / _safe(slx)), F32(nmax))
                slx_new = slx + wx[:, i] * new
                sl2_new = sl2 + wi * new * new
                accept = (
                    movable & (new != li)
                    & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
                )
                level[:, i] = np.where(accept, new, li)
                sumlx = np.where(accept, slx_new, sumlx).astype(F32)
                suml2 = np.where(accept, sl2_new, suml2).astype(F32)
                changed |= accept
            if not changed.any():  # a pass without a change leaves every row where it is
                break
        scale = np.where(suml2 > 0, sumlx / _safe(suml2), F32(0)).astype(F32)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], F32(0), level)


# ---------------------------------------------------------------- blocks of 32


def q8_0(x: np.ndarray) -> np.ndarray:
    """Q8_0: d = amax / 127 (fp16), q = round(x / d) in int8. 34 bytes per 32."""
    d = np.abs(x).max(axis=1) / F32(127)
    inv = np.where(d != 0, F32(1) / _safe(d), F32(0)).astype(F32)
    return _round_away(x * inv[:, None]) * fp16(d)[:, None]


def _legacy_symmetric(x: np.ndarray, levels: int) -> np.ndarray:
    """Q4_0 / Q5_0: d = max / -(levels/2) from the signed extreme, then
    q = trunc(x/d + levels/2 + 0.5), at most levels - 1."""
    half = F32(levels // 2)
    mx, _ = _signed_absmax(x)
    d = (mx / -half).astype(F32)
    inv = np.where(d != 0, F32(1) / _safe(d), F32(0)).astype(F32)
    q = np.minimum(F32(levels - 1), np.trunc(x * inv[:, None] + (half + F32(0.5))))
    return (q - half) * fp16(d)[:, None]


def _weighted_symmetric(x: np.ndarray, weights: np.ndarray, levels: int) -> np.ndarray:
    """Q4_0 / Q5_0 with an importance matrix: the weighted make_qx_quants search, its levels
    kept as found (no re-quantization against the fp16 scale, as in the C code)."""
    d, q = make_qx_quants(x, levels // 2, weights)
    return q * fp16(d)[:, None]


def q4_0(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Q4_0: 16 levels, one fp16 scale. 18 bytes per 32."""
    return _legacy_symmetric(x, 16) if weights is None else _weighted_symmetric(x, weights, 16)


def q5_0(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Q5_0: 32 levels, one fp16 scale. 22 bytes per 32."""
    return _legacy_symmetric(x, 32) if weights is None else _weighted_symmetric(x, weights, 32)


def q5_1(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Q5_1: min-max affine (with weights: make_qkx3_quants), 32 levels, fp16 scale and min.
    24 bytes per 32."""
    if weights is not None:
        d, neg_min, q = make_qkx3_quants(x, weights, 31, -0.9, 0.05, 36)
        return q * fp16(d)[:, None] + fp16(-neg_min)[:, None]
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = ((hi - lo) / F32(31)).astype(F32)
    inv = np.where(d != 0, F32(1) / _safe(d), F32(0)).astype(F32)
    q = np.trunc((x - lo[:, None]) * inv[:, None] + F32(0.5))
    return q * fp16(d)[:, None] + fp16(lo)[:, None]


def _iq4_index(v: np.ndarray) -> np.ndarray:
    """Index of the nearest IQ4_NL grid value (ties to the upper one, as best_index_int8)."""
    grid = KVALUES_IQ4NL
    upper = np.clip(np.searchsorted(grid, v, side="right"), 1, len(grid) - 1)
    lower_closer = v - grid[upper - 1] < grid[upper] - v
    return np.where(lower_closer, upper - 1, upper)


def _iq4_scale(
    x: np.ndarray, w: np.ndarray, add: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """quantize_row_iq4_nl_impl's scale search per block of 32 (ntry = 7): the scale refitted
    by weighted least squares over 15 candidate grids, 0 for an all-zero block; ``add`` sums
    a row."""
    mx, amax = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    grid = KVALUES_IQ4NL

    def fit(inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = grid[_iq4_index(inv[:, None] * x)]
        wq = w * q
        return add(wq * x), add(wq * q)

    d = (-mx / grid[0]).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sumqx, sumq2 = fit((F32(1) / d).astype(F32))
        d = (sumqx / _safe(sumq2)).astype(F32)
        best = d * sumqx
        for step in range(-7, 8):
            sumqx, sumq2 = fit(((F32(step) + grid[0]) / mx).astype(F32))
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / _safe(sumq2), d).astype(F32)
            best = np.where(better, d * sumqx, best).astype(F32)
    return np.where(zero, F32(0), d).astype(F32)


def iq4_nl(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """IQ4_NL (llama-quantize's path, ntry = 7, weights x**2 unless given): 16 non-uniform
    levels, a scale refitted over 15 candidate grids. 18 bytes per 32."""
    d = _iq4_scale(x, x * x, _psum) if weights is None else _iq4_scale(x, weights, _csum)
    inv = np.where(d != 0, F32(1) / _safe(d), F32(0)).astype(F32)
    return KVALUES_IQ4NL[_iq4_index(inv[:, None] * x)] * fp16(d)[:, None]


# ---------------------------------------------------------------- super-blocks of 256


def _sub(x: np.ndarray, size: int) -> np.ndarray:
    return x.reshape(-1, size)


def q6_k(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Q6_K: 16 sub-blocks of 16, each a symmetric 6-bit scale search (weighted by the
    importance matrix alone where given); the sub-block scales quantized to int8 against one
    fp16 super-scale. 210 bytes per 256."""
    n = len(x)
    sub = _sub(x, 16)
    w = None if weights is None else _sub(weights, 16)
    scales = make_qx_quants(sub, 32, w)[0].reshape(n, 16)
    max_scale, max_abs = _signed_absmax(scales)
    zero = max_abs < GROUP_MAX_EPS
    iscale = (F32(-128) / np.where(zero, F32(1), max_scale)).astype(F32)
    d = fp16(F32(1) / iscale)
    sc = np.minimum(F32(127), nearest_int(iscale[:, None] * scales))
    dl = (d[:, None] * sc).reshape(-1)
    q = np.clip(nearest_int(sub / _safe(dl)[:, None]), -32, 31)
    out = (dl[:, None] * q).reshape(n, QK_K)
    return np.where(zero[:, None], F32(0), out)


def q3_k(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Q3_K: 16 sub-blocks of 16 with 8 levels (make_q3_quants; with weights a weighted
    make_qx_quants), 6-bit signed sub-block scales against one fp16 super-scale (with weights
    found by make_qx_quants weighted by the sub-blocks' total weight). 110 bytes per 256."""
    n = len(x)
    sub = _sub(x, 16)
    if weights is None:
        scales = make_q3_quants(sub, 4).reshape(n, 16)
        max_scale, _ = _signed_absmax(scales)
        some = max_scale != 0
        with np.errstate(divide="ignore"):
            iscale = np.where(some, F32(-32) / _safe(max_scale), F32(0)).astype(F32)
            d = np.where(some, fp16(F32(1) / _safe(iscale)), F32(0))
        sc = np.where(some[:, None], np.clip(nearest_int(iscale[:, None] * scales), -32, 31), -32)
    else:
        w = _sub(weights, 16)
        scales = make_qx_quants(sub, 4, w)[0].reshape(n, 16)
        d_block, sc = make_qx_quants(scales, 32, _csum(w).reshape(n, 16))
        d = fp16(d_block)
    dl = (d[:, None] * sc.astype(F32)).reshape(-1)
    q = np.clip(nearest_int(sub / _safe(dl)[:, None]), -4, 3)
    return (dl[:, None] * q).reshape(n, QK_K)


def _k_affine(
    x: np.ndarray, size: int, nmax: int, search: tuple, scale_bits: int,
    weights: np.ndarray | None,
) -> np.ndarray:
    """Q2_K / Q4_K / Q5_K: asymmetric sub-blocks (make_qkx2_quants), their scales and mins
    quantized to ``scale_bits`` bits against fp16 super-scales d and dmin (the largest over
    2**bits - 1), then every value re-quantized against the rounded scales. With importance
    weights (quantize_row_q*_K_impl): make_qkx3_quants per sub-block and make_qp_quants for the
    sub-block scales and mins, weighted by each sub-block's total weight."""
    n = len(x)
    sub = _sub(x, size)
    top = F32((1 << scale_bits) - 1)
    if weights is None:
        rmin, rdelta, nstep, use_mad, weighting = search
        if weighting == "abs":
            w = np.abs(sub)
        else:  # root-mean-square of the sub-block plus |x|
            w = np.sqrt((sub * sub).sum(axis=1, dtype=F32) / F32(size))[:, None] + np.abs(sub)
        scales, mins = make_qkx2_quants(sub, w.astype(F32), nmax, rmin, rdelta, nstep, use_mad)
        scales, mins = scales.reshape(n, -1), mins.reshape(n, -1)
        max_scale = np.maximum(scales.max(axis=1), F32(0))
        max_min = np.maximum(mins.max(axis=1), F32(0))
        inv_scale = np.where(max_scale > 0, top / _safe(max_scale), F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, top / _safe(max_min), F32(0)).astype(F32)
        ls, lm = nearest_int(inv_scale[:, None] * scales), nearest_int(inv_min[:, None] * mins)
        d, dmin = max_scale / top, max_min / top
    else:
        w = _sub(weights, size)
        scales, mins, _ = make_qkx3_quants(sub, w, nmax, -0.9, 0.05, 36)
        sw = _csum(w).reshape(n, -1)
        d, ls = make_qp_quants(scales.reshape(n, -1), int(top), sw)
        dmin, lm = make_qp_quants(mins.reshape(n, -1), int(top), sw)
    ls, lm = ls.astype(np.int64) & 0xFF, lm.astype(np.int64) & 0xFF  # stored as uint8
    if scale_bits == 6:  # Q4_K / Q5_K: 6 bits each (MIN(63, .) before packing)
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    else:  # Q2_K: both nibbles share one byte: scale | min << 4
        packed = ls | ((lm << 4) & 0xFF)
        ls, lm = packed & 0xF, packed >> 4
    d = fp16(d)
    dmin = fp16(dmin)
    dl = (d[:, None] * ls.astype(F32)).reshape(-1)
    ml = (dmin[:, None] * lm.astype(F32)).reshape(-1)
    q = np.clip(nearest_int((sub + ml[:, None]) / _safe(dl)[:, None]), 0, nmax)
    return (dl[:, None] * q - ml[:, None]).reshape(n, QK_K)


def q2_k(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Q2_K: 16 sub-blocks of 16, 4 levels, 4-bit scales and mins. 84 bytes per 256."""
    return _k_affine(x, 16, 3, (-0.5, 0.1, 15, True, "abs"), 4, weights)


def q4_k(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Q4_K: 8 sub-blocks of 32, 16 levels, 6-bit scales and mins. 144 bytes per 256."""
    return _k_affine(x, 32, 15, (-1.0, 0.1, 20, False, "rms"), 6, weights)


def q5_k(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Q5_K: 8 sub-blocks of 32, 32 levels, 6-bit scales and mins. 176 bytes per 256."""
    return _k_affine(x, 32, 31, (-0.5, 0.1, 15, False, "rms"), 6, weights)


def iq4_xs(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """IQ4_XS: 8 sub-blocks of 32 on the IQ4_NL grid (each its own scale search, weights x**2
    unless given), their scales quantized to 6 signed bits against one fp16 super-scale
    (-max/32), then every value re-mapped to the grid against the quantized scale.
    136 bytes per 256 (4.25 bits per weight)."""
    n = len(x)
    sub = _sub(x, 32)
    scales = _iq4_scale(sub, sub * sub if weights is None else _sub(weights, 32), _csum)
    scales = scales.reshape(n, 8)
    max_scale, _ = _signed_absmax(scales)
    d = (-max_scale / F32(32)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / _safe(d), F32(0)).astype(F32)
        sc = np.clip(nearest_int(inv[:, None] * scales), -32, 31)
        dl = (d[:, None] * sc).reshape(-1)  # the unrounded d, as the C code re-maps with
        idl = np.where(dl != 0, F32(1) / _safe(dl), F32(0)).astype(F32)
    q = KVALUES_IQ4NL[_iq4_index(idl[:, None] * sub)]
    return ((fp16(d)[:, None] * sc).reshape(-1)[:, None] * q).reshape(n, QK_K)


TYPES: dict[str, BlockType] = {
    t.name: t
    for t in (
        BlockType("Q8_0", 32, 34, q8_0),
        BlockType("Q5_1", 32, 24, q5_1, "row"),
        BlockType("Q5_0", 32, 22, q5_0, "row"),
        BlockType("Q4_0", 32, 18, q4_0, "row"),
        BlockType("IQ4_NL", 32, 18, iq4_nl, "block2"),
        BlockType("Q6_K", QK_K, 210, q6_k, "raw"),
        BlockType("Q5_K", QK_K, 176, q5_k, "block2"),
        BlockType("Q4_K", QK_K, 144, q4_k, "block2"),
        BlockType("Q3_K", QK_K, 110, q3_k, "block2"),
        BlockType("Q2_K", QK_K, 84, q2_k, "block"),
        BlockType("IQ4_XS", QK_K, 136, iq4_xs, "block2"),
    )
}

# llama_tensor_get_type: the type used when a row is not a multiple of 256
K_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q4_K": "Q5_0",
              "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def row_type(name: str, row: int) -> str:
    """The type llama.cpp stores a tensor with rows of ``row`` elements in, asked for ``name``."""
    if name not in TYPES:
        raise KeyError(f"unknown GGUF type {name!r}; choose from {sorted(TYPES)}")
    if row % TYPES[name].block == 0:
        return name
    fallback = K_FALLBACK.get(name)
    if fallback is not None and row % TYPES[fallback].block == 0:
        return fallback
    return "F16"


def _blockwise(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], block: int) -> np.ndarray:
    flat = np.ascontiguousarray(x, dtype=F32).reshape(-1, block)
    step = max(1, CHUNK // block)
    return np.concatenate([fn(flat[i:i + step]) for i in range(0, len(flat), step)])


def importance_weights(
    x: np.ndarray, imatrix: np.ndarray, row_mean_square: np.ndarray, weighting: str
) -> np.ndarray:
    """The per-value weights a type's quantize_row_*_impl derives from the importance matrix
    (``imatrix``: each value's column entry, same shape as the blocks ``x``)."""
    if weighting == "raw":
        return imatrix
    if weighting == "row":
        sigma2 = row_mean_square
    else:
        sigma2 = _csum(x * x)
        if weighting == "block2":
            sigma2 = F32(2) * sigma2
        sigma2 = sigma2 / F32(x.shape[1])
    return (imatrix * np.sqrt(sigma2[:, None] + x * x)).astype(F32)


def _blockwise_weighted(x: np.ndarray, imatrix: np.ndarray, t: BlockType) -> np.ndarray:
    rows = np.ascontiguousarray(x, dtype=F32).reshape(-1, x.shape[-1])
    per_row = rows.shape[1] // t.block
    mean_square = _csum(rows * rows) / F32(rows.shape[1])
    flat = rows.reshape(-1, t.block)
    columns = imatrix.reshape(per_row, t.block)
    step = max(1, CHUNK // t.block)
    out = []
    for i in range(0, len(flat), step):
        index = np.arange(i, min(i + step, len(flat)))
        blocks = flat[index]
        w = importance_weights(blocks, columns[index % per_row], mean_square[index // per_row],
                               t.weighting)
        out.append(t.dequantized(blocks, w))
    return np.concatenate(out)


def gguf(weight: np.ndarray, name: str, imatrix: np.ndarray | None = None) -> Quantized:
    """Round-trip ``weight`` through the GGUF type ``name`` (with llama.cpp's fallbacks),
    with llama.cpp's importance-matrix quantizers where ``imatrix`` (one non-negative entry
    per input column, i.e. per element of a row) is given."""
    weight = np.asarray(weight, dtype=F32)
    if imatrix is not None:
        imatrix = np.asarray(imatrix, dtype=F32).reshape(-1)
        if len(imatrix) != weight.shape[-1]:
            raise ValueError(f"imatrix has {len(imatrix)} entries, rows have {weight.shape[-1]}")
    kind = row_type(name, weight.shape[-1])
    if kind == "F16":
        return Quantized(fp16(weight), 2 * weight.size, kind)
    t = TYPES[kind]
    if imatrix is None or t.weighting is None:
        values = _blockwise(weight, t.dequantized, t.block)
    else:
        values = _blockwise_weighted(weight, imatrix, t)
    return Quantized(values.reshape(weight.shape), weight.size // t.block * t.block_bytes, kind)


# ---------------------------------------------------------------- torchao-style baselines


def int4_groupwise(weight: np.ndarray, group_size: int) -> Quantized:
    """torchao int4 weight-only (tinygemm layout): per group of ``group_size`` along the row,
    asymmetric min-max with 16 levels, scale and zero point stored as bfloat16
    (zero = min + 8 * scale, value = (q - 8) * scale + zero). 4 bits per weight + 4 bytes per
    group; rows not divisible by the group size stay float16."""
    weight = np.asarray(weight, dtype=F32)
    if weight.shape[-1] % group_size:
        return Quantized(fp16(weight), 2 * weight.size, "F16")
    groups = weight.reshape(-1, group_size)
    lo, hi = groups.min(axis=1), groups.max(axis=1)
    scale = bf16(np.maximum((hi - lo) / F32(15), np.finfo(F32).eps))
    zero = bf16(lo + F32(8) * scale)
    start = zero - F32(8) * scale
    q = np.clip(np.rint((groups - start[:, None]) / scale[:, None]), 0, 15)
    values = ((q - F32(8)) * scale[:, None] + zero[:, None]).reshape(weight.shape)
    return Quantized(values.astype(F32), weight.size // 2 + 4 * len(groups), f"int4-g{group_size}")


def int8_per_channel(weight: np.ndarray) -> Quantized:
    """torchao int8 weight-only: symmetric per output channel (row), scale = amax / 127.5 kept
    in the weight's dtype (float32), codes in [-128, 127]. 1 byte per weight + 4 per row."""
    weight = np.asarray(weight, dtype=F32)
    rows = weight.reshape(weight.shape[0], -1)
    scale = np.maximum(np.abs(rows).max(axis=1) / F32(127.5), np.finfo(F32).eps).astype(F32)
    q = np.clip(np.rint(rows / scale[:, None]), -128, 127)
    values = (q * scale[:, None]).reshape(weight.shape).astype(F32)
    return Quantized(values, weight.size + 4 * len(rows), "int8-channel")
