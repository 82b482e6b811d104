"""Policies: something that looks at a model and produces a Plan (qlis/plan/plans.py).

A policy is a small frozen dataclass config (torchao style), registered by id like the
pruners and quantizers, so a third party adds one with ``@register_policy`` or the
``qlis.policies`` entry-point group and uses it by name from Python and from ``qlis pack``.

The paper's policies (``prune``, ``quant``, ``lap``, ``laq``, ``lapq``) map QLIS ranks to
levels. Levels run from the least to the most precise; a layer's position in them grows with
its QLIS rank, so a higher QLIS never gets fewer bits or a larger k. Two mappings:

- rank quantiles (default): the layers, ranked by QLIS, are cut into equal-size groups, one
  per level; the lowest-QLIS group gets the first (least precise) level.
- budget (``paper_cr``): the same ranking, shifted towards the less precise levels just
  enough that the paper's idealised compression ratio (CR) reaches the target. (qlis' own
  ``target_ratio`` is the real archive ratio, which policy ``rd`` reaches.)

The rate–distortion policy ``rd`` lives in qlis/plan/rd.py.
"""

from __future__ import annotations

import inspect as _inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from qlis.archive.resume import PassCache
from qlis.config import Param, check_options
from qlis.errors import ConfigError
from qlis.models.tensors import storage_bits, tensor_layout
from qlis.plan.execute import Realized, pruned_count
from qlis.plan.plans import LayerConfig, Plan, finite_json
from qlis.quantize.pruners import get_pruner
from qlis.quantize.quantizers import (
    GRANULARITY,
    QuantizedTensor,
    get_quantizer,
    quantizer_registry,
)
from qlis.registry import Registry
from qlis.strategy import Strategy
from qlis.workers.cluster import Cluster

if TYPE_CHECKING:
    from qlis.measure.calibrate import Calibration
    from qlis.measure.stats import InspectionReport
    from qlis.plan.compress import CompressionResult

PAPER_K_LEVELS = (1.5, 1.0, 0.5, 0.25, 0.0)
PAPER_BITS_LEVELS = (1, 2, 4, 8)
_SHORTCUT_K = Param("float", 0, optional=True)  # LevelsPolicy's k= and bits= shortcuts
_SHORTCUT_BITS = Param("int", 1, 8, optional=True)

Assignment = list[tuple[float, int | None]]


@dataclass
class PlanContext:
    """What a policy may look at: the tensors, their QLIS report, and (optionally) the module
    with its calibration data. ``progress`` takes the parameters of each layer the policy has
    measured. ``realize`` executes a plan as the compression will (reconstructed, with error
    feedback): the tensors it changes, as the model computes with them, and its layers' coded
    bytes. ``jobs``: threads for per-layer work, ``cluster``: the ranks that share it,
    ``cache``: results of an interrupted run to reuse (qlis.workers.cluster.spread)."""

    state: Mapping[str, torch.Tensor]
    report: InspectionReport
    model: torch.nn.Module | None = None
    calibration: Calibration | None = None
    progress: Callable[[int], None] | None = None
    realize: Callable[[Plan], Realized] | None = None
    jobs: int | None = None
    cluster: Cluster | None = None
    cache: PassCache | None = None


class Policy(Strategy):
    """Base class: a config that produces a Plan. Subclasses implement ``make_plan``; a
    dataclass policy declares its fields in ``params`` (checked on construction, then the
    rules between them in ``check``)."""

    config_kind = "policy"
    ranks_by_score: ClassVar[bool] = True
    """Whether ``make_plan`` reads the layers' QLIS scores. The exact value entropy they need
    is the costliest measure of a data-free pack (a quarter of its CPU time on a ViT-L/14), so
    a policy that does not rank by them is given a report without them (``None``)."""

    def __post_init__(self) -> None:
        if self.params:
            current = {f.name: getattr(self, f.name) for f in fields(self)}
            checked = check_options(self.params, current, f"policy {self.strategy_id!r}")
            for name, value in checked.items():
                object.__setattr__(self, name, value)  # the kept form (lists as tuples)
        self.check()

    def check(self) -> None:
        """Rules between options (each option alone was checked against ``params``)."""

    def make_plan(self, context: PlanContext) -> Plan:
        raise NotImplementedError

    def check_reach(self, state: Mapping[str, torch.Tensor], report: InspectionReport) -> None:
        """Refuse, before any calibration pass, a target this policy can tell from the
        tensors alone is out of reach (rd: a size below the archive's fixed part)."""

    def stored_rest(self, tensor: torch.Tensor) -> torch.Tensor | QuantizedTensor:
        """How a tensor outside the plan (a bias, a norm, a buffer) is stored: as it is."""
        return tensor

    def review(self, result: CompressionResult) -> list[str]:
        """Warnings about the executed result (e.g. a quality target that was missed)."""
        return []

    def size_target_bytes(self, original_bytes: float, numel: int) -> float | None:
        """The archive size, in real bytes, a size target of this policy asks for (None: it
        has none; the paper's budgets count idealised bits, not bytes)."""
        return None

    @classmethod
    def from_options(cls, **options: Any) -> Policy:
        """The policy built from keyword options (``make_policy``'s entry point)."""
        known = [n for n in _inspect.signature(cls).parameters if n != "self"]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} for policy {cls.strategy_id!r}; "
                f"known: {', '.join(known)}"
            )
        return cls(**options)

    def get_config(self) -> dict[str, Any]:
        return finite_json(super().get_config(), f"policy {self.strategy_id!r} options")


policy_registry: Registry[Policy] = Registry("policy", "qlis.policies", base=Policy,
                                            builtins=("qlis.plan.rd",))


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Register a Policy subclass under its ``strategy_id`` (usable as a decorator)."""
    policy_registry.register(cls.strategy_id, cls)
    return cls


def policy_names() -> list[str]:
    """Every registered policy id (entry points included)."""
    return policy_registry.names()


@register_policy
@dataclass(frozen=True)
class LevelsPolicy(Policy):
    """The paper's scheme with levels of your choice: QLIS rank -> (k, bits) per layer.

    ``k_levels`` and ``bits_levels`` run from the least to the most precise level; a single
    entry applies to every layer. ``bits=None`` keeps the layer in floating point. ``method``
    names the quantizer used for each bits level (the paper: ``affine``, with the binary
    quantizer at 1 bit); ``quantizer``/``pruner`` (configs) instead apply one fixed
    strategy to every layer, replacing the bits/k levels.

    >>> make_policy("laq").bits_levels
    (1, 2, 4, 8)
    """

    strategy_id: ClassVar[str] = "levels"
    params = {
        "k_levels": Param("float", 0, sequence=True, non_empty=True),
        "bits_levels": Param("int", 1, 8, sequence=True, non_empty=True, items_optional=True),
        "granularity": GRANULARITY,
        "method": Param("str"),
        "paper_cr": Param("float", 1, optional=True),
        "pruner": Param("config", optional=True),
        "quantizer": Param("config", optional=True),
    }

    k_levels: tuple[float, ...] = (0.0,)
    bits_levels: tuple[int | None, ...] = (None,)
    granularity: str = "tensor"
    method: str = "affine"
    paper_cr: float | None = None
    pruner: dict | None = None
    quantizer: dict | None = None

    def check(self) -> None:
        if list(self.k_levels) != sorted(self.k_levels, reverse=True):
            raise ConfigError(f"k levels must run from largest to smallest: {self.k_levels}")
        bits = [b for b in self.bits_levels if b is not None]
        if None in self.bits_levels and self.bits_levels[-1] is not None:
            raise ConfigError("'no quantization' (None) can only be the most precise bits level")
        if bits != sorted(bits):
            raise ConfigError(f"bits levels must go from fewest to most bits: {self.bits_levels}")
        # a bad config fails now, not after the scoring; a bare id becomes its full config
        if self.pruner is not None:
            object.__setattr__(self, "pruner", get_pruner(self.pruner).get_config())
        if self.quantizer is not None:
            object.__setattr__(self, "quantizer", get_quantizer(self.quantizer).get_config())
        else:
            for b in bits:
                self.level_quantizer(b)

    @classmethod
    def from_options(cls, **options: Any) -> LevelsPolicy:
        """Options, with ``k``/``bits`` as shortcuts for a single uniform level (None: keep).
        ``target_ratio`` is refused by name: it means real archive bytes everywhere in qlis,
        which the paper's levels cannot aim at (their budget is ``paper_cr``)."""
        if options.get("target_ratio") is not None:
            raise ConfigError(
                "target_ratio is the real archive ratio, which policy 'rd' reaches; the paper's "
                "policies aim at its idealised CR: pass paper_cr= (qlis pack --paper-cr)")
        options.pop("target_ratio", None)
        k = _SHORTCUT_K.check(options.pop("k", None), f"policy {cls.strategy_id!r}: k")
        bits = _SHORTCUT_BITS.check(options.pop("bits", None), f"policy {cls.strategy_id!r}: bits")
        if k is not None:
            if options.get("pruner") is not None:
                raise ConfigError("give either k (sigma pruning) or pruner=, not both")
            if options.get("k_levels") is not None:  # k would replace them unseen
                raise ConfigError("give either k (one level) or k_levels, not both")
            options["k_levels"] = (k,)
        if bits is not None:
            if options.get("quantizer") is not None:
                raise ConfigError("give either bits or quantizer=, not both")
            if options.get("bits_levels") is not None:
                raise ConfigError("give either bits (one level) or bits_levels, not both")
            options["bits_levels"] = (bits,)
        return super().from_options(**options)

    def level_quantizer(self, bits: int | None) -> dict | None:
        """The quantizer config of a bits level (None: keep floating point)."""
        if bits is None:
            return None
        if self.quantizer is not None:
            return dict(self.quantizer)
        return quantizer_registry.get(self.method).config_for_bits(bits, self.granularity)

    def level_pruner(self, k: float) -> dict | None:
        """The pruner config of a k level (None: no pruning)."""
        if self.pruner is not None:
            return dict(self.pruner)
        return {"id": "sigma", "k": float(k)} if k > 0 else None

    def assign(
        self, qlis: np.ndarray, paper_bits: Callable[[Assignment], float] | None = None,
        original_bits: float | None = None,
    ) -> Assignment:
        """(k, bits) per layer, in the order of ``qlis``.

        In budget mode ``paper_bits(assignment)`` gives the model's paper-counted bits and
        ``original_bits`` its uncompressed bits.
        """
        quantiles = _rank_quantiles(np.asarray(qlis, dtype=np.float64))
        if self.paper_cr is None:
            return self._at(quantiles, 0.0)
        if paper_bits is None or original_bits is None:
            raise ConfigError("budget mode needs the model's bit costs")

        def reaches(shift: float) -> bool:
            return original_bits / paper_bits(self._at(quantiles, shift)) >= self.paper_cr

        if reaches(-1.0):
            return self._at(quantiles, -1.0)
        if not reaches(1.0):
            best = original_bits / paper_bits(self._at(quantiles, 1.0))
            raise ConfigError(
                f"paper_cr {self.paper_cr} is out of reach for policy "
                f"{self.strategy_id!r}: its least precise levels give a paper CR of {best:.2f}"
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

    def make_plan(self, context: PlanContext) -> Plan:
        if (self.quantizer is None and self.pruner is None and not any(self.k_levels)
                and all(bits is None for bits in self.bits_levels)):
            raise ConfigError("these levels neither prune nor quantize any layer: give "
                              "bits_levels or k_levels (or another policy)")
        scores = np.array([layer.QLIS for layer in context.report.layers])
        if self.paper_cr is None:
            assignment = self.assign(scores)
        else:
            state = context.state
            assignment = self.assign(
                scores, self._paper_bits(state, context.report),
                sum(t.numel() * storage_bits(t.dtype) for t in tensor_layout(state).values()),
            )
        return Plan({
            layer.name: LayerConfig(pruner=self.level_pruner(k), quantizer=self.level_quantizer(b))
            for layer, (k, b) in zip(context.report.layers, assignment, strict=True)
        })

    def _paper_bits(self, state: dict, report: InspectionReport) -> Callable[[Assignment], float]:
        """Paper bits of any assignment, from kept-weight counts measured once per (layer, k)."""

        kept = []
        for layer in report.layers:
            weight = state[layer.name]
            counts = {}
            for k in self.k_levels:
                config = self.level_pruner(k)
                pruned = get_pruner(config).prune(weight)[0] if config else weight
                counts[k] = weight.numel() - pruned_count(weight, pruned)
            kept.append(counts)
        layout = tensor_layout(state)
        widths = [storage_bits(layout[layer.name].dtype) for layer in report.layers]
        selected = {layer.name for layer in report.layers}
        fixed = sum(
            t.numel() * storage_bits(t.dtype) for n, t in layout.items() if n not in selected
        )

        def paper_bits(assignment: Assignment) -> float:
            return fixed + sum(
                kept[i][k] * (bits if bits is not None else widths[i])
                for i, (k, bits) in enumerate(assignment)
            )

        return paper_bits


@register_policy
@dataclass(frozen=True)
class PlanPolicy(Policy):
    """A hand-written plan, as a policy: ``compress(model, plan=...)`` runs this."""

    strategy_id: ClassVar[str] = "plan"
    params = {"plan": Param("config", optional=True)}

    plan: dict | None = None

    def check(self) -> None:
        Plan.coerce(self.plan or {})

    def make_plan(self, context: PlanContext) -> Plan:
        return Plan.coerce(self.plan or {})


def _preset(policy_id: str, doc: str, **defaults: Any) -> type[LevelsPolicy]:
    """A registered LevelsPolicy subclass whose level defaults are the paper's preset."""
    namespace: dict[str, Any] = {"__doc__": doc, "__annotations__": {}}
    namespace["strategy_id"] = policy_id
    for key, value in defaults.items():
        namespace[key] = value
        namespace["__annotations__"][key] = "tuple"
    cls = type(f"{policy_id.upper()}Policy", (LevelsPolicy,), namespace)
    cls.__module__ = __name__
    return register_policy(dataclass(frozen=True)(cls))


PrunePolicy = _preset("prune", "Every layer pruned at one sigma multiplier k (default 1).",
                      k_levels=(1.0,))
QuantPolicy = _preset("quant", "Every layer quantized to one bit width (default 8).",
                      bits_levels=(8,))
LAPPolicy = _preset("lap", "The paper's LAP: k from QLIS rank.", k_levels=PAPER_K_LEVELS)
LAQPolicy = _preset("laq", "The paper's LAQ: bits from QLIS rank.", bits_levels=PAPER_BITS_LEVELS)
LAPQPolicy = _preset("lapq", "The paper's LAPQ: k and bits from QLIS rank.",
                     k_levels=PAPER_K_LEVELS, bits_levels=PAPER_BITS_LEVELS)
PAPER_POLICIES = ("prune", "quant", "lap", "laq", "lapq")


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


def make_policy(policy: str | Policy, **options: Any) -> Policy:
    """A policy from a registered id (or an instance) and options; the class is kept.

    >>> make_policy("prune", k=0.5).k_levels, make_policy("quant", bits=4).bits_levels
    ((0.5,), (4,))
    """
    if isinstance(policy, Policy):
        if not options:
            return policy
        if is_dataclass(policy):
            current = {f.name: getattr(policy, f.name) for f in fields(policy)}
        else:
            current = {k: v for k, v in policy.get_config().items() if k != "id"}
        if isinstance(policy, LevelsPolicy):
            if options.get("pruner") is not None or options.get("k") is not None:
                current.pop("k_levels")
            if options.get("quantizer") is not None or options.get("bits") is not None:
                current.pop("bits_levels")
        return type(policy).from_options(**{**current, **options})
    if not isinstance(policy, str):
        raise ConfigError(f"policy must be a name or a Policy, got {type(policy).__name__}")
    return policy_registry.get(policy).from_options(**options)
