"""Held-out calibration batches: layers are fitted on some batches, the output quality that
``min_cosine`` aims at and the result reports is measured on others."""

from __future__ import annotations

import pytest
import torch

import qlis
from qlis.measure.calibrate import HOLDOUT_EVERY, Calibration
from qlis.quantize import reconstruct as rec


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))


def _batches(count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 32, generator=gen) for _ in range(count)]


def test_every_fourth_batch_is_held_out_and_never_fed_to_the_fitting():
    model, batches = _model(), _batches(2 * HOLDOUT_EVERY)
    calibration = Calibration(model, batches)
    assert calibration.held_out == [3, 7]
    assert calibration.fitting == [0, 1, 2, 4, 5, 6]
    seen = []
    handle = model[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    calibration.feed()
    handle.remove()
    assert len(seen) == 6
    assert not any(torch.equal(x, batches[i]) for x in seen for i in calibration.held_out)
    measured = calibration.measure({})
    assert measured["held_out"] and measured["batches"] == 2 and measured["cosine"] == 1.0


def test_few_batches_or_a_callable_are_measured_on_the_fitting_data_and_say_so():
    for calib in (_batches(HOLDOUT_EVERY - 1), lambda m: m(_batches(1)[0])):
        calibration = Calibration(_model(), calib)
        assert calibration.held_out == []
        assert calibration.measure({})["held_out"] is False


def test_the_reported_output_quality_is_the_held_out_quality():
    model, batches = _model(), _batches(2 * HOLDOUT_EVERY)
    result = qlis.compress(model, calib=batches)
    output = result.distortion["output"]
    assert output["held_out"] and output["batches"] == 2
    assert "2 held-out calibration batches" in result.describe_quality()
    held = [batches[3], batches[7]]
    compressed = _model()
    compressed.load_state_dict(result.state_dict())
    with torch.no_grad():
        cosine = torch.cat([torch.nn.functional.cosine_similarity(
            model(x).double(), compressed(x).double(), dim=1) for x in held]).mean()
    assert abs(float(cosine) - output["cosine"]) < 1e-6


def test_min_cosine_is_met_on_the_held_out_batches():
    model, batches = _model(), _batches(2 * HOLDOUT_EVERY)
    result = qlis.compress(model, calib=batches, min_cosine=0.999)
    output = result.distortion["output"]
    assert output["held_out"]
    assert output["cosine"] >= 0.999 or result.warnings


def test_batches_given_as_callables_are_held_out_too():
    """One callable per batch (a pooling, a loss of the user's choosing) can be split."""
    model, batches = _model(), _batches(2 * HOLDOUT_EVERY)
    calib = [lambda m, x=x: m(x).mean(dim=0, keepdim=True) for x in batches]
    result = qlis.compress(model, calib=calib)
    output = result.distortion["output"]
    assert output["held_out"] and output["batches"] == 2
    assert {layer.reconstruction for layer in result.layers} == {rec.BIAS_CORRECTED}


def test_a_model_the_quantization_breaks_is_reported_not_finite_and_still_saves(tmp_path):
    """A weight-normalised layer whose direction rounds to all zeros computes 0/0: the measure
    says the outputs are not finite (cosine 0, no relative MSE), a warning says the result
    is unusable, and the archive is still written (its header holds no NaN)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.utils.parametrizations.weight_norm(
        torch.nn.Linear(32, 8)))
    direction = "0.parametrizations.weight.original1"
    plan = {direction: {"quantizer": {"id": "uniform", "step": 100.0}}}
    with pytest.warns(qlis.QualityWarning, match="outputs NaN or inf"):
        result = qlis.compress(model, plan=plan, calib=_batches(HOLDOUT_EVERY))
    output = result.distortion["output"]
    assert output["finite"] is False and output["rel_mse"] is None and output["cosine"] == 0
    assert "NOT FINITE" in result.describe_quality()
    qlis.save(result, tmp_path / "m.qlis")
    kept = qlis.compress(model, plan={direction: {"quantizer": {"id": "affine", "bits": 8}}},
                         calib=_batches(HOLDOUT_EVERY))
    assert kept.distortion["output"]["finite"] is True and kept.distortion["output"]["rel_mse"] >= 0
