"""Plans and extension points: hand-written plans, third-party pruner/quantizer/policy by name."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from typing import ClassVar

import numpy as np
import pytest
import torch

import qlis
from qlis import ConfigError, LayerConfig, Plan, QuantizedTensor
from qlis.plan.plans import finite_json
from qlis.plan.policy import PlanContext, Policy, make_policy, policy_registry, register_policy
from qlis.quantize.pruners import Pruner, pruner_registry, register_pruner
from qlis.quantize.quantizers import Quantizer, quantizer_registry, register_quantizer


@pytest.fixture
def clean_registries(monkeypatch):
    for registry in (pruner_registry, quantizer_registry, policy_registry):
        monkeypatch.setattr(registry, "_classes", dict(registry._classes))


class EveryOtherPruner(Pruner):
    """A user's pruner: zero every other weight (in flat order)."""

    strategy_id = "test-every-other"

    def __init__(self, phase: int = 0) -> None:
        self.phase = phase

    def keep_mask(self, weight: torch.Tensor) -> torch.Tensor:
        flat = torch.arange(weight.numel()) % 2 != self.phase
        return flat.reshape(weight.shape)


class SignQuantizer(Quantizer):
    """A user's quantizer: sign only (codes 0/1/2 for -1/0/+1), scale 1."""

    strategy_id = "test-sign"

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        codes = (torch.sign(weight.float()) + 1).to(torch.uint8).numpy()
        return QuantizedTensor(codes, 3, self.get_config(), {}, weight.dtype)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        return (torch.from_numpy(q.codes).float() - 1).to(q.dtype)


@dataclass(frozen=True)
class BiggestLayerPolicy(Policy):
    """A user's policy: quantize only the largest layer, with the quantizer it names."""

    strategy_id: ClassVar[str] = "test-biggest"
    quantizer: str = "test-sign"

    def make_plan(self, context: PlanContext) -> Plan:
        biggest = max(context.report.layers, key=lambda layer: layer.numel)
        return Plan({biggest.name: LayerConfig(quantizer={"id": self.quantizer})})


def test_hand_written_plan_is_executed_and_recorded(tiny_state):
    plan = {
        "head.weight": {"quantizer": {"id": "affine", "bits": 4, "granularity": "channel"}},
        "blocks.0.fc1.weight": {"pruner": {"id": "fraction", "fraction": 0.5}},
    }
    result = qlis.compress(tiny_state, plan=plan)
    assert [p.name for p in result.layers] == list(plan)
    head, fc1 = result.layers
    assert head.bits == 4 and isinstance(result.tensors["head.weight"], QuantizedTensor)
    assert result.tensors["head.weight"].quantizer["granularity"] == "channel"
    assert fc1.bits is None and fc1.k is None and fc1.sparsity == pytest.approx(0.5, abs=0.01)
    untouched = set(tiny_state) - set(plan)
    assert all(result.tensors[n].data_ptr() == tiny_state[n].data_ptr() for n in untouched)
    assert result.config["plan"] == Plan(plan).to_json()
    assert result.config["policy"]["id"] == "plan"
    json.dumps(result.config, allow_nan=False)  # plain JSON, archive-ready
    again = qlis.compress(tiny_state, plan=result.config["plan"])  # a result can be re-made
    for name in plan:
        assert torch.equal(again.state_dict()[name], result.state_dict()[name])


@pytest.mark.parametrize(
    "plan, match",
    [
        ({"nope.weight": {}}, "does not have"),
        ({"blocks.0.fc1.weight": {"quantizer": "affine"}}, "must be a dict with an 'id'"),
        ({"blocks.0.fc1.weight": {"quantiser": {"id": "affine"}}}, "unknown plan key"),
        ({"blocks.0.fc1.weight": {"quantizer": {"id": "nope"}}}, "unknown quantizer"),
        ({"blocks.0.fc1.weight": {"pruner": {"id": "sigma", "k": float("inf")}}}, "JSON"),
        ({"position_ids": {"quantizer": {"id": "affine"}}}, "not a floating-point"),
    ],
)
def test_bad_plans_are_refused(tiny_state, plan, match):
    with pytest.raises(ConfigError, match=match):
        qlis.compress(tiny_state, plan=plan)


def test_plan_and_policy_options_are_exclusive(tiny_state):
    with pytest.raises(ConfigError, match="either plan"):
        qlis.compress(tiny_state, "lapq", plan={})
    with pytest.raises(ConfigError, match="either plan"):
        qlis.compress(tiny_state, plan={}, bits=4)


def test_third_party_pruner_quantizer_and_policy_by_name(tiny_state, clean_registries):
    register_pruner(EveryOtherPruner)
    register_quantizer(SignQuantizer)
    register_policy(BiggestLayerPolicy)
    assert "test-biggest" in qlis.policy_names()

    pruned = qlis.compress(tiny_state, "prune", pruner={"id": "test-every-other", "phase": 1})
    assert {tuple(sorted(p.pruner.items())) for p in pruned.layers} == {
        (("id", "test-every-other"), ("phase", 1))
    }
    head = pruned.state_dict()["head.weight"].reshape(-1)
    assert bool((head[1::2] == 0).all())

    quantized = qlis.compress(tiny_state, "quant", quantizer={"id": "test-sign"})
    assert all(p.quantizer == {"id": "test-sign"} for p in quantized.layers)
    assert set(np.unique(quantized.state_dict()["head.weight"].numpy())) <= {-1.0, 0.0, 1.0}

    biggest = qlis.compress(tiny_state, "test-biggest")
    assert isinstance(biggest.policy, BiggestLayerPolicy)
    assert len(biggest.layers) == 1 and biggest.layers[0].quantizer == {"id": "test-sign"}
    assert biggest.config["policy"] == {"id": "test-biggest", "quantizer": "test-sign"}


def test_policy_from_an_entry_point(tiny_state, clean_registries, monkeypatch):
    monkeypatch.setattr(policy_registry, "_entry_points_loaded", False)
    register_quantizer(SignQuantizer)
    point = EntryPoint("test-biggest", f"{__name__}:BiggestLayerPolicy", "qlis.policies")
    monkeypatch.setattr(
        "qlis.registry.entry_points",
        lambda group: [point] if group == "qlis.policies" else [],
    )
    result = qlis.compress(tiny_state, "test-biggest")
    assert type(result.policy).__name__ == "BiggestLayerPolicy"


def test_make_policy_keeps_the_subclass_and_refuses_unknown_options():
    policy = BiggestLayerPolicy()
    changed = make_policy(policy, quantizer="affine")
    assert type(changed) is BiggestLayerPolicy and changed.quantizer == "affine"
    with pytest.raises(ConfigError, match="unknown option"):
        make_policy(policy, bits=4)
    lapq = make_policy("lapq")
    assert type(make_policy(lapq, bits=4)).__name__ == "LAPQPolicy"


def test_granularity_is_passed_to_custom_quantizers_or_refused(tiny_state, clean_registries):
    register_quantizer(SignQuantizer)
    with pytest.raises(ConfigError, match="no 'bits' parameter"):
        qlis.compress(tiny_state, "quant", method="test-sign")
    with pytest.raises(ConfigError, match="no granularity"):
        qlis.compress(tiny_state, "quant", method="kmeans", granularity="channel", bits=3)
    with pytest.raises(ConfigError, match="no 'bits' parameter"):
        qlis.compress(tiny_state, "quant", method="uniform", bits=4)


def test_finite_json_refuses_infinity():
    with pytest.raises(ConfigError, match="finite"):
        finite_json({"k": float("inf")}, "the config")
    assert finite_json({"k": 1.5}, "the config") == {"k": 1.5}
