"""Pruners: the sigma rule against float64 reference masks, FractionPruner, the registry."""

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
from qlis import ConfigError, FractionPruner, Pruner, SigmaPruner, get_pruner, register_pruner
from qlis.quantize.pruners import pruner_registry

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def weights(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    values = draw(
        st.lists(st.floats(-10, 10, width=32, allow_subnormal=False), min_size=2, max_size=300)
    )
    return torch.tensor(values).to(dtype)


def _check_mask(weight: torch.Tensor, k: float, mask: np.ndarray) -> None:
    """mask == (|w| >= k sigma) except where |w| is within float32 rounding of the threshold."""
    expected = ref.keep_mask(weight, k)
    w = np.abs(weight.double().numpy())
    threshold = k * weight.double().numpy().std()
    ambiguous = np.abs(w - threshold) <= 1e-6 * max(threshold, w.max())
    assert np.array_equal(mask[~ambiguous], expected[~ambiguous])


@given(weights(), st.sampled_from([1.5, 1.0, 0.5, 0.25]) | st.floats(0.01, 3))
def test_sigma_pruner_keeps_exactly_abs_above_k_sigma(weight, k):
    pruned, mask = SigmaPruner(k).prune(weight)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    _check_mask(weight, k, mask.numpy())
    # kept weights are bit-identical, pruned ones exact zeros, dtype unchanged
    assert pruned.dtype == weight.dtype
    assert torch.equal(pruned[mask], weight[mask])
    assert bool((pruned[~mask] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1.5, 1.0, 0.5, 0.25])
def test_pruned_fraction_equals_fraction_below_k_sigma(dtype, k):
    """Many stored values sit near the threshold in 16-bit floats: the count must be exact."""
    rng = np.random.default_rng(7)
    weight = ref.student_t((400, 500), 4.0, 0.02, rng).to(dtype)
    _, mask = SigmaPruner(k).prune(weight)
    w = weight.double().numpy()
    below = int((np.abs(w) < k * w.std()).sum())
    assert int((~mask).sum()) == below


def test_k_zero_keeps_everything_including_zeros():
    weight = torch.tensor([0.0, 1e-9, -3.0])
    pruned, mask = SigmaPruner(0).prune(weight)
    assert bool(mask.all()) and torch.equal(pruned, weight)


def test_constant_and_empty_layers():
    assert bool(SigmaPruner(1.0).keep_mask(torch.full((3, 3), 0.7)).all())
    pruned, mask = SigmaPruner(1.0).prune(torch.zeros(0, 4))
    assert pruned.shape == (0, 4) and mask.shape == (0, 4)


@pytest.mark.parametrize("k", [-0.5, float("nan"), float("inf"), "a", None, True])
def test_bad_k(k):
    with pytest.raises(ConfigError, match="k"):
        SigmaPruner(k)


@given(
    st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=200, unique=True),
    st.floats(0, 1),
)
def test_fraction_pruner_prunes_the_smallest_magnitudes(values, fraction):
    weight = torch.tensor(values)
    mask = FractionPruner(fraction).keep_mask(weight)
    n_prune = round(fraction * weight.numel())
    magnitude = weight.abs()
    # ties in |w| (x and -x) may prune a few more, never fewer
    assert (~mask).sum() >= n_prune
    if mask.any() and (~mask).any():
        assert magnitude[~mask].max() <= magnitude[mask].min()
    if len(set(magnitude.tolist())) == weight.numel():
        assert int((~mask).sum()) == n_prune


@pytest.mark.parametrize("fraction", [-0.1, 1.1])
def test_bad_fraction(fraction):
    with pytest.raises(ConfigError, match="fraction"):
        FractionPruner(fraction)


def test_builtin_pruners_are_registered_and_configs_round_trip():
    assert {"sigma", "fraction"} <= set(pruner_registry.names())
    assert get_pruner("sigma") == SigmaPruner()
    assert get_pruner({"id": "sigma", "k": 0.5}) == SigmaPruner(k=0.5)
    assert get_pruner("fraction") == FractionPruner()
    pruner = FractionPruner(fraction=0.3)
    assert pruner.get_config() == {"id": "fraction", "fraction": 0.3}
    assert get_pruner(pruner.get_config()) == pruner
    assert repr(SigmaPruner(k=1.5)) == "SigmaPruner(k=1.5)"


def test_unknown_pruner_and_bad_parameters():
    with pytest.raises(ConfigError, match="unknown pruner 'nope'.*sigma"):
        get_pruner("nope")
    with pytest.raises(ConfigError, match="unknown option 'kk' for pruner 'sigma'; known: k"):
        get_pruner({"id": "sigma", "kk": 1})


@pytest.fixture
def clean_registry(monkeypatch):
    """Registrations made by a test vanish afterwards; entry points are read afresh."""
    monkeypatch.setattr(pruner_registry, "_classes", dict(pruner_registry._classes))
    monkeypatch.setattr(pruner_registry, "_entry_points_loaded", False)
    return pruner_registry


class EveryOtherPruner(Pruner):
    """A user's pruner: keeps every ``step``-th weight of the flattened tensor."""

    strategy_id = "every-other"

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def keep_mask(self, weight: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(weight.numel(), dtype=torch.bool)
        mask[:: self.step] = True
        return mask.reshape(weight.shape)


def test_user_registered_pruner_is_found(clean_registry):
    register_pruner(EveryOtherPruner)
    pruner = get_pruner({"id": "every-other", "step": 3})
    assert isinstance(pruner, EveryOtherPruner) and pruner.step == 3
    pruned, _ = pruner.prune(torch.arange(1.0, 7.0))
    assert pruned.tolist() == [1.0, 0.0, 0.0, 4.0, 0.0, 0.0]
    assert "every-other" in clean_registry.names()


def test_pruner_found_through_an_entry_point(clean_registry, monkeypatch):
    groups = []

    def fake_entry_points(*, group):
        groups.append(group)
        return [SimpleNamespace(name="every-other", load=lambda: EveryOtherPruner)]

    monkeypatch.setattr(qlis.registry, "entry_points", fake_entry_points)
    assert "every-other" not in clean_registry._classes
    assert isinstance(get_pruner("every-other"), EveryOtherPruner)
    assert groups == ["qlis.pruners"]
    get_pruner("sigma")
    clean_registry.names()
    assert groups == ["qlis.pruners"]  # entry points are read once


def test_entry_point_does_not_replace_a_registered_name(clean_registry, monkeypatch):
    monkeypatch.setattr(
        qlis.registry,
        "entry_points",
        lambda *, group: [SimpleNamespace(name="sigma", load=lambda: EveryOtherPruner)],
    )
    assert "sigma" in clean_registry.names()
    assert isinstance(get_pruner("sigma"), SigmaPruner)


@pytest.mark.parametrize("policy, options", [("prune", {"k": 1.0}), ("lap", {})])
def test_a_pruned_layer_kept_in_float_is_estimated_as_the_sparse_record_it_is(
        tmp_path, policy, options):
    """Counted raw, pruned layers were estimated over the original model's size."""
    torch.manual_seed(0)
    state = {f"l{i}.weight": torch.randn(128, 128) for i in range(3)}
    result = qlis.compress(state, policy, **options)
    path = qlis.save(result, tmp_path / "m.qlis")
    assert result.estimated_bytes < result.original_bytes
    assert abs(path.stat().st_size / result.estimated_bytes - 1) < 0.02
