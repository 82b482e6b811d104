"""The HQQ re-implementation the rate–distortion benchmark compares against
(benchmarks/hqq_quants.py): real bytes of the package's packing, round trips, error bounds of
the min-max start, the zero-point solver and the 8-bit meta-data option."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

_DIR = Path(__file__).resolve().parent.parent / "benchmarks"  # benchmarks/ is no package


def _load(name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, _DIR / f"{name}.py")
    module = sys.modules.setdefault(name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


_load("gguf_quants")  # hqq_quants imports it by name, as the benchmark scripts do
hq = _load("hqq_quants")

F32 = np.float32
CASES = [(2, 32), (3, 64), (4, 64), (8, 64), (4, 128), (3, 32)]


def _heavy(shape: tuple[int, int], seed: int, df: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_t(df, shape) * 0.05).astype(F32)


def _lp(values: np.ndarray, w: np.ndarray, p: float = 0.7) -> float:
    return float(np.mean(np.abs(values - w) ** p))


@given(case=st.sampled_from(CASES), rows=st.integers(1, 40), meta=st.booleans())
def test_bytes_are_the_packed_codes_plus_the_meta_data(case, rows, meta) -> None:
    nbits, group = case
    w = _heavy((rows, 256), rows)
    out = hq.hqq(w, nbits, group, quant_meta=meta)
    n = w.size // group
    # BitPack packs the (groups, group_size) code matrix along its rows: 8 bits 1 row per
    # byte row, 4 bits 2, 2 bits 4, 3 bits 10 rows per int32 row (rows padded up)
    rows_per, row_bytes = {8: (1, 1), 4: (2, 1), 2: (4, 1), 3: (10, 4)}[nbits]
    codes = -(-n // rows_per) * row_bytes * group
    if meta and n % 128 == 0:  # uint8 scale and zero per group, fp16 pair each per 128 groups
        assert out.kind.endswith("-meta8")
        assert out.nbytes == codes + 2 * n + 2 * 2 * 2 * (n // 128)
    else:  # fp16 scale and zero per group (the package refuses meta groups that do not fit)
        assert out.kind == f"hqq{nbits}-g{group}"
        assert out.nbytes == codes + 4 * n


@pytest.mark.parametrize(("nbits", "group"), CASES)
def test_round_trip_shape_dtype_and_levels(nbits, group) -> None:
    w = _heavy((24, 384), 0)
    out = hq.hqq(w, nbits, group)
    assert out.values.shape == w.shape and out.values.dtype == F32
    assert np.array_equal(out.values.astype(np.float16).astype(F32), out.values)  # fp16 rebuilt
    levels = [len(np.unique(g)) for g in out.values.reshape(-1, group)]
    assert max(levels) <= 2**nbits


@pytest.mark.parametrize(("nbits", "group"), CASES)
def test_min_max_start_error_bound(nbits, group) -> None:
    w = _heavy((16, 256), 1)
    out = hq.hqq(w, nbits, group, optimize=False)
    groups = w.reshape(-1, group)
    lo, hi = groups.min(axis=1, keepdims=True), groups.max(axis=1, keepdims=True)
    top = 2**nbits - 1
    step = (hi - lo) / top
    # half a step; a full one at 4 bits, whose zero point is rounded to an integer (round_zero)
    bound = step * (1.0 if nbits == 4 else 0.5)
    # float16 zero point, scale and arithmetic: relative 2**-11 on the zero (in codes, times
    # the step) and on the value, a few times over
    slack = step * (top + 1) * 2.0**-10 + np.abs(groups).max(axis=1, keepdims=True) * 2.0**-9
    assert np.all(np.abs(out.values.reshape(groups.shape) - groups) <= bound + slack)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), case=st.sampled_from(CASES), df=st.sampled_from([2.5, 3, 5]))
def test_optimized_zero_never_worse_in_lp_than_min_max(seed, case, df) -> None:
    # an aggregate property of a realistic matrix: the solver's stopping rule is global (mean
    # |error| over the tensor) and it keeps the zero update of one step past its best, so a
    # single group, or a tensor of a few dozen groups, can end slightly worse
    nbits, group = case
    w = _heavy((96, 256), seed, df)
    assert _lp(hq.hqq(w, nbits, group).values, w) <= _lp(
        hq.hqq(w, nbits, group, optimize=False).values, w)


@given(case=st.sampled_from(CASES), seed=st.integers(0, 2**31), e=st.integers(-12, -3))
def test_values_on_the_hqq_grid_survive_exactly(case, seed, e) -> None:
    # (q - z) * step with a power-of-two step, an integer zero point and both ends of the code
    # range in every group: every operation of the round trip, the solver included, is exact
    nbits, group = case
    top = 2**nbits - 1
    rng = np.random.default_rng(seed)
    q = rng.integers(0, top + 1, (4 * 256 // group, group))
    q[:, 0], q[:, 1] = 0, top
    z = rng.integers(0, top + 1, (len(q), 1))
    w = ((q - z) * 2.0**e).astype(F32).reshape(4, 256)
    np.testing.assert_array_equal(hq.hqq(w, nbits, group).values, w)


def test_shrink_lp_is_the_generalized_soft_threshold() -> None:
    x = np.linspace(-0.2, 0.2, 401, dtype=F32)
    beta, p = 10.0, 0.7
    out = hq.shrink_lp(x, beta, p)
    threshold = (1 / beta) ** (1 / (2 - p))  # |x| - |x|**(p-1) / beta <= 0 below it
    assert np.all(out[np.abs(x) <= threshold * 0.999] == 0)
    big = np.abs(x) > threshold * 1.001
    assert np.all(np.sign(out[big]) == np.sign(x[big]))
    assert np.all(np.abs(out) <= np.abs(x))


def test_meta8_costs_little_accuracy_and_falls_back_where_the_package_refuses() -> None:
    w = _heavy((128, 256), 3)  # 512 groups of 64: a multiple of 128
    fp16_meta = hq.hqq(w, 4, 64)
    meta8 = hq.hqq(w, 4, 64, quant_meta=True)
    assert meta8.nbytes < fp16_meta.nbytes
    assert ((meta8.values - w) ** 2).sum() <= 1.1 * ((fp16_meta.values - w) ** 2).sum()
    odd = hq.hqq(_heavy((3, 256), 4), 4, 64, quant_meta=True)  # 12 groups
    assert odd.kind == "hqq4-g64"


def test_invalid_arguments_are_rejected() -> None:
    w = _heavy((4, 64), 5)
    for nbits in (1, 5, 6, 16):
        with pytest.raises(ValueError):
            hq.hqq(w, nbits, 64)
    with pytest.raises(ValueError):
        hq.hqq(w, 4, 48)  # does not divide 256 elements
