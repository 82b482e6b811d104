"""Sequential reconstruction: quantize the planned layers in forward order, each fitted to the
inputs that the already-quantized model gives it, then correct its bias.

Plain rounding (and error feedback against the float model's inputs) lets every layer's
error add to the next layers' inputs unseen. Here (as GPTQ and its successors do):

1. One pass of the float model finds the order in which the planned layers run, which of
   them calibration reaches (qlis/measure/layer_inputs.py says how each layer kind sees its inputs),
   and the float model's mean input of each layer.
2. In that order, a group of layers (consecutive layers that read the same input tensor, as
   attention's q/k/v projections or an Inception block's first convolutions) gets one pass
   of the model *with every earlier layer already quantized*; hooks accumulate each layer's
   input covariance ``H`` and mean input. The pass stops as soon as the group has run (when
   no planned layer runs twice per forward), so memory is one forward pass, whatever the
   model's depth. When the model's blocks form a chain (qlis/measure/blocks.py), the first
   block's inputs are cached once and a group inside the chain gets a pass of its own block
   alone, on the inputs the quantized blocks before it made: a pass costs one block, not
   half the model, and each finished block is kept only as stored.
3. Each layer of the group is pruned and quantized by its plan with GPTQ's error feedback
   along ``H`` (qlis/quantize/gptq.py, on the quantizer's own grid), and its bias (when it has one
   and it is stored in float) takes the mean output shift, so that the layer's mean output
   on the quantized model's inputs is the float layer's on the float inputs (Nagel et al.,
   2019, bias correction): ``b' = b + W mu - W_hat mu_hat``.

Layers that calibration never reaches, and weights of kinds without ``LayerInputs``
(embeddings), are rounded data-free; every layer's ``LayerPlan.reconstruction`` says which.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qlis.measure.blocks import Blocks, CachedInputs, ChainCheck, find_blocks
from qlis.measure.calibrate import Calibration, Replacement
from qlis.measure.layer_inputs import LayerInputs, accumulate, call_inputs, layer_inputs
from qlis.plan.execute import LayerPlan, StoredTensor, dequantized
from qlis.plan.plans import Plan
from qlis.workers.memory import release_freed_memory

FED_BACK = "error feedback"
BIAS_CORRECTED = "error feedback + bias correction"
NOT_REACHED = "data-free: calibration never reached this layer"
NO_INPUTS = "data-free: no error feedback for this kind of tensor"


class _GroupDone(Exception):
    """Raised by a hook once every layer of the current group has run: the pass stops."""


@dataclass
class _Moments:
    """Sum of X^T X, sum of X and row count, per output group (float64)."""

    sums: torch.Tensor
    totals: torch.Tensor
    rows: list[int]

    @classmethod
    def empty(cls, inputs: LayerInputs, with_covariance: bool) -> _Moments:
        width, groups = inputs.width, inputs.groups
        sums = torch.zeros(groups, width, width, dtype=torch.float64) if with_covariance else (
            torch.zeros(groups, 0, 0, dtype=torch.float64))
        return cls(sums, torch.zeros(groups, width, dtype=torch.float64), [0] * groups)

    def add(self, chunk: list[torch.Tensor]) -> None:
        for g, rows in enumerate(chunk):
            rows = rows.to(device="cpu")
            if self.sums.shape[1]:
                accumulate(rows, self.sums[g], self.totals[g])
            else:
                self.totals[g].add_(rows.to(torch.float64).sum(dim=0))
            self.rows[g] += rows.shape[0]

    def take_covariance(self) -> torch.Tensor:
        """(groups, width, width) float32, or (width, width) for one group; the sums are
        released (width^2 float64 per group: the largest buffers of a wide layer's pass)."""
        counts = torch.tensor([max(n, 1) for n in self.rows], dtype=torch.float64)
        h = self.sums.div_(counts[:, None, None]).float()
        self.sums = self.sums.new_zeros(self.sums.shape[0], 0, 0)
        return h[0] if h.shape[0] == 1 else h

    def mean(self) -> torch.Tensor:
        counts = torch.tensor([max(n, 1) for n in self.rows], dtype=torch.float64)
        return self.totals / counts[:, None]


@dataclass
class Reconstruction:
    """What sequential reconstruction made: per planned layer its stored tensor and plan row,
    and the corrected biases (state-dict name -> float tensor)."""

    tensors: dict[str, StoredTensor]
    layers: dict[str, LayerPlan]
    biases: dict[str, torch.Tensor]


def _hooked(
    watched: Mapping[str, LayerInputs], moments: dict[str, _Moments],
    on_call: Callable[[str, tuple, dict], None] | None = None,
) -> list:
    """Pre-hooks that add each watched weight's input rows to its moments."""
    handles = []
    for name, inputs in watched.items():

        def hook(module: nn.Module, args: tuple, kwargs: dict, name: str = name,
                 inputs: LayerInputs = inputs) -> None:
            if on_call is not None:
                on_call(name, args, kwargs)
            for chunk in inputs.chunks(args, kwargs):
                moments[name].add(chunk)

        handles.append(inputs.module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _order(
    calibration: Calibration, reachable: Mapping[str, LayerInputs], blocks: Blocks | None,
) -> tuple[list[list[str]], dict[str, _Moments], bool, bool]:
    """One pass of the float model: the groups of layers in forward order, every reached
    layer's float mean input, whether a planned layer runs more than once per forward, and
    whether ``blocks`` form a chain (qlis/measure/blocks.py)."""
    moments = {name: _Moments.empty(inputs, False) for name, inputs in reachable.items()}
    calls: dict[str, int] = dict.fromkeys(reachable, 0)
    groups: list[list[str]] = []
    last_input: list[object] = [None]  # kept alive, so no later tensor can take its address

    def on_call(name: str, args: tuple, kwargs: dict) -> None:
        calls[name] += 1
        if calls[name] == 1:
            x, previous = call_inputs(args, kwargs), last_input[0]
            same = x is previous or (
                isinstance(x, torch.Tensor) and isinstance(previous, torch.Tensor)
                and x.data_ptr() == previous.data_ptr() and x.shape == previous.shape)
            if groups and same:
                groups[-1].append(name)
            else:
                groups.append([name])
            last_input[0] = x

    check = ChainCheck(blocks) if blocks is not None else None
    handles = _hooked(reachable, moments, on_call)
    try:
        with check.watching() if check is not None else contextlib.nullcontext():
            calibration.feed()
    finally:
        for handle in handles:
            handle.remove()
    repeated = any(count > calibration.forward_calls for count in calls.values())
    chained = (check is not None and check.chained
               and check.runs == calibration.forward_calls)
    return groups, {n: moments[n] for group in groups for n in group}, repeated, chained


def _chain_positions(groups: list[list[str]], blocks: Blocks) -> list[int | None] | None:
    """Per group, the block that holds it (None before or after the chain), or None when
    the groups do not run block after block (a group across blocks, a layer between)."""
    positions: list[int | None] = []
    for group in groups:
        held = {blocks.index_of(name) for name in group}
        if len(held) != 1:
            return None
        positions.append(held.pop())
    inside = [i for i, p in enumerate(positions) if p is not None]
    if not inside:
        return None
    chain = positions[inside[0]:inside[-1] + 1]
    if None in chain or chain != sorted(chain):
        return None
    return positions


def _group_moments(
    group: list[str], reachable: Mapping[str, LayerInputs], stop_early: bool,
    run: Callable[[type[Exception] | None], None],
) -> dict[str, _Moments]:
    """Input moments of the group's layers over ``run(stop)``, one pass (of the model or of
    the block that holds them) that may end once the group has run."""
    watched = {name: reachable[name] for name in group}
    moments = {name: _Moments.empty(inputs, True) for name, inputs in watched.items()}
    seen: set[str] = set()

    def on_call(name: str, args: tuple, kwargs: dict) -> None:
        seen.add(name)

    handles = _hooked(watched, moments, on_call)
    if stop_early:
        last = watched[group[-1]].module

        def done(module: nn.Module, args: tuple, output: object) -> None:
            if seen == set(group):
                seen.clear()
                raise _GroupDone

        handles.append(last.register_forward_hook(done))
    try:
        run(_GroupDone if stop_early else None)
    finally:
        for handle in handles:
            handle.remove()
    return moments


def _corrected_bias(
    bias: torch.Tensor, inputs: LayerInputs, weight: torch.Tensor, approx: torch.Tensor,
    float_mean: torch.Tensor, quantized_mean: torch.Tensor,
) -> torch.Tensor:
    """b + W mu - W_hat mu_hat, per output (each output group with its own means)."""
    groups = inputs.groups
    w = inputs.output_matrix(weight).double().reshape(groups, -1, inputs.width)
    w_hat = inputs.output_matrix(approx).double().reshape(groups, -1, inputs.width)
    shift = (w @ float_mean[..., None] - w_hat @ quantized_mean[..., None]).reshape(-1)
    return (bias.double() + shift.to(bias.device)).to(bias.dtype)


def reconstruct(
    calibration: Calibration,
    plan: Plan,
    state: Mapping[str, torch.Tensor],
    execute: Callable[..., tuple[StoredTensor, LayerPlan]],
    bias_correction: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Reconstruction:
    """Quantize ``plan``'s layers sequentially (module doc). ``execute(name, weight, config,
    hessian=..., transposed=..., reconstruction=...)`` prunes and quantizes one layer (the
    caller's ``execute_layer``); ``progress`` gets each finished layer's parameter count.

    Where the model's blocks form a chain (qlis/measure/blocks.py), the groups inside it are
    measured on the blocks' cached inputs, one block at a time, and a finished block's layers
    are kept only as stored (dequantized again when a later pass needs them): the same
    moments as passes of the whole model, at the cost of one block per pass."""
    model = calibration.model
    kinds = {name: layer_inputs(model, name) for name in plan}
    reachable = {name: inputs for name, inputs in kinds.items() if inputs is not None}
    blocks = find_blocks(model)
    groups, float_moments, repeated, chained = _order(calibration, reachable, blocks)
    positions: list[int | None] = [None] * len(groups)
    if blocks is not None and chained and not repeated:
        positions = _chain_positions(groups, blocks) or positions
    result = Reconstruction({}, {}, {})
    replacements: dict[str, Replacement] = {}
    cached: CachedInputs | None = None
    at = 0  # the block whose inputs ``cached`` holds

    def of_block(index: int) -> dict[str, Replacement]:
        return {n: v for n, v in replacements.items() if blocks.index_of(n) == index}

    for group, position in zip(groups, positions, strict=True):
        if position is None:
            cached = None  # past the chain: whole passes, finished blocks made when they run
            run = functools.partial(calibration.feed, replacements=replacements)
        else:
            if cached is None:
                cached = CachedInputs(calibration, blocks, replacements)
            while at < position:
                finished = of_block(at)
                cached.advance(blocks.modules[at], finished)
                for name in finished.keys() & result.tensors.keys():
                    replacements[name] = functools.partial(dequantized, result.tensors[name])
                at += 1
                release_freed_memory()
            run = functools.partial(cached.run, blocks.modules[position], of_block(position))
        moments = _group_moments(group, reachable, not repeated, run)
        for name in group:
            inputs = reachable[name]
            config = plan[name]
            hessian = moments[name].take_covariance() if config.quantizer is not None else None
            stored, layer = execute(name, state[name], config, hessian=hessian,
                                    transposed=inputs.transposed, reconstruction=FED_BACK)
            approx = dequantized(stored)
            replacements[name] = approx
            bias = inputs.bias
            if bias_correction and bias in state and bias not in plan:
                corrected = _corrected_bias(state[bias], inputs, state[name], approx,
                                            float_moments[name].mean(),
                                            moments[name].mean())
                result.biases[bias] = replacements[bias] = corrected
                layer = dataclasses.replace(layer, reconstruction=BIAS_CORRECTED)
            result.tensors[name], result.layers[name] = stored, layer
            release_freed_memory()
            if progress is not None:
                progress(layer.numel)
    for name in plan:
        if name not in result.layers:
            note = NO_INPUTS if kinds[name] is None else NOT_REACHED
            result.tensors[name], result.layers[name] = execute(
                name, state[name], plan[name], reconstruction=note)
            if progress is not None:
                progress(result.layers[name].numel)
    return result
