"""The GGUF / torchao-style re-implementations the rate–distortion benchmark compares against
(benchmarks/gguf_quants.py): byte sizes, llama.cpp's fallbacks, exactness on each format's own
grid, hand-worked blocks, error bounds, and the importance-matrix paths."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "gguf_quants.py"
_SPEC = importlib.util.spec_from_file_location("gguf_quants", _PATH)  # benchmarks/ is no package
gq = sys.modules.setdefault("gguf_quants", importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(gq)

F32 = np.float32
K_TYPES = ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
LEGACY = ["Q8_0", "Q5_1", "Q5_0", "Q4_0", "IQ4_NL"]
WEIGHTED = sorted(n for n, t in gq.TYPES.items() if t.weighting is not None)  # all but Q8_0

# block struct sizes from their fields (fp16 = 2 bytes), as in ggml-common.h
STRUCT_BYTES = {
    "Q8_0": 2 + 32,
    "Q5_1": 2 + 2 + 4 + 16,
    "Q5_0": 2 + 4 + 16,
    "Q4_0": 2 + 16,
    "IQ4_NL": 2 + 16,
    "Q6_K": 128 + 64 + 16 + 2,  # ql (4 bits), qh (2 bits), int8 scales, d
    "Q5_K": 2 + 2 + 12 + 32 + 128,  # d, dmin, 6-bit scales/mins, qh, qs
    "Q4_K": 2 + 2 + 12 + 128,
    "Q3_K": 32 + 64 + 12 + 2,  # hmask, qs, 6-bit scales, d
    "Q2_K": 16 + 64 + 2 + 2,  # 4-bit scales/mins, qs, d, dmin
    "IQ4_XS": 2 + 2 + 4 + 128,  # d, scales_h (2 bits x 8), scales_l (4 bits x 8), qs
}
SUPER_BLOCKS = {*K_TYPES, "IQ4_XS"}


def test_block_sizes_are_the_struct_sizes() -> None:
    assert {n: t.block_bytes for n, t in gq.TYPES.items()} == STRUCT_BYTES
    assert {n: t.block for n, t in gq.TYPES.items()} == {
        n: 256 if n in SUPER_BLOCKS else 32 for n in STRUCT_BYTES
    }


@given(
    name=st.sampled_from(sorted(gq.TYPES)),
    rows=st.integers(1, 3),
    blocks=st.integers(1, 3),
    shape=st.sampled_from(["k", "legacy", "odd"]),
    imatrix=st.booleans(),
)
def test_bytes_and_fallback_follow_the_row_length(name, rows, blocks, shape, imatrix) -> None:
    row = {"k": 256 * blocks, "legacy": 256 * blocks - 32 * blocks, "odd": 40 * blocks}[shape]
    if shape == "odd" and row % 32 == 0:
        row += 8
    rng = np.random.default_rng(0)
    w = rng.normal(size=(rows, row)).astype(F32)
    out = gq.gguf(w, name, rng.gamma(0.5, size=row) if imatrix else None)
    if row % gq.TYPES[name].block == 0:
        expected = name
    elif name in gq.K_FALLBACK and row % 32 == 0:
        expected = gq.K_FALLBACK[name]
    else:
        expected = "F16"
    assert out.kind == expected
    per = 2 if expected == "F16" else gq.TYPES[expected].block_bytes / gq.TYPES[expected].block
    assert out.nbytes == w.size * per
    assert out.values.shape == w.shape and out.values.dtype == F32


def test_llama_cpp_fallback_table() -> None:
    assert {k: gq.row_type(k, 384) for k in K_TYPES} == {
        "Q6_K": "Q8_0", "Q5_K": "Q5_1", "Q4_K": "Q5_0", "Q3_K": "IQ4_NL", "Q2_K": "IQ4_NL",
    }
    assert all(gq.row_type(k, 1536) == k for k in K_TYPES)
    assert gq.row_type("IQ4_XS", 384) == "IQ4_NL" and gq.row_type("IQ4_XS", 512) == "IQ4_XS"
    assert gq.row_type("Q4_K", 100) == "F16" and gq.row_type("Q8_0", 48) == "F16"
    with pytest.raises(KeyError):
        gq.row_type("Q7_K", 256)


def test_hand_worked_q8_0_block() -> None:
    # amax = 2.54 -> d = 0.02 (fp16 0.0200042724609375); q = roundf(x / 0.02), halves away
    x = np.zeros((1, 32), F32)
    x[0, :4] = [2.54, -1.27, 0.01, -0.03]
    d16 = float(np.float16(F32(2.54) / F32(127)))
    expected = np.zeros(32, F32)
    expected[:4] = np.array([127, -64, 1, -2], F32) * F32(d16)  # 0.5 -> 1, -1.5 -> -2
    np.testing.assert_array_equal(gq.q8_0(x)[0], expected)


def test_hand_worked_q4_0_block() -> None:
    # the signed extreme is -4.0 -> d = -4 / -8 = 0.5; q = trunc(x / 0.5 + 8.5), at most 15
    x = np.zeros((1, 32), F32)
    x[0, :5] = [-4.0, 3.9, 1.0, 0.2, -0.3]
    # x/d = -8, 7.8, 2, 0.4, -0.6 -> levels 0, 15 (16 clipped), 10, 8, 7 -> (l - 8) * 0.5
    expected = np.zeros(32, F32)
    expected[:5] = [-4.0, 3.5, 1.0, 0.0, -0.5]
    np.testing.assert_array_equal(gq.q4_0(x)[0], expected)


def _on_grid(name: str, rng: np.random.Generator, e: int) -> np.ndarray:
    """A (super-)block whose values lie exactly on the format's grid, with scales that the
    format stores exactly (so a faithful quantizer must reproduce it bit for bit)."""
    s = F32(2.0**e)
    if name == "Q8_0":
        q = rng.integers(-127, 128, 32)
        q[rng.integers(32)] = rng.choice([-127, 127])
        return q * s
    if name in ("Q4_0", "Q5_0"):
        half = 8 if name == "Q4_0" else 16
        q = rng.integers(-half + 1, half, 32)
        q[rng.integers(32)] = -half
        return q * s
    if name == "Q5_1":
        q = rng.integers(0, 32, 32)
        q[:2] = [0, 31]
        return q * s + F32(rng.integers(-40, 40)) * s
    if name == "IQ4_NL":
        idx = rng.integers(1, 16, 32)
        idx[rng.integers(32)] = 0
        return gq.KVALUES_IQ4NL[idx] * s
    if name == "IQ4_XS":  # sub-block scales m * s, m in 1..32, the largest 32 (super-scale -s)
        idx = rng.integers(1, 16, (8, 32))
        idx[np.arange(8), rng.integers(32, size=8)] = 0
        m = rng.integers(1, 33, 8)
        m[rng.integers(8)] = 32
        return gq.KVALUES_IQ4NL[idx] * (m[:, None] * s)
    if name in ("Q6_K", "Q3_K"):
        half = 32 if name == "Q6_K" else 4
        q = rng.integers(-half + 1, half, (16, 16))
        q[np.arange(16), rng.integers(16, size=16)] = -half
        return q * s
    nmax, size, top = {"Q5_K": (31, 32, 63), "Q4_K": (15, 32, 63), "Q2_K": (3, 16, 15)}[name]
    # an offset between two levels: no value is exactly 0 (Q2_K weights each value by |x|,
    # so an exact zero would not constrain the fit)
    scale, offset = F32(top) * s, F32(top) * s * F32(rng.integers(0, 4) + 0.5)
    q = rng.integers(0, nmax + 1, (256 // size, size))
    q[:, 0], q[:, 1] = 0, nmax
    return q * scale - offset


@given(name=st.sampled_from(sorted(gq.TYPES)), seed=st.integers(0, 2**31), e=st.integers(-12, -4))
def test_values_on_the_format_grid_survive_exactly(name, seed, e) -> None:
    x = _on_grid(name, np.random.default_rng(seed), e).astype(F32).reshape(1, -1)
    t = gq.TYPES[name]
    np.testing.assert_array_equal(t.dequantized(x.reshape(-1, t.block)).reshape(1, -1), x)


@pytest.mark.parametrize("name", sorted(gq.TYPES))
def test_zero_blocks_stay_zero(name) -> None:
    x = np.zeros((2, 512), F32)
    assert not gq.gguf(x, name).values.any()


@given(seed=st.integers(0, 2**31), scale=st.floats(0.1, 100))  # d stays a normal fp16
def test_q8_0_error_is_at_most_half_a_step(seed, scale) -> None:
    x = (np.random.default_rng(seed).standard_t(3, (8, 32)) * scale).astype(F32)
    d = np.abs(x).max(axis=1, keepdims=True) / 127
    bound = d / 2 + 127 * d * 2.0**-11  # half a step, plus the fp16 rounding of d
    assert np.all(np.abs(gq.q8_0(x) - x) <= bound * (1 + 1e-5))


def test_more_bits_less_error_on_heavy_tailed_weights() -> None:
    w = (np.random.default_rng(3).standard_t(5, (64, 1024)) * 0.02).astype(F32)
    err = {
        n: float(((gq.gguf(w, n).values - w) ** 2).sum() / (w**2).sum())
        for n in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    }
    ordered = list(err.values())
    assert ordered == sorted(ordered, reverse=True)
    assert err["Q8_0"] < 1e-4 and err["Q6_K"] < 1e-3 and err["Q4_K"] < 1.5e-2
    # the K-quants' scale search beats the plain 32-blocks at equal or fewer bits
    assert err["Q4_K"] < float(((gq.gguf(w, "Q4_0").values - w) ** 2).sum() / (w**2).sum())


@given(group=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2**31))
def test_int4_groupwise_bytes_and_bound(group, seed) -> None:
    w = (np.random.default_rng(seed).standard_t(4, (3, 256)) * 0.05).astype(F32)
    out = gq.int4_groupwise(w, group)
    assert out.nbytes == w.size // 2 + 4 * (w.size // group)
    g = w.reshape(-1, group)
    step = (g.max(axis=1) - g.min(axis=1)) / 15
    # half a step, widened by the bfloat16 scale and zero point (8 bits of mantissa)
    err = np.abs(out.values - w).reshape(-1, group).max(axis=1)
    assert np.all(err <= step * (0.5 + 16 * 2.0**-8) + np.abs(g).max(axis=1) * 2.0**-8)
    assert gq.int4_groupwise(np.ones((2, 48), F32), 32).kind == "F16"


@given(seed=st.integers(0, 2**31))
def test_int8_per_channel_bytes_and_bound(seed) -> None:
    w = (np.random.default_rng(seed).standard_t(4, (5, 40)) * 0.05).astype(F32)
    out = gq.int8_per_channel(w)
    assert out.nbytes == w.size + 4 * 5
    step = np.abs(w).max(axis=1, keepdims=True) / 127.5
    assert np.all(np.abs(out.values - w) <= step / 2 * (1 + 1e-4))  # float32 rounding


# ---------------------------------------------------------------- importance matrix


def _heavy(rows: int, cols: int, seed: int = 3) -> np.ndarray:
    return (np.random.default_rng(seed).standard_t(5, (rows, cols)) * 0.02).astype(F32)


def _weighted_error(values: np.ndarray, w: np.ndarray, columns: np.ndarray) -> float:
    return float((columns * (values - w) ** 2).sum() / (columns * w**2).sum())


def _row_errors(values: np.ndarray, x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    values, x, weights = (a.astype(np.float64) for a in (values, x, weights))
    return (weights * (values - x) ** 2).sum(axis=1)


def _times(scale: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """``scale * levels`` in float64: a float32 product moves each value by up to half an
    ulp, which can outweigh the gain a search for the scale finds (make_qp_quants, seed 98,
    nmax 63: its least-squares scale beats the plain step by 2e-6 of the error)."""
    return scale.astype(np.float64) * levels


@pytest.mark.parametrize("name", WEIGHTED)
def test_uniform_imatrix_is_no_worse_than_the_plain_path(name) -> None:
    # with every column equally important the impl paths minimise the same squared error as
    # the plain ones, with weights sqrt(sigma2 + x**2) (or 1) and, for the K-quants, a finer
    # scale search: at least as good, up to a rare unlucky block
    for cols in (1536, 384):  # the type itself, and llama.cpp's fallback for 384-wide rows
        w = _heavy(32, cols)
        plain = gq.gguf(w, name)
        uniform = gq.gguf(w, name, np.ones(cols))
        assert uniform.kind == plain.kind and uniform.nbytes == plain.nbytes
        ones = np.ones(cols)
        assert _weighted_error(uniform.values, w, ones) <= 1.02 * _weighted_error(
            plain.values, w, ones)


@pytest.mark.parametrize("name", WEIGHTED)
def test_skewed_imatrix_protects_the_important_columns(name) -> None:
    cols = 1536
    w = _heavy(32, cols)
    importance = np.ones(cols)
    importance[np.random.default_rng(1).permutation(cols)[: cols // 8]] = 100.0
    plain = _weighted_error(gq.gguf(w, name).values, w, importance)
    guided = _weighted_error(gq.gguf(w, name, importance).values, w, importance)
    assert guided < 0.9 * plain


# Q3_K: a block whose sub-block scales are all equal ties the super-scale candidates (any
# uniform level fits), and llama.cpp may keep one fp16 cannot store exactly; Q5_1: the impl
# path clamps the min to <= 0, so a block above zero cannot come back (both checked against
# the compiled C, which misses the same blocks)
@given(name=st.sampled_from(sorted(set(WEIGHTED) - {"Q3_K", "Q5_1"})), seed=st.integers(0, 2**31),
       e=st.integers(-12, -4))
def test_values_on_the_format_grid_survive_the_imatrix_path(name, seed, e) -> None:
    rng = np.random.default_rng(seed)
    x = _on_grid(name, rng, e).astype(F32).reshape(1, -1)
    imatrix = rng.gamma(1.0, size=x.shape[1]) + 0.1
    np.testing.assert_array_equal(gq.gguf(x, name, imatrix).values, x)


def test_imatrix_is_ignored_where_llama_cpp_ignores_it() -> None:
    w = _heavy(4, 384)
    skewed = np.random.default_rng(2).gamma(0.3, size=384)
    for name in ("Q8_0", "Q6_K"):  # Q8_0 takes no weights; Q6_K falls back to Q8_0 here
        np.testing.assert_array_equal(gq.gguf(w, name, skewed).values, gq.gguf(w, name).values)
    odd = _heavy(2, 40)  # F16: no block type at all
    np.testing.assert_array_equal(gq.gguf(odd, "Q4_K", np.ones(40)).values, gq.fp16(odd))
    with pytest.raises(ValueError):
        gq.gguf(w, "Q4_K", np.ones(383))


@pytest.mark.parametrize("name", WEIGHTED)
def test_imatrix_path_handles_zero_importance_and_zero_blocks(name) -> None:
    w = _heavy(4, 512)
    w[1] = 0
    imatrix = np.ones(512)
    imatrix[:64] = 0  # columns no calibration token ever activated
    out = gq.gguf(w, name, imatrix).values
    assert np.isfinite(out).all() and not out[1].any()


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31), nmax=st.sampled_from([3, 15, 31]))
def test_make_qkx3_quants_never_loses_to_its_min_max_start(seed, nmax) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(3, (64, 32)) * rng.uniform(0.01, 1)).astype(F32)
    x[0] = np.abs(x[0])  # a row with min > 0: the offset stays 0 as in the C code
    weights = rng.gamma(0.5, size=x.shape).astype(F32)
    scale, neg_min, levels = gq.make_qkx3_quants(x, weights, nmax, -0.9, 0.05, 36)
    assert levels.min() >= 0 and levels.max() <= nmax and np.all(neg_min >= 0)
    lo = np.minimum(x.min(axis=1), 0)[:, None]
    step = (x.max(axis=1)[:, None] - lo) / nmax
    start = _times(step, np.clip(np.rint((x - lo) / step), 0, nmax)) + lo
    found = _times(scale[:, None], levels) - neg_min[:, None]
    assert np.all(_row_errors(found, x, weights)
                  <= _row_errors(start, x, weights) * (1 + 1e-5) + 1e-12)


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31), nmax=st.sampled_from([15, 63]))
def test_make_qp_quants_improves_on_plain_rounding(seed, nmax) -> None:
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, size=(64, 8)).astype(F32) * F32(rng.uniform(0.001, 1))
    weights = rng.gamma(1.0, size=x.shape).astype(F32)
    scale, levels = gq.make_qp_quants(x, nmax, weights)
    assert levels.min() >= 0 and levels.max() <= nmax
    step = x.max(axis=1, keepdims=True) / nmax
    assert np.all(_row_errors(_times(scale[:, None], levels), x, weights)
                  <= _row_errors(_times(step, np.rint(x / step)), x, weights) * (1 + 1e-5))
