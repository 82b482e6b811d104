"""Per-layer statistics and the QLIS score (DESIGN.md, the paper's equations 4-8).

Every statistic is a pure function of the stored tensor. The entropy is exact over the stored
bit patterns (32-bit for float32, 16-bit for float16/bfloat16) and runs in compiled loops, so
that scoring a 300M-parameter model takes seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from qlis.archive.codecs import symbol_histogram
from qlis.archive.resume import PassCache
from qlis.compiled import njit
from qlis.config import Param, check_instance, check_options
from qlis.errors import InputError
from qlis.measure.distortion import peak_abs, population_std
from qlis.measure.select import SelectSpec, make_selector
from qlis.models.tensors import (
    as_state_dict,
    bit_patterns,
    smallest_at_least,
    split_aliases,
    storage_bits,
    tensor_layout,
)
from qlis.workers.cluster import Cluster, spread

RECORD_KEYS = ("name", "shape", "numel", "dtype", "sigma", "P", "E", "S", "EWDS", "QLIS")


@njit(cache=True, nogil=True)
def _scan_u32(values: np.ndarray, small_below: int) -> tuple[float, int]:
    """(sum of c*log2(c) over distinct values' counts, number of |value| patterns < small_below).

    Values are bucketed by their high 16 bits, then counted by their low 16 bits in a small
    table that stays in cache: a linear-time exact distinct count.
    """
    n = values.size
    start = np.zeros(65537, np.int64)
    n_small = 0
    for i in range(n):
        v = values[i]
        start[(v >> 16) + 1] += 1
        if (v & 0x7FFFFFFF) < small_below:
            n_small += 1
    for j in range(65536):
        start[j + 1] += start[j]
    pos = start[:-1].copy()
    low = np.empty(n, np.uint16)
    for i in range(n):
        high = values[i] >> 16
        low[pos[high]] = values[i] & 0xFFFF
        pos[high] += 1
    counts = np.zeros(65536, np.int64)
    acc = 0.0
    for b in range(65536):
        s = start[b]
        e = start[b + 1]
        for i in range(s, e):
            counts[low[i]] += 1
        for i in range(s, e):
            c = counts[low[i]]
            if c:
                acc += c * math.log2(c)
                counts[low[i]] = 0
    return acc, n_small


_TABLES_FROM = 1 << 12
"""Smaller tensors are counted by sorting: the 65,536-entry tables of the counting passes
cost ~0.1 ms a tensor, 1 s of an inspect of 10,000 small ones."""


def _small_threshold_pattern(eps: float, dtype: torch.dtype) -> int:
    """The bit pattern p of the smallest ``dtype`` value >= eps: |x| < eps iff |x|'s pattern < p.
    ``eps`` is >= 0, but may be -0.0, whose pattern (the sign bit alone) is above every |x|'s:
    it is taken as the 0 it equals."""
    return int(bit_patterns(smallest_at_least(abs(eps), dtype).reshape(1))[0])


def _scan(tensor: torch.Tensor, eps: float) -> tuple[float, float]:
    """(entropy in bits, fraction with |x| < eps) of a floating tensor, in one compiled pass."""
    n = tensor.numel()
    patterns = bit_patterns(tensor).reshape(-1)
    small_below = _small_threshold_pattern(eps, tensor.dtype)
    sign_bit = 1 << (patterns.dtype.itemsize * 8 - 1)
    if patterns.dtype.itemsize == 4 and n >= _TABLES_FROM:
        acc, n_small = _scan_u32(patterns, small_below)
    else:
        if patterns.dtype.itemsize == 8 or n < _TABLES_FROM:  # too wide for a table of counts
            values, counts = np.unique(patterns, return_counts=True)
        else:
            counts = symbol_histogram(patterns)  # no int64 copy of the patterns
            values = np.flatnonzero(counts)
            counts = counts[values]
        n_small = int(counts[(values & (sign_bit - 1)) < small_below].sum())
        counts = counts.astype(np.float64)
        acc = float((counts * np.log2(counts)).sum())
    return max(0.0, math.log2(n) - acc / n), n_small / n


def value_entropy_bits(tensor: torch.Tensor) -> float:
    """Shannon entropy, in bits, of the distinct stored values of a floating ``tensor``.

    >>> value_entropy_bits(torch.tensor([1.0, 1.0, 2.0, 3.0]))
    1.5
    """
    if tensor.numel() == 0:
        return 0.0
    return _scan(tensor, 0.0)[0]


@dataclass(frozen=True)
class LayerStats:
    """The statistics of one selected layer; ``as_dict`` gives the machine-readable record.
    Only name, shape, numel, dtype and P are set in a report made without scores
    (``inspect(score=False)``); the measures are None."""

    name: str
    shape: tuple[int, ...]
    numel: int
    dtype: str
    sigma: float | None
    P: float
    E: float | None
    S: float | None
    EWDS: float | None
    QLIS: float | None

    def as_dict(self) -> dict:
        record = asdict(self)
        record["shape"] = list(self.shape)
        return record


@dataclass(frozen=True)
class InspectionReport:
    """What ``qlis.inspect`` found: one record per layer plus model totals."""

    layers: list[LayerStats]
    beta: float
    eps: float
    total_params: int
    layer_params: int
    unselected: list[str] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)
    """Tensors the default selection took that hold infinities and no NaN (masks, no
    weights): stored as they are, among ``unselected``."""

    @property
    def totals(self) -> dict:
        scores = [layer.QLIS for layer in self.layers]
        scored = None not in scores  # a report made with score=False has none

        def total(reduce: Callable[[list[float]], float]) -> float | None:
            return float(reduce(scores)) if scored else None

        return {
            "layers": len(self.layers),
            "layer_params": self.layer_params,
            "total_params": self.total_params,
            "unselected_tensors": len(self.unselected),
            "mean_QLIS": total(np.mean),
            "min_QLIS": total(np.min),
            "max_QLIS": total(np.max),
        }

    def records(self) -> list[dict]:
        return [layer.as_dict() for layer in self.layers]

    def __getitem__(self, name: str) -> LayerStats:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


SCORE_PARAMS = {"beta": Param("float", 0, 1), "eps": Param("float", 0)}
"""The options of the QLIS score (β weighs E against S; ε is the small-weight threshold)."""


Measures = tuple[float, float, float] | tuple[None, None, None]


def _layer_measures(tensor: torch.Tensor, eps: float, score: bool,
                    masks: bool) -> Measures | None:
    """(sigma, H in bits, S) of one layer; without ``score``, only the check that its values
    are finite. With ``masks``, None for a tensor of infinities and no NaN: a mask (a causal
    one of -inf kept as a buffer) that no weight can be, to be stored as it is."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() and not math.isfinite(peak_abs(flat)):  # a NaN or an infinity
        if not masks:
            raise InputError("contains NaN or Inf values: repair the weights, or, if it is no "
                             "weight (a mask of -inf kept as a buffer), leave it out of the "
                             "layers selected (select=, qlis pack --select)")
        if bool(flat.isnan().any()):
            raise InputError("contains NaN values: repair the weights")
        return None
    if not score:
        return None, None, None
    if flat.numel() == 0:
        return 0.0, 0.0, 0.0
    entropy, sparsity = _scan(flat, eps)
    return population_std(flat), entropy, sparsity


def _measures_from_json(value: object) -> Measures | None:
    """A layer's measures read back (the pass-1 cache, another rank), as `_layer_measures`
    makes them: None (a mask), three Nones, or sigma and entropy finite and >= 0 and a
    sparsity in [0, 1]; a ValueError otherwise (the cache is then measured again)."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise ValueError(f"not a layer's measures: {value!r:.80}")
    if all(v is None for v in value):
        return None, None, None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               and v >= 0 for v in value) or value[2] > 1:
        raise ValueError(f"not a layer's measures: {value!r:.80}")
    sigma, entropy, sparsity = (float(v) for v in value)
    return sigma, entropy, sparsity


def inspect(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    beta: float = 0.5,
    eps: float = 1e-3,
    select: SelectSpec = None,
    jobs: int | None = None,
    cluster: Cluster | None = None,
    cache: PassCache | None = None,
    score: bool = True,
) -> InspectionReport:
    """Score every selected layer with P, E, S, EWDS and QLIS (``jobs`` layers at a time;
    in a ``cluster``, each rank the layers it owns; measures saved in ``cache`` reused). A
    tied tensor is one layer, under its first name (`qlis.models.tensors.split_aliases`), selected
    when any of its names is. ``score=False`` only checks that the values are finite and
    leaves the measures (sigma, E, S, EWDS, QLIS) out, as None. With the default selection a
    tensor of infinities and no NaN is a mask, not a layer (``masks``); a NaN is an error.

    >>> report = inspect(torch.nn.Linear(4, 3))
    >>> [r.name for r in report.layers], round(report.layers[0].P, 3)
    (['weight'], 1.0)
    """
    checked = check_options(SCORE_PARAMS, {"beta": beta, "eps": eps}, "inspect")
    beta, eps = checked["beta"], checked["eps"]
    check_instance(cluster, Cluster, "cluster")
    check_instance(cache, PassCache, "cache")
    state, aliases = split_aliases(as_state_dict(model_or_state_dict))
    selector = make_selector(select)
    also_named: dict[str, list[str]] = {}
    for alias, name in aliases.items():
        also_named.setdefault(name, []).append(alias)
    layout = tensor_layout(state)
    seen = state if callable(select) else layout  # a user's selector sees the values
    names = [name for name, t in seen.items()
             if any(selector(n, t) for n in (name, *also_named.get(name, ())))]
    if not names:
        raise InputError(
            "no layer selected: the model has no floating-point tensor with 2 or more "
            "dimensions (or none matches the selection)"
        )
    def measure(name: str) -> Measures | None:
        try:
            return _layer_measures(state[name], eps, score, masks=select is None)
        except InputError as err:
            raise InputError(f"layer {name!r} {err}") from None

    measured = spread(measure, names, [layout[n].numel() for n in names], jobs, cluster,
                      from_json=_measures_from_json, cache=cache,
                      key=f"inspect {eps!r}" if score else "inspect unscored")
    masks = [name for name, m in zip(names, measured, strict=True) if m is None]
    kept = [(name, m) for name, m in zip(names, measured, strict=True) if m is not None]
    layer_params = sum(layout[name].numel() for name, _ in kept)
    if layer_params == 0 and not masks:
        raise InputError("the selected layers are all empty")
    if layer_params == 0:
        shown_masks = ", ".join(map(repr, masks[:3])) + (" ..." if len(masks) > 3 else "")
        raise InputError(f"no layer left to compress: every selected tensor with values holds "
                         f"infinities ({shown_masks}: masks, no weights)")

    layers = []
    for name, (sigma, entropy, sparsity) in kept:
        tensor = layout[name]
        share = tensor.numel() / layer_params
        e = ewds = qlis_score = None
        if score:
            e = entropy / storage_bits(tensor.dtype)
            ewds = e * (1.0 - sparsity)
            qlis_score = beta * share + (1.0 - beta) * (1.0 - ewds)
        layers.append(
            LayerStats(
                name=name,
                shape=tuple(tensor.shape),
                numel=tensor.numel(),
                dtype=str(tensor.dtype).removeprefix("torch."),
                sigma=sigma,
                P=share,
                E=e,
                S=sparsity,
                EWDS=ewds,
                QLIS=qlis_score,
            )
        )
    selected = {name for name, _ in kept}
    return InspectionReport(
        layers=layers,
        beta=beta,
        eps=eps,
        total_params=sum(t.numel() for t in layout.values()),
        layer_params=layer_params,
        unselected=[n for n in state if n not in selected],
        masks=masks,
    )
