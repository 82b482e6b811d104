"""Pruners: which weights of a layer become exactly zero.

A pruner returns a keep-mask; ``prune`` applies it. The paper's LAP uses the sigma threshold
(|w| < k * sigma -> 0) with a per-layer k; ``FractionPruner`` shows how a user adds their own.
"""

from __future__ import annotations

import math

import torch

from qlis.errors import ConfigError
from qlis.registry import Registry
from qlis.strategy import Strategy
from qlis.tensors import smallest_at_least


class Pruner(Strategy):
    """Decides which weights to keep. Subclasses implement ``keep_mask``."""

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
    config = {"id": config} if isinstance(config, str) else config
    return pruner_registry.get(config["id"]).from_config(config)


@register_pruner
class SigmaPruner(Pruner):
    """Zero every weight with |w| < k * sigma (sigma: population std of the layer); k=0 keeps all.

    >>> SigmaPruner(k=0.5).prune(torch.tensor([-2.0, 0.1, 3.0]))[0]
    tensor([-2.,  0.,  3.])
    """

    strategy_id = "sigma"

    def __init__(self, k: float = 1.0) -> None:
        if isinstance(k, bool) or not isinstance(k, int | float) or not 0 <= k < math.inf:
            raise ConfigError(f"pruning multiplier k must be a finite number >= 0, got {k!r}")
        self.k = float(k)

    def threshold(self, weight: torch.Tensor) -> float:
        if weight.numel() == 0:
            return 0.0
        return self.k * float(weight.float().std(correction=0))

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

    def __init__(self, fraction: float = 0.5) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"fraction must be in [0, 1], got {fraction}")
        self.fraction = float(fraction)

    def keep_mask(self, weight: torch.Tensor) -> torch.Tensor:
        n_prune = int(round(self.fraction * weight.numel()))
        if n_prune == 0:
            return torch.ones_like(weight, dtype=torch.bool)
        magnitude = weight.abs().reshape(-1).float()
        cut = magnitude.kthvalue(n_prune).values
        return (weight.abs() > cut).reshape(weight.shape)
