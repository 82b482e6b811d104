"""GPTQ-style error feedback: lower output error than plain rounding on the same grid, the
quantizer's own format (archive round trip), exact zeros, dead inputs, input covariances."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

import qlis
import qlis.quantize.gptq
from qlis.errors import ConfigError, InputError
from qlis.plan.execute import execute_layer
from qlis.plan.plans import LayerConfig
from qlis.quantize.gptq import quantize_with_error_feedback
from qlis.quantize.grid import AffineGrid, CodebookGrid
from qlis.quantize.quantizers import QuantizedTensor, Quantizer, get_quantizer, quantizer_registry

CONFIGS = [
    {"id": "uniform", "step": 0.5},
    {"id": "uniform", "rel_mse": 0.01, "granularity": "channel", "rounding": 0.4},
    {"id": "affine", "bits": 3, "granularity": "channel"},
    {"id": "affine", "bits": 3, "granularity": "tensor"},
    {"id": "group", "bits": 3, "group_size": 16},
    {"id": "group", "bits": 3, "group_size": 16, "symmetric": True},
    {"id": "kmeans", "bits": 3},
    {"id": "binary", "granularity": "channel"},
]


def correlated_layer(seed: int = 0, out: int = 24, width: int = 40, rows: int = 600):
    """A weight with some exact zeros, and inputs X = Z A (strongly correlated columns)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=gen) @ torch.randn(width, width, generator=gen)
    weight = torch.randn(out, width, generator=gen)
    weight[torch.rand(out, width, generator=gen) < 0.1] = 0.0
    return weight, x, x.T @ x / rows


def output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(((weight - approx) @ x.T).norm())


def assert_same_format(q: qlis.QuantizedTensor, plain: qlis.QuantizedTensor) -> None:
    assert q.quantizer == plain.quantizer and q.dtype == plain.dtype and q.shape == plain.shape
    assert q.codes.dtype == plain.codes.dtype
    assert sorted(q.params) == sorted(plain.params)
    for key, value in plain.params.items():
        assert q.params[key].dtype == value.dtype and q.params[key].shape == value.shape
    assert q.codes.dtype == (np.uint8 if q.n_levels <= 256 else np.uint16)
    assert int(q.codes.max()) < q.n_levels


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_error_feedback_lowers_output_error_on_the_same_grid(config):
    weight, x, hessian = correlated_layer()
    plain = get_quantizer(config).quantize(weight)
    q = quantize_with_error_feedback(weight, hessian, config, block_size=16)
    approx = get_quantizer(q.quantizer).dequantize(q)
    gain = 0.95 if config["id"] == "binary" else 0.9  # two levels leave little to fix
    assert output_error(weight, approx, x) < gain * output_error(weight, plain.dequantize(), x)
    assert_same_format(q, plain)
    assert torch.equal(approx, q.dequantize())
    assert bool((approx[weight == 0] == 0).all())  # pruned zeros stay exactly zero
    if config["id"] != "uniform":  # the grid is the quantizer's, fixed from the whole weight
        assert q.n_levels == plain.n_levels
        assert all(np.array_equal(q.params[k], plain.params[k]) for k in plain.params)
    else:
        assert np.array_equal(q.params["step"], plain.params["step"])
        assert int(q.codes.min()) == 0  # the level range is recomputed tightly


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**31 - 1),
    st.sampled_from(CONFIGS), st.sampled_from([1, 5, 128]),
)
def test_without_correlations_it_is_plain_rounding(out, width, seed, config, block_size):
    """A diagonal covariance (some inputs dead) couples no columns: nothing is fed back."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, width, generator=gen)
    weight[torch.rand(out, width, generator=gen) < 0.2] = 0.0
    diagonal = torch.rand(width, generator=gen) * (torch.rand(width, generator=gen) > 0.3)
    q = quantize_with_error_feedback(weight, torch.diag(diagonal), config, block_size=block_size)
    plain = get_quantizer(config).quantize(weight)
    assert np.array_equal(q.codes, plain.codes) and q.n_levels == plain.n_levels
    assert all(np.array_equal(q.params[k], plain.params[k]) for k in plain.params)


def test_block_size_only_changes_the_order_of_the_arithmetic():
    weight, x, hessian = correlated_layer(seed=1, width=50)
    config = {"id": "uniform", "step": 0.4}
    results = [quantize_with_error_feedback(weight, hessian, config, block_size=b).dequantize()
               for b in (1, 7, 128)]
    for other in results[1:]:
        assert float((other == results[0]).float().mean()) > 0.98
        assert output_error(weight, other, x) == pytest.approx(
            output_error(weight, results[0], x), rel=0.02)


def test_uniform_levels_follow_the_feedback_beyond_the_plain_range():
    weight = torch.tensor([[0.49, 1.2]])
    hessian = torch.tensor([[1.0, 0.99], [0.99, 1.0]])
    plain = get_quantizer({"id": "uniform", "step": 1.0}).quantize(weight)
    q = quantize_with_error_feedback(weight, hessian, {"id": "uniform", "step": 1.0})
    assert plain.dequantize().tolist() == [[0.0, 1.0]] and plain.n_levels == 2
    assert q.dequantize().tolist() == [[0.0, 2.0]] and q.n_levels == 3
    with pytest.raises(ConfigError, match="levels"):  # past 16-bit codes: refused, not wrapped
        quantize_with_error_feedback(torch.tensor([[0.49, 65535.4]]), hessian,
                                     {"id": "uniform", "step": 1.0})


def test_dead_inputs_are_rounded_plainly_and_the_rest_still_gains():
    weight, x, _ = correlated_layer(seed=2)
    x[:, [0, 7, 39]] = 0.0
    hessian = x.T @ x / len(x)
    config = {"id": "group", "bits": 3, "group_size": 8}
    q = quantize_with_error_feedback(weight, hessian, config)
    plain = get_quantizer(config).quantize(weight)
    assert np.array_equal(q.codes[:, [0, 7, 39]], plain.codes[:, [0, 7, 39]])
    assert output_error(weight, q.dequantize(), x) < output_error(weight, plain.dequantize(), x)
    all_dead = quantize_with_error_feedback(weight, torch.zeros(40, 40), config)
    assert np.array_equal(all_dead.codes, plain.codes)


@pytest.mark.parametrize("config", [CONFIGS[0], {"id": "uniform", "step": 0.002},
                                    CONFIGS[2], CONFIGS[5]], ids=["u8", "u16", "affine", "group"])
def test_round_trips_through_the_archive(tmp_path, config):
    weight, _, hessian = correlated_layer(seed=3)
    layer = torch.nn.Linear(40, 24)
    with torch.no_grad():
        layer.weight.copy_(weight)
    result = qlis.compress(layer, plan={"weight": {"pruner": None, "quantizer": config}})
    q = quantize_with_error_feedback(weight, hessian, config)
    result.tensors["weight"] = q
    path = qlis.save(result, tmp_path / "m.qlis")
    restored = qlis.load(path)
    assert torch.equal(restored["weight"], q.dequantize())
    assert (q.n_levels > 256) == (config.get("step") == 0.002)  # 16-bit codes exercised


class GridlessQuantizer(Quantizer):
    """A user's quantizer that does not describe its grid: sign only."""

    strategy_id = "test-gridless"

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        codes = (weight > 0).to(torch.uint8).numpy()
        return QuantizedTensor(codes, 2, self.get_config(), {}, weight.dtype)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        return (torch.from_numpy(q.codes).float() * 2 - 1).to(q.dtype)


def test_refuses_what_it_cannot_do(monkeypatch):
    weight, _, hessian = correlated_layer()
    monkeypatch.setattr(quantizer_registry, "_classes", dict(quantizer_registry._classes))
    quantizer_registry.register(GridlessQuantizer.strategy_id, GridlessQuantizer)
    with pytest.raises(ConfigError, match="does not describe its grid"):
        quantize_with_error_feedback(weight, hessian, "test-gridless")
    with pytest.raises(InputError, match="2 or more dimensions"):
        quantize_with_error_feedback(weight.reshape(-1), hessian, "affine")
    with pytest.raises(InputError, match=r"\(40, 40\)"):
        quantize_with_error_feedback(weight, hessian[:10, :10], "affine")
    with pytest.raises(InputError, match="damp"):  # singular and not damped
        quantize_with_error_feedback(weight[:, :2], torch.ones(2, 2), "affine", damp=0)
    with pytest.raises(ConfigError, match="damp"):
        quantize_with_error_feedback(weight, hessian, "affine", damp=-1.0)
    with pytest.raises(ConfigError, match="block_size"):
        quantize_with_error_feedback(weight, hessian, "affine", block_size=0)
    with pytest.raises(InputError, match="groups dividing"):
        quantize_with_error_feedback(weight, torch.stack([hessian] * 5), "affine")


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("case", ["plain", "dead input", "groups", "transposed", "undamped"])
def test_the_output_error_it_reports_is_the_one_its_result_leaves(config, case):
    weight, _, hessian = correlated_layer(seed=3)
    damp = 0.0 if case == "undamped" else 0.1
    if case == "dead input":
        hessian[5, :] = hessian[:, 5] = 0.0
    if case == "groups":
        hessian = torch.stack([hessian, 2.0 * hessian, hessian + torch.eye(40)])
    if case == "transposed":
        weight = weight.T.contiguous()
    fed = qlis.quantize.gptq.fit_with_error_feedback(
        weight, hessian, config, damp=damp, block_size=16, transposed=case == "transposed")
    direct = qlis.quantize.gptq.output_error(fed.quantized.dequantize() - weight, hessian,
                                             transposed=case == "transposed")
    assert fed.output_error == pytest.approx(direct, rel=1e-5)
    assert torch.equal(fed.quantized.dequantize(), quantize_with_error_feedback(
        weight, hessian, config, damp=damp, block_size=16,
        transposed=case == "transposed").dequantize())
    scratch = hessian.clone()
    in_place = qlis.quantize.gptq.fit_with_error_feedback(
        weight, scratch, config, damp=damp, block_size=16, transposed=case == "transposed",
        overwrite_hessian=True)
    assert torch.equal(in_place.quantized.dequantize(), fed.quantized.dequantize())
    assert in_place.output_error == fed.output_error
    assert not torch.equal(scratch, hessian)  # its buffer held the factor


@pytest.mark.parametrize("groups", [1, 3])
def test_the_inverse_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(groups):
    _, _, hessian = correlated_layer(seed=4, width=40)
    hessian[7, :] = hessian[:, 7] = 0.0  # a dead input
    stacked = torch.stack([hessian * (g + 1) for g in range(groups)])
    before = stacked.clone()
    factors = qlis.quantize.gptq._inverse_factors(stacked, 0.1, overwrite=True)
    assert factors.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    for h, u in zip(before.double(), factors.double(), strict=True):
        damped = h.clone()
        damped[7, 7] = 1.0
        damped += 0.1 * float(damped.diagonal().mean()) * torch.eye(40, dtype=torch.float64)
        assert torch.equal(u, u.triu())
        assert torch.allclose(u.T @ u, torch.linalg.inv(damped), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("transposed", [False, True])
def test_the_callers_weight_is_left_as_it_was(transposed):
    weight, _, hessian = correlated_layer(width=40)
    if transposed:
        weight = weight.T.contiguous()  # stored (in, out), as Hugging Face's Conv1D
    before = weight.clone()
    quantize_with_error_feedback(weight, hessian, "affine", block_size=16, transposed=transposed)
    assert torch.equal(weight, before)


def test_after_learned_rounding_no_output_error_is_claimed():
    weight, _, hessian = correlated_layer()
    fed = qlis.quantize.gptq.fit_with_error_feedback(weight, hessian, "affine", sweeps=1)
    assert fed.output_error is None


def test_the_inverse_factor_is_the_same_bits_whatever_threads_the_blas_has():
    """OpenBLAS factorizes a wide matrix to other bits on two threads than on one; the fit
    holds it to one, so a rank of a job (one thread) and one process agree."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1600, 1536, generator=gen) @ torch.randn(1536, 1536, generator=gen)
    hessian = x.T @ x / len(x)
    factors = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            factors.append(qlis.quantize.gptq._inverse_factors(hessian[None], 0.001, False))
    assert torch.equal(*factors)


def test_docstring_examples():
    result = doctest.testmod(qlis.quantize.gptq, optionflags=doctest.ELLIPSIS)
    assert result.attempted and result.failed == 0


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_layer_fitted_on_a_covariance_it_may_overwrite_frees_it(overwrite):
    """The caller's frames still name the covariance while the layer's sizes are measured
    (width^2, the largest buffer of a wide layer's fit): the fit lets its storage go."""
    weight, _, hessian = correlated_layer(seed=5)
    covariance = hessian.clone()
    stored, layer = execute_layer("w", weight, LayerConfig(quantizer={"id": "affine", "bits": 3}),
                                  hessian=covariance, overwrite_hessian=overwrite)
    assert layer.feedback is not None and stored.shape == weight.shape
    assert (covariance.numel() == 0) == overwrite
    assert overwrite or torch.equal(covariance, hessian)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c["id"] != "uniform"],
                         ids=lambda c: "-".join(map(str, c.values())))
def test_codes_that_fit_a_byte_are_kept_in_one_with_the_same_values(config, monkeypatch):
    """The column loop holds a bounded grid's codes (at most 256) in uint8, a quarter of the
    float32 it held before (4 MiB against 16 for a 4096 x 1024 layer), and finds the same
    codes as with them in float32 (the path of a grid whose codes are unbounded)."""
    weight, _, hessian = correlated_layer()
    kinds: list[torch.dtype] = []
    feed_back = qlis.quantize.gptq._feed_back

    def recorded(*args, **kwargs):
        codes, *rest = feed_back(*args, **kwargs)
        kinds.append(codes.dtype)
        return (codes, *rest)

    monkeypatch.setattr(qlis.quantize.gptq, "_feed_back", recorded)
    narrow = quantize_with_error_feedback(weight, hessian, config, block_size=16)
    for grid in (AffineGrid, CodebookGrid):
        monkeypatch.setattr(grid, "levels", property(lambda self: None))
    wide = quantize_with_error_feedback(weight, hessian, config, block_size=16)
    assert kinds == [torch.uint8, torch.float32]
    assert np.array_equal(narrow.codes, wide.codes)
