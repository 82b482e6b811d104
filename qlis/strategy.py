"""The shape shared by pruners and quantizers: a small, self-describing, registered class.

Like a numcodecs codec, a strategy has an id, takes its parameters in ``__init__`` and can
round-trip them through plain JSON, so an archive can name the strategy that made a tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from qlis.config import Param, checked_init, config_id, init_parameters
from qlis.errors import ConfigError
from qlis.registry import construct


class Strategy:
    """Base of Pruner, Quantizer and Policy: an id plus JSON-serialisable constructor
    parameters, declared in ``params`` (`qlis.config.Param`), which every construction checks
    (a subclass that declares no ``params`` checks its own)."""

    strategy_id: ClassVar[str] = ""
    config_kind: ClassVar[str] = "strategy"  # "quantizer", "pruner", "policy": for messages
    params: ClassVar[Mapping[str, Param]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        checked_init(cls, lambda: f"{cls.config_kind} {cls.strategy_id!r}")

    def get_config(self) -> dict[str, Any]:
        """The id and every constructor parameter, as plain JSON."""
        config = {name: getattr(self, name) for name in init_parameters(type(self))}
        return {"id": self.strategy_id, **config}

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        """Rebuild the strategy from ``get_config()``'s output."""
        name, params = config_id(config, cls.config_kind)
        if name != cls.strategy_id:
            raise ConfigError(f"a config of {cls.config_kind} {name!r} given to "
                              f"{cls.strategy_id!r}")
        return construct(cls, params, f"{cls.config_kind} {cls.strategy_id!r}",
                         f"bad parameters for {cls.strategy_id!r}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "id")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(repr(self))
