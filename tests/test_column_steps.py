"""Steps per input column (AWQ's scaling on the grid): the uniform grid's ``column``
granularity, the factors from the inputs' energy, error feedback on that grid, rd measuring
its candidates and gains with them, and archives that keep them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qlis
import qlis.plan.rd as rd
from qlis.measure.calibrate import Calibration
from qlis.quantize.column_scales import RANGE, column_factors, divided_columns
from qlis.quantize.gptq import fit_with_error_feedback, output_error
from qlis.quantize.quantizers import get_quantizer


def test_the_uniform_grid_takes_a_step_per_input_column(tmp_path):
    """Each column's step is from its own mean square, and the archive keeps them."""
    weight = torch.randn(48, 6) * torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 0.5])
    quantizer = get_quantizer({"id": "uniform", "rel_mse": 0.01, "granularity": "column"})
    q = quantizer.quantize(weight)
    assert q.params["step"].shape == (6,)
    error = (q.dequantize() - weight).square().mean(dim=0) / weight.square().mean(dim=0)
    assert torch.allclose(error, torch.full((6,), 0.01), rtol=0.6)  # each column its own
    model = nn.Sequential(nn.Linear(6, 48, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    result = qlis.compress(model, "quant", quantizer=quantizer.get_config())
    path = qlis.save(result, tmp_path / "m.qlis")
    assert torch.equal(qlis.load(path)["0.weight"], q.dequantize())
    packed = nn.Sequential(nn.Linear(6, 48, bias=False))
    qlis.load(path, model=packed, runtime="lowbit")
    x = torch.randn(5, 6)
    assert torch.allclose(packed(x), x @ q.dequantize().T, atol=1e-5)


def test_factors_follow_the_inputs_energy_within_their_range():
    energy = torch.tensor([0.0, 1e-6, 1.0, 4.0, 1e6])
    factors = column_factors(energy)
    assert factors[0] == RANGE  # never an input: the coarsest step
    assert np.all(np.diff(factors[1:]) < 0) or np.all(np.diff(factors[1:]) <= 0)
    assert factors[1] == RANGE and factors[-1] == 1 / RANGE
    assert factors[2] > factors[3]  # the more energy, the finer the step
    assert column_factors(torch.zeros(3)) is None
    assert column_factors(torch.tensor([1.0, float("inf")])) is None


def _layer(transposed: bool = False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=gen) * torch.logspace(-1, 1, 16)
    weight = torch.randn(12, 16, generator=gen)
    hessian = x.T @ x / len(x)
    return weight, hessian, column_factors(torch.diagonal(hessian))


def test_error_feedback_fits_the_column_stepped_grid_and_measures_what_it_leaves():
    weight, hessian, factors = _layer()
    config = {"id": "uniform", "rel_mse": 0.02}
    fed = fit_with_error_feedback(weight, hessian.clone(), config, column_factors=factors)
    q = fed.quantized
    assert q.quantizer["granularity"] == "column"
    probe = get_quantizer(config).quantize(divided_columns(weight, factors, False))
    assert np.allclose(q.params["step"], probe.params["step"][0] * factors, rtol=1e-6)
    assert fed.output_error == pytest.approx(
        output_error(q.dequantize() - weight, hessian), rel=1e-3)
    # stored (in, out), the same layer takes the same values
    stored_in_out = fit_with_error_feedback(weight.T.contiguous(), hessian.clone(), config,
                                            transposed=True, column_factors=factors).quantized
    assert torch.allclose(stored_in_out.dequantize().T, q.dequantize(), atol=1e-6)
    # a quantizer without a step to carry them fits as before
    affine = {"id": "affine", "bits": 4, "granularity": "channel"}
    assert torch.equal(
        fit_with_error_feedback(weight, hessian.clone(), affine,
                                column_factors=factors).quantized.dequantize(),
        fit_with_error_feedback(weight, hessian.clone(), affine).quantized.dequantize())


class _Scaled(nn.Module):
    """``linear`` on inputs times ``along``: the reparametrised layer whose plain weight is
    the column-divided one."""

    def __init__(self, linear: nn.Linear, along: torch.Tensor) -> None:
        super().__init__()
        self.linear, self.along = linear, along

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.along)


def test_a_gain_with_factors_is_the_gain_of_the_divided_weight():
    """The gradient pass measures the weight as the divided matrix on scaled inputs would."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 5)
    factors = np.linspace(0.5, 2.0, 8)
    divided = nn.Linear(8, 5)
    with torch.no_grad():
        divided.weight.copy_(divided_columns(layer.weight, factors, False))
        divided.bias.copy_(layer.bias)
    batches = [torch.randn(6, 8) for _ in range(3)]
    plain = Calibration(nn.Sequential(layer, nn.Tanh()), batches)
    scaled = Calibration(nn.Sequential(_Scaled(divided, torch.from_numpy(factors).float()),
                                       nn.Tanh()), batches)
    with_factors = plain.sensitivities(["0.weight"], column_factors={"0.weight": factors})
    reparametrised = scaled.sensitivities(["0.linear.weight"])
    assert with_factors["0.weight"] == pytest.approx(reparametrised["0.linear.weight"], rel=1e-4)
    assert with_factors["0.weight"] != pytest.approx(plain.sensitivities(["0.weight"])["0.weight"],
                                                     rel=1e-2)


def _uneven_model_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    scales = torch.logspace(-1.5, 1.5, 64)
    batches = [torch.randn(32, 64) * scales for _ in range(8)]
    return model, batches


def test_calibrated_rd_steps_the_input_columns_and_keeps_more_at_equal_size(monkeypatch,
                                                                            tmp_path):
    model, batches = _uneven_model_and_batches()
    stepped = qlis.compress(model, calib=batches, target_bits_per_weight=3)
    assert {stepped.tensors[n].quantizer["granularity"] for n in ("0.weight", "2.weight")} == {
        "column"}
    path = qlis.save(stepped, tmp_path / "m.qlis")
    restored = qlis.load(path)
    assert torch.equal(restored["0.weight"], stepped.tensors["0.weight"].dequantize())
    monkeypatch.setattr(rd, "_column_factors", lambda *args: {})
    one_step = qlis.compress(model, calib=batches, target_bits_per_weight=3)
    assert {one_step.tensors[n].quantizer["granularity"] for n in ("0.weight", "2.weight")} == {
        "tensor"}
    sizes = [qlis.save(r, tmp_path / f"{i}.qlis").stat().st_size
             for i, r in enumerate((stepped, one_step))]
    assert sizes[0] <= 1.02 * sizes[1]
    errors = [1 - r.distortion["output"]["cosine"] for r in (stepped, one_step)]
    assert errors[0] < 0.8 * errors[1]


def test_without_error_feedback_the_layers_keep_the_steps_rd_measured():
    """Rounded to nearest, each layer still takes the steps its candidates were measured
    on: rd's plan and the archive agree on what a step of the plan is."""
    model, batches = _uneven_model_and_batches()
    result = qlis.compress(model, calib=batches, target_bits_per_weight=3,
                           error_feedback=False)
    assert {result.tensors[n].quantizer["granularity"] for n in ("0.weight", "2.weight")} == {
        "column"}
    assert all(layer.reconstruction == "" for layer in result.layers)


def test_convolutions_keep_one_step_per_layer():
    """Stepped per unfolded input column, a convolution fitted with error feedback lost
    quality (MobileNetV2, docs/method.md): only linear layers take steps per input column."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 32))
    channels = torch.tensor([0.1, 1.0, 10.0]).view(1, 3, 1, 1)
    batches = [torch.randn(8, 3, 8, 8) * channels for _ in range(4)]
    result = qlis.compress(model, calib=batches, target_bits_per_weight=4)
    assert result.tensors["0.weight"].quantizer["granularity"] == "tensor"
    assert result.tensors["3.weight"].quantizer["granularity"] == "column"
