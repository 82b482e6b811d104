"""Quantizers: exact zeros, error bounds, code ranges, per-channel vs per-tensor, registry."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import reference as ref
import torch
from hypothesis import given
from hypothesis import strategies as st

import qlis
import qlis.registry
from qlis import (
    AffineQuantizer,
    BinaryQuantizer,
    ConfigError,
    InputError,
    KMeansQuantizer,
    QuantizedTensor,
    Quantizer,
    get_quantizer,
    register_quantizer,
)
from qlis.quantize.quantizers import make_quantizer, quantizer_registry

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

QUANTIZERS = (
    [AffineQuantizer(bits, g) for bits in (2, 3, 4, 8) for g in ("tensor", "channel")]
    + [BinaryQuantizer(g) for g in ("tensor", "channel")]
    + [KMeansQuantizer(bits) for bits in (1, 2, 4, 8)]
)


@st.composite
def weights(draw, zeros: bool = True) -> torch.Tensor:
    """A 2-D float tensor of heavy-tailed-ish values, with a random share of exact zeros."""
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 40))
    values = draw(
        st.lists(
            st.floats(-50, 50, width=16, allow_subnormal=False),
            min_size=rows * cols,
            max_size=rows * cols,
        )
    )
    w = torch.tensor(values, dtype=torch.float32).reshape(rows, cols)
    if zeros:
        drop = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
        w[torch.tensor(drop).reshape(rows, cols)] = 0.0
    return w.to(dtype)


@given(weights(), st.sampled_from(QUANTIZERS))
def test_zeros_stay_exactly_zero(weight, quantizer):
    q = quantizer.quantize(weight)
    out = q.dequantize()
    assert out.dtype == weight.dtype and out.shape == weight.shape
    assert bool((out[weight == 0] == 0).all())
    assert q.codes.dtype == np.uint8 and q.codes.shape == tuple(weight.shape)
    assert int(q.codes.max(initial=0)) < q.n_levels
    assert q.n_levels <= max(2**quantizer.bits, 3)


def _affine_reference_error(weight: torch.Tensor, q: QuantizedTensor, granularity: str):
    """Per-element |dequantized - w| and the allowed scale/2 (+ float rounding), in float64."""
    w = weight.double().numpy().reshape(weight.shape[0] if granularity == "channel" else 1, -1)
    out = q.dequantize().double().numpy().reshape(w.shape)
    scale = q.params["scale"].astype(np.float64).reshape(-1, 1)
    rounding = torch.finfo(weight.dtype).eps  # dequantized values are stored in weight.dtype
    allowed = scale / 2 * (1 + 1e-5) + rounding * (np.abs(w) + scale)
    return np.abs(out - w), allowed


@given(weights(), st.integers(2, 8), st.sampled_from(["tensor", "channel"]))
def test_affine_error_is_at_most_half_a_step(weight, bits, granularity):
    q = AffineQuantizer(bits, granularity).quantize(weight)
    error, allowed = _affine_reference_error(weight, q, granularity)
    assert (error <= allowed).all()
    top = 2**bits - 1
    assert q.n_levels == top + 1 and int(q.codes.max()) <= top
    zero_point = q.params["zero_point"]
    assert np.array_equal(zero_point, np.round(zero_point))  # an integer code
    assert ((zero_point >= 0) & (zero_point <= top)).all()
    assert (q.params["scale"] > 0).all()


def test_affine_range_is_widened_to_include_zero():
    q = AffineQuantizer(bits=2).quantize(torch.tensor([1.0, 2.0, 3.0]))
    assert q.params["zero_point"].tolist() == [0.0]  # [0, 3] in 3 steps of 1
    assert q.params["scale"].tolist() == [1.0]
    assert q.dequantize().tolist() == [1.0, 2.0, 3.0]
    q = AffineQuantizer(bits=2).quantize(torch.tensor([-3.0, -1.0]))
    assert q.params["zero_point"].tolist() == [3.0]


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_affine_holds_a_range_wider_than_float32_can_subtract(granularity):
    """3e38 - (-3e38) overflows float32: the step is then computed in float64, and the
    values come back within half a step."""
    weight = torch.tensor([[3e38, -3e38, 1e37, 0.0], [2e38, -1e38, 5e37, 1.0]])
    q = AffineQuantizer(bits=8, granularity=granularity).quantize(weight)
    assert np.isfinite(q.params["scale"]).all()
    error, allowed = _affine_reference_error(weight, q, granularity)
    assert (error <= allowed).all()


@pytest.mark.parametrize("weight", [
    torch.tensor([[3.4028234e38, -3.4028234e38], [1.0, 2.0]]),  # float32's largest
    torch.tensor([[1e300, -1e300], [1.0, 2.0]], dtype=torch.float64),  # beyond float32
])
@pytest.mark.parametrize("calibrated", [False, True])
def test_a_grid_beyond_float32_is_refused_naming_the_layer(weight, calibrated):
    model = torch.nn.Linear(2, 2, bias=False).to(weight.dtype)
    model.weight.data.copy_(weight)
    calib = [torch.ones(4, 2, dtype=weight.dtype) * 1e-3] if calibrated else None
    before = model.weight.detach().clone()
    with pytest.raises(InputError, match="layer 'weight': quantizer 'affine' cannot hold"):
        qlis.compress(model, policy="quant", bits=8, calib=calib, inplace=True)
    assert torch.equal(model.weight, before)


def test_per_channel_beats_per_tensor_when_rows_differ_in_scale():
    rng = np.random.default_rng(3)
    row_scale = torch.from_numpy(10.0 ** np.linspace(-3, 1, 32)).float().reshape(-1, 1)
    weight = ref.student_t((32, 256), 4.0, 1.0, rng) * row_scale
    for bits in (2, 4, 8):
        rel, mse = {}, {}
        for granularity in ("tensor", "channel"):
            out = AffineQuantizer(bits, granularity).quantize(weight).dequantize()
            mse[granularity] = float((out - weight).square().mean())
            # relative error per row, averaged: the small rows are what per-tensor loses
            per_row = (out - weight).square().sum(1) / weight.square().sum(1)
            rel[granularity] = float(per_row.mean())
        assert mse["channel"] < mse["tensor"], (bits, mse)
        assert rel["channel"] < rel["tensor"] / (2 if bits == 2 else 10), (bits, rel)


@given(weights(zeros=False) | weights(), st.sampled_from(["tensor", "channel"]))
def test_binary_is_sign_times_mean_magnitude_of_non_zeros(weight, granularity):
    q = BinaryQuantizer(granularity).quantize(weight)
    w = weight.double().numpy()
    rows = w.reshape(w.shape[0], -1) if granularity == "channel" else w.reshape(1, -1)
    nonzero = rows != 0
    alpha = np.abs(rows).sum(1) / np.maximum(nonzero.sum(1), 1)
    expected = np.sign(rows) * alpha[:, None]
    out = q.dequantize().double().numpy().reshape(rows.shape)
    tol = torch.finfo(weight.dtype).eps * np.abs(expected) + 1e-6 * np.abs(alpha[:, None])
    assert (np.abs(out - expected) <= tol).all()
    assert q.n_levels == (3 if (w == 0).any() else 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_binary_scales_weights_whose_magnitudes_sum_past_float32(dtype):
    """|w| ~1e37 over 4,096 weights sums past float32's 3.4e38: the scale was inf, a float32
    layer was refused as if its values left float32's range, and a bfloat16 one (decoding
    saturates) came back as +3.4e38 everywhere, written into the model with inplace=True."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(64, 64) * 1e37)
    before = model[0].weight.detach().clone()
    result = qlis.compress(model, policy="quant", quantizer={"id": "binary"}, inplace=True)
    alpha = result.tensors["0.weight"].params["alpha"]
    assert alpha == pytest.approx(before.double().abs().mean().item(), rel=1e-6)
    after = model[0].weight.detach()
    assert torch.equal(after.sign(), before.sign())
    assert result.distortion["weight_rel_mse"] < 0.5


@given(weights(), st.integers(1, 8))
def test_kmeans_maps_every_weight_to_its_nearest_codebook_entry(weight, bits):
    q = KMeansQuantizer(bits).quantize(weight)
    codebook = q.params["codebook"].astype(np.float64)
    assert (np.diff(codebook) > 0).all()
    assert len(codebook) == q.n_levels <= 2**bits
    if (weight == 0).any():
        assert 0.0 in codebook
    w = weight.float().double().numpy().reshape(-1, 1)
    best = np.abs(w - codebook).min(1)
    chosen = np.abs(w[:, 0] - codebook[q.codes.reshape(-1)])
    assert (chosen <= best + 1e-6 * (1 + np.abs(w[:, 0]))).all()
    distinct = np.unique(weight.float().numpy())
    if len(distinct) <= 2**bits - int((weight == 0).any()):
        # fewer distinct values than codebook entries: lossless up to the dtype
        assert torch.equal(q.dequantize(), weight)


def test_kmeans_is_deterministic_and_samples_large_layers():
    rng = np.random.default_rng(5)
    weight = ref.student_t((300, 300), 3.0, 0.05, rng)
    a = KMeansQuantizer(bits=4, sample_size=4096).quantize(weight)
    b = KMeansQuantizer(bits=4, sample_size=4096).quantize(weight)
    assert np.array_equal(a.codes, b.codes)
    assert np.array_equal(a.params["codebook"], b.params["codebook"])
    # 16 fitted entries do much better than a 16-level min-max grid on heavy tails
    affine = AffineQuantizer(bits=4).quantize(weight).dequantize()
    assert (a.dequantize() - weight).square().sum() < (affine - weight).square().sum()


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=repr)
@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
def test_empty_tensors(quantizer, shape):
    q = quantizer.quantize(torch.zeros(shape))
    assert q.dequantize().shape == shape


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=repr)
def test_config_round_trip_and_dequantize_through_the_registry(quantizer):
    weight = torch.linspace(-1, 1, 24).reshape(4, 6)
    q = quantizer.quantize(weight)
    assert q.quantizer == quantizer.get_config()
    assert get_quantizer(q.quantizer) == quantizer
    assert torch.equal(q.dequantize(), quantizer.dequantize(q))
    assert q.shape == (4, 6)
    assert 2 ** (q.code_bits - 1) < max(q.n_levels, 2) <= 2**q.code_bits


def test_make_quantizer_follows_the_paper():
    assert make_quantizer(1) == BinaryQuantizer("tensor")
    assert make_quantizer(1, "channel") == BinaryQuantizer("channel")
    for bits in (2, 4, 8):
        assert make_quantizer(bits, "channel") == AffineQuantizer(bits, "channel")
    assert make_quantizer(3, method="kmeans") == KMeansQuantizer(bits=3)
    with pytest.raises(ConfigError, match="unknown quantizer 'nope'"):
        make_quantizer(4, method="nope")


@pytest.mark.parametrize(
    "make",
    [
        lambda: AffineQuantizer(bits=1),
        lambda: AffineQuantizer(bits=9),
        lambda: AffineQuantizer(bits=4.0),
        lambda: AffineQuantizer(bits=4, granularity="row"),
        lambda: BinaryQuantizer(granularity="block"),
        lambda: KMeansQuantizer(bits=0),
        lambda: KMeansQuantizer(bits=9),
        lambda: get_quantizer({"id": "affine", "bit": 4}),
        lambda: get_quantizer("nope"),
    ],
)
def test_bad_configs(make):
    with pytest.raises(ConfigError):
        make()


class RoundQuantizer(Quantizer):
    """A user's quantizer: round to a grid of step 2**-bits (codes offset by 128)."""

    strategy_id = "test-round"

    def __init__(self, bits: int = 4) -> None:
        self.bits = bits

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        steps = torch.round(weight.float() * 2**self.bits).clamp(-128, 127) + 128
        return QuantizedTensor(
            codes=steps.to(torch.uint8).numpy(),
            n_levels=256,
            quantizer=self.get_config(),
            params={},
            dtype=weight.dtype,
        )

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        codes = torch.from_numpy(q.codes).float()
        return ((codes - 128) / 2**self.bits).to(q.dtype)


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(quantizer_registry, "_classes", dict(quantizer_registry._classes))
    monkeypatch.setattr(quantizer_registry, "_entry_points_loaded", False)
    return quantizer_registry


def test_user_registered_quantizer_is_found(clean_registry):
    register_quantizer(RoundQuantizer)
    assert "test-round" in clean_registry.names()
    quantizer = get_quantizer({"id": "test-round", "bits": 2})
    assert quantizer == RoundQuantizer(bits=2)
    q = quantizer.quantize(torch.tensor([0.26, -1.0, 0.0]))
    assert q.dequantize().tolist() == [0.25, -1.0, 0.0]
    assert make_quantizer(2, method="test-round") == RoundQuantizer(bits=2)


def test_quantizer_found_through_an_entry_point(clean_registry, monkeypatch):
    seen = []

    def fake_entry_points(*, group):
        seen.append(group)
        return [SimpleNamespace(name="test-round", load=lambda: RoundQuantizer)]

    monkeypatch.setattr(qlis.registry, "entry_points", fake_entry_points)
    assert get_quantizer("test-round") == RoundQuantizer()
    assert seen == ["qlis.quantizers"]
