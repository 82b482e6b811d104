"""``qlis.compress``: ask a policy for a Plan, execute it through the registries, measure it.

The result keeps what the archive needs (integer codes and their parameters, float tensors
for everything stored losslessly), what was done to each layer, what it cost in quality
(weight error always; output error when calibration data was given) and its sizes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from qlis.archive.format import Summary
from qlis.archive.resume import PassCache
from qlis.config import Param, check_callback, check_instance, check_options
from qlis.errors import ConfigError, InputError
from qlis.measure.calibrate import Calibration, CalibSpec
from qlis.measure.select import SelectSpec
from qlis.measure.stats import SCORE_PARAMS, InspectionReport, inspect
from qlis.models.tensors import (
    as_state_dict,
    check_loadable,
    check_unshared,
    checked_state,
    model_in_use,
    renormalized,
    split_aliases,
    storage_bits,
    tensor_layout,
    with_aliases,
)
from qlis.plan.execute import LayerPlan, StoredTensor, dequantized, execute_layer
from qlis.plan.plan_executor import PlanExecutor
from qlis.plan.plans import LayerConfig, Plan, finite_json
from qlis.plan.policy import PlanContext, PlanPolicy, Policy, make_policy
from qlis.plan.sizes import HEADER_BYTES, stored_bits, unplanned_bytes
from qlis.quantize.gptq import MAX_SWEEPS
from qlis.quantize.quantizers import QuantizedTensor
from qlis.quantize.reconstruct import NOT_REACHED
from qlis.runtime.lowbit import check_not_packed
from qlis.workers.cluster import Cluster
from qlis.workers.spill_file import SpillFile
from qlis.workers.threads import check_jobs

COMPRESS_PARAMS = {
    **SCORE_PARAMS,
    "error_feedback": Param("bool", optional=True),
    "bias_correction": Param("bool"),
    "rounding_sweeps": Param("int", 0, MAX_SWEEPS),
}
"""``compress``'s own options (the policy's are its ``params``)."""

DEFAULT_POLICY = "rd"
DEFAULT_ROUNDING_SWEEPS = 0
"""Learned rounding is opt-in: on MiniLM at 2.75 bits/weight 2 sweeps raised the held-out
cosine by 0.0008 for 3x the compression time (docs/method.md)."""


class QualityWarning(UserWarning):
    """A compression result misses a target it was asked for (also in ``result.warnings``)."""


class CompressionResult:
    """The outcome of ``qlis.compress``.

    ``tensors`` holds, for every tensor of the input in its order, either a QuantizedTensor
    (codes + parameters) or a float tensor kept as it is. ``cr``/``hcr`` are the paper's
    idealised ratios (no index or metadata cost); ``estimated_bytes`` is the real archive
    size to expect with an entropy coder; ``distortion`` says what it cost in quality:
    ``weight_rel_mse`` (the layers' relative MSE, each layer counting equally),
    ``weight_rel_mse_params`` (weighted by parameters), ``weight_rel_mse_max``, and
    ``output`` (cosine and relative MSE of the outputs) when calibration data was given,
    with ``calibration_cost`` (passes over the calibration data, seconds).
    """

    def __init__(
        self,
        tensors: Mapping[str, StoredTensor],
        layers: list[LayerPlan],
        policy: Policy,
        report: InspectionReport | None,
        original_bits: int,
        config: dict,
        distortion: dict,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.tensors = tensors
        self.aliases = dict(aliases or {})
        """Names of tied tensors, stored once, and the name each is stored under."""
        self.layers = layers
        self.policy = policy
        self.report = report
        self.original_bits = original_bits
        self.config = config
        self.distortion = distortion
        self.warnings: list[str] = []
        self.estimate_warnings: list[str] = []
        """The warnings in `warnings` that the estimated archive size gave (a size target out
        of reach): the archive written, its real size confirms or withdraws them."""
        self.calibration_cost: dict[str, float] | None = None
        planned = {layer.name for layer in layers}
        fixed = [tensors[n] for n in tensors if n not in planned]
        fixed_bits = sum(stored_bits(t) for t in fixed)
        self.numel = sum(math.prod(t.shape) for t in fixed) + sum(p.numel for p in layers)
        """Elements of all tensors (every parameter and buffer)."""
        self.paper_bits = fixed_bits + sum(p.paper_bits for p in layers)
        self.huffman_bits = fixed_bits + sum(p.huffman_bits for p in layers)
        self._fixed = fixed  # for estimated_bytes: a streamed result makes them at each read

    @cached_property
    def estimated_bytes(self) -> int:
        """The archive's size to expect, counted when first asked: it encodes the tensors
        outside the layers stored as float16 codes, which a `qlis.pack` (writing them) has
        no use for (a fifth of a second, serial, of ViT-L/14's 3.7 s on two threads)."""
        fixed = sum(unplanned_bytes(t) for t in self._fixed)
        return int(HEADER_BYTES + fixed + sum(p.coded_bytes for p in self.layers))

    @property
    def cr(self) -> float:
        """Paper CR: original bits / (b_l bits per weight the pruner kept; the rest in full).

        Only zeros the pruner made are free; zeros already in the weights are counted."""
        return self.original_bits / self.paper_bits if self.paper_bits else float("inf")

    @property
    def hcr(self) -> float:
        """Paper HCR: as ``cr`` but quantized layers counted at their Huffman-coded bits."""
        return self.original_bits / self.huffman_bits if self.huffman_bits else float("inf")

    @property
    def original_bytes(self) -> int:
        """Bytes of all input tensors in their dtypes (the size of a bare safetensors file)."""
        return self.original_bits // 8

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors the compressed model computes with (dequantized), for every input tensor
        (a tied one under each of its names, one tensor)."""
        state = {
            name: t.dequantize() if isinstance(t, QuantizedTensor) else t
            for name, t in self.tensors.items()
        }
        return with_aliases(state, self.aliases)

    def summary(self) -> dict:
        """Plain-JSON totals: policy, sizes, ratios and quality."""
        return {
            "policy": self.policy.strategy_id,
            "layers": len(self.layers),
            "tensors": len(self.tensors),
            "original_bytes": self.original_bytes,
            "estimated_bytes": self.estimated_bytes,
            "estimated_bits_per_weight": 8 * self.estimated_bytes / max(self.numel, 1),
            "cr": self.cr,
            "hcr": self.hcr,
            **{f"distortion_{k}": v for k, v in self.distortion.items() if k != "output"},
            "output": self.distortion.get("output"),
        }

    def estimate_missed(self) -> list[str]:
        """The warning that the policy's size target is out of reach, when the estimated
        archive is over it by more than 1% (none when there is no size target)."""
        wanted = self.policy.size_target_bytes(self.original_bytes, self.numel)
        if wanted is None or self.estimated_bytes <= wanted * 1.01:
            return []
        reached = self.original_bytes / max(self.estimated_bytes, 1)
        return [f"the size target ({wanted:,.0f} bytes, {self.original_bytes / wanted:.2f}x) "
                f"is out of reach: the smallest archive the candidates allow takes about "
                f"{self.estimated_bytes:,} bytes ({reached:.2f}x)"]

    def check_written_size(self, path: Path, codec: str) -> None:
        """Warn (and add to `warnings`) when the archive written at ``path`` is over its size
        target by more than 1%: the plan counts codes as ans codes them (``codec`` "raw"
        wrote a 2.5x archive asked 4x, silently), and its header and records by estimate.
        An archive within the target withdraws the estimate's warning that it is out of
        reach (the estimate is an upper bound: it said so of archives that met it)."""
        wanted = self.policy.size_target_bytes(self.original_bytes, self.numel)
        size = path.stat().st_size
        if wanted is None:
            return
        if size <= wanted * 1.01:
            self.warnings = [w for w in self.warnings if w not in self.estimate_warnings]
            self.estimate_warnings = []
            return
        why = (f"the plan counts codes as 'ans' codes them, and codec {codec!r} stores them "
               "otherwise" if codec not in ("ans", "auto") else "the plan's estimate missed")
        missed = (f"the archive is {size:,} bytes ({self.original_bytes / size:.2f}x), over the "
                  f"size target ({wanted:,.0f} bytes, {self.original_bytes / wanted:.2f}x) by "
                  f"{size / wanted - 1:.1%}: {why}")
        self.warnings.append(missed)
        warnings.warn(missed, QualityWarning, stacklevel=3)

    def header(self, source_bytes: int | None) -> dict[str, Any]:
        """The archive header's fields that describe this compression (`qlis.save` writes
        them): its config, its quality and its sizes (``source_bytes``: the file it came from,
        if any)."""
        return {
            "compression": self.config,
            "distortion": self.distortion,
            "summary": Summary(
                original_bytes=self.original_bytes,
                source_bytes=source_bytes,
                cr=_finite_or_none(self.cr),
                hcr=_finite_or_none(self.hcr),
            ).to_json(),
            "aliases": self.aliases,
        }

    def with_tensors(self, tensors: Mapping[str, torch.Tensor]) -> CompressionResult:
        """This compression applied, data-free, to new values of some of its tensors: a part
        trained again on the compressed model's own outputs (an MLP head refit on the
        compressed backbone's features) is stored as the part it replaces was (a planned
        layer rounded with its plan row's pruner and quantizer, and measured again; another
        tensor as the policy stores what lies outside its layers), and every other tensor
        keeps its codes and bytes. The output quality measured on calibration data described
        the model before and is dropped: the caller measures the new one. The archive's
        ``compression.replaced`` names them. Each must be one of this result's tensors (not
        a tied alias), with its shape and dtype, and finite."""
        if not isinstance(tensors, Mapping):
            raise InputError(f"with_tensors takes a mapping of names to tensors, got a "
                             f"{type(tensors).__name__}")
        checked: dict[str, torch.Tensor] = {}
        for name, tensor in checked_state(tensors.items()).items():  # dense, plain, not meta
            stored = self.tensors.get(name)
            if stored is None:
                where = "a tied alias: give the tensor it names" if name in self.aliases else (
                    "not a tensor of this result")
                raise InputError(f"tensor {name!r} is {where}")
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(
                    stored.shape) or tensor.dtype != stored.dtype:
                got = (f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor)
                       else type(tensor).__name__)
                raise InputError(f"tensor {name!r} must be a {tuple(stored.shape)} "
                                 f"{stored.dtype} tensor like the one it replaces, got {got}")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise InputError(f"tensor {name!r} holds NaN or infinity")
            checked[name] = tensor.detach().to("cpu").clone()
        new = dict(self.tensors)
        rows = {layer.name: i for i, layer in enumerate(self.layers)}
        layers = list(self.layers)
        for name, tensor in checked.items():
            if name in rows:
                row = layers[rows[name]]
                new[name], layers[rows[name]] = execute_layer(
                    name, tensor, LayerConfig(row.pruner, row.quantizer), row.qlis)
            else:
                new[name] = self.policy.stored_rest(tensor)
        replaced = sorted({*self.config.get("replaced", ()), *checked})
        result = CompressionResult(
            tensors=new, layers=layers, policy=self.policy, report=self.report,
            original_bits=self.original_bits, config={**self.config, "replaced": replaced},
            distortion={**_weight_distortion(layers), "output": None}, aliases=self.aliases)
        result.warnings = list(self.warnings)
        result.estimate_warnings = list(self.estimate_warnings)
        result.calibration_cost = self.calibration_cost
        return result

    def describe_quality(self) -> str:
        """One line on what the compression cost: the weight error, and the output error
        when calibration data was given (the mean cosine ± its standard error)."""
        mean, worst = self.distortion["weight_rel_mse"], self.distortion["weight_rel_mse_max"]
        text = (f"weight error: relative MSE {mean:.2e} per layer on average "
                f"(SNR {_snr_db(mean):.1f} dB), worst layer {worst:.2e}")
        output = self.distortion.get("output")
        if output:
            batches = output["batches"]
            where = (f"{batches} held-out calibration batch{'es' if batches != 1 else ''}"
                     if output.get("held_out") else "the calibration data")
            if output.get("synthetic"):
                where += " (synthetic inputs, not your data)"
            rel_mse = output.get("rel_mse")
            stderr = output.get("cosine_stderr")  # absent from older archives
            spread = f" ± {stderr:.5f}" if stderr is not None else ""
            text += (f"; output on {where}: cosine {output['cosine']:.5f}{spread}, " + (
                f"relative MSE {rel_mse:.2e}" if rel_mse is not None
                else "NOT FINITE (the compressed model outputs NaN or inf)"))
        return text

    def __repr__(self) -> str:
        return (
            f"CompressionResult(policy={self.policy.strategy_id!r}, layers={len(self.layers)}, "
            f"estimated_bytes={self.estimated_bytes}, "
            f"weight_rel_mse={self.distortion['weight_rel_mse']:.3g})"
        )


def _weight_distortion(layers: list[LayerPlan]) -> dict[str, float]:
    """The layers' relative weight errors: their mean (each layer counting equally), their
    mean weighted by parameters, and the worst."""
    return {
        "weight_rel_mse": sum(p.rel_mse for p in layers) / max(len(layers), 1),
        "weight_rel_mse_params": sum(p.rel_mse * p.numel for p in layers)
        / max(sum(p.numel for p in layers), 1),
        "weight_rel_mse_max": max((p.rel_mse for p in layers), default=0.0),
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _snr_db(rel_mse: float) -> float:
    return float("inf") if rel_mse <= 0 else -10 * math.log10(rel_mse)


EMPTIED_REL_MSE = 0.99
"""A layer's relative weight error from which it is said to keep nothing (`_emptied`)."""


def _emptied(layers: list[LayerPlan], tensors: Mapping[str, StoredTensor],
             state: Mapping[str, torch.Tensor]) -> list[str]:
    """A warning naming the layers that keep (almost) nothing of their weights, which the
    model then computes without; a ratio or a data-free quality line alone does not show it.
    Pruning and plain rounding (0 on the grid, or the nearest code) leave each weight's error
    within its magnitude, so a relative error of 1 means every weight became 0, and 0.99 that
    a few outliers are all that is left (a data-free rd at 12x kept 1 of a tied LLaMA
    table's 32,768 weights: its logits were 0, and nothing was said); error feedback trades
    weight error for output error and may exceed 1 with a useful layer, so a fitted layer is
    named when what it stores keeps under 1% of its weights' energy (a calibrated rd at 3.5
    b/w kept 2 of a tied table's 6,400, silently)."""
    names = [layer.name for layer in layers
             if layer.rel_mse >= EMPTIED_REL_MSE and (
                 layer.feedback is None or _energy(tensors[layer.name])
                 < (1 - EMPTIED_REL_MSE) * _energy(state[layer.name]))]
    if not names:
        return []
    return [f"{len(names)} layer(s) keep nothing of their weights (relative error >= "
            f"{EMPTIED_REL_MSE:g}: pruned or rounded to zeros, but for a few at most): "
            f"{_some_names(names)}; the model computes without them"]


def _masks(report: InspectionReport) -> list[str]:
    """A warning naming the tensors left out of the layers for their infinities: a mask (a
    causal one of -inf) is stored as it is, but so would be a weight an overflow broke."""
    if not report.masks:
        return []
    return [f"{len(report.masks)} tensor(s) hold infinities and no NaN, so are masks, no "
            f"weights: stored as they are, not compressed: {_some_names(report.masks)}"]


def _energy(tensor: StoredTensor) -> float:
    """The sum of the squares of the values ``tensor`` holds (dequantized)."""
    return float(dequantized(tensor).double().square().sum())


def _zero_rows_divided(layers: list[LayerPlan], tensors: Mapping[str, StoredTensor],
                       state: Mapping[str, torch.Tensor]) -> list[str]:
    """A warning naming the layers whose module divides them by their rows' norms (weight
    or spectral normalization's direction) with a row the compression made all zeros: 0 / 0,
    the model's outputs are NaN (the paper's prune at k=1.5 did it to a weight_norm layer,
    silently). rd keeps a weight in every such row; other policies are told here."""
    names = []
    for layer in layers:
        if layer.unchanged or not renormalized(layer.name):
            continue
        before, after = (t.reshape(len(t), -1) if t.ndim else t.reshape(1, 1)
                         for t in (state[layer.name], dequantized(tensors[layer.name])))
        if bool(((after == 0).all(dim=1) & (before != 0).any(dim=1)).any()):
            names.append(layer.name)
    if not names:
        return []
    return [f"{len(names)} layer(s) divided by their rows' norms (weight normalization) have "
            f"a row made all zeros: {_some_names(names)}; the model's outputs are NaN (rd "
            "keeps a weight in every such row; or prune or round them less)"]


def _some_names(names: list[str]) -> str:
    """The first five of ``names``, and how many more, for a warning."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _unreached(layers: list[LayerPlan], calibration: Calibration | None = None) -> list[str]:
    """Warnings naming the planned layers that calibration never ran (rounded data-free),
    and those a policy found the calibration's outputs do not depend on
    (``Calibration.unreached``: they ran, and were fitted to the inputs they saw where their
    ``reconstruction`` says so); layers stored as they were lost nothing, and are not
    named."""
    never_ran = [layer.name for layer in layers if layer.reconstruction == NOT_REACHED]
    off_path = [] if calibration is None else [
        layer.name for layer in layers if layer.name in calibration.unreached
        and layer.name not in never_ran and not layer.unchanged]
    found = []
    for names, what, how in (
            (never_ran, "the calibration never ran", "they were rounded data-free and "),
            (off_path, "the calibration's outputs do not depend on", "")):
        if names:
            found.append(f"{what} {len(names)} planned layer(s): {_some_names(names)}; {how}"
                         "their effect on the output was not measured")
    return found


def _score_outputs(calibration: Calibration | None) -> list[str]:
    """A warning where the compared outputs are one score per example: a batch's scores are
    one vector, whose cosine their common offset dominates (scores of 3.5 +- 0.5 kept cosine
    0.992 with a correlation of 0.21 to the model's), and a batch of one is a cosine of 1
    whenever the score keeps its sign."""
    count = None if calibration is None else calibration.scores_per_batch
    if count is None:
        return []
    how = ("calibrate on centred scores instead: a calib callable that returns the model's "
           "scores on your batches minus their mean (as qlis-iqa does)")
    if count == 1:
        return [f"each calibration batch gives one output value, whose cosine is only its "
                f"sign: the output quality reported says nothing of the scores; {how}"]
    return [f"the calibration's outputs are one score per example, compared un-centred: their "
            f"cosine is dominated by the scores' common offset and misses a loss of their "
            f"ranking; {how}"]


def _not_finite(output: dict | None) -> list[str]:
    if output is None or output.get("finite", True):
        return []
    return ["the compressed model outputs NaN or inf on the calibration batches: it is not "
            "usable (a layer rounded this coarsely breaks it, e.g. a weight-normalised weight "
            "rounded to all zeros); ask for a larger size or a quality target"]


def _select_config(select: SelectSpec) -> Any:
    if select is None or isinstance(select, str):
        return select
    if callable(select):
        return f"<function {getattr(select, '__qualname__', type(select).__name__)}>"
    return [str(s) for s in select]


def _first_names(plan: Plan, aliases: Mapping[str, str]) -> dict[str, dict]:
    """A plan's layers with a tied tensor's other names replaced by its first (planned) one."""
    layers: dict[str, dict] = {}
    for name, config in plan.to_json().items():
        first = aliases.get(name, name)
        if first in layers:
            raise ConfigError(f"the plan names the tied tensor {first!r} twice (also as "
                              f"{name!r})")
        layers[first] = config
    return layers


def _check_plan(plan: Plan, state: Mapping[str, torch.Tensor]) -> None:
    layout = tensor_layout(state)
    for name in plan:
        if name not in layout:
            raise ConfigError(f"the plan names {name!r}, which the model does not have")
        if not layout[name].is_floating_point():
            raise ConfigError(f"the plan names {name!r}, which is not a floating-point tensor")


def compress(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    policy: str | Policy = DEFAULT_POLICY,
    beta: float = 0.5,
    *,
    plan: Plan | Mapping | None = None,
    calib: CalibSpec | None = None,
    eps: float = 1e-3,
    select: SelectSpec = None,
    inplace: bool = False,
    progress: Callable[[int], None] | None = None,
    error_feedback: bool | None = None,
    bias_correction: bool = True,
    rounding_sweeps: int = DEFAULT_ROUNDING_SWEEPS,
    jobs: int | None = None,
    **options: Any,
) -> CompressionResult:
    """Compress the selected layers as a policy (or a hand-written ``plan``) says.

    The default policy ``"rd"`` allocates, per layer, the entropy-coded quantizer step that
    keeps quality: with no option it aims at a conservative weight error (docs/method.md);
    ``target_bits_per_weight=``, ``target_bytes=``, ``target_ratio=`` (real archive bytes)
    ask for a size, ``max_distortion=`` (weight error) or ``min_cosine=`` (output, needs
    ``calib``) for a quality. ``calib`` is a few input batches (tensors, tuples or dicts of
    keyword arguments) or a callable ``calib(model) -> outputs``; with it, distortion is
    measured on the model's outputs. The paper's policies keep their names: ``"prune"``
    (``k``), ``"quant"`` (``bits``), ``"lap"``, ``"laq"``, ``"lapq"``, with ``k_levels``,
    ``bits_levels``, ``granularity``, ``method`` (quantizer id), ``pruner=``/``quantizer=``
    (configs applied to every layer) and ``paper_cr`` (budget mode: the paper's idealised CR).

    With ``calib``, the plan is executed by reconstruction unless ``error_feedback=False``
    (``error_feedback=True`` without ``calib`` is refused): sequentially
    (qlis/quantize/reconstruct.py), layers in forward order, each rounded GPTQ-style on its
    quantizer's grid against the inputs the already-quantized model gives it (Linear,
    Conv1d/2d/3d incl. grouped and depthwise, Hugging Face Conv1D, attention's packed
    projections), and with ``bias_correction`` its bias shifted by the mean output error;
    other layers are rounded
    data-free and ``LayerPlan.reconstruction`` says so. ``rounding_sweeps`` passes of learned
    rounding (qlis/quantize/rounding.py) then re-choose each reconstructed layer's codes for its
    output error and their coded length (0: GPTQ's codes as they are).

    A module is left untouched unless ``inplace=True``. ``progress`` gets the number of
    parameters of each layer once it is executed: once per layer without calibration; with
    it, in every pass that the allocation executes (a few). Tensors kept as they are share
    memory with the input. ``jobs`` threads (default: every core) measure and quantize
    layers side by side; the result is the same whatever their number (qlis/workers/threads.py).

    >>> result = compress(torch.nn.Linear(64, 64), policy="quant", bits=4)
    >>> result.layers[0].bits, result.policy.strategy_id
    (4, 'quant')
    """
    Param("bool").check(inplace, "compress: inplace")
    inplace = inplace and isinstance(model_or_state_dict, torch.nn.Module)
    if inplace:
        check_loadable(model_or_state_dict, "compress(inplace=True)")
    # calibration runs the module with its weights swapped: the module to this call alone
    with model_in_use(model_or_state_dict if calib is not None or inplace else None):
        planned = plan_compression(
            model_or_state_dict, policy, beta, plan=plan, calib=calib, eps=eps,
            select=select, progress=progress, error_feedback=error_feedback,
            bias_correction=bias_correction, rounding_sweeps=rounding_sweeps, jobs=jobs,
            **options)
        stored, layers = planned.executor.run(planned.plan)
        result = planned.result(stored, layers)
        if inplace:
            model_or_state_dict.load_state_dict(result.state_dict())
    return result


@dataclass
class PlannedCompression:
    """A compression planned but not yet executed: what ``compress`` and the streaming
    ``qlis.pack`` share. Execute ``plan`` (``executor.run``, or layer by layer with
    ``executor.execute``), then build the result with ``result``."""

    state: Mapping[str, torch.Tensor]
    policy: Policy
    report: InspectionReport
    executor: PlanExecutor
    plan: Plan
    calibration: Calibration | None
    config: dict
    aliases: dict[str, str] = field(default_factory=dict)

    def result(self, tensors: Mapping[str, StoredTensor], layers: list[LayerPlan],
               ) -> CompressionResult:
        """The result of the executed plan (quality measured, warnings raised)."""
        distortion: dict[str, Any] = {**_weight_distortion(layers), "output": None}
        result = CompressionResult(
            tensors=tensors, layers=layers, policy=self.policy, report=self.report,
            original_bits=sum(t.numel() * storage_bits(t.dtype)
                              for t in tensor_layout(self.state).values()),
            config=self.config, distortion=distortion, aliases=self.aliases,
        )
        if self.calibration is not None:
            distortion["output"] = self.calibration.measure(
                self.executor.realize(self.plan).tensors)
            if self.calibration.synthetic:
                distortion["output"]["synthetic"] = True
            result.calibration_cost = {"passes": self.calibration.passes,
                                       "seconds": self.calibration.seconds}
        result.estimate_warnings = result.estimate_missed()
        result.warnings = (_masks(self.report) + result.estimate_warnings
                           + self.policy.review(result)
                           + _emptied(layers, tensors, self.state)
                           + _zero_rows_divided(layers, tensors, self.state)
                           + _unreached(layers, self.calibration)
                           + _score_outputs(self.calibration)
                           + _not_finite(distortion["output"]))
        for warning in result.warnings:
            warnings.warn(warning, QualityWarning, stacklevel=3)
        return result


def plan_compression(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    policy: str | Policy = DEFAULT_POLICY,
    beta: float = 0.5,
    *,
    plan: Plan | Mapping | None = None,
    calib: CalibSpec | None = None,
    eps: float = 1e-3,
    select: SelectSpec = None,
    progress: Callable[[int], None] | None = None,
    planning_progress: Callable[[int], None] | None = None,
    error_feedback: bool | None = None,
    bias_correction: bool = True,
    rounding_sweeps: int = DEFAULT_ROUNDING_SWEEPS,
    jobs: int | None = None,
    cluster: Cluster | None = None,
    cache: PassCache | None = None,
    spill: SpillFile | None = None,
    **options: Any,
) -> PlannedCompression:
    """Validate ``compress``'s arguments, inspect the model and let the policy plan; nothing
    is executed but what the policy measures while it plans. ``planning_progress`` gets the
    parameters of each layer the policy has measured; in a ``cluster`` every rank plans the
    same, each measuring the layers it owns; ``cache`` saves (and gives back) what the layers
    measured (qlis/archive/resume.py); ``spill`` keeps executed layers' codes and the calibration's
    reference outputs out of memory (qlis/workers/spill_file.py)."""
    if isinstance(model_or_state_dict, torch.nn.Module):
        check_not_packed(model_or_state_dict)
        check_unshared(model_or_state_dict, "compress")
    state, aliases = split_aliases(as_state_dict(model_or_state_dict))
    jobs = check_jobs(jobs)
    check_callback(progress, "progress")
    check_callback(planning_progress, "planning_progress")
    check_instance(cluster, Cluster, "cluster")
    check_instance(cache, PassCache, "cache")
    checked = check_options(COMPRESS_PARAMS, {
        "beta": beta, "eps": eps, "error_feedback": error_feedback,
        "bias_correction": bias_correction, "rounding_sweeps": rounding_sweeps}, "compress")
    beta, eps, error_feedback, bias_correction, rounding_sweeps = checked.values()
    if error_feedback and calib is None:
        raise ConfigError("error_feedback needs calibration data: pass calib=")
    error_feedback = calib is not None if error_feedback is None else error_feedback
    if rounding_sweeps and not error_feedback:
        raise ConfigError("rounding_sweeps refines reconstructed layers: it needs calib= "
                          "(and error_feedback not False)")
    if plan is not None:
        if options or (policy != DEFAULT_POLICY and policy != "plan"):
            raise ConfigError("give either plan= or a policy with options, not both")
        plan_policy: Policy = PlanPolicy(plan=_first_names(Plan.coerce(plan), aliases))
    else:
        plan_policy = make_policy(policy, **options)
    report = inspect(state, beta=beta, eps=eps, select=select, jobs=jobs, cluster=cluster,
                     cache=cache, score=plan_policy.ranks_by_score)
    plan_policy.check_reach(state, report)
    calibration = None
    if calib is not None:
        if not isinstance(model_or_state_dict, torch.nn.Module):
            raise InputError("calib= needs the model as an nn.Module (not a state dict)")
        calibration = Calibration(model_or_state_dict, calib, cluster, spill)
    executor = PlanExecutor(state, {layer.name: layer.QLIS for layer in report.layers},
                            calibration if error_feedback else None, bias_correction,
                            rounding_sweeps, progress, jobs, spill, plan_policy.stored_rest,
                            steps_from=calibration)
    context = PlanContext(
        state=state,
        report=report,
        model=model_or_state_dict if isinstance(model_or_state_dict, torch.nn.Module) else None,
        calibration=calibration,
        realize=executor.realize,
        progress=planning_progress,
        jobs=jobs,
        cluster=cluster,
        cache=cache,
    )
    the_plan = plan_policy.make_plan(context)
    _check_plan(the_plan, state)
    config = finite_json({
        "policy": plan_policy.get_config(),
        "beta": beta,
        "eps": eps,
        "select": _select_config(select),
        "error_feedback": error_feedback,
        "rounding_sweeps": rounding_sweeps,
        "plan": the_plan.to_json(),
    }, "the compression config")
    return PlannedCompression(state, plan_policy, report, executor, the_plan, calibration,
                              config, aliases)
