"""Pruners: which weights of a layer become exactly zero.

A pruner returns a keep-mask; ``prune`` applies it. The paper's LAP uses the sigma threshold
(|w| < k * sigma -> 0) with a per-layer k; ``FractionPruner`` shows how a user adds their own.
"""

from __future__ import annotations

import torch

from qlis.config import Param, config_id
from qlis.measure.distortion import population_std
from qlis.models.tensors import smallest_at_least
from qlis.registry import Registry
from qlis.strategy import Strategy


class Pruner(Strategy):
    """Decides which weights to keep. Subclasses implement ``keep_mask``."""

    config_kind = "pruner"

    def keep_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """A bool tensor shaped like ``weight``: True where the weight is kept."""
        raise NotImplementedError

    def prune(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pruned weight with exact zeros, keep mask)."""
        mask = self.keep_mask(weight)
        return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype)), mask


pruner_registry: Registry[Pruner] = Registry("pruner", "qlis.pruners", base=Pruner)


def register_pruner(cls: type[Pruner]) -> type[Pruner]:
    """Register a Pruner subclass under its ``strategy_id`` (usable as a decorator)."""
    pruner_registry.register(cls.strategy_id, cls)
    return cls


def get_pruner(config: dict | str) -> Pruner:
    """A pruner from its config dict (or a bare id with default parameters)."""
    name, options = config_id(config, "pruner")
    return pruner_registry.get(name).from_config({"id": name, **options})


@register_pruner
class SigmaPruner(Pruner):
    """Zero every weight with |w| < k * sigma (sigma: population std of the layer); k=0 keeps all.

    >>> SigmaPruner(k=0.5).prune(torch.tensor([-2.0, 0.1, 3.0]))[0]
    tensor([-2.,  0.,  3.])
    """

    strategy_id = "sigma"
    params = {"k": Param("float", 0)}

    def __init__(self, k: float = 1.0) -> None:
        self.k = k

    def threshold(self, weight: torch.Tensor) -> float:
        if weight.numel() == 0:
            return 0.0
        return self.k * population_std(weight.detach().reshape(-1))

    def keep_mask(self, weight: torch.Tensor) -> torch.Tensor:
        if self.k == 0:
            return torch.ones_like(weight, dtype=torch.bool)
        return weight.abs() >= smallest_at_least(self.threshold(weight), weight.dtype)


@register_pruner
class FractionPruner(Pruner):
    """Zero the ``fraction`` of weights with the smallest magnitude (ties may prune a few more).

    >>> FractionPruner(fraction=0.5).prune(torch.tensor([-2.0, 0.1, 3.0, -0.2]))[0]
    tensor([-2.,  0.,  3.,  0.])
    """

    strategy_id = "fraction"
    params = {"fraction": Param("float", 0, 1)}

    def __init__(self, fraction: float = 0.5) -> None:
        self.fraction = fraction

    def keep_mask(self, weight: torch.Tensor) -> torch.Tensor:
        n_prune = int(round(self.fraction * weight.numel()))
        if n_prune == 0:
            return torch.ones_like(weight, dtype=torch.bool)
        magnitude = weight.abs().reshape(-1).float()
        cut = magnitude.kthvalue(n_prune).values
        return (weight.abs() > cut).reshape(weight.shape)
