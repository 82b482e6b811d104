"""A Plan: layer name -> what to do with that layer (a pruner config, a quantizer config).

Every policy produces a Plan and ``qlis.compress`` executes one, so a hand-written plan, the
paper's QLIS policies and the rate–distortion allocator all meet in one plain-JSON object
that the archive records (torchao's per-module configs, in JSON).

>>> plan = Plan({"fc.weight": {"quantizer": {"id": "uniform", "rel_mse": 1e-4}}})
>>> plan["fc.weight"].quantizer["id"], plan.to_json()["fc.weight"]["pruner"]
('uniform', None)
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from qlis.config import shown
from qlis.errors import ConfigError
from qlis.quantize.pruners import get_pruner
from qlis.quantize.quantizers import get_quantizer


def _plain_number(value: object) -> int | float:
    """A numpy (or other) number as JSON writes it, as the policies' options take them;
    anything else is not JSON."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _check_config(config: object, kind: str, layer: str) -> dict | None:
    """A strategy config: None, or a JSON object with a string ``id`` and finite JSON values
    that its registered class accepts (a bad plan fails when it is made, not mid-way)."""
    if config is None:
        return None
    if not isinstance(config, Mapping) or not isinstance(config.get("id"), str):
        raise ConfigError(
            f"layer {layer!r}: the {kind} must be a dict with an 'id', got {shown(config)}"
        )
    try:
        text = json.dumps(dict(config), allow_nan=False, default=_plain_number)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"layer {layer!r}: the {kind} config is not plain JSON ({err})") from None
    try:
        (get_pruner if kind == "pruner" else get_quantizer)(config)
    except ConfigError as err:
        raise ConfigError(f"layer {layer!r}: {err}") from None
    return json.loads(text)


@dataclass(frozen=True)
class LayerConfig:
    """What happens to one layer: prune with ``pruner`` then quantize with ``quantizer``.

    Both are strategy configs (``{"id": ..., **params}``) or None (skip that step); a layer
    with neither is kept exactly as it is.
    """

    pruner: dict | None = None
    quantizer: dict | None = None

    def to_json(self) -> dict[str, Any]:
        return {"pruner": self.pruner, "quantizer": self.quantizer}

    @property
    def unchanged(self) -> bool:
        """Neither pruned nor quantized: the layer is stored exactly as it is."""
        return self.pruner is None and self.quantizer is None

    @property
    def k(self) -> float | None:
        """The paper's k: the sigma pruner's multiplier, 0 without pruning, None for other
        pruners."""
        if self.pruner is None:
            return 0.0
        if self.pruner.get("id") == "sigma":
            return float(self.pruner.get("k", 1.0))
        return None

    @property
    def bits(self) -> int | None:
        """The quantizer's nominal bits, when it has them (1 for binary)."""
        if not self.quantizer:
            return None
        bits = getattr(get_quantizer(self.quantizer), "bits", None)
        return bits if isinstance(bits, int) else None


class Plan(Mapping[str, LayerConfig]):
    """An ordered mapping of layer names to LayerConfig; immutable, JSON round-trippable."""

    def __init__(self, layers: Mapping[str, LayerConfig | Mapping]) -> None:
        if not isinstance(layers, Mapping):
            raise ConfigError(f"a plan maps layer names to configs, got {type(layers).__name__}")
        self._layers: dict[str, LayerConfig] = {}
        for name, config in layers.items():
            if not isinstance(name, str):
                raise ConfigError(f"plan keys are layer names (strings), got {shown(name)}")
            self._layers[name] = _layer_config(name, config)

    @classmethod
    def coerce(cls, plan: Plan | Mapping) -> Plan:
        """A Plan from a Plan or a plain dict (as ``to_json`` writes it)."""
        return plan if isinstance(plan, Plan) else cls(plan)

    def to_json(self) -> dict[str, dict]:
        return {name: config.to_json() for name, config in self._layers.items()}

    def __getitem__(self, name: str) -> LayerConfig:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return f"Plan({len(self)} layers)"


def _layer_config(name: str, config: LayerConfig | Mapping) -> LayerConfig:
    if isinstance(config, LayerConfig):
        config = config.to_json()
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"layer {name!r}: expected a dict with 'pruner'/'quantizer', got {shown(config)}"
        )
    unknown = set(config) - {"pruner", "quantizer"}
    if unknown:
        raise ConfigError(
            f"layer {name!r}: unknown plan key(s) {', '.join(sorted(map(str, unknown)))}"
        )
    return LayerConfig(
        pruner=_check_config(config.get("pruner"), "pruner", name),
        quantizer=_check_config(config.get("quantizer"), "quantizer", name),
    )


def finite_json(value: Any, what: str) -> Any:
    """``value`` as plain JSON; non-finite floats are refused (JSON has no Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{what} must be finite, got {value}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what} is not plain finite JSON ({err})") from None
