"""UniformQuantizer: a fixed step, codes of any range, exact zeros, dead zone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qlis import ConfigError, UniformQuantizer
from qlis.quantize.grid import in_dtype
from qlis.quantize.quantizers import _NARROWED, MAX_LEVELS, _narrow, get_quantizer

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@given(arrays(np.float32, st.integers(0, 64), elements=finite),
       st.floats(1e-3, 10.0), st.sampled_from(["tensor", "channel"]))
def test_every_value_is_within_half_a_step_and_zero_stays_zero(values, step, granularity):
    weight = torch.from_numpy(values).reshape(-1, 1) if values.size else torch.zeros(0, 1)
    quantizer = UniformQuantizer(step=step, granularity=granularity)
    span = (float(weight.max()) - float(weight.min())) / step if values.size else 0
    if span > MAX_LEVELS:  # too many levels for 16-bit codes: refused
        with pytest.raises(ConfigError, match="levels"):
            quantizer.quantize(weight)
        return
    if span > MAX_LEVELS - 2:
        return  # at the boundary, either outcome is right
    q = quantizer.quantize(weight)
    out = q.dequantize()
    assert out.shape == weight.shape and out.dtype == weight.dtype
    float32_rounding = 4e-7 * weight.abs() + 1e-6  # x / step and code * step round in float32
    assert bool(((out - weight).abs() <= step / 2 * (1 + 1e-5) + float32_rounding).all())
    assert bool((out[weight == 0] == 0).all())
    assert q.codes.dtype == (np.uint8 if q.n_levels <= 256 else np.uint16)
    assert q.codes.size == 0 or int(q.codes.max()) < q.n_levels
    rebuilt = get_quantizer(q.quantizer).dequantize(q)  # from its config alone
    assert torch.equal(rebuilt, out)


def test_rel_mse_mode_hits_its_target_at_high_rate():
    torch.manual_seed(0)
    weight = torch.randn(256, 512) * torch.linspace(0.1, 3, 256)[:, None]
    for granularity in ("tensor", "channel"):
        q = UniformQuantizer(rel_mse=1e-4, granularity=granularity).quantize(weight)
        error = float((q.dequantize() - weight).square().sum() / weight.square().sum())
        assert error == pytest.approx(1e-4, rel=0.1)
        assert q.params["step"].shape == ((256,) if granularity == "channel" else (1,))


def test_wide_ranges_use_16_bit_codes_and_the_limit_is_enforced():
    weight = torch.linspace(-1, 1, 5001)
    q = UniformQuantizer(step=1e-3).quantize(weight)
    assert q.n_levels == 2001 and q.codes.dtype == np.uint16
    assert float((q.dequantize() - weight).abs().max()) <= 5e-4 + 1e-6
    with pytest.raises(ConfigError, match="a step this small needs .* levels"):
        UniformQuantizer(step=1e-6).quantize(torch.tensor([-1.0, 1.0]))
    with pytest.raises(ConfigError, match="the step that rel_mse 1e-12 asks for needs"):
        UniformQuantizer(rel_mse=1e-12).quantize(torch.linspace(-1, 1, 5001))
    # a step below float32's smallest number was taken for a row of zeros (step 1): every
    # weight of the layer rounded to 0, exit 0
    with pytest.raises(ConfigError, match="rel_mse=1e-300 makes steps below float32's"):
        UniformQuantizer(rel_mse=1e-300).quantize(torch.linspace(-1, 1, 5001))
    assert MAX_LEVELS == 65536


def test_codes_far_from_zero_are_kept_while_the_float32_offset_holds_them_exactly():
    weight = torch.full((4, 4), 3.0)  # one level: the range alone says nothing
    q = UniformQuantizer(step=3.0 / 2**23).quantize(weight)
    assert q.n_levels == 1 and torch.equal(q.dequantize(), weight)
    with pytest.raises(ConfigError, match="float32 offset holds exactly"):
        UniformQuantizer(step=1e-30).quantize(weight)  # codes near 3e30 from zero


def test_a_dead_zone_lowers_the_rate():
    torch.manual_seed(0)
    weight = torch.randn(10000)
    nearest = UniformQuantizer(step=0.5).quantize(weight)
    dead = UniformQuantizer(step=0.5, rounding=0.3).quantize(weight)
    zero_nearest = int((nearest.dequantize() == 0).sum())
    zero_dead = int((dead.dequantize() == 0).sum())
    assert zero_dead > zero_nearest


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_come_back_in_their_dtype(dtype):
    weight = torch.randn(8, 8).to(dtype)
    out = UniformQuantizer(rel_mse=1e-3).quantize(weight).dequantize()
    assert out.dtype == dtype


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"step": 1.0, "rel_mse": 1e-3}, "exactly one"),
        ({"step": 0.0}, r"step must be a finite number in \(0, 3.40282e\+38\]"),
        ({"step": float("inf")}, r"step must be a finite number in \(0, 3.40282e\+38\]"),
        # past float32, the steps' dtype: a traceback when the steps were made
        ({"step": 1e39}, r"step must be a finite number in \(0, 3.40282e\+38\]"),
        ({"rel_mse": 16.5}, r"\(0, 16\]"),
        ({"step": 1.0, "rounding": 0.0}, "rounding"),
        ({"step": 1.0, "granularity": "row"}, "granularity"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        UniformQuantizer(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_compiled_narrowing_rounds_as_torch_does(dtype):
    # the measured error of a float16/bfloat16 layer needs its decoded values exactly as
    # dequantize rounds them (`in_dtype`): every magnitude (float16's subnormals, and past
    # the largest value, saturating) and the ties halfway between neighbours of the dtype
    rng = np.random.default_rng(0)
    spread = [rng.standard_normal(20000).astype(np.float32) * scale
              for scale in (1e-9, 1e-7, 3e-5, 1e-2, 1.0, 3e4, 7e4, 1e30)]
    patterns = rng.integers(0, 0x7F00 if dtype == torch.bfloat16 else 0x7BFF, 20000)
    narrow = torch.from_numpy(patterns.astype(np.int16)).view(dtype)
    above = torch.nextafter(narrow, torch.tensor(float("inf"), dtype=dtype))
    ties = ((narrow.double() + above.double()) / 2).float().numpy()
    values = np.concatenate([*spread, ties, -ties, narrow.float().numpy()])
    rounded = values.copy()
    _narrow(rounded, _NARROWED[dtype])
    expected = in_dtype(torch.from_numpy(values.copy()), dtype).float().numpy()
    assert np.array_equal(rounded.view(np.uint32), expected.view(np.uint32))


def test_the_error_of_float64_extremes_is_measured():
    """1e-300 rounded with float32 steps is all zeros: measured as relative error 1, where
    its squares (1e-600) measured none."""
    for tiny in (1e-300, 1e-310):
        weight = torch.randn(16, 16, dtype=torch.float64) * tiny
        q, error = UniformQuantizer(rel_mse=1e-3).quantize_measured(weight)
        assert not q.dequantize().any() and error == 1.0
