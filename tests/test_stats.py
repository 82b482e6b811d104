"""P, E, S, EWDS and QLIS against independent computations (DESIGN.md, eqs. 4-8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch
from hypothesis import given
from hypothesis import strategies as st

import qlis
from qlis.archive.resume import PassCache
from qlis.errors import InputError, QlisError
from qlis.measure.stats import RECORD_KEYS, value_entropy_bits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
dtypes = st.sampled_from(DTYPES)


@st.composite
def weights(draw, min_size: int = 1, max_size: int = 200, dtype=None) -> torch.Tensor:
    """A float tensor whose values repeat (a small pool), include exact and signed zeros,
    values near eps and heavy-tailed magnitudes."""
    dtype = draw(dtypes) if dtype is None else dtype
    pool = draw(
        st.lists(
            st.one_of(
                st.floats(-100, 100, width=32, allow_subnormal=False),
                st.sampled_from([0.0, -0.0, 1e-3, -1e-3, 0.000999, 0.0010001, 1e-6]),
            ),
            min_size=1,
            max_size=30,
        )
    )
    idx = draw(st.lists(st.integers(0, len(pool) - 1), min_size=min_size, max_size=max_size))
    return torch.tensor([pool[i] for i in idx], dtype=torch.float32).to(dtype)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@given(weights())
def test_entropy_is_exact_over_stored_bit_patterns(w):
    h = value_entropy_bits(w)
    assert h == pytest.approx(ref.entropy(w), rel=1e-9, abs=1e-9)
    assert 0.0 <= h <= min(ref.width(w.dtype), math.log2(w.numel())) + 1e-9


@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_large_tensor_with_repeats(dtype):
    """Beyond one 64K bucket: many repeated values and all-distinct values."""
    rng = np.random.default_rng(0)
    pool = torch.from_numpy(rng.standard_t(3, size=5000).astype(np.float32))
    repeated = pool[torch.from_numpy(rng.integers(0, 5000, size=300_000))].to(dtype)
    distinct = torch.from_numpy(rng.standard_normal(200_000).astype(np.float32)).to(dtype)
    for w in (repeated, distinct):
        assert value_entropy_bits(w) == pytest.approx(ref.entropy(w), rel=1e-9)


def test_entropy_counts_signed_zeros_as_distinct_patterns():
    assert value_entropy_bits(torch.tensor([0.0, -0.0])) == 1.0
    assert value_entropy_bits(torch.tensor([0.0, 0.0, 0.0])) == 0.0


@given(
    st.lists(st.tuples(weights(min_size=4), st.integers(1, 3)), min_size=1, max_size=4),
    st.floats(0, 1),
    st.sampled_from([0.0, 1e-3, 1e-2, 0.5]),
)
def test_inspect_matches_the_formulas(layers, beta, eps):
    state = {
        f"layer{i}.weight": w[: (w.numel() // rows) * rows].reshape(rows, -1)
        for i, (w, rows) in enumerate(layers)
    }
    report = qlis.inspect(state, beta=beta, eps=eps)
    expected = ref.stats(state, beta=beta, eps=eps)
    assert [layer.name for layer in report.layers] == list(expected)
    for layer in report.layers:
        want = expected[layer.name]
        for key in ("P", "E", "S", "EWDS", "QLIS"):
            assert _close(getattr(layer, key), want[key]), (key, layer, want)
        scale = float(state[layer.name].abs().max())  # float32 arithmetic: relative to max|w|
        assert layer.sigma == pytest.approx(want["sigma"], rel=1e-5, abs=1e-6 * scale)
        assert 0 <= layer.E <= 1 and 0 <= layer.S <= 1 and 0 <= layer.EWDS <= 1
        assert 0 <= layer.QLIS <= 1
    assert sum(layer.P for layer in report.layers) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_inspect_tiny_vit(tiny_vit, beta):
    state = tiny_vit.state_dict()
    report = qlis.inspect(tiny_vit, beta=beta)
    expected = ref.stats(state, beta=beta)
    assert [layer.name for layer in report.layers] == list(expected)
    for layer in report.layers:
        tensor = state[layer.name]
        assert layer.shape == tuple(tensor.shape) and layer.numel == tensor.numel()
        assert layer.dtype == "float32"
        for key in ("P", "E", "S", "EWDS", "QLIS"):
            assert _close(getattr(layer, key), expected[layer.name][key]), key
    assert report.beta == beta and report.eps == 1e-3
    assert report.total_params == sum(t.numel() for t in state.values())
    assert report.layer_params == sum(t.numel() for t in state.values() if ref.is_layer(t))
    assert set(report.unselected) == {n for n, t in state.items() if not ref.is_layer(t)}
    assert "position_ids" in report.unselected
    # the heavy-tailed layers differ, so the scores do
    assert len({round(layer.QLIS, 12) for layer in report.layers}) > 1


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_inspect_in_every_float_dtype(tiny_state, dtype):
    state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in tiny_state.items()}
    report = qlis.inspect(state)
    expected = ref.stats(state)
    for layer in report.layers:
        assert layer.dtype == str(dtype).removeprefix("torch.")
        for key in ("P", "E", "S", "EWDS", "QLIS"):
            assert _close(getattr(layer, key), expected[layer.name][key]), key
        assert layer.sigma == pytest.approx(expected[layer.name]["sigma"], rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsity_threshold_is_strict_and_exact_at_eps(dtype):
    eps = 0.5
    below = torch.nextafter(torch.tensor(0.5, dtype=dtype), torch.tensor(0.0, dtype=dtype))
    w = torch.stack(
        [torch.tensor(v, dtype=dtype) for v in (0.5, -0.5, 0.25, -0.0, 0.0, 3.0)] + [below]
    ).reshape(1, -1)
    # |w| < 0.5: 0.25, -0.0, 0.0 and the value just below 0.5
    sparsity = qlis.inspect({"w": w}, eps=eps).layers[0].S
    assert sparsity == pytest.approx(4 / 7)
    for zero in (0.0, -0.0):  # -0.0 >= 0 passes the check, and is the same threshold
        assert qlis.inspect({"w": w}, eps=zero).layers[0].S == 0.0


def test_eps_between_representable_values():
    """eps = 1e-3 lies between float16/bfloat16 values: the count must follow float64 |w| < eps."""
    for dtype in (torch.float16, torch.bfloat16):
        grid = torch.linspace(9e-4, 1.1e-3, 2000).to(dtype).reshape(40, 50)
        sparsity = qlis.inspect({"w": grid}).layers[0].S
        assert sparsity == ref.sparsity(grid, 1e-3)


def test_selection_and_share_are_over_selected_layers(tiny_state):
    pattern = "blocks.*.fc*.weight"
    report = qlis.inspect(tiny_state, select=pattern)
    names = [layer.name for layer in report.layers]
    assert names == [f"blocks.{i}.fc{j}.weight" for i in range(2) for j in (1, 2)]
    total = sum(tiny_state[n].numel() for n in names)
    for layer in report.layers:
        share = layer.P
        assert share == tiny_state[layer.name].numel() / total
    by_callable = qlis.inspect(tiny_state, select=lambda name, t: name == "head.weight")
    assert [layer.name for layer in by_callable.layers] == ["head.weight"]
    assert by_callable.layers[0].P == 1.0


def test_integer_tensors_never_match_a_pattern(tiny_state):
    with pytest.raises(InputError, match="no layer selected"):
        qlis.inspect(tiny_state, select="position_ids")


def test_module_and_state_dict_give_the_same_report(tiny_vit):
    assert qlis.inspect(tiny_vit).records() == qlis.inspect(tiny_vit.state_dict()).records()


def test_report_records_and_totals(tiny_vit):
    report = qlis.inspect(tiny_vit)
    records = report.records()
    assert all(tuple(r) == RECORD_KEYS for r in records)
    assert all(isinstance(r["shape"], list) for r in records)
    totals = report.totals
    scores = [layer.QLIS for layer in report.layers]
    assert totals["layers"] == len(report.layers)
    assert totals["max_QLIS"] == max(scores) and totals["min_QLIS"] == min(scores)
    assert report["head.weight"].name == "head.weight"
    with pytest.raises(KeyError):
        report["head.bias"]


@pytest.mark.parametrize(("bad", "select"), [
    (float("nan"), None), (float("inf"), "*"), (-float("inf"), ["*.weight"])])
def test_non_finite_weights_name_the_layer(bad, select):
    state = {"good.weight": torch.ones(2, 2), "bad.weight": torch.ones(3, 3)}
    state["bad.weight"][1, 2] = bad
    with pytest.raises(InputError, match=r"bad\.weight.*contains NaN"):
        qlis.inspect(state, select=select)
    with pytest.raises(InputError, match=r"bad\.weight.*contains NaN"):
        qlis.inspect(state, select=select, score=False)  # unscored, still checked


@pytest.mark.parametrize("score", [True, False])
def test_a_tensor_of_infinities_is_a_mask_left_out_of_the_default_layers(score):
    mask = torch.triu(torch.full((4, 4), -torch.inf), 1)
    state = {"lin.weight": torch.randn(3, 3), "attn.mask": mask, "attn.both": mask.neg()}
    report = qlis.inspect(state, score=score)
    assert [layer.name for layer in report.layers] == ["lin.weight"]
    assert report.layers[0].P == 1.0 and report.layer_params == 9
    assert report.masks == ["attn.mask", "attn.both"]
    assert {"attn.mask", "attn.both"} <= set(report.unselected)
    with pytest.raises(InputError, match=r"no layer left.*'attn\.mask'"):
        qlis.inspect({"attn.mask": mask}, score=score)
    state["attn.mask"] = mask.clone()
    state["attn.mask"][3, 0] = torch.nan  # a NaN is no mask
    with pytest.raises(InputError, match=r"attn\.mask.*contains NaN values"):
        qlis.inspect(state, score=score)


def test_an_unscored_report_has_the_same_layers_and_no_scores(tiny_state):
    scored, unscored = qlis.inspect(tiny_state), qlis.inspect(tiny_state, score=False)
    assert [(a.name, a.shape, a.numel, a.dtype, a.P) for a in scored.layers] == [
        (b.name, b.shape, b.numel, b.dtype, b.P) for b in unscored.layers]
    assert all(b.sigma is b.E is b.S is b.EWDS is b.QLIS is None for b in unscored.layers)
    assert unscored.totals["mean_QLIS"] is None
    assert {k: v for k, v in unscored.totals.items() if not k.endswith("QLIS")} == {
        k: v for k, v in scored.totals.items() if not k.endswith("QLIS")}


@pytest.mark.parametrize(
    "state, match",
    [
        ({}, "no tensors"),
        (
            {"ids": torch.arange(6).reshape(2, 3), "mask": torch.ones(2, 2, dtype=torch.bool)},
            "no layer selected",
        ),
        ({"bias": torch.ones(3)}, "no layer selected"),
        ({"w": torch.ones(2, 2), "meta": 3}, "not a tensor"),
        ({"w": torch.zeros(0, 3)}, "empty"),
    ],
)
def test_unusable_input_raises_input_error(state, match):
    with pytest.raises(InputError, match=match):
        qlis.inspect(state)


def test_non_model_input_raises_input_error():
    with pytest.raises(InputError, match="nn.Module or a state dict"):
        qlis.inspect([torch.ones(2, 2)])


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
def test_beta_outside_unit_interval(beta):
    with pytest.raises(QlisError, match="beta"):
        qlis.inspect(torch.nn.Linear(3, 3), beta=beta)


def test_negative_eps():
    with pytest.raises(QlisError, match="eps"):
        qlis.inspect(torch.nn.Linear(3, 3), eps=-1e-3)


def test_a_float64_layer_past_float32s_range_has_its_sigma_and_is_pruned_by_it():
    torch.manual_seed(0)
    weight = torch.randn(64, 64, dtype=torch.float64)
    huge = weight * 1e100  # finite in float64, infinite as float32
    report = qlis.inspect({"w.weight": huge})
    sigma = float(huge.std(correction=0))
    assert report.layers[0].sigma == pytest.approx(sigma, rel=1e-12)
    pruned = qlis.compress({"w.weight": huge}, policy="prune", k=1.0).state_dict()["w.weight"]
    plain = qlis.compress({"w.weight": weight}, policy="prune", k=1.0).state_dict()["w.weight"]
    assert torch.equal(pruned == 0, plain == 0)  # the same weights, not all of them


@pytest.mark.parametrize("scale", [1e300, -1e300, 1e-300, 1.7e308 / 5])
def test_sigma_of_finite_float64_weights_whose_squares_overflow_or_underflow(scale):
    torch.manual_seed(0)
    weight = torch.randn(64, 64, dtype=torch.float64)
    expected = float(weight.std(correction=0)) * abs(scale)
    assert qlis.inspect({"w.weight": weight * scale}).layers[0].sigma == pytest.approx(
        expected, rel=1e-12)


def test_sigma_of_float64_weights_at_the_top_of_their_range():
    """2^1023 and more: the scale itself overflowed; +-1.7e308 summed to nan."""
    top = torch.tensor([[1e308, 1e308], [1e308, 1e308]], dtype=torch.float64)
    assert qlis.inspect({"w.weight": top}).layers[0].sigma == 0.0
    both = torch.tensor([[1.7e308, -1.7e308], [1.0, 0.0]], dtype=torch.float64)
    sigma = qlis.inspect({"w.weight": both}).layers[0].sigma
    scale = math.ldexp(1.0, 1000)
    assert sigma == pytest.approx(float((both / scale).std(correction=0)) * scale, rel=1e-12)


def test_a_mask_read_back_from_the_saved_first_pass_stays_a_mask(tmp_path):
    state = {"lin.weight": torch.randn(3, 3), "mask": torch.full((2, 2), torch.inf)}
    first = qlis.inspect(state, cache=PassCache(tmp_path / "out.qlis", "same input", False))
    cache = PassCache(tmp_path / "out.qlis", "same input", resume=True)
    again = qlis.inspect(state, cache=cache)
    assert cache.used and again.masks == first.masks == ["mask"]
    assert again.records() == first.records()
