"""Large tensors are worked on a chunk of rows at a time (bounded memory): the results are
those of the whole tensor at once. CHUNK_ELEMENTS is made tiny here, so that small tensors
take the chunked paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import qlis.measure.distortion
import qlis.quantize.quantizers
from qlis.plan.execute import Dequantized, execute_layer
from qlis.plan.plans import LayerConfig
from qlis.quantize.grid import matrix_shape
from qlis.quantize.quantizers import UniformQuantizer, _row_extremes, _row_view, get_quantizer


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of 100 elements: every tensor below spans many of them."""
    for module in (qlis.quantize.quantizers, qlis.measure.distortion):
        monkeypatch.setattr(module, "CHUNK_ELEMENTS", 100)


def _weight(dtype: torch.dtype, shape=(37, 23), seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.05).to(dtype)


@pytest.mark.parametrize("config", [
    {"id": "uniform", "step": 0.01},
    {"id": "uniform", "step": 0.0002},  # over 256 levels: uint16 codes, widened per chunk
    {"id": "uniform", "step": 0.004, "granularity": "channel"},
    {"id": "uniform", "rel_mse": 1e-3, "granularity": "channel"},
    {"id": "uniform", "rel_mse": 1e-2, "granularity": "channel", "rounding": 0.3},
    {"id": "affine", "bits": 4, "granularity": "channel"},
    {"id": "affine", "bits": 3},
    {"id": "group", "bits": 3, "group_size": 8},
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chunked_quantize_and_dequantize_equal_the_whole_tensor_s(config, dtype, monkeypatch):
    weight = _weight(dtype)
    whole = get_quantizer(config).quantize(weight)
    values = whole.dequantize()
    for module in (qlis.quantize.quantizers, qlis.measure.distortion):
        monkeypatch.setattr(module, "CHUNK_ELEMENTS", 100)
    chunked = get_quantizer(config).quantize(weight)
    assert chunked.n_levels == whole.n_levels and chunked.codes.dtype == whole.codes.dtype
    assert (whole.codes.dtype == np.uint16) == (config.get("step") == 0.0002)
    assert np.array_equal(chunked.codes, whole.codes)
    assert all(np.array_equal(chunked.params[k], whole.params[k]) for k in whole.params)
    assert torch.equal(chunked.dequantize(), values) and values.dtype == dtype


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_steps_from_the_matrix_rows_extremes_equal_those_found_alone(granularity, dtype):
    weight = _weight(dtype, (37, 3, 7))
    weight[5, 1, 2] = 40.0  # one row's peak far from the others'
    quantizer = UniformQuantizer(rel_mse=1e-3, granularity=granularity)
    rows = _row_view(weight, granularity)
    extremes = _row_extremes(weight.reshape(matrix_shape(weight.shape)))
    assert torch.equal(quantizer.steps(rows, extremes), quantizer.steps(rows))


def test_chunked_steps_of_one_long_row_agree_with_the_whole_row(monkeypatch):
    row = _weight(torch.float32, (1, 5000))
    whole = UniformQuantizer(rel_mse=1e-3).steps(row)
    monkeypatch.setattr(qlis.quantize.quantizers, "CHUNK_ELEMENTS", 100)
    assert torch.allclose(UniformQuantizer(rel_mse=1e-3).steps(row), whole, rtol=1e-6)


def test_chunked_quantize_refuses_what_the_whole_one_refuses(tiny_chunks):
    weight = _weight(torch.float32)
    with pytest.raises(qlis.ConfigError, match="levels"):
        UniformQuantizer(step=1e-7).quantize(weight)
    weight[3, 4] = math.nan
    with pytest.raises(qlis.ConfigError, match="finite"):
        UniformQuantizer(step=0.01).quantize(weight)


def test_chunked_measures_agree_with_the_whole_tensor_s(tiny_chunks):
    weight = _weight(torch.float16, (31, 41))
    approx = (weight.float() + 0.001).half()
    ref, out = weight.float(), approx.float()
    expected = float((out - ref).square().sum() / ref.square().sum())
    assert qlis.measure.distortion.relative_mse(weight, approx) == pytest.approx(expected, rel=1e-5)
    assert qlis.measure.distortion.sum_of_squares(weight) == pytest.approx(
        float(ref.square().sum()), rel=1e-5)
    flat = (weight.float() + 3.0).reshape(-1)  # a mean far from 0: deviations, not squares
    assert qlis.measure.distortion.population_std(flat) == pytest.approx(
        float(flat.std(correction=0)), rel=1e-5)


@pytest.mark.parametrize("config", [
    {"id": "uniform", "rel_mse": 1e-3},
    {"id": "uniform", "rel_mse": 1e-2, "granularity": "channel"},
    {"id": "affine", "bits": 3, "granularity": "channel"},
    {"id": "kmeans", "bits": 2},
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_s_error_measured_by_row_ranges_is_that_of_its_whole_dequantized_copy(
        tiny_chunks, config, dtype):
    weight = _weight(dtype, (53, 29))
    stored, plan = execute_layer("w", weight, LayerConfig(quantizer=config))
    assert len(list(get_quantizer(config).dequantized_rows(stored))) > (config["id"] != "kmeans")
    whole = stored.dequantize()
    ref, out = weight.double(), whole.double()
    assert whole.dtype == dtype
    assert plan.rel_mse == pytest.approx(float((out - ref).square().sum() / ref.square().sum()),
                                         rel=1e-12)


@pytest.mark.parametrize("config", [
    {"step": 0.0002},  # uint16 codes
    {"step": 1e-5},  # float16 rounds the smallest values to its subnormals
    {"rel_mse": 1e-2, "granularity": "channel", "rounding": 0.3},
    {"rel_mse": 4.0},  # coarser than the weights: most codes are 0
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_uniform_error_measured_while_rounding_is_that_of_its_codes(tiny_chunks, config, dtype):
    weight = _weight(dtype, (53, 29))
    weight[0, :4] = torch.tensor([3e-6, -5e-7, 6.1e-5, 1e-8])  # float16's subnormals
    quantizer = UniformQuantizer(**config)
    measured, error = quantizer.quantize_measured(weight)
    plain = quantizer.quantize(weight)
    assert np.array_equal(measured.codes, plain.codes) and measured.n_levels == plain.n_levels
    assert error == pytest.approx(quantizer.relative_error(weight, plain), rel=1e-12)
    assert type(error) is float  # as the small layers' (a plan's JSON holds it)
    ref, out = weight.double(), plain.dequantize().double()
    assert error == pytest.approx(float((out - ref).square().sum() / ref.square().sum()),
                                  rel=1e-12)
    assert quantizer.quantize_measured(torch.zeros(53, 29, dtype=dtype))[1] == 0.0


@pytest.mark.parametrize("dtype, value, step", [(torch.float16, 60000.0, 70000.0),
                                                (torch.bfloat16, 3e38, 3.4e38)])
def test_error_measured_while_rounding_saturates_as_dequantize(tiny_chunks, dtype, value, step):
    """A step that decodes the top codes past the dtype's range (+-70000 in float16): the
    values saturate at its largest finite one, in the measure as in dequantize."""
    weight = torch.full((40, 30), value, dtype=dtype)
    weight[::2] = -value
    measured, error = UniformQuantizer(step=step).quantize_measured(weight)
    values = measured.dequantize()
    assert torch.equal(values.abs(), torch.full_like(values, torch.finfo(dtype).max))
    expected = UniformQuantizer(step=step).relative_error(weight, measured)
    assert math.isfinite(error) and error == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("config", [
    {"id": "uniform", "step": 0.01},
    {"id": "uniform", "rel_mse": 1e-3, "granularity": "channel"},
    {"id": "group", "bits": 3, "group_size": 8},
    {"id": "kmeans", "bits": 3},  # a codebook grid: decoded at once
])
def test_a_tables_rows_are_decoded_from_the_chunks_that_hold_them(tiny_chunks, config):
    stored = get_quantizer(config).quantize(_weight(torch.float32, (61, 12)))
    index = torch.tensor([0, 5, 6, 40, 60])
    rows = Dequantized(stored).rows(index)
    assert torch.equal(rows, stored.dequantize()[index])
    ranges = [(a, b) for a, b, _ in get_quantizer(config).dequantized_rows(stored, index)]
    if config["id"] != "kmeans":  # chunks of 8 rows (100 elements): 3 of the 8 hold a row
        assert ranges == [(0, 8), (40, 48), (56, 61)]
