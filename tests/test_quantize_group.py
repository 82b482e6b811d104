"""Group-wise affine quantization: error bound, zeros, float16 params, shapes, formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qlis
from qlis.errors import ArchiveError, ConfigError, InputError
from qlis.quantize.quantizers import (
    AffineQuantizer,
    GroupAffineQuantizer,
    KMeansQuantizer,
    QuantizedTensor,
    get_quantizer,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def group_cases(
    draw: st.DrawFn, dtypes: list = DTYPES
) -> tuple[torch.Tensor, GroupAffineQuantizer]:
    """A weight (rows x cols, varied magnitudes, some exact zeros) and a group quantizer."""
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**32 - 1))
    gen = torch.Generator().manual_seed(seed)
    magnitude = draw(st.sampled_from([1e-6, 1e-2, 1.0, 300.0]))
    w = torch.randn(rows, cols, generator=gen) * magnitude
    w += draw(st.sampled_from([0.0, 3.0])) * magnitude  # all-positive rows test the 0 widening
    w[torch.rand(rows, cols, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = 0.0
    quantizer = GroupAffineQuantizer(
        bits=draw(st.integers(2, 8)),
        group_size=draw(st.sampled_from([1, 3, 8, 32, 128])),
        symmetric=draw(st.booleans()),
    )
    return w.to(draw(st.sampled_from(dtypes))), quantizer


def per_element(q: QuantizedTensor, quantizer: GroupAffineQuantizer, name: str) -> np.ndarray:
    """A group parameter repeated over its group's elements, as float32 (rows, cols)."""
    rows = q.codes.reshape(q.codes.shape[0], -1) if q.codes.ndim >= 2 else q.codes.reshape(1, -1)
    if name == "zero_point" and quantizer.symmetric:
        return np.full(rows.shape, 1 << (quantizer.bits - 1), dtype=np.float32)
    param = q.params[name].astype(np.float32)
    return np.repeat(param, quantizer.group_size, axis=1)[:, : rows.shape[1]]


def reference_dequantize(q: QuantizedTensor, quantizer: GroupAffineQuantizer) -> np.ndarray:
    """The documented formula, as another reader would write it: float32, then the cast."""
    codes = q.codes.reshape(per_element(q, quantizer, "scale").shape).astype(np.float32)
    scale, zero = per_element(q, quantizer, "scale"), per_element(q, quantizer, "zero_point")
    return ((codes - zero) * scale).reshape(q.codes.shape)


@settings(max_examples=120, deadline=None)
@given(group_cases(dtypes=[torch.float32]))
def test_every_value_in_range_is_within_half_a_step(case) -> None:
    weight, quantizer = case
    q = quantizer.quantize(weight)
    top = (1 << quantizer.bits) - 1
    assert q.codes.dtype == np.uint8 and int(q.codes.max()) <= top and q.n_levels == top + 1
    scale = per_element(q, quantizer, "scale")
    zero = per_element(q, quantizer, "zero_point")
    assert np.all(scale > 0) and np.all(np.isfinite(scale))
    assert np.all(zero == np.round(zero)) and np.all((zero >= 0) & (zero <= top))
    w = weight.numpy().reshape(scale.shape)
    out = q.dequantize().numpy().reshape(scale.shape)
    lowest, highest = (0 - zero) * scale, (top - zero) * scale
    inside = (w >= lowest - scale / 2) & (w <= highest + scale / 2)
    slack = 1e-6 * np.abs(w) + 1e-30
    assert np.all(np.abs(w - out)[inside] <= scale[inside] / 2 + slack[inside])
    # The float16 scale is rounded up, so the grid holds the whole group up to the zero
    # point's rounding (half a step): no weight here is clamped.
    assert inside.all()


@settings(max_examples=80, deadline=None)
@given(group_cases())
def test_zeros_stay_zero_and_the_formula_is_reproducible(case) -> None:
    weight, quantizer = case
    q = quantizer.quantize(weight)
    out = q.dequantize()
    assert out.dtype == weight.dtype and out.shape == weight.shape
    assert torch.all(out[weight == 0] == 0)
    expected = torch.from_numpy(reference_dequantize(q, quantizer)).to(weight.dtype)
    assert torch.equal(
        out.view(torch.int16 if out.itemsize == 2 else torch.int32),
        expected.view(torch.int16 if out.itemsize == 2 else torch.int32),
    )
    if weight.dtype == torch.float16:  # numpy's own cast: round to nearest even, bit for bit
        assert np.array_equal(
            reference_dequantize(q, quantizer).astype(np.float16).view(np.int16),
            out.numpy().view(np.int16),
        )


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(
    "shape", [(), (0,), (1,), (130,), (3, 0), (0, 5), (5, 7), (4, 64), (2, 3, 5), (3, 2, 2, 2)]
)
def test_shapes_and_group_tails(shape: tuple[int, ...], symmetric: bool) -> None:
    quantizer = GroupAffineQuantizer(bits=4, group_size=3, symmetric=symmetric)
    weight = torch.randn(shape)
    q = quantizer.quantize(weight)
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)
    assert q.codes.shape == shape
    assert q.params["scale"].shape == (rows, math.ceil(cols / 3))
    assert q.params["scale"].dtype == np.float16
    assert ("zero_point" in q.params) is not symmetric
    if not symmetric:
        assert q.params["zero_point"].dtype == np.float16
    out = q.dequantize()
    assert out.shape == weight.shape and out.dtype == weight.dtype
    if weight.numel():
        assert torch.allclose(out, weight, atol=float(q.params["scale"].max()) / 2 + 1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_group_longer_than_the_row_is_the_row(symmetric: bool) -> None:
    """group_size up to its 2**31 limit on a small layer: the row's own group, the same
    codes and scales, without padding every row to the group size."""
    weight = torch.randn(6, 40)
    whole_row = GroupAffineQuantizer(bits=3, group_size=40, symmetric=symmetric).quantize(weight)
    longest = GroupAffineQuantizer(bits=3, group_size=2**31, symmetric=symmetric).quantize(weight)
    assert np.array_equal(longest.codes, whole_row.codes)
    assert all(np.array_equal(longest.params[k], whole_row.params[k]) for k in whole_row.params)
    assert torch.equal(longest.dequantize(), whole_row.dequantize())


def test_symmetric_codes_are_centred_and_scale_rounds_up_to_float16() -> None:
    weight = torch.tensor([[-3.0, 0.0, 1.0, 3.0, 0.1, -0.2]])
    q = GroupAffineQuantizer(bits=4, group_size=4, symmetric=True).quantize(weight)
    scale = q.params["scale"].astype(np.float32)
    assert scale[0, 0] >= np.float32(3.0) / 7 > np.nextafter(q.params["scale"][0, 0], 0)
    assert q.codes[0, :4].tolist() == [1, 8, 8 + round(1 / scale[0, 0]), 15]
    asym = GroupAffineQuantizer(bits=4, group_size=4).quantize(weight)
    assert float(asym.params["zero_point"][0, 0]) == round(3.0 / float(asym.params["scale"][0, 0]))
    assert asym.codes[0, 1] == asym.params["zero_point"][0, 0]


def test_float16_range_guards() -> None:
    """A tensor of ordinary scales keeps float16 ones, its all-zero group too; a tiny group in
    it may round to a coarser float16 (the subnormal 2**-24), never below its own scale."""
    weight = torch.zeros(4, 8)
    weight[1] = 1e-12  # scale under the smallest float16 subnormal
    weight[2] = 3.0
    weight[3, 0] = -2.0
    for symmetric in (False, True):
        q = GroupAffineQuantizer(bits=2, group_size=8, symmetric=symmetric).quantize(weight)
        assert q.params["scale"].dtype == np.float16
        scale = q.params["scale"].astype(np.float32)[:, 0]
        assert scale[0] == 1.0  # all zeros
        assert scale[1] == np.float32(2.0**-24)
        out = q.dequantize()
        assert torch.isfinite(out).all() and torch.all(out[0] == 0)
        assert torch.all(out[1] >= 0) and torch.allclose(out[2], weight[2])


SCALE_CASES = [(bits, symmetric, magnitude) for bits in (2, 4, 8) for symmetric in (False, True)
               for magnitude in (1e6, 1e8, 1e-9, 1e-7) if magnitude != 1e6 or bits < 8]


@pytest.mark.parametrize("bits, symmetric, magnitude", SCALE_CASES)
def test_scales_float16_cannot_hold_are_stored_in_float32(bits, symmetric, magnitude) -> None:
    """Scales over 65504 saturated in float16, so the groups' largest weights clipped (a
    weight of 1e6 came back as 458528 at 4 bits); a tensor whose scales all lie under
    float16's normal range rounded to its subnormal steps (weights near 1e-9 all to 0).
    Both now store float32 scales: every weight within half its group's step."""
    gen = torch.Generator().manual_seed(bits)
    weight = torch.randn(6, 40, generator=gen) * magnitude
    weight[0, :8] = 0.0  # a group of zeros among them
    quantizer = GroupAffineQuantizer(bits=bits, group_size=8, symmetric=symmetric)
    q = quantizer.quantize(weight)
    assert q.params["scale"].dtype == np.float32
    assert quantizer.scale_dtype(weight) == "float32"
    scale = per_element(q, quantizer, "scale")
    out = q.dequantize().numpy()
    w = weight.numpy()
    assert np.all(np.abs(out - w) <= scale / 2 * (1 + 1e-5))
    assert np.all(out[0, :8] == 0)
    assert np.array_equal(reference_dequantize(q, quantizer), out)
    assert quantizer.check_params(q.shape, q.n_levels, q.params) is not None
    relative = float(np.square(out - w).sum() / np.square(w).sum())
    normal = quantizer.quantize(weight / magnitude)  # the same tensor at an ordinary scale
    assert normal.params["scale"].dtype == np.float16
    expected = quantizer.relative_error(weight / magnitude, normal)
    assert relative == pytest.approx(expected, rel=0.05, abs=1e-6)


def test_float32_scales_only_where_float16_cannot_hold_them() -> None:
    """A reader refuses float32 scales qlis would have stored in float16, and accepts them
    where some scale lies outside float16's normal range."""
    quantizer = GroupAffineQuantizer(bits=4, group_size=8)
    q = quantizer.quantize(torch.randn(4, 16))
    widened = {**q.params, "scale": q.params["scale"].astype(np.float32)}
    with pytest.raises(ArchiveError, match="'scale' is float32"):
        quantizer.check_params(q.shape, q.n_levels, widened)
    huge = quantizer.quantize(torch.randn(4, 16) * 1e7)
    assert quantizer.check_params(huge.shape, huge.n_levels, huge.params) is not None
    with np.errstate(over="ignore"):
        narrowed = {**huge.params, "scale": huge.params["scale"].astype(np.float16)}
    with pytest.raises(ArchiveError, match="'scale' must be finite"):  # inf in float16
        quantizer.check_params(huge.shape, huge.n_levels, narrowed)


@pytest.mark.parametrize("magnitude", [1e8, 1e-9])
def test_float32_scales_round_trip_through_the_archive_and_the_lowbit_runtime(
        tmp_path, magnitude) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16)).eval()
    with torch.no_grad():
        for module in model:
            module.weight.mul_(magnitude)
    config = {"id": "group", "bits": 4, "group_size": 16}
    result = qlis.compress(model, "quant", quantizer=config)
    state = result.state_dict()
    path = qlis.save(result, tmp_path / "m.qlis")
    with qlis.open(path) as archive:
        assert archive.read_params("0.weight")["scale"].dtype == np.float32
    loaded = qlis.load(path)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())
    weight = model[0].weight.detach()
    error = float((state["0.weight"] - weight).square().sum() / weight.square().sum())
    assert error < 0.02  # 4 bits: no clipping, no group rounded away
    reference = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16)).eval()
    qlis.load(path, model=reference)
    with torch.device("meta"):
        low = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16)).eval()
    qlis.load(path, model=low, runtime="lowbit")
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(low(x), reference(x))
        assert torch.equal(low[0].dequantized_weight(), state["0.weight"])


def test_groups_beat_per_tensor_affine_on_heavy_tails() -> None:
    gen = np.random.default_rng(0)
    weight = torch.from_numpy(gen.standard_t(3, size=(64, 256)).astype(np.float32))

    def rel_mse(quantizer) -> float:
        out = quantizer.quantize(weight).dequantize()
        return float((out - weight).square().sum() / weight.square().sum())

    grouped = rel_mse(GroupAffineQuantizer(bits=4, group_size=32))
    per_tensor = rel_mse(AffineQuantizer(bits=4))
    assert grouped < per_tensor / 4
    assert rel_mse(GroupAffineQuantizer(bits=4, group_size=128)) > grouped


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype: torch.dtype) -> None:
    weight = (torch.randn(8, 100, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    q = GroupAffineQuantizer(bits=8, group_size=32).quantize(weight)
    out = q.dequantize()
    assert out.dtype == dtype
    step = float(q.params["scale"].max())
    assert float((out.float() - weight.float()).abs().max()) <= step / 2 + 0.01 * step * 64


def test_config_registry_and_errors() -> None:
    quantizer = get_quantizer({"id": "group", "bits": 3, "group_size": 64, "symmetric": True})
    assert isinstance(quantizer, GroupAffineQuantizer)
    assert quantizer.get_config() == {"id": "group", "bits": 3, "group_size": 64, "symmetric": True}
    assert get_quantizer("group").get_config()["group_size"] == 128
    q = quantizer.quantize(torch.randn(4, 70))
    assert torch.equal(q.dequantize(), get_quantizer(q.quantizer).dequantize(q))
    for bad in (
        {"bits": 1},
        {"bits": 9},
        {"bits": True},
        {"group_size": 0},
        {"group_size": 2.5},
        {"symmetric": "yes"},
    ):
        with pytest.raises(ConfigError):
            GroupAffineQuantizer(**bad)
    with pytest.raises(InputError, match="finite weights"):
        GroupAffineQuantizer().quantize(torch.tensor([1.0, float("inf")]))
    with pytest.raises(InputError, match="range .* within float32's"):  # finite, range is not
        GroupAffineQuantizer().quantize(torch.tensor([2e38, -2e38]))
    q.params["scale"] = q.params["scale"][:, :1]
    with pytest.raises(ArchiveError):
        q.dequantize()


def test_float64_weights_beyond_float32_are_named_so_not_called_infinite() -> None:
    weight = torch.randn(4, 32, dtype=torch.float64) * 1e300
    with pytest.raises(InputError, match="beyond its range"):
        GroupAffineQuantizer(bits=4).quantize(weight)


def test_kmeans_keeps_a_finite_codebook_for_weights_near_float32s_limit() -> None:
    """A centroid's values were summed in float32: from |w| ~1e33 the sum overflowed and
    the codebook took -inf."""
    weight = torch.randn(256, 1024) * 1e37
    q = KMeansQuantizer(bits=1).quantize(weight)
    assert np.isfinite(q.params["codebook"]).all()
    assert KMeansQuantizer(bits=1).relative_error(weight, q) < 0.5
