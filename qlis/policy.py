"""Policies: from QLIS scores to a per-layer plan (pruning multiplier k_l, bits b_l).

A policy is a small dataclass config (torchao style). Levels are listed from the least to
the most precise; a layer's position in those lists grows with its QLIS rank, so a higher
QLIS never gets fewer bits or a larger k. Two mappings:

- rank quantiles (default): the layers, ranked by QLIS, are cut into equal-size groups, one
  per level; the lowest-QLIS group gets the first (least precise) level.
- budget (``target_ratio``): the same ranking, shifted towards the less precise levels just
  enough that the paper's compression ratio reaches the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from qlis.errors import ConfigError
from qlis.quantize import GRANULARITIES

PAPER_K_LEVELS = (1.5, 1.0, 0.5, 0.25, 0.0)
PAPER_BITS_LEVELS = (1, 2, 4, 8)

Assignment = list[tuple[float, int | None]]


@dataclass(frozen=True)
class Policy:
    """How to choose (k, bits) per layer.

    ``k_levels`` and ``bits_levels`` run from the least to the most precise level; a single
    entry applies to every layer. ``bits=None`` keeps the layer in floating point.

    >>> make_policy("laq").bits_levels
    (1, 2, 4, 8)
    """

    name: str
    k_levels: tuple[float, ...] = (0.0,)
    bits_levels: tuple[int | None, ...] = (None,)
    granularity: str = "tensor"
    method: str = "affine"
    target_ratio: float | None = None

    def __post_init__(self) -> None:
        if not self.k_levels or not self.bits_levels:
            raise ConfigError("a policy needs at least one k level and one bits level")
        if any(not k >= 0 for k in self.k_levels):
            raise ConfigError(f"k levels must be >= 0, got {self.k_levels}")
        if list(self.k_levels) != sorted(self.k_levels, reverse=True):
            raise ConfigError(f"k levels must run from largest to smallest: {self.k_levels}")
        bits = [b for b in self.bits_levels if b is not None]
        if any(not isinstance(b, int) or not 1 <= b <= 8 for b in bits):
            raise ConfigError(f"bits must be whole numbers from 1 to 8, got {self.bits_levels}")
        if None in self.bits_levels and self.bits_levels[-1] is not None:
            raise ConfigError("'no quantization' (None) can only be the most precise bits level")
        if bits != sorted(bits):
            raise ConfigError(f"bits levels must go from fewest to most bits: {self.bits_levels}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}")
        if self.target_ratio is not None and not self.target_ratio >= 1.0:
            raise ConfigError(f"target_ratio must be >= 1, got {self.target_ratio}")

    def assign(
        self, qlis: np.ndarray, paper_bits: Callable[[Assignment], float] | None = None,
        original_bits: float | None = None,
    ) -> Assignment:
        """(k, bits) per layer, in the order of ``qlis``.

        In budget mode ``paper_bits(assignment)`` gives the model's paper-counted bits and
        ``original_bits`` its uncompressed bits.
        """
        quantiles = _rank_quantiles(np.asarray(qlis, dtype=np.float64))
        if self.target_ratio is None:
            return self._at(quantiles, 0.0)
        if paper_bits is None or original_bits is None:
            raise ConfigError("budget mode needs the model's bit costs")

        def reaches(shift: float) -> bool:
            return original_bits / paper_bits(self._at(quantiles, shift)) >= self.target_ratio

        if reaches(-1.0):
            return self._at(quantiles, -1.0)
        if not reaches(1.0):
            best = original_bits / paper_bits(self._at(quantiles, 1.0))
            raise ConfigError(
                f"target_ratio {self.target_ratio} is out of reach for policy {self.name!r}: "
                f"its least precise levels give a ratio of {best:.2f}"
            )
        lo, hi = -1.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
        return self._at(quantiles, hi)

    def _at(self, quantiles: np.ndarray, shift: float) -> Assignment:
        k_idx = _level_index(quantiles, len(self.k_levels), shift)
        b_idx = _level_index(quantiles, len(self.bits_levels), shift)
        return [
            (self.k_levels[i], self.bits_levels[j])
            for i, j in zip(k_idx.tolist(), b_idx.tolist(), strict=True)
        ]


def _rank_quantiles(scores: np.ndarray) -> np.ndarray:
    """Each score's rank as a fraction in [0, 1] (ties share a rank; a lone layer gets 1)."""
    if scores.size <= 1:
        return np.ones(scores.size)
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts + 1) / 2  # 0-based, ties averaged
    return average_rank[group] / (scores.size - 1)


def _level_index(quantiles: np.ndarray, n_levels: int, shift: float) -> np.ndarray:
    """Equal-size rank bins, moved by ``shift`` (-1: all most precise, 1: all least precise)."""
    return np.clip(np.floor((quantiles - shift) * n_levels), 0, n_levels - 1).astype(int)


_PRESETS = {
    "prune": {"k_levels": (1.0,)},
    "quant": {"bits_levels": (8,)},
    "lap": {"k_levels": PAPER_K_LEVELS},
    "laq": {"bits_levels": PAPER_BITS_LEVELS},
    "lapq": {"k_levels": PAPER_K_LEVELS, "bits_levels": PAPER_BITS_LEVELS},
}
POLICY_NAMES = tuple(_PRESETS)


def make_policy(policy: str | Policy, **options) -> Policy:
    """A Policy from a preset name and options (``k``/``bits`` set a uniform level).

    >>> make_policy("prune", k=0.5).k_levels, make_policy("quant", bits=4).bits_levels
    ((0.5,), (4,))
    """
    if isinstance(policy, Policy):
        if not options:
            return policy
        name = policy.name
        config = {f.name: getattr(policy, f.name) for f in fields(Policy) if f.name != "name"}
    elif policy in _PRESETS:
        name, config = policy, dict(_PRESETS[policy])
    else:
        raise ConfigError(f"unknown policy {policy!r}; choose one of {', '.join(POLICY_NAMES)}")
    if "k" in options:
        k = options.pop("k")
        if k is not None:
            config["k_levels"] = (float(k),)
    if "bits" in options:
        bits = options.pop("bits")
        if bits is not None:
            config["bits_levels"] = (bits,)
    known = {f.name for f in fields(Policy)} - {"name"}
    unknown = set(options) - known
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(sorted(unknown))} for policy {name!r}; "
            f"known: k, bits, {', '.join(sorted(known))}"
        )
    config.update({key: tuple(v) if key.endswith("_levels") else v for key, v in options.items()})
    return Policy(name=name, **config)
