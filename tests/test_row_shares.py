"""An embedding table's rows stepped by their share of the calibration's lookups: rows the
data looks up often keep fine steps, rows it never saw take coarse ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import qlis
from qlis.measure.calibrate import Calibration, _count_lookups
from qlis.measure.row_shares import MIN_ROWS, STEP_RANGE, lookup_shares, step_factors
from qlis.models.synthetic_inputs import SyntheticBatch
from qlis.plan.execute import STEPS_BY_LOOKUPS
from qlis.quantize.quantizers import get_quantizer

ROWS = MIN_ROWS  # the smallest vocabulary stepped by its lookups


class Bag(nn.Module):
    """Token ids -> mean of their rows -> a projection: a sentence encoder's shape."""

    def __init__(self, rows: int = ROWS, width: int = 16) -> None:
        super().__init__()
        self.table = nn.Embedding(rows, width)
        self.head = nn.Linear(width, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(ids).mean(dim=1))


def zipf_batches(count: int, seed: int, vocabulary: int = 300) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = 1 / torch.arange(1, vocabulary + 1, dtype=torch.float64)
    return [torch.multinomial(weights, 16 * 12, replacement=True, generator=gen).reshape(16, 12)
            for _ in range(count)]


def test_shares_split_the_good_turing_mass_by_the_norms_of_the_rows_seen():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(ROWS, 8, generator=gen)
    table[:ROWS // 2] *= 0.1  # the low-norm half is never looked up
    counts = torch.zeros(ROWS)
    seen = ROWS // 2 + torch.randperm(ROWS // 2, generator=gen)[:600]
    counts[seen[:200]] = 1
    counts[seen[200:]] = 3
    shares = lookup_shares(counts, table)
    total = float(counts.sum())
    unseen = counts == 0
    assert math.isclose(float(shares.sum()), 1.0, rel_tol=1e-12)
    assert math.isclose(float(shares[unseen].sum()), 200 / total, rel_tol=1e-9)  # tokens seen once
    assert torch.allclose(shares[~unseen], counts[~unseen].double() / total * (1 - 200 / total))
    # the unseen rows like the seen ones (high norms) share more than the others
    assert float(shares[ROWS // 2:][unseen[ROWS // 2:]].mean()) > 20 * float(
        shares[:ROWS // 2].mean())
    assert lookup_shares(torch.zeros(ROWS), table) is None  # nothing looked up
    assert lookup_shares(counts[:100], table[:100]) is None  # positions, types: too few rows


def test_step_factors_are_half_octaves_around_one_finer_for_the_larger_shares():
    shares = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.019, 0.001], dtype=torch.float64)
    factors = step_factors(shares)
    assert np.all(np.diff(factors) >= 0)  # the larger the share, the finer the step
    assert np.allclose(np.round(2 * np.log2(factors)), 2 * np.log2(factors))
    assert abs(float(np.log2(factors).mean())) <= 0.5  # the table's step in the middle
    extreme = step_factors(torch.tensor([1.0, 1e-30], dtype=torch.float64))
    assert extreme.max() == STEP_RANGE and extreme.min() == 1 / STEP_RANGE


def test_only_lookups_that_reach_the_outputs_count():
    counts = torch.zeros(10, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 2], [3, 0, 0]])
    gradient = torch.ones(2, 3, 4)
    gradient[1, 1:] = 0  # padding: no gradient
    _count_lookups(counts, ids, gradient)
    assert counts.tolist() == [0, 1, 2, 1, 0, 0, 0, 0, 0, 0]
    _count_lookups(counts, torch.tensor([[1.0, 2.0, 3.0]]), gradient[:1])  # not row indices
    _count_lookups(counts, torch.tensor([[1, 2, 99]]), gradient[:1])  # past the table
    assert float(counts.sum()) == 4


def test_uniform_steps_per_row_keep_the_codes_and_other_grids_decline():
    weight = torch.randn(6, 5)
    factors = np.array([1, 2, 0.5, 4, 1, 0.25])
    uniform = get_quantizer({"id": "uniform", "step": 0.1})
    q = uniform.quantize(weight)
    scaled = uniform.with_row_scales(q, factors)
    assert scaled.quantizer["granularity"] == "channel"
    assert np.array_equal(np.asarray(scaled.codes), np.asarray(q.codes))
    expected = q.dequantize() * torch.from_numpy(factors).float()[:, None]
    assert torch.allclose(scaled.dequantize(), expected, rtol=1e-6)
    affine = get_quantizer({"id": "affine", "bits": 4})
    assert affine.with_row_scales(affine.quantize(weight), factors) is None


def test_a_vocabulary_is_stepped_by_the_lookups_of_the_calibration(tmp_path):
    torch.manual_seed(0)
    model = Bag().eval()
    batches = zipf_batches(8, seed=1)
    calibration = Calibration(model, batches)
    calibration.sensitivities(["table.weight", "head.weight"])
    shares = calibration.row_shares["table.weight"]
    fitting = torch.cat([batches[i].reshape(-1) for i in calibration.fitting])
    looked_up = torch.bincount(fitting, minlength=ROWS) > 0
    assert float(shares[looked_up].min()) > float(shares[~looked_up].max())
    result = qlis.compress(model, calib=batches, target_bits_per_weight=5)
    table = next(layer for layer in result.layers if layer.name == "table.weight")
    assert table.reconstruction.endswith(STEPS_BY_LOOKUPS) and table.feedback is None
    steps = np.asarray(result.tensors["table.weight"].params["step"])
    assert steps.shape == (ROWS,)
    assert float(steps[looked_up.numpy()].max()) < float(steps[~looked_up.numpy()].min())
    path = qlis.save(result, tmp_path / "m.qlis")
    assert torch.equal(qlis.load(path)["table.weight"], result.state_dict()["table.weight"])
    # the rows looked up are the ones kept well
    error = (result.state_dict()["table.weight"] - model.table.weight.detach()).square().mean(1)
    assert float(error[looked_up].mean()) < 0.1 * float(error[~looked_up].mean())


@pytest.mark.parametrize("rows", [ROWS - 1])
def test_a_small_table_keeps_one_step(rows):
    torch.manual_seed(0)
    model = Bag(rows).eval()
    result = qlis.compress(model, calib=zipf_batches(8, seed=1), target_bits_per_weight=5)
    table = next(layer for layer in result.layers if layer.name == "table.weight")
    assert not table.reconstruction.endswith(STEPS_BY_LOOKUPS)
    assert np.asarray(result.tensors["table.weight"].params["step"]).size == 1


def test_made_up_batches_do_not_step_the_rows():
    torch.manual_seed(0)
    model = Bag().eval()
    made_up = [SyntheticBatch(ids=b) for b in zipf_batches(8, 1)]
    calibration = Calibration(model, made_up)
    assert calibration.synthetic
    calibration.sensitivities(["table.weight", "head.weight"])
    assert "table.weight" in calibration.output_covariances and not calibration.row_shares
