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
   half the model, and each finished block is kept only as stored. A whole pass after the
   chain (a pooler, a head) makes each finished layer when its module runs, once they total
   more than one block: it holds one block's float copies, not the model's.
3. Each layer of the group is pruned and quantized by its plan with GPTQ's error feedback
   along ``H`` (qlis/quantize/gptq.py, on the quantizer's own grid), and its bias (when it has one
   and it is stored in float) takes the mean output shift, so that the layer's mean output
   on the quantized model's inputs is the float layer's on the float inputs (Nagel et al.,
   2019, bias correction): ``b' = b + W mu - W_hat mu_hat``.

Every sum over calibration batches is the same bits however the batches are split
(qlis/measure/batch_sums.py), so the ranks of a torch.distributed job can share them: each
runs its batches, a layer's moments are added onto the rank that quantizes it, and the
layer is sent to the others (`reconstruct`).

An embedding table has no input covariance (a lookup's input is a row index), but an error in a
row costs the outputs by the gradients that reach the rows it gives: where rd's backward
passes measured their covariance S (`Calibration.output_covariances`), the table is rounded
with the same error feedback along S (its columns as a layer's inputs; for a table tied to
the output layer, S adds what the output layer's products cost), once the layers are
done (fitted first, so that the layers saw its rows, MiniLM at 2.75 bits/weight kept less:
cosine 0.9739 against 0.9772). On MiniLM it moves the calibrated front by 0.14-0.17 bits/weight
at cosines 0.99-0.995 (docs/method.md).

Layers that calibration never reaches, and weights of kinds without ``LayerInputs``
(embeddings without S), are rounded data-free; every layer's ``LayerPlan.reconstruction`` says
which.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qlis.errors import InputError, QlisError
from qlis.measure.batch_sums import FixedPointSum, OrderedSum, gather_totals
from qlis.measure.blocks import Blocks, CachedInputs, ChainCheck, find_blocks
from qlis.measure.calibrate import EAGER_BYTES, Calibration, Replacement
from qlis.measure.distortion import squared_sums
from qlis.measure.layer_inputs import LayerInputs, call_inputs, float64_parts, layer_inputs
from qlis.plan.execute import LayerPlan, StoredTensor, dequantized, lazily
from qlis.plan.layer_message import error_message, layer_message, read_layer_message
from qlis.plan.plans import Plan
from qlis.quantize.gptq import CovarianceNotPositive
from qlis.quantize.quantizers import get_quantizer
from qlis.workers.cluster import Cluster
from qlis.workers.memory import release_freed_memory
from qlis.workers.threads import single_threaded_ops

_BIAS_BAND = 1 << 18  # weights widened to float64 at once by a bias correction
FED_BACK = "error feedback"
BIAS_CORRECTED = "error feedback + bias correction"
BIAS_ONLY = "bias correction"
"""A layer kept as it is (neither pruned nor quantized) whose bias takes the mean shift of
the quantized layers before it."""
OUTPUT_FED_BACK = "error feedback along the output's gradients"
NOT_REACHED = "data-free: calibration never reached this layer"
NO_INPUTS = "data-free: no error feedback for this kind of tensor"
NOT_POSITIVE = "data-free: its inputs' covariance has no Cholesky factor (nearly silent inputs)"
NO_GRID = "data-free: its quantizer describes no grid to feed errors back on"


class _GroupDone(Exception):
    """Raised by a hook once every layer of the current group has run: the pass stops."""


@dataclass
class _Moments:
    """One layer's input moments over a pass, per output group: the sum of X^T X (exact on
    a grid: `FixedPointSum`; None in the float pass, which needs only means), the sum of X
    (added call by call in the pass's order: `OrderedSum`), the row count, and the largest
    trace of one term's X^T X and the number of terms (what sizes the next passes' grids).
    In a job, each rank's moments are its batches' until `_combined` adds every rank's."""

    covariance: FixedPointSum | None
    totals: OrderedSum
    rows: list[int]
    largest_trace: float = 0.0
    terms: int = 0
    _key: tuple[int, int] = (-1, -1)

    @classmethod
    def empty(cls, inputs: LayerInputs, distributed: bool,
              grid: tuple[float, int] | None = None) -> _Moments:
        """Empty moments; ``grid``: (largest trace, calls) the covariance's grid is sized
        for (None: no covariance)."""
        width, groups = inputs.width, inputs.groups
        covariance = None if grid is None else FixedPointSum((groups, width, width), *grid)
        return cls(covariance, OrderedSum((groups, width), distributed), [0] * groups)

    def add_call(self, batch: int, chunks: Iterator[list[torch.Tensor]]) -> None:
        """Add the input rows of one call of the layer's module on ``batch``: each float64
        part of a group's rows (`float64_parts`) is one term of the covariance."""
        self._key = (batch, self._key[1] + 1 if self._key[0] == batch else 0)
        sums = None
        for chunk in chunks:
            if sums is None:
                sums = torch.zeros(len(chunk), chunk[0].shape[-1], dtype=torch.float64)
            for g, rows in enumerate(chunk):
                for part in float64_parts(rows):
                    sums[g] += part.sum(dim=0)
                    trace = squared_sums(part, part)[0]  # the same bits on any thread count
                    self.largest_trace = max(self.largest_trace, trace)
                    self.terms += 1
                    if self.covariance is not None:
                        self.covariance.add_gram(g, part, trace)
                self.rows[g] += rows.shape[0]
        if sums is not None:
            self.totals.add(self._key, sums)

    def take_covariance(self) -> torch.Tensor:
        """(groups, width, width) float32, or (width, width) for one group; the sums are
        released (width^2 per group: the largest buffers of a wide layer's pass)."""
        return self.covariance.take([max(n, 1) for n in self.rows])

    def mean(self) -> torch.Tensor:
        counts = torch.tensor([max(n, 1) for n in self.rows], dtype=torch.float64)
        return self.totals.total() / counts[:, None]


def _combined(cluster: Cluster | None, moments: Mapping[str, _Moments]) -> float:
    """Add every rank's moments (sums of X, rows, calls; the largest trace) into each rank's
    (in one process: as they are); the largest trace a covariance grid refused (0: none)."""
    gather_totals(cluster, [m.totals for m in moments.values()])
    found = [[m.rows, m.largest_trace, m.terms,
              m.covariance.overflow if m.covariance is not None else 0.0]
             for m in moments.values()]
    if cluster is not None:
        seen = cluster.all_gather_json(found)
        found = [[[sum(rows) for rows in zip(*(r[i][0] for r in seen), strict=True)],
                  max(r[i][1] for r in seen), sum(r[i][2] for r in seen),
                  max(r[i][3] for r in seen)] for i in range(len(found))]
    for m, (rows, largest, terms, _) in zip(moments.values(), found, strict=True):
        m.rows, m.largest_trace, m.terms = rows, largest, terms
    return max((overflow for *_, overflow in found), default=0.0)


@dataclass
class Reconstruction:
    """What sequential reconstruction made: per planned layer its stored tensor and plan row,
    and the corrected biases (state-dict name -> float tensor)."""

    tensors: dict[str, StoredTensor]
    layers: dict[str, LayerPlan]
    biases: dict[str, torch.Tensor]


def _hooked(
    calibration: Calibration, watched: Mapping[str, LayerInputs],
    moments: dict[str, _Moments], on_call: Callable[[str, tuple, dict], None] | None = None,
) -> list:
    """Pre-hooks that add each watched weight's input rows to its moments."""
    handles = []
    for name, inputs in watched.items():

        def hook(module: nn.Module, args: tuple, kwargs: dict, name: str = name,
                 inputs: LayerInputs = inputs) -> None:
            if on_call is not None:
                on_call(name, args, kwargs)
            moments[name].add_call(calibration.batch, inputs.chunks(args, kwargs))

        handles.append(inputs.module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _order(
    calibration: Calibration, reachable: Mapping[str, LayerInputs], blocks: Blocks | None,
) -> tuple[list[list[str]], dict[str, _Moments], bool, bool]:
    """One pass of the float model: the groups of layers in forward order, every reached
    layer's float mean input, whether a planned layer runs more than once per forward, and
    whether ``blocks`` form a chain (qlis/measure/blocks.py)."""
    cluster = calibration.cluster
    moments = {name: _Moments.empty(inputs, cluster is not None)
               for name, inputs in reachable.items()}
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
    handles = _hooked(calibration, reachable, moments, on_call)
    try:
        with check.watching() if check is not None else contextlib.nullcontext():
            calibration.feed()
    finally:
        for handle in handles:
            handle.remove()
    repeated = any(count > calibration.forward_calls for count in calls.values())
    chained = (check is not None and check.chained
               and check.runs == calibration.forward_calls)
    if cluster is not None:
        cluster.agree([groups, repeated, chained], "order of layers on its calibration batches")
    reached = {n: moments[n] for group in groups for n in group}
    _combined(cluster, reached)
    return groups, reached, repeated, chained


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
    calibration: Calibration, group: list[str], reachable: Mapping[str, LayerInputs],
    float_moments: Mapping[str, _Moments], stop_early: bool,
    run: Callable[[type[Exception] | None], None],
) -> dict[str, _Moments]:
    """Input moments of the group's layers over ``run(stop)``, one pass (of the model or of
    the block that holds them) that may end once the group has run, every rank's added. A
    covariance grid sized by the float model that a quantized input outgrows (inputs 256x
    larger in norm) is sized again by what was seen, and the pass made again."""
    watched = {name: reachable[name] for name in group}
    grids = {name: (float_moments[name].largest_trace, float_moments[name].terms)
             for name in group}
    for _ in range(2):
        moments = _one_pass(calibration, watched, grids, stop_early, run)
        if not _combined(calibration.cluster, moments):
            return moments
        grids = {name: (m.largest_trace, m.terms) for name, m in moments.items()}
    raise InputError(f"the inputs of {group[0]} are not finite once the layers before it are "
                     "quantized; calibrate with error_feedback=False, or keep more bits")


def _one_pass(
    calibration: Calibration, watched: Mapping[str, LayerInputs],
    grids: Mapping[str, tuple[float, int]], stop_early: bool,
    run: Callable[[type[Exception] | None], None],
) -> dict[str, _Moments]:
    """This rank's moments of the ``watched`` layers over ``run(stop)``."""
    group = list(watched)
    moments = {name: _Moments.empty(inputs, calibration.cluster is not None, grids[name])
               for name, inputs in watched.items()}
    seen: set[str] = set()

    def on_call(name: str, args: tuple, kwargs: dict) -> None:
        seen.add(name)

    handles = _hooked(calibration, watched, moments, on_call)
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


def _fitted(
    cluster: Cluster | None, group: list[str], moments: Mapping[str, _Moments],
    state: Mapping[str, torch.Tensor],
    fit: Callable[[str, _Moments], tuple[StoredTensor, LayerPlan, torch.Tensor | None]],
    keep: Callable[[StoredTensor], StoredTensor],
) -> list[tuple[str, tuple[StoredTensor, LayerPlan, torch.Tensor | None]]]:
    """Each layer of ``group`` fitted (``fit``) by the rank that owns it, and every fitted
    layer on every rank. Every message is exchanged before any error is raised, so that no
    rank waits for one that stopped."""
    if cluster is None:
        return [(name, fit(name, moments[name])) for name in group]
    owners = cluster.owners([float(state[name].numel()) for name in group])
    for name, owner in zip(group, owners, strict=True):
        moments[name].covariance.reduce_onto(cluster, owner)
        if owner != cluster.rank:
            moments[name].covariance = None  # another rank's scratch now
    messages, failure = {}, None
    for name, owner in zip(group, owners, strict=True):
        if owner == cluster.rank and failure is None:
            try:
                messages[name] = layer_message(*fit(name, moments[name]))
            except QlisError as err:
                failure, messages[name] = err, error_message(str(err))
        elif owner == cluster.rank:
            messages[name] = error_message(f"stopped by {failure}")
    received = [(name, cluster.broadcast_bytes(messages.get(name), owner))
                for name, owner in zip(group, owners, strict=True)]
    if failure is not None:
        raise failure
    fitted = []
    for (name, data), owner in zip(received, owners, strict=True):
        stored, layer, bias = read_layer_message(data, owner)
        fitted.append((name, (keep(stored) if owner != cluster.rank else stored, layer, bias)))
    return fitted


def _corrected_bias(
    bias: torch.Tensor, inputs: LayerInputs, weight: torch.Tensor, approx: torch.Tensor,
    float_mean: torch.Tensor, quantized_mean: torch.Tensor,
) -> torch.Tensor:
    """b + W mu - W_hat mu_hat, per output (each output group with its own means), in
    float64 a band of outputs at a time (no float64 copy of a wide weight)."""
    groups = inputs.groups
    w = inputs.output_matrix(weight).reshape(groups, -1, inputs.width)
    w_hat = inputs.output_matrix(approx).reshape(groups, -1, inputs.width)
    shift = torch.empty(w.shape[:2], dtype=torch.float64)
    band = max(1, _BIAS_BAND // inputs.width)
    for start in range(0, w.shape[1], band):
        rows = slice(start, start + band)
        shift[:, rows] = (w[:, rows].double() @ float_mean[..., None]
                          - w_hat[:, rows].double() @ quantized_mean[..., None])[..., 0]
    return (bias.double() + shift.reshape(-1).to(bias.device)).to(bias.dtype)


def reconstruct(
    calibration: Calibration,
    plan: Plan,
    state: Mapping[str, torch.Tensor],
    execute: Callable[..., tuple[StoredTensor, LayerPlan]],
    bias_correction: bool = True,
    progress: Callable[[int], None] | None = None,
    keep: Callable[[StoredTensor], StoredTensor] = lambda stored: stored,
) -> Reconstruction:
    """Quantize ``plan``'s layers sequentially (module doc). ``execute(name, weight, config,
    hessian=..., transposed=..., reconstruction=..., overwrite_hessian=True)`` prunes and
    quantizes one layer (the caller's ``execute_layer``; the covariance is its to overwrite);
    ``progress`` gets each finished layer's parameter count.

    In a job (the calibration's ``cluster``), each rank runs its calibration batches, each
    layer's moments are added onto the rank that owns it (owners balanced by parameters),
    which quantizes it and sends it to the others (``keep``: what a rank does with a layer it
    received, as ``execute`` does with its own): every rank ends with the result one process
    makes, to the bit.

    Where the model's blocks form a chain (qlis/measure/blocks.py), the groups inside it are
    measured on the blocks' cached inputs, one block at a time, and a finished block's layers
    are kept only as stored (dequantized again when a later pass needs them): the same
    moments as passes of the whole model, at the cost of one block per pass."""
    model = calibration.model
    # a weight of no elements (no inputs or no outputs) has nothing to fit
    kinds = {name: layer_inputs(model, name) if state[name].numel() else None for name in plan}
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

    def fit(name: str, moments: _Moments) -> tuple[StoredTensor, LayerPlan, torch.Tensor | None]:
        """One layer quantized on its moments, and its corrected bias (None: none), on one
        thread (`single_threaded_ops`): torch's reductions round by the number of threads
        that split them, and the layer must be the same bits in any process of any job."""
        inputs, config = reachable[name], plan[name]
        kept = config.unchanged
        on_grid = config.quantizer is None or get_quantizer(config.quantizer).has_grid()
        with single_threaded_ops():
            if not on_grid:
                stored, layer = execute(name, state[name], config, reconstruction=NO_GRID)
            else:
                hessian = moments.take_covariance() if config.quantizer is not None else None
                try:
                    stored, layer = execute(name, state[name], config, hessian=hessian,
                                            transposed=inputs.transposed,
                                            reconstruction="" if kept else FED_BACK,
                                            overwrite_hessian=True)
                except CovarianceNotPositive:
                    return (*execute(name, state[name], config, reconstruction=NOT_POSITIVE),
                            None)
            if not (bias_correction and inputs.bias in state and inputs.bias not in plan):
                return stored, layer, None
            corrected = _corrected_bias(state[inputs.bias], inputs, state[name],
                                        dequantized(stored), float_moments[name].mean(),
                                        moments.mean())
        note = BIAS_ONLY if kept else BIAS_CORRECTED if on_grid else f"{NO_GRID}; {BIAS_ONLY}"
        return stored, dataclasses.replace(layer, reconstruction=note), corrected

    def of_block(index: int) -> dict[str, Replacement]:
        return {n: v for n, v in replacements.items() if blocks.index_of(n) == index}

    eager = EAGER_BYTES
    if any(position is not None for position in positions):  # then whole passes hold one
        eager = max(sum(param.numel() for param in module.parameters()) * 4  # block's floats
                    for module in blocks.modules)
    for group, position in zip(groups, positions, strict=True):
        if position is None:
            cached = None  # past the chain: whole passes, finished blocks made when they run
            run = functools.partial(calibration.feed, replacements=replacements,
                                    eager_bytes=eager)
        else:
            if cached is None:
                cached = CachedInputs(calibration, blocks, replacements)
            while at < position:
                cached.advance(blocks.modules[at], of_block(at))
                at += 1
                release_freed_memory()
            run = functools.partial(cached.run, blocks.modules[position], of_block(position))
        moments = _group_moments(calibration, group, reachable, float_moments, not repeated,
                                 run)
        for name, (stored, layer, corrected) in _fitted(calibration.cluster, group, moments,
                                                         state, fit, keep):
            # inside the chain a fitted layer is made when its module runs, so that a pass
            # holds one float copy of a layer, not the block's (48 MiB at width 1024)
            replacements[name] = dequantized(stored) if position is None else lazily(stored)
            if corrected is not None:
                result.biases[reachable[name].bias] = corrected
                replacements[reachable[name].bias] = corrected
            result.tensors[name], result.layers[name] = stored, layer
            release_freed_memory()
            if progress is not None:
                progress(layer.numel)
    for name, covariance in calibration.output_covariances.items():
        if name not in plan or kinds[name] is not None or not state[name].numel() or (
                plan[name].quantizer is None):
            continue
        with single_threaded_ops():  # every rank fits the table, to the same bits
            result.tensors[name], result.layers[name] = execute(
                name, state[name], plan[name], hessian=covariance.clone(),
                reconstruction=OUTPUT_FED_BACK, overwrite_hessian=True,
                row_shares=calibration.row_shares.get(name))
        if progress is not None:
            progress(result.layers[name].numel)
    for name in plan:
        if name not in result.layers:
            note = NO_INPUTS if kinds[name] is None else NOT_REACHED
            if plan[name].unchanged:
                note = ""  # nothing rounded
            result.tensors[name], result.layers[name] = execute(
                name, state[name], plan[name], reconstruction=note)
            if progress is not None:
                progress(result.layers[name].numel)
    return result
