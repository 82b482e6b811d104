"""``policy="rd"``: per-layer entropy-coded uniform steps chosen by rate–distortion allocation.

For every layer, a curve of candidates — uniform quantization at a ladder of steps (relative
to the layer's RMS, per tensor or per output channel; optionally after sigma pruning, and
group-wise affine at several bit widths), and "keep it as it is" — each with
its real coded size (entropy of its codes + parameters + record, measured on a seeded sample
of the layer) and its distortion:

- data-free: the layer's relative weight MSE, each layer counting equally (the total is
  the layers' mean relative MSE that every result reports; ``weighting="params"`` weights
  layers by their parameters instead). Measured on a real sentence transformer at equal
  size, equal weighting keeps far more of the output (cosine 0.991 vs 0.975 at 4 bits per
  weight): a network's layers matter to its output about alike, whatever their size. A
  convolution's errors count by its channels' scales too (`_CHANNEL_EMPHASIS`);
- with calibration data: the model's output distortion (1 - cosine) when that layer alone is
  quantized, from one probe pass per layer: output distortion grows in proportion to the
  weight's squared error (quantization noise is white at these rates), so the probe gives
  the layer's gain and every candidate's output distortion follows from its weight error.

qlis/plan/allocate.py then picks one candidate per layer to meet a size or a quality target.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from qlis.archive.codecs import entropy_bits
from qlis.archive.codecs.row_classes import (
    MAX_CLASSES,
    MIN_SYMBOLS,
    SAVING_BYTES,
    SPLITS,
    STREAM_BYTES,
    TABLE_BYTES_PER_SYMBOL,
    finest_classes,
    stream_bytes,
)
from qlis.archive.format import RECORD_ALIGN, aligned
from qlis.compiled import njit
from qlis.config import Param
from qlis.errors import ConfigError, QlisError
from qlis.measure.column_energy import input_column_energies
from qlis.measure.distortion import peak_abs, relative_mse, sum_of_squares
from qlis.models.tensors import renormalized, storage_bits, tensor_layout
from qlis.plan.allocate import Curve, allocate_for_distortion, allocate_for_size, totals
from qlis.plan.execute import Realized, dequantized, execute_layer
from qlis.plan.plans import LayerConfig, Plan
from qlis.plan.policy import PlanContext, Policy, register_policy
from qlis.plan.sizes import (
    HEADER_BYTES,
    NARROWED_ENTRY_BYTES,
    QUANTIZED_RECORD_BYTES,
    kept_bytes,
    unplanned_bytes,
)
from qlis.quantize.column_scales import column_factors, divided_columns
from qlis.quantize.float16 import Float16Quantizer
from qlis.quantize.grid import matrix_shape, rounded_level
from qlis.quantize.pruners import get_pruner
from qlis.quantize.quantizers import (
    GRANULARITIES,
    MAX_GROUP_SIZE,
    MAX_LEVELS,
    GroupAffineQuantizer,
    QuantizedTensor,
    get_quantizer,
    group_scale_dtype,
    row_mean_squares,
)
from qlis.workers.cluster import spread

if TYPE_CHECKING:
    from qlis.measure.calibrate import Calibration
    from qlis.measure.stats import InspectionReport
    from qlis.plan.compress import CompressionResult

DEFAULT_MAX_DISTORTION = 1e-4
"""The default quality target: the layers' mean relative weight MSE (40 dB weight SNR).
Measured on a real sentence transformer: embeddings keep cosine 0.9996 at 6.1 bits/weight."""
DEFAULT_MIN_COSINE = 0.999
"""The default quality target with calibration data: mean output cosine."""

_PROBE_REL_MSE = 1e-3
_GRADIENT_SAMPLES = 4
_FLAT_GAIN = 1e-2
"""A layer whose gradient gain is above 0 and below this share of the median is probed as
well: a gradient sees only what is differentiable, and a top-1 router's choice is not
(Mixtral: 1e-15 of the median, while rounding the router sends tokens to other experts)."""
_ROUNDING_DISTORTION = 1e-12
"""Output distortion (1 - cosine) that float rounding makes with no layer involved: equal
outputs measure up to ~2e-16, a float32 network's reordered sums ~1e-15. A layer whose gain
says that even its removal moves the output less than this is one the outputs do not depend
on (attention's query and key on sequences of one token measured 2e-16, and were rounded to
nothing without a word)."""
_COSINE_PASSES = 4
_COSINE_AIM = 0.95  # between two executions, aim this share of the allowed output error
_SIZE_PASSES = 3
_SIZE_SLACK = 0.01
"""An allocation aimed with the feedback that fits within this share under the budget is
kept: on ViT-B/16 (calibrated, 4 b/w), the third and fourth executions moved the size by
0.01% and cost 41 s each."""
_CHANNEL_EMPHASIS = 0.5
"""Data-free, each weight's squared error in a weight of three or more dimensions (a
convolution's) counts times (the layer's mean square / its output channel's) ** this: 0
is the layer's relative error (right where a channel's scale is its importance), 1 each
channel's own (right where a normalization rescales every channel: BatchNorm, folded or
not); this is their geometric middle (`_channel_emphasis`). Against 0, at equal real size
(bench_vision --data-free, feature cosine): nsfwjs's MobileNetV2, BatchNorm folded, 8x 0.917 ->
0.932, 12x 0.274 -> 0.548 (at 0 its depthwise convolutions' quiet channels rounded to zeros);
InceptionV3 16x 0.866 -> 0.878, 22x 0.775 -> 0.752 (docs/method.md)."""
_SAMPLING_MARGIN = 0.98  # sampled errors are estimates: aim 2% under a weight target


@dataclass(frozen=True)
class _Candidate:
    config: dict | None  # the quantizer; None: keep the layer as it is
    size: float
    rel_mse: float
    pruner: dict | None = None

    @property
    def layer_config(self) -> LayerConfig:
        return LayerConfig(pruner=self.pruner, quantizer=self.config)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON for the pass-1 cache and the ranks (configs are flat, never mutated:
        `dataclasses.asdict`'s deep copies cost more than measuring a small layer)."""
        return {"config": self.config, "size": self.size, "rel_mse": self.rel_mse,
                "pruner": self.pruner}

    @classmethod
    def from_json(cls, value: object) -> _Candidate:
        """A candidate read back (the pass-1 cache, another rank), checked as `to_json`
        writes one: a size and an error finite and >= 0, configs a quantizer and a pruner
        accept; a ValueError otherwise (the cache is then measured again)."""
        if not isinstance(value, dict) or set(value) != {"config", "size", "rel_mse", "pruner"}:
            raise ValueError(f"not a candidate: {value!r:.80}")
        for number in (value["size"], value["rel_mse"]):
            if (isinstance(number, bool) or not isinstance(number, int | float)
                    or not 0 <= number < math.inf):
                raise ValueError(f"not a size or an error: {number!r:.80}")
        for config, get in ((value["config"], get_quantizer), (value["pruner"], get_pruner)):
            if config is None:
                continue
            if not isinstance(config, dict):
                raise ValueError(f"not a config: {config!r:.80}")
            try:
                get(config)
            except QlisError as err:
                raise ValueError(str(err)) from None
        return cls(value["config"], float(value["size"]), float(value["rel_mse"]),
                   value["pruner"])


def _candidates_from_json(found: object) -> list[_Candidate]:
    """A layer's candidates read back: a list of at least one (keeping the layer as it is is
    always one), each checked by `_Candidate.from_json`; a ValueError otherwise."""
    if not isinstance(found, list) or not found:
        raise ValueError(f"not a layer's candidates: {found!r:.80}")
    return [_Candidate.from_json(c) for c in found]


_POSITIVE = Param("float", 0, low_open=True, optional=True)

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_SMALLEST_PEAK = 1e-30
"""A layer peaking below this is kept as it is: its finest steps (1e-3 of an RMS that may be
1e-3 of the peak) would fall under float32's smallest normal number (1.2e-38)."""
COARSEST_STEP = 8.0
"""The coarsest step offered, relative to the RMS: under 0.01 bit per weight for Gaussian
weights, so that size targets of 16-22x and beyond have candidates to choose from."""


def _relative_steps(finest: float) -> np.ndarray:
    """Steps relative to the RMS, half an octave apart, from COARSEST_STEP to ``finest``."""
    count = int(math.floor(2 * math.log2(COARSEST_STEP / finest))) + 1
    return COARSEST_STEP * 2.0 ** (-np.arange(count) / 2)


def _vanishing_limit(peaks: torch.Tensor, scale: torch.Tensor, rounding: float) -> float:
    """The relative step (step / ``scale``, per row) below which every row keeps a code
    other than the zero code: a row rounds to zeros only once the step exceeds its peak
    (``peaks``, per row) / (1 - rounding). Rows that are zeros already are left out (they
    stay zeros)."""
    alive = peaks > 0
    return float((peaks[alive] / scale[alive]).min()) / (1.0 - rounding) * 0.999


def _sample_index(numel: int, size: int, seed: int) -> torch.Tensor:
    """Every index of a small layer; a seeded sample (with replacement) of a large one."""
    if numel <= size:
        return torch.arange(numel)
    return torch.randint(numel, (size,), generator=torch.Generator().manual_seed(seed))


def _bits_per_symbol(present: int, entropy: float, n: int) -> float | None:
    """Bits per symbol (Miller–Madow corrected) of a sample of ``n`` symbols, ``present`` of
    them distinct, whose counts' Shannon bound is ``entropy`` bits; None when the sample is
    too small to estimate it (fewer than 16 samples per present symbol)."""
    if present > n / 16:
        return None
    return entropy / n + (present - 1) / (2 * n * math.log(2))


@njit(cache=True, nogil=True)
def _round_to_steps(scaled: np.ndarray, step: np.float32, rounding: np.float32,
                    levels: np.ndarray) -> tuple[int, int]:
    # levels = the grid's rounding of x / step; returns the lowest and highest level.
    low, high = 0, 0
    for i in range(scaled.size):
        level = int(rounded_level(scaled[i] / step, rounding))
        levels[i] = level
        if i == 0 or level < low:
            low = level
        if i == 0 or level > high:
            high = level
    return low, high


@njit(cache=True, nogil=True)
def _error_and_entropy(levels: np.ndarray, low: int, high: int, step: np.float32,
                       rms: np.ndarray, reference: np.ndarray) -> tuple[float, int, float]:
    # The squared error of the levels' values (float32 terms, summed in float64), how many
    # levels occur, and the Shannon bound of their counts in bits (`entropy_bits`).
    counts = np.zeros(high - low + 1, dtype=np.int64)
    error = 0.0
    for i in range(levels.size):
        counts[levels[i] - low] += 1
        difference = reference[i] - np.float32(levels[i]) * step * rms[i]
        error += np.float64(difference * difference)
    present, entropy = 0, 0.0
    log_total = np.log2(np.float64(levels.size))
    for count in counts:
        if count:
            present += 1
            entropy += count * (log_total - np.log2(np.float64(count)))
    return error, present, entropy


@dataclass(frozen=True)
class _SampledRows:
    """Which finest row class (`finest_classes`) each sampled weight's row is in, how many
    of the layer's rows each class holds, their length, and what the rows' class ids cost
    in each of the codec's `SPLITS`: what the ans codec's row classes
    (qlis/archive/codecs/row_classes.py) are estimated from."""

    of_sample: np.ndarray
    per_class: np.ndarray
    length: int
    id_bytes: np.ndarray

    @classmethod
    def of(cls, rows: torch.Tensor, row_of: torch.Tensor) -> _SampledRows | None:
        """The classes of ``rows`` (one step for the layer: a row's codes spread as its
        weights do), None where the codec keeps one table for so few codes."""
        if rows.numel() < MIN_SYMBOLS or rows.shape[0] < 2:
            return None
        finest = finest_classes(row_mean_squares(rows).double().numpy())
        per_class = np.bincount(finest, minlength=MAX_CLASSES)
        merged = [per_class.reshape(classes, -1).sum(axis=1) for classes in SPLITS]
        id_bytes = np.array([stream_bytes(ids[ids > 0]) + 4 for ids in merged])
        return cls(finest[row_of.numpy()], per_class, rows.shape[1], id_bytes)


_SPLIT_COUNTS = np.array(SPLITS)
_NO_ROWS = _SampledRows(np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.int64), 0,
                        np.zeros(0))
"""What the compiled ladder takes for a layer measured on one table."""


@njit(cache=True, nogil=True)
def _classed_code_bytes(levels: np.ndarray, low: int, width: int, of_sample: np.ndarray,
                        per_class: np.ndarray, length: int, splits_of: np.ndarray,
                        ) -> np.ndarray:
    # For each split into ``splits_of`` classes, the classes' estimated streams (each one's
    # sampled bits per symbol, Miller-Madow corrected, times its codes; its table and head);
    # -1 where a class is too thinly sampled. The class ids are the caller's.
    finest = per_class.size
    counts = np.zeros((finest, width), dtype=np.int64)
    for i in range(levels.size):
        counts[of_sample[i], levels[i] - low] += 1
    splits = np.full(splits_of.size, -1.0)
    for index in range(splits_of.size):
        classes = splits_of[index]
        merge = finest // classes
        total = 0.0
        for k in range(classes):
            rows = 0
            for f in range(k * merge, (k + 1) * merge):
                rows += per_class[f]
            if rows == 0:
                continue
            n, present, information = 0, 0, 0.0
            for level in range(width):
                count = 0
                for f in range(k * merge, (k + 1) * merge):
                    count += counts[f, level]
                if count:
                    n += count
                    present += 1
                    information -= count * np.log2(np.float64(count))
            if n == 0 or present > n / 16:
                total = -1.0
                break
            information = information / n + np.log2(np.float64(n))  # bits per symbol
            bits = information + (present - 1) / (2 * n * np.log(2.0))
            total += (rows * length * bits / 8 + TABLE_BYTES_PER_SYMBOL * present
                      + STREAM_BYTES)
        splits[index] = total
    return splits


@njit(cache=True, nogil=True)
def _measure_steps(scaled: np.ndarray, steps: np.ndarray, rounding: np.float32,
                   rms: np.ndarray, reference: np.ndarray, widest: float,
                   of_sample: np.ndarray, per_class: np.ndarray, length: int,
                   splits_of: np.ndarray, id_bytes: np.ndarray) -> tuple[int, np.ndarray]:
    # Each step in turn, until its levels would pass MAX_LEVELS (how many were measured is
    # returned): the sample's squared error, how many levels occur, the Shannon bound of
    # their counts in bits and, given the rows' classes (``per_class``, empty for a layer on
    # one table) and where the sample is thick enough (`_bits_per_symbol`), the smallest
    # split's row classes' bytes (NaN where none can say, `_classed_code_bytes`). One call a
    # layer: a call a step held the GIL between steps.
    levels = np.empty(scaled.size, dtype=np.int64)
    measured = np.empty((steps.size, 4))
    for s in range(steps.size):
        low, high = _round_to_steps(scaled, steps[s], rounding, levels)
        if (high - low + 1) * max(1.0, widest) > MAX_LEVELS:
            return s, measured
        error, present, entropy = _error_and_entropy(levels, low, high, steps[s], rms,
                                                     reference)
        smallest = np.nan
        if per_class.size and not present > scaled.size / 16:
            splits = _classed_code_bytes(levels, low, high - low + 1, of_sample, per_class,
                                         length, splits_of)
            for i in range(splits.size):
                if splits[i] >= 0 and not splits[i] + id_bytes[i] >= smallest:
                    smallest = splits[i] + id_bytes[i]
        measured[s, 0], measured[s, 1] = error, present
        measured[s, 2], measured[s, 3] = entropy, smallest
    return steps.size, measured


def _uniform_ladder(
    values: torch.Tensor, rms: torch.Tensor, n_params: int, numel: int, widest: float,
    granularity: str, rounding: float, finest: float, pruner: dict | None,
    reference: torch.Tensor, mean_square: float, coarsest: float = math.inf,
    sampled_rows: _SampledRows | None = None, emphasis: torch.Tensor | None = None,
) -> list[_Candidate]:
    """Uniform steps half an octave apart on one (possibly pruned) sample of a layer.

    The relative error is the sample's mean squared error over the whole layer's mean
    square: the error per weight is bounded by the step, so its sample mean is accurate, while
    the energy of a heavy-tailed sample is not. Each step is one compiled pass over the
    sample (the torch ops it replaced took most of a data-free pack's first pass). The size
    is the codes' entropy with one table, or, with ``sampled_rows``, in row classes where
    they save what the codec asks of them (a matrix whose rows spread differently: a
    vocabulary, an output layer; rows of four spreads asked 3.0 bits per weight made 2.32
    planned on one table). ``emphasis``: a factor per sampled value on its error
    (`_channel_emphasis`)."""
    scaled = (values / rms).numpy()
    if emphasis is not None:  # the errors (reference - level * step * rms) weighed
        rms, reference = rms * emphasis, reference * emphasis
    rms_values, reference_values = rms.numpy(), reference.numpy()
    steps = [t for t in _relative_steps(finest) if t < coarsest]
    rows = sampled_rows or _NO_ROWS
    count, measured = _measure_steps(
        scaled, np.array(steps, dtype=np.float32), np.float32(rounding), rms_values,
        reference_values, float(widest), rows.of_sample, rows.per_class, rows.length,
        _SPLIT_COUNTS, rows.id_bytes)
    found = []
    reliable = None
    saved = 0.0  # bytes the row classes saved at the last step that measured them
    for t, (error, present, entropy, classed) in zip(steps[:count],
                                                     measured[:count].tolist(), strict=True):
        present = int(present)
        bits = _bits_per_symbol(present, entropy, values.numel())
        sampled = bits is not None
        if sampled:
            reliable = (bits, float(t))
        elif reliable is not None:  # high rate: one more bit per halving of the step
            bits = reliable[0] + math.log2(reliable[1] / float(t))
        else:
            bits = entropy / values.numel()
        code_bytes = numel * bits / 8 + TABLE_BYTES_PER_SYMBOL * present + 12
        if sampled_rows is not None and sampled:
            pays = classed < code_bytes - SAVING_BYTES  # never where NaN: none could say
            saved = code_bytes - classed if pays else 0.0
        # kept finer, where a class's sample is too thin: what a class tells of a code, at
        # high rates, no longer changes with the step
        size = code_bytes - saved + 4 * n_params + QUANTIZED_RECORD_BYTES
        config = {"id": "uniform", "rel_mse": float(t) ** 2 / 12,
                  "granularity": granularity, "rounding": rounding}
        found.append(_Candidate(config, size, error / values.numel() / mean_square, pruner))
    return found


def _column_stepped_ladder(divided: torch.Tensor, index: torch.Tensor, row_of: torch.Tensor,
                           policy: RDPolicy) -> list[_Candidate]:
    """The one-step candidates of a layer stepped per input column, measured on ``divided``
    (its matrix with the columns divided by their factors) at the sample ``index``: a step
    per column to store, the errors relative to the divided matrix's."""
    values = divided.reshape(-1)[index]
    energy = sum_of_squares(divided)
    if energy == 0 or not bool(values.any()):
        return []
    numel = divided.numel()
    rms = torch.full_like(values, math.sqrt(energy / numel))
    return _uniform_ladder(values, rms, divided.shape[1], numel,
                           peak_abs(divided) / peak_abs(values), "tensor", policy.rounding,
                           policy.finest_step, None, values, energy / numel,
                           sampled_rows=_SampledRows.of(divided, row_of))


def _group_param_bytes(quantizer: GroupAffineQuantizer, rows: torch.Tensor,
                       peak: float) -> int:
    """Bytes per group of the parameters ``quantizer`` stores for a layer: its scale (float16,
    or float32 where float16 cannot hold the layer's scales, `group_scale_dtype`) and,
    asymmetric, a float16 zero point. ``peak`` is the layer's largest magnitude: its largest
    scale lies within a factor of 2 of peak / top (asymmetric: a group spans up to twice the
    peak), which decides all but the layers near float16's limits; those ``rows`` (then the
    layer's own, not divided by its peak) are measured."""
    if quantizer.symmetric:
        levels = (1 << (quantizer.bits - 1)) - 1
        low, high = peak / levels, peak / levels
    else:
        levels = (1 << quantizer.bits) - 1
        low, high = peak / levels, 2 * peak / levels
    dtype = group_scale_dtype(low * (1 - 1e-6))
    if dtype != group_scale_dtype(high * (1 + 1e-6)):
        dtype = quantizer.scale_dtype(rows)
    return (4 if dtype == "float32" else 2) + (0 if quantizer.symmetric else 2)


def _group_candidates(
    rows: torch.Tensor, numel: int, sample_size: int, seed: int, group_sizes: tuple[int, ...],
    group_bits: tuple[int, ...], peak: float, emphasis: torch.Tensor | None = None,
) -> list[_Candidate]:
    """Group-wise affine candidates, measured on whole sampled rows (groups stay intact);
    ``peak`` is the layer's largest magnitude (``rows`` may be divided by it); ``emphasis``:
    a factor per row on its errors (`_channel_emphasis`)."""

    n_rows = max(1, min(rows.shape[0], sample_size // max(rows.shape[1], 1)))
    pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:n_rows]
    sample = rows[pick]
    mean_square = float(rows.square().sum(dtype=torch.float64)) / numel
    if mean_square == 0:
        return []
    found = []
    for group_size in group_sizes:
        n_groups = rows.shape[0] * -(-rows.shape[1] // group_size)
        for bits in group_bits:
            quantizer = GroupAffineQuantizer(bits=bits, group_size=group_size)
            q = quantizer.quantize(sample)
            difference = q.dequantize() - sample
            if emphasis is not None:
                difference *= emphasis[pick, None]
            error = float(difference.square_().sum(dtype=torch.float64))
            counts = np.bincount(q.codes.reshape(-1), minlength=q.n_levels)
            present = int(np.count_nonzero(counts))
            per_symbol = _bits_per_symbol(present, entropy_bits(counts), q.codes.size) or bits
            param_bytes = _group_param_bytes(quantizer, rows, peak)
            size = (numel * min(per_symbol, bits) / 8 + param_bytes * n_groups
                    + TABLE_BYTES_PER_SYMBOL * present
                    + QUANTIZED_RECORD_BYTES)
            found.append(_Candidate(quantizer.get_config(), size,
                                    error / sample.numel() / mean_square))
    return found


def _channel_emphasis(rows: torch.Tensor, mean_square: float) -> torch.Tensor:
    """Per row, the factor on its errors (squared: its weight) that `_CHANNEL_EMPHASIS`
    asks for; 0 on rows of zeros (they stay zeros)."""
    row_ms = row_mean_squares(rows).double()
    ratio = mean_square / torch.where(row_ms > 0, row_ms, math.inf)
    return (ratio ** (_CHANNEL_EMPHASIS / 2)).float()


def _column_factors(calibration: Calibration, state: Mapping[str, torch.Tensor],
                    names: list[str]) -> dict[str, np.ndarray]:
    """The step factors per input column (qlis/quantize/column_scales.py) of every linear
    layer the calibration runs (not a `renormalized` one), from the float model's inputs on
    the fitting batches (qlis/measure/column_energy.py)."""
    eligible = [n for n in names
                if state[n].ndim >= 2 and state[n].numel() and not renormalized(n)]
    found = {}
    for name, energy in input_column_energies(calibration, eligible).items():
        factors = column_factors(energy)
        if factors is not None and len(factors) == matrix_shape(state[name].shape)[1]:
            found[name] = factors
    return found


def _digest(factors: Mapping[str, np.ndarray]) -> str:
    """A short digest of the column factors (part of the cache key of the candidates that
    were measured with them; empty without)."""
    if not factors:
        return ""
    digest = hashlib.sha256()
    for name in sorted(factors):
        digest.update(name.encode() + b"\0" + factors[name].astype(np.float64).tobytes())
    return " columns " + digest.hexdigest()[:16]


def _layer_candidates(
    weight: torch.Tensor, policy: RDPolicy, seed: int, keep_rows: bool = False,
    per_channel: bool = False, column_factors: np.ndarray | None = None,
) -> list[_Candidate]:
    """The candidates of one layer, measured on a sample of its weights. ``keep_rows``
    (a `renormalized` tensor): only candidates that leave no row of it all zeros.
    ``per_channel``: errors weighed by their rows' scales (`_CHANNEL_EMPHASIS`).
    ``column_factors`` (one per column of the matrix view; `_column_factors` gives none for
    a `renormalized` tensor): the unpruned one-step-per-tensor candidates are measured on the
    weight with its input columns divided by them (the layer is then stepped per input
    column: qlis/quantize/column_scales.py), their errors relative to that matrix's."""
    w = weight.detach()
    numel = w.numel()
    peak = peak_abs(w)
    keep = _Candidate(None, kept_bytes(w, zeros=peak == 0), 0.0)
    if keep.size <= QUANTIZED_RECORD_BYTES:
        return [keep]  # smaller than any quantized record, and exact: nothing else is chosen
    if peak and not _SMALLEST_PEAK < peak < _FLOAT32_MAX / COARSEST_STEP:
        return [keep]  # float64 whose steps float32 (the grids' steps) cannot hold
    layer_peak = peak
    if policy.prune_levels or policy.group_sizes or not (peak == 0 or 1e-10 < peak < 1e10):
        if 0 < peak < math.inf and not 1e-10 < peak < 1e10:
            # every measure below is relative: keep squares within float32, dividing in
            # the weight's own dtype (float64's extremes are inf or 0 in float32)
            w = w / peak
            peak = 1.0
        w = w.float()  # pruning and groups work on the whole layer in float32
    rows = w.reshape(w.shape[0], -1) if w.ndim >= 1 and numel else w.reshape(1, -1)
    energy = sum_of_squares(rows) if numel else 0.0
    if numel == 0 or energy == 0:
        return [keep]
    index = _sample_index(numel, policy.sample_size, seed)
    values = rows.reshape(-1)[index].float()
    row_of = index // rows.shape[1]
    sample_energy = float(values.square().sum(dtype=torch.float64))
    if sample_energy == 0:
        return [keep]
    candidates = [keep]
    widest = peak / peak_abs(values)  # full range / sample range
    sigma = float(rows.std(correction=0)) if policy.prune_levels else 0.0
    row_peaks = rows.abs().amax(dim=1) if keep_rows else None
    emphasis = _channel_emphasis(rows, energy / numel) if per_channel else None
    divided = None if column_factors is None else (
        rows.float() / torch.from_numpy(column_factors).float())
    for k in (0.0, *(() if keep_rows else policy.prune_levels)):
        kept_rows = rows if k == 0 else torch.where(rows.abs() >= k * sigma, rows, 0.0)
        kept_values = values if k == 0 else torch.where(values.abs() >= k * sigma, values, 0.0)
        pruner = None if k == 0 else {"id": "sigma", "k": float(k)}
        kept_energy = energy if k == 0 else float(kept_rows.square().sum(dtype=torch.float64))
        if kept_energy == 0 or not bool(kept_values.any()):
            continue
        for granularity in policy.granularities:
            if k == 0 and granularity == "tensor" and divided is not None:
                candidates += _column_stepped_ladder(divided, index, row_of, policy)
                continue
            if granularity == "channel":
                row_rms = row_mean_squares(kept_rows).sqrt()
                row_rms = torch.where(row_rms > 0, row_rms, torch.ones_like(row_rms))
                rms = row_rms[row_of]
                n_params = rows.shape[0]
                sampled_rows = None  # rows of one spread: one table
            else:
                row_rms = torch.full((rows.shape[0],), math.sqrt(kept_energy / numel))
                rms = torch.full_like(values, row_rms[0])
                n_params = 1
                sampled_rows = _SampledRows.of(kept_rows, row_of)
            coarsest = (_vanishing_limit(row_peaks, row_rms, policy.rounding) if keep_rows
                        else math.inf)
            candidates += _uniform_ladder(
                kept_values, rms, n_params, numel, widest, granularity, policy.rounding,
                policy.finest_step, pruner, values, energy / numel, coarsest, sampled_rows,
                None if emphasis is None else emphasis[row_of],
            )
    if policy.group_sizes:
        candidates += _group_candidates(rows, numel, policy.sample_size, seed,
                                        policy.group_sizes, policy.group_bits, layer_peak,
                                        emphasis)
    return candidates


def _shown_below(value: float, target: float) -> str:
    """``value`` with as many decimals (5 at least) as show it under ``target``: a cosine of
    0.99999999 missing 0.999999999 is not 1.00000."""
    for digits in range(5, 18):
        text = f"{value:.{digits}f}"
        if float(text) < target:
            return text
    return repr(value)


_DEFAULT_GROUP_BITS = (2, 3, 4, 5, 6, 8)
"""The bits of rd's group-wise candidates unless group_bits says otherwise."""


@register_policy
@dataclass(frozen=True)
class RDPolicy(Policy):
    """Rate–distortion allocation of entropy-coded uniform steps (see the module doc).

    Give at most one target. Size (real archive bytes, all tensors counted):
    ``target_bits_per_weight`` (over every element of the model), ``target_bytes``,
    ``target_ratio`` (original tensor bytes / archive bytes). Quality: ``max_distortion``
    (the layers' mean relative weight MSE, see ``weighting``) or ``min_cosine`` (mean
    cosine of the model's outputs to the original's; needs calibration data). No target:
    ``max_distortion`` = DEFAULT_MAX_DISTORTION (with calibration data: ``min_cosine`` =
    DEFAULT_MIN_COSINE). Candidates: ``granularities`` are the step families offered to
    each layer (``"tensor"``: one step per layer, the weight-MSE optimum; ``"channel"``: one
    per output channel); ``prune_levels`` adds sigma pruning at those k before the steps;
    ``group_sizes`` adds group-wise affine at ``group_bits``; ``rounding`` < 0.5 adds a dead
    zone. ``float16_rest``: the float32 tensors outside the layers (biases, norms, BatchNorm
    statistics) are stored as float16 where it holds them (`Float16Quantizer.narrowed`).
    """

    strategy_id: ClassVar[str] = "rd"
    ranks_by_score: ClassVar[bool] = False
    params = {
        "target_bits_per_weight": _POSITIVE,
        "target_bytes": _POSITIVE,
        "target_ratio": Param("float", 1, optional=True),
        "max_distortion": _POSITIVE,
        "min_cosine": Param("float", 0, 1, low_open=True, high_open=True, optional=True),
        "granularities": Param("str", choices=GRANULARITIES, sequence=True, non_empty=True),
        "prune_levels": Param("float", 0, 10, low_open=True, high_open=True, sequence=True),
        "group_sizes": Param("int", 1, MAX_GROUP_SIZE, sequence=True),
        "group_bits": Param("int", 2, 8, sequence=True),
        "rounding": Param("float", 0, 0.5, low_open=True),
        "weighting": Param("str", choices=("layers", "params")),
        "finest_step": Param("float", 0, 1, low_open=True, high_open=True),
        "sample_size": Param("int", 1024, 1 << 30),
        "seed": Param("int", 0, 2**31 - 1),
        "float16_rest": Param("bool"),
    }

    target_bits_per_weight: float | None = None
    target_bytes: int | None = None
    target_ratio: float | None = None
    max_distortion: float | None = None
    min_cosine: float | None = None
    granularities: tuple[str, ...] = ("tensor",)
    prune_levels: tuple[float, ...] = ()
    group_sizes: tuple[int, ...] = ()
    group_bits: tuple[int, ...] = _DEFAULT_GROUP_BITS
    rounding: float = 0.5
    weighting: str = "layers"
    finest_step: float = 1e-3
    sample_size: int = 1 << 16
    seed: int = 0
    float16_rest: bool = True

    def check(self) -> None:
        targets = [n for n in ("target_bits_per_weight", "target_bytes", "target_ratio",
                               "max_distortion", "min_cosine") if getattr(self, n) is not None]
        if len(targets) > 1:
            raise ConfigError(f"give one target, not {', '.join(targets)}")
        # group candidates are group_sizes x group_bits: one without the other offers none,
        # and the option given would be silently ignored
        if self.group_sizes and not self.group_bits:
            raise ConfigError("group_sizes adds group-wise candidates at group_bits, which is "
                              "empty: give group_bits too (or leave it out for its default)")
        if not self.group_sizes and self.group_bits != _DEFAULT_GROUP_BITS:
            raise ConfigError("group_bits are the bits of the group-wise candidates, which "
                              "group_sizes adds: give group_sizes too")

    @classmethod
    def from_options(cls, **options: Any) -> RDPolicy:
        for key in ("granularities", "prune_levels", "group_sizes", "group_bits"):
            value = options.get(key)
            if isinstance(value, str | int | float):
                options[key] = (value,)
            elif key in options:
                if not isinstance(value, list | tuple):
                    raise ConfigError(f"{key} takes a list, got {value!r}")
                options[key] = tuple(value)
        return super().from_options(**options)

    def make_plan(self, context: PlanContext) -> Plan:
        if self.min_cosine is not None and context.calibration is None:
            raise ConfigError("min_cosine needs calibration data: pass calib=")
        state = context.state
        names = [layer.name for layer in context.report.layers]
        total_numel = sum(layer.numel for layer in context.report.layers)

        progress = context.progress
        factors: dict[str, np.ndarray] = {}
        if context.calibration is not None:
            factors = _column_factors(context.calibration, state, names)
            context.calibration.column_factors = factors

        def measure(index: int) -> list[_Candidate]:
            return _layer_candidates(state[names[index]], self, self.seed + index,
                                     keep_rows=renormalized(names[index]),
                                     per_channel=context.calibration is None
                                     and len(context.report.layers[index].shape) >= 3,
                                     column_factors=factors.get(names[index]))

        per_layer = spread(measure, range(len(names)),
                           [layer.numel for layer in context.report.layers], context.jobs,
                           context.cluster, to_json=lambda found: [c.to_json() for c in found],
                           from_json=lambda found: self._made_here(_candidates_from_json(found)),
                           done=None if progress is None else (
                               lambda i: progress(context.report.layers[i].numel)),
                           cache=context.cache,
                           key=f"rd {self.get_config()} {context.calibration is None}"
                               f"{_digest(factors)}")
        unreached: list[int] = []
        if context.calibration is None:
            share = {layer.name: layer.numel / total_numel for layer in context.report.layers}
            if self.weighting == "layers":
                share = {n: 1 / len(names) for n in names}
            dist = [
                np.array([c.rel_mse * share[n] for c in cands])
                for n, cands in zip(names, per_layer, strict=True)
            ]
        else:
            per_layer = list(per_layer)
            dist, unreached = self._output_distortions(context, names, per_layer, measure)
        curves = [
            Curve(np.array([c.size for c in cands]), d)
            for cands, d in zip(per_layer, dist, strict=True)
        ]

        def plan_of(choice: list[int]) -> Plan:
            return Plan({
                name: cands[i].layer_config
                for name, cands, i in zip(names, per_layer, choice, strict=True)
            })

        return plan_of(self._allocate(context, curves, names, plan_of, per_layer, unreached))

    def review(self, result: CompressionResult) -> list[str]:
        found = []  # a size target the estimate misses: CompressionResult.estimate_missed
        output = result.distortion.get("output")
        if output is not None and self.max_distortion is None and self._size_target() is None:
            wanted = self.min_cosine if self.min_cosine is not None else DEFAULT_MIN_COSINE
            if output["cosine"] < wanted:
                where = "held-out" if output.get("held_out") else "calibration"
                found.append(f"the output cosine {_shown_below(output['cosine'], wanted)} on "
                             f"the {where} batches misses the target {wanted} even after "
                             f"{_COSINE_PASSES} passes")
        elif output is None and self._size_target() is None:
            limit = self.max_distortion or DEFAULT_MAX_DISTORTION
            key = "weight_rel_mse" if self.weighting == "layers" else "weight_rel_mse_params"
            if result.distortion[key] > limit * 1.001:
                found.append(f"the weight error {result.distortion[key]:.3g} "
                             f"misses the target {limit:g}: even the finest steps do not reach "
                             f"it (lower finest_step)")
        return found

    def _size_target(self) -> str | None:
        for name in ("target_bits_per_weight", "target_bytes", "target_ratio"):
            if getattr(self, name) is not None:
                return name
        return None

    def size_target_bytes(self, original_bytes: float, numel: int) -> float | None:
        if self.target_bits_per_weight is not None:
            return self.target_bits_per_weight * numel / 8
        if self.target_bytes is not None:
            return float(self.target_bytes)
        if self.target_ratio is not None:
            return original_bytes / self.target_ratio
        return None

    def check_reach(self, state: Mapping[str, torch.Tensor], report: InspectionReport) -> None:
        self._budget(state, report, read=False)

    def stored_rest(self, tensor: torch.Tensor) -> torch.Tensor | QuantizedTensor:
        """As float16 where that holds it and saves bytes (a scalar's record grows more), by
        the codes' size at their width: encoding them to decide took every pass's time."""
        at_most = aligned(2 * tensor.numel(), RECORD_ALIGN) + NARROWED_ENTRY_BYTES
        if not (self.float16_rest and at_most < unplanned_bytes(tensor)):
            return tensor
        narrowed = Float16Quantizer().narrowed(tensor)
        return tensor if narrowed is None else narrowed

    def _budget(self, state: Mapping[str, torch.Tensor], report: InspectionReport,
                read: bool = True) -> float | None:
        """Bytes the selected layers may take, from the size target (None: no size target).
        ``read=False``: the tensors rd may narrow are not read, counted at their records
        alone (a bound: a target refused then is out of reach whatever their values)."""
        selected = {layer.name for layer in report.layers}
        layout = tensor_layout(state)
        original = sum(t.numel() * storage_bits(t.dtype) / 8 for t in layout.values())
        total = self.size_target_bytes(original, sum(t.numel() for t in layout.values()))
        if total is None:
            return None

        def stored_bytes(name: str, tensor: torch.Tensor) -> float:
            if not self.float16_rest or tensor.dtype != torch.float32:
                return unplanned_bytes(tensor)
            return unplanned_bytes(self.stored_rest(state[name])) if read else min(
                unplanned_bytes(tensor), NARROWED_ENTRY_BYTES)

        fixed = HEADER_BYTES + sum(stored_bytes(n, t) for n, t in layout.items()
                                   if n not in selected)
        if total <= fixed:
            raise ConfigError(
                f"the size target ({total:,.0f} bytes) does not even hold the archive's "
                f"fixed part (header and the tensors kept as they are: {fixed:,.0f} bytes)"
            )
        return total - fixed

    def _allocate(
        self, context: PlanContext, curves: list[Curve], names: list[str],
        plan_of: Callable[[list[int]], Plan], per_layer: list[list[_Candidate]],
        unreached: list[int],
    ) -> list[int]:
        """The candidate of each layer. ``unreached``: the layers calibration measured no
        gain for; under a size target they count as typical layers (`_output_distortions`),
        the budget bounding them; under a cosine target, whose measures cannot see them,
        they take rd's data-free default (`_data_free_choice`) and the rest meet the target."""
        budget = self._budget(context.state, context.report)
        if budget is not None:
            return _allocate_for_size(context, curves, names, plan_of, budget)
        if context.calibration is not None and self.max_distortion is None:
            min_cosine = self.min_cosine if self.min_cosine is not None else DEFAULT_MIN_COSINE
            numels = [layer.numel for layer in context.report.layers]
            fixed = _data_free_choice(per_layer, unreached, numels if self.weighting == "params"
                                      else None)
            if len(fixed) == len(names):
                return [fixed[i] for i in range(len(names))]

            def expanded(choice: list[int]) -> list[int]:
                return [fixed.get(i, c) for i, c in enumerate(choice)]

            # a fixed layer is a curve of one point: its bytes counted, no output error
            pinned = [Curve(c.sizes[[fixed[i]]], np.zeros(1)) if i in fixed else c
                      for i, c in enumerate(curves)]
            return expanded(_allocate_for_cosine(context, pinned, names,
                                                 lambda choice: plan_of(expanded(choice)),
                                                 min_cosine))
        if context.calibration is not None:
            raise ConfigError("max_distortion is a weight-error target: with calib= ask for "
                              "min_cosine (output quality) or a size target")
        limit = self.max_distortion if self.max_distortion is not None else DEFAULT_MAX_DISTORTION
        return allocate_for_distortion(curves, limit * _SAMPLING_MARGIN)

    def _made_here(self, candidates: list[_Candidate]) -> list[_Candidate]:
        """``candidates`` (read back: the pass-1 cache, another rank) if this policy makes
        such ones: a step family and rounding it offers, a pruning level of its, a group
        grid of its sizes and bits, and a rounded layer that measured some error; a
        ValueError otherwise (a cache from other options, or edited: measured again; a layer
        whose rounding is exact is measured again too, which costs time, not quality).
        Their numbers were checked by `_Candidate.from_json`."""
        prune_levels = {float(k) for k in self.prune_levels}
        for candidate in candidates:
            config, pruner = candidate.config or {}, candidate.pruner
            pruned = pruner is not None
            if pruned and not (set(pruner) == {"id", "k"} and pruner["id"] == "sigma"
                               and pruner["k"] in prune_levels):
                raise ValueError(f"a pruner this policy does not offer: {pruner!r:.80}")
            if config.get("id") == "uniform":
                made = (config.get("granularity") in self.granularities
                        and config.get("rounding") == self.rounding)
            elif config.get("id") == "group":
                made = (not pruned and config.get("bits") in self.group_bits
                        and config.get("group_size") in self.group_sizes
                        and config.get("symmetric") is False)
            else:
                made = candidate.config is None and not pruned and candidate.rel_mse == 0
            if not made or (candidate.config is not None and candidate.rel_mse == 0):
                raise ValueError(f"a candidate this policy does not make: {config!r:.80}")
        return candidates

    def _output_distortions(
        self, context: PlanContext, names: list[str], per_layer: list[list[_Candidate]],
        measure: Callable[[int], list[_Candidate]],
    ) -> tuple[list[np.ndarray], list[int]]:
        """Output distortion (1 - cosine) of every candidate: each layer's gain (output
        distortion per unit of relative weight error) times the candidate's weight error.
        The gains come from a few backward passes (``Calibration.sensitivities``), or, when
        the outputs carry no gradient, from one probe pass per layer (measured on MiniLM:
        the two agree within 10-20% per layer; the backward passes took 4.3 s, the probes
        9.8 s, and the gap grows with the number of layers); a layer whose gradient is flat
        (`_FLAT_GAIN`) is probed too, and keeps the larger gain. A layer that measures no
        gain counts as a typical one (the median gain); the indices of those that had
        something to round come second (recorded in ``calibration.unreached`` for the
        warnings). Such a layer loses its steps per input column (the calibration says
        nothing of what its inputs' energy costs the outputs): its candidates in
        ``per_layer`` are measured again, by ``measure``, without them."""
        calibration = context.calibration
        gains = calibration.sensitivities(names, _GRADIENT_SAMPLES, self.seed,
                                          calibration.column_factors)
        if gains is None:
            probed = {name: _probe_gain(context, name, cands)
                      for name, cands in zip(names, per_layer, strict=True)}
            gains = {name: 0.0 if gain is None else gain for name, gain in probed.items()}
        else:
            measured = [g for g in gains.values() if g > 0]
            flat = float(np.median(measured)) * _FLAT_GAIN if measured else math.inf
            for name, cands in zip(names, per_layer, strict=True):
                # none at all: never run, or off the path (counted below, not probed)
                if name in gains and 0 < gains[name] < flat:
                    gain = _probe_gain(context, name, cands)
                    gains[name] = max(gains[name], gain if gain is not None else 0.0)
        gains = {name: gain if gain > _ROUNDING_DISTORTION else 0.0
                 for name, gain in gains.items()}
        # a layer the calibration's outputs do not depend on (never run, or not on the path
        # to the compared output) measures no gain: the data says nothing about it, so it
        # counts as a typical layer (the median gain) rather than being rounded to nothing
        # (a cosine target gives it rd's data-free default instead: `_allocate`)
        measured = [g for g in gains.values() if g > 0]
        typical = float(np.median(measured)) if measured else 1.0
        unreached = [i for i, (name, cands) in enumerate(zip(names, per_layer, strict=True))
                     if not gains[name] > 0
                     and any(c.config is not None and c.rel_mse > 0 for c in cands)]
        calibration.unreached.update(names[i] for i in unreached)
        for i in unreached:
            if calibration.column_factors.pop(names[i], None) is not None:
                per_layer[i] = measure(i)
        return [np.array([(gains[name] if gains[name] > 0 else typical) * c.rel_mse
                          for c in cands])
                for name, cands in zip(names, per_layer, strict=True)], unreached


def _probe_gain(context: PlanContext, name: str, candidates: list[_Candidate]) -> float | None:
    """A layer's gain measured by one forward pass over the fitting batches with the layer
    alone rounded (at the candidate nearest `_PROBE_REL_MSE`); None where no candidate
    rounds it or the rounding changed the outputs no more than float rounding does."""
    quantized = [c for c in candidates if c.config is not None]
    if not quantized:
        return None
    probe = min(quantized, key=lambda c: abs(math.log(max(c.rel_mse, 1e-30))
                                             - math.log(_PROBE_REL_MSE)))
    weight, factors = context.state[name], context.calibration.column_factors.get(name)
    stored, layer = execute_layer(name, weight, probe.layer_config, column_factors=factors)
    approx = dequantized(stored)
    rel_mse = layer.rel_mse if factors is None else relative_mse(
        divided_columns(weight, factors, False), divided_columns(approx, factors, False))
    if not rel_mse > 0:
        return None
    measured = context.calibration.measure({name: approx},
                                           held_out=False)["one_minus_cosine"]
    return measured / rel_mse if measured > _ROUNDING_DISTORTION else None


def _data_free_choice(per_layer: list[list[_Candidate]], indices: list[int],
                      numels: list[int] | None = None) -> dict[int, int]:
    """The candidate rd takes data-free, at its default quality, for each layer at
    ``indices`` (by index): the smallest allocation whose mean relative weight MSE over them
    (weighted by ``numels`` when given: ``weighting="params"``) is within
    DEFAULT_MAX_DISTORTION, as a pack without calibration data would choose."""
    if not indices:
        return {}
    weights = [numels[i] if numels is not None else 1 for i in indices]
    curves = [Curve(np.array([c.size for c in per_layer[i]]),
                    np.array([c.rel_mse * w / sum(weights) for c in per_layer[i]]))
              for i, w in zip(indices, weights, strict=True)]
    choice = allocate_for_distortion(curves, DEFAULT_MAX_DISTORTION * _SAMPLING_MARGIN)
    return dict(zip(indices, choice, strict=True))


def _plain(context: PlanContext, plan: Plan) -> Realized:
    """A plan executed layer by layer, without reconstruction (stepped per input column where
    the candidates were)."""
    factors = context.calibration.column_factors if context.calibration is not None else {}
    tensors, size = {}, 0.0
    for name, config in plan.items():
        stored, layer = execute_layer(name, context.state[name], config,
                                      column_factors=factors.get(name))
        tensors[name] = dequantized(stored)
        size += layer.coded_bytes
    return Realized(tensors, size)


def _with_feedback(curves: list[Curve], names: list[str], feedback: dict[str, float],
                   ) -> list[Curve]:
    """The curves with each reconstructed layer's output distortions scaled by the output
    error its reconstruction left (``Realized.feedback``): the additive model measures plain
    rounding, and error feedback removes 50-95% of a layer's output error, a different share
    per layer (measured on MiniLM), which moves where the bytes do most good."""
    return [Curve(c.sizes, c.distortions * min(1.0, max(feedback.get(name, 1.0), 1e-3)))
            for c, name in zip(curves, names, strict=True)]


def _allocate_for_size(
    context: PlanContext, curves: list[Curve], names: list[str],
    plan_of: Callable[[list[int]], Plan], budget: float,
) -> list[int]:
    """Fit ``budget`` as executed, and spend it where reconstruction leaves the most output
    error. Reconstruction moves codes off the plain rounding the curves measured, which
    costs bytes at low rates (measured: +5-15%), and recovers a different share of each
    layer's error. The first execution measures both: the curves are scaled by each layer's
    feedback (which hardly changes with the step, so it is measured once) and every later
    allocation aims at the budget divided by the last executed / estimated size ratio, until
    the allocation settles, or fits within ``_SIZE_SLACK`` of the budget (usually the second
    execution; at most ``_SIZE_PASSES``). The last allocation that fitted is kept."""
    choice = allocate_for_size(curves, budget)
    if context.calibration is None or context.realize is None:
        return choice
    realized = context.realize(plan_of(choice))
    aimed = _with_feedback(curves, names, realized.feedback)
    fitted = None
    for attempt in range(_SIZE_PASSES):  # from the second on, aimed with the feedback
        executed = realized.layer_bytes
        fits = executed <= budget * 1.005
        if fits:
            fitted = choice
            if attempt and executed >= budget * (1.0 - _SIZE_SLACK):
                break
        ratio = executed / max(totals(curves, choice)[0], 1e-300)
        following = allocate_for_size(aimed, budget / max(ratio, 1e-300) * (
            1.0 if fits else 0.995))
        if following == choice:
            break
        choice = following
        realized = context.realize(plan_of(choice))
    else:
        if realized.layer_bytes <= budget * 1.005:
            fitted = choice
    return fitted if fitted is not None else choice


def _allocate_for_cosine(
    context: PlanContext, curves: list[Curve], names: list[str],
    plan_of: Callable[[list[int]], Plan], min_cosine: float,
) -> list[int]:
    """Meet ``min_cosine`` as measured, with the fewest bytes found in a few passes.

    Allocate on the additive model, execute the plan as the compression will (reconstructed
    when it is) and measure. The model is then corrected: each layer's curve is scaled by
    the share of its output error that reconstruction left (``_with_feedback``), and the
    next allocation aims at the measured / predicted ratio that remains. Once one execution
    has met the target and another has missed it, the next size is interpolated between the
    closest two (the output error falls about exponentially with the bytes), aimed a little
    under the target: the model's corrections alone, whose predictions move with every
    feedback, settled MiniLM at 3.68 bits per weight for cosine 0.99 where 3.46 met it.
    A measure counts with its standard error added (`Calibration.compare`): held-out
    batches are a sample, and a target met only on average there is missed as often on the
    user's other data. The smallest allocation that met the target is kept; a measure
    within 10% under the target ends it."""
    wanted = 1.0 - min_cosine
    aim = _COSINE_AIM * wanted
    realize = context.realize or (lambda plan: _plain(context, plan))
    met: list[tuple[float, float]] = []  # (executed bytes, measured) of each execution
    missed: list[tuple[float, float]] = []
    best: tuple[float, list[int]] | None = None
    choice = allocate_for_distortion(curves, wanted)
    for _ in range(_COSINE_PASSES):
        realized = realize(plan_of(choice))
        quality = context.calibration.measure(realized.tensors)
        measured = quality["one_minus_cosine"] + (quality["cosine_stderr"] or 0.0)
        size = realized.layer_bytes
        aimed = _with_feedback(curves, names, realized.feedback)
        if measured <= wanted:
            if best is None or size < best[0]:
                best = (size, choice)
            if measured >= 0.9 * wanted:
                break
            met.append((size, measured))
        else:
            missed.append((size, measured))
        following = _bracketed(aimed, met, missed, aim,
                               size / max(totals(curves, choice)[0], 1e-300))
        if following is None:
            predicted = totals(aimed, choice)[1]
            following = allocate_for_distortion(aimed, predicted * aim / max(measured, 1e-300))
        if following == choice:
            break
        choice = following
    return best[1] if best is not None else choice


def _bracketed(curves: list[Curve], met: list[tuple[float, float]],
               missed: list[tuple[float, float]], aim: float, executed_ratio: float,
               ) -> list[int] | None:
    """The allocation whose executed size is interpolated (log output error linear in size)
    between the largest execution that missed and the smallest that met, where ``aim``
    falls; None until there are both, when they do not bracket it (measures are noisy), or
    when the one that met measured no error at all (a plan that left every layer the
    calibration reaches as it was), which has no logarithm to interpolate to."""
    if not met or not missed:
        return None
    low = max(missed)
    high = min(met)
    if not (low[0] < high[0] and low[1] > aim > high[1] > 0.0):
        return None
    share = math.log(low[1] / aim) / math.log(low[1] / high[1])
    return allocate_for_size(curves, (low[0] + share * (high[0] - low[0])) / executed_ratio)
