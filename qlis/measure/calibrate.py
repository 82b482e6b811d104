"""Calibration: run the model on a few of the user's inputs and measure output distortion.

``calib`` is either a sequence of input batches (a tensor, a tuple of positional arguments,
a dict of keyword arguments, e.g. a tokenizer's output, or a callable
``batch(model) -> outputs`` that runs one batch its own way) or a callable
``calib(model) -> outputs`` for all of them (which cannot be split into batches, so nothing
is held out). The original model runs once; any set of replacement weights
is then measured by swapping them into the module for one pass (and restoring it after), so
the user's model is never left modified.

Outputs: a tensor, or the first tensor of a tuple / dict / ``ModelOutput`` (for Hugging
Face models, ``last_hidden_state`` or ``logits``). Cosine is measured per vector along the
last dimension (per token, per embedding); a feature map (4 or more dimensions: examples,
channels, then space) as one vector per example, since its last dimension is a row of pixels
(rows that are zero in both would count as perfect); outputs of width 1 (a score per input)
are compared as one vector per batch.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from qlis.errors import ConfigError, InputError, QlisError, first_line
from qlis.measure.batch_sums import OrderedSum, gather_totals
from qlis.measure.distortion import squared_sums
from qlis.measure.layer_inputs import layer_inputs
from qlis.measure.row_shares import lookup_shares
from qlis.models.tensors import renormed_tables, tensor_label
from qlis.quantize.column_scales import divided_columns
from qlis.workers.cluster import Cluster, share_of, together
from qlis.workers.memory import allocation_failed
from qlis.workers.spill_file import SpillFile
from qlis.workers.threads import single_threaded_ops

CalibSpec = Sequence[Any] | Callable[[torch.nn.Module], Any]
Run = tuple[int, Callable[[], Any]]
"""One model call of a pass: its key (the batch's index) and how to make it."""
Replacement = torch.Tensor | Callable[[], torch.Tensor]
"""A tensor a calibration pass computes with instead of the model's own, or how to make it."""
EAGER_BYTES = 256 << 20
"""Replacements made when asked total at most this much float32 before they are made layer by
layer instead (`Calibration.swapped`)."""
HOLDOUT_EVERY = 4
"""With at least this many batches, every fourth one is held out: reconstruction and the
allocation's probes fit on the others, and the output quality that ``min_cosine`` aims at and
the result reports is measured on the held-out ones, which no layer was fitted to."""
OUTPUT_COVARIANCE_BYTES = 256 << 20
"""The most float64 the embeddings' output covariances may take over all fitting batches (a
job keeps each batch's term until the ranks add them in order): a wider table, or one
calibrated on more batches, is rounded to nearest, in one process too (so that a job writes
the archive one process writes)."""
_REPEATABLE = 1e-4
"""The largest relative difference between two runs of the float model on one batch that
counts as the same output (float rounding of another order of sums; Reformer's random hashing
differs by 0.3)."""
_SQUARES_AT_ONCE = 1 << 20
"""Output gradients widened to float64 at once (a 256k-word vocabulary's logits would take
2 GiB for 1,024 tokens)."""
_MISFIT_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError)
"""What a model raises for inputs of the wrong shape, dtype or keywords (AttributeError: an
input it needs left out, read as None: CLIP's pixel_values given text alone)."""


@runtime_checkable
class LazyTable(Protocol):
    """A replacement that makes its whole tensor when called, or some of its rows alone: an
    embedding's table then gives a call only the rows it looks up (`Calibration.swapped`)."""

    def __call__(self) -> torch.Tensor: ...

    def rows(self, index: torch.Tensor) -> torch.Tensor: ...


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor a model output stands for: the first of a tuple, dict or ModelOutput that
    has a dimension (a 0-d one is a loss, which a Hugging Face model puts first when the
    batch holds ``labels``: one number, whose cosine is 1 whatever the weights)."""
    values: Iterable[Any] = ()
    if isinstance(output, torch.Tensor):
        values = (output,)
    elif isinstance(output, Mapping):
        values = output.values()
    elif isinstance(output, Sequence):
        values = output
    tensors = [value for value in values if isinstance(value, torch.Tensor)]
    found = next((value for value in tensors if value.ndim), None)
    if found is None:
        what = "a single number (a loss?)" if tensors else "no tensor"
        raise InputError(
            f"the model returned a {type(output).__name__} with {what}; pass calib="
            "callable(model) -> tensor to say which output to compare, and leave the "
            "training targets (labels) out of the calibration batches"
        )
    if found.is_meta:
        raise InputError("the model's output is on the meta device (a tensor without "
                         "values): load its weights before calibrating")
    return found


def _first_not_finite(model: torch.nn.Module) -> str | None:
    """The name of the model's first floating weight or buffer holding NaN or inf, if any:
    what makes its outputs NaN whatever the inputs."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def _mixed_dtypes(model: torch.nn.Module) -> str | None:
    """How the model's floating weights mix dtypes (None where they share one): a forward
    that multiplies them together fails whatever the inputs."""
    elements: dict[torch.dtype, int] = {}
    example: dict[torch.dtype, str] = {}
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point():
            elements[tensor.dtype] = elements.get(tensor.dtype, 0) + tensor.numel()
            example.setdefault(tensor.dtype, name)
    if len(elements) < 2:
        return None
    common, *others = sorted(elements, key=elements.__getitem__, reverse=True)
    odd = ", ".join(f"{tensor_label(example[dtype])} is {dtype}" for dtype in others)
    return f"its weights are {common} but for some ({odd})"


_MAIN_INPUTS = ("input_ids", "pixel_values", "input_features", "input_values")
"""The inputs a Hugging Face model's forward is fed by (text, images, audio); a model of two
(CLIP: text and images) fails without either, with a message of its own about None."""


def _inputs_left_out(model: torch.nn.Module, batch: object) -> list[str]:
    """The main inputs (`_MAIN_INPUTS`) that ``model``'s forward takes and the keyword
    ``batch`` does not give; none for other batches or forwards that do not say."""
    if not isinstance(batch, Mapping):
        return []
    try:
        taken = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return []
    return [name for name in _MAIN_INPUTS if name in taken and name not in batch]


def _model_failed(err: Exception, where: str, first: bool,
                  model: torch.nn.Module | None = None, batch: object = None) -> InputError:
    """What the model raised on calibration data, as the user's error: on the first pass a
    batch it cannot take (naming the main inputs ``batch`` leaves out), or a model that
    cannot run at all (weights of mixed dtypes); after it, a model that no longer computes
    as it did."""
    if isinstance(err, MemoryError) or allocation_failed(err):
        return InputError(f"not enough memory to run the model on the calibration data "
                          f"({where}): calibrate on smaller batches")
    text = f"{type(err).__name__}: {first_line(err)}"
    left_out = _inputs_left_out(model, batch) if first and model is not None else []
    if left_out:
        text += (f"; the batch gives no {' or '.join(left_out)}, which "
                 f"{type(model).__name__} takes")
    mixed = _mixed_dtypes(model) if first and model is not None else None
    if mixed is not None:
        return InputError(f"the model failed on the calibration data ({where}): {text}; "
                          f"{mixed}: store them in one dtype")
    if first and isinstance(err, _MISFIT_ERRORS):
        return InputError(f"the calibration data does not fit the model ({where}): {text}")
    if first:
        return InputError(f"the model failed on the calibration data ({where}): {text}")
    return InputError(f"the model failed on the calibration data ({where}) after running on "
                      f"it before: {text}; calibration needs a model that computes the same "
                      "way on every pass")


def _shared_tensors(model: torch.nn.Module) -> set[int]:
    """Ids of the tensors that more than one module holds (tied weights)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, tensor in model.named_parameters(remove_duplicate=False):
        (shared if id(tensor) in seen else seen).add(id(tensor))
    return shared


def _calling_module(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """The module whose call multiplies by (or looks up in) weight ``name``: a layer kind's
    (qlis/measure/layer_inputs.py) or an embedding's own table; None when no call is known
    to be the tensor's only use."""
    inputs = layer_inputs(model, name)
    if inputs is not None:
        return inputs.module
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return module if isinstance(module, torch.nn.Embedding) and attr == "weight" else None


@dataclass(frozen=True)
class TableUses:
    """An embedding table whose cost the calibration's hooks see: the embeddings that look
    rows up in its weight and the Linear layers that multiply by it; ``tied``: the weight is
    held by more than one module, so its uses' terms must be in one unit."""

    table: torch.nn.Embedding
    lookups: list[torch.nn.Embedding]
    heads: list[torch.nn.Linear]
    tied: bool


def _table(model: torch.nn.Module, name: str, shared: set[int]) -> TableUses | None:
    """The uses of the embedding whose table weight ``name`` is (`table_uses`), or None."""
    module = _calling_module(model, name)
    if isinstance(module, torch.nn.Embedding):
        return table_uses(model, module, shared)
    return None


def table_uses(model: torch.nn.Module, table: torch.nn.Embedding, shared: set[int],
               ) -> TableUses | None:
    """The table alone, or, for a weight tied between modules (a language model's input
    embedding and output layer: GPT-2, OPT, Gemma, T5, BART), its ``nn.Embedding`` lookups
    and ``nn.Linear`` products. None when another kind of module holds it too, whose
    products' cost the hooks do not see."""
    if id(table.weight) not in shared:
        return TableUses(table, [table], [], tied=False)
    holders = [module for module in model.modules()
               if any(p is table.weight for p in module.parameters(recurse=False))]
    lookups = [module for module in holders if isinstance(module, torch.nn.Embedding)]
    heads = [module for module in holders if type(module) is torch.nn.Linear]
    if len(lookups) + len(heads) < len(holders):
        return None
    return TableUses(table, lookups, heads, tied=True)


def _add_gram(total: torch.Tensor, gradient: torch.Tensor) -> None:
    """Add G^T G of an output gradient's rows to ``total``, on one thread (a product's bits
    depend on how many threads split it, and a job's ranks must add the same bits)."""
    rows = gradient.detach().reshape(-1, gradient.shape[-1]).to(torch.float64)
    with single_threaded_ops():
        total += rows.T @ rows


def _lookup_scale(module: torch.nn.Embedding, args: tuple, output: torch.Tensor,
                  ) -> float | None:
    """c where an embedding with a forward of its own gives c times the rows it looks up
    (BART's and Gemma's scaled embeddings), None where it gives something else; on one
    thread, so that every rank finds the same c."""
    ids = args[0] if args else None
    if not (isinstance(ids, torch.Tensor) and ids.dtype in (torch.int64, torch.int32)
            and ids.numel() and 0 <= int(ids.min()) <= int(ids.max()) < len(module.weight)):
        return None  # not the rows it gives: a learned position embedding's shape source
    with torch.no_grad(), single_threaded_ops():
        rows = torch.nn.functional.embedding(ids, module.weight).to(torch.float64)
        given = output.detach().to(torch.float64)
        if rows.shape != given.shape or not bool(rows.any()):
            return None
        scale = float((given * rows).sum() / rows.square().sum())
        scaled = scale * rows
        if not math.isfinite(scale) or bool(
                (given - scaled).abs().max() > 1e-5 * scaled.abs().max()):
            return None
    return scale


def _count_lookups(counts: torch.Tensor, ids: Any, gradient: torch.Tensor) -> None:
    """Add to ``counts`` each row that ``ids`` looked up where the output's gradient is not
    zero (a lookup that reaches the outputs: not a padding position). Ids that are not the
    rows' indices (a forward of its own) count nothing."""
    if not (isinstance(ids, torch.Tensor) and ids.dtype in (torch.int64, torch.int32)
            and tuple(ids.shape) == tuple(gradient.shape[:-1]) and ids.numel()
            and int(ids.min()) >= 0 and int(ids.max()) < len(counts)):
        return
    reached = gradient.detach().reshape(-1, gradient.shape[-1]).ne(0).any(dim=1)
    looked_up = ids.detach().reshape(-1).to(device="cpu", dtype=torch.int64)[reached.cpu()]
    counts.index_add_(0, looked_up, torch.ones(len(looked_up), dtype=counts.dtype))


def _gram_hook(total: torch.Tensor, tied: bool, counts: torch.Tensor | None = None,
               ) -> Callable[[torch.nn.Module, tuple, Any], None]:
    """A forward hook that adds the gradient of the module's output to ``total``
    (`_add_gram`) when backward reaches it, and the rows it looked up to ``counts`` (when
    given: `_count_lookups`). A table's own S is the same up to a factor
    whatever its forward does to the rows it looks up; a ``tied`` one's must be in the units
    of its output layer's term: for an embedding whose output is c times its rows, c g, the
    gradient at the rows, and any other forward of its own makes ``total`` NaN, so that the
    table is rounded to nearest (in every rank of a job alike)."""

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            return
        scale = 1.0
        if tied and type(module).forward is not torch.nn.Embedding.forward:
            found = _lookup_scale(module, args, output)
            if found is None:
                total.fill_(math.nan)
                return
            scale = found
        ids = args[0] if args else None

        def take(gradient: torch.Tensor) -> None:
            _add_gram(total, gradient if scale == 1.0 else gradient * scale)
            if counts is not None:
                _count_lookups(counts, ids, gradient)

        output.register_hook(take)

    return hook


def _add_head_gram(total: torch.Tensor, inputs: torch.Tensor, gradient: torch.Tensor) -> None:
    """Add sum_p |g_p|^2 h_p h_p^T to ``total``: what an output layer's row errors cost, on
    average over its rows, for inputs h_p whose outputs receive the gradients g_p (row r's
    error e moves output p's entry r by e.h_p, weighed by g_pr^2), on one thread."""
    gradient = gradient.detach().reshape(-1, gradient.shape[-1])
    step = max(1, _SQUARES_AT_ONCE // max(gradient.shape[1], 1))  # a vocabulary's logits
    with single_threaded_ops():
        weights = torch.cat([part.to(torch.float64).square().sum(dim=1)
                             for part in gradient.split(step)])
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
        rows = rows * weights.sqrt().unsqueeze(1)
        total += rows.T @ rows


def _head_gram_hook(total: torch.Tensor) -> Callable[[torch.nn.Module, tuple, Any], None]:
    """A forward hook on an output layer tied to a table that adds its rows' cost
    (`_add_head_gram`) to the table's ``total`` when backward reaches its output."""

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        if args and isinstance(output, torch.Tensor) and output.requires_grad:
            inputs = args[0]
            output.register_hook(lambda gradient: _add_head_gram(total, inputs, gradient))

    return hook


def _swapped_on_call(module: torch.nn.Module, tensor: torch.Tensor,
                     make: Callable[[], torch.Tensor]) -> list:
    """Hooks that give ``tensor`` the value ``make()`` while ``module`` runs."""
    own = tensor.data

    def enter(module: torch.nn.Module, args: tuple) -> None:
        tensor.data = make().to(dtype=tensor.dtype, device=tensor.device).reshape(tensor.shape)
        _fresh_casts()

    def leave(module: torch.nn.Module, args: tuple, output: Any) -> None:
        tensor.data = own
        _fresh_casts()

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


def _looks_up_rows(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a plain embedding whose call only gathers rows of its table (one
    with ``max_norm`` also rescales them in place, a subclass may do anything)."""
    return type(module) is torch.nn.Embedding and module.max_norm is None


def _rows_on_call(module: torch.nn.Embedding, tensor: torch.Tensor, table: LazyTable) -> list:
    """Hooks that give an embedding, while it runs, only the rows its call looks up (the ids
    renumbered into them: the same output), or the whole table where the ids are not a valid
    lookup (then torch says why, as without the swap)."""
    own, padding = tensor.data, module.padding_idx

    def enter(module: torch.nn.Module, args: tuple) -> tuple | None:
        ids = args[0] if args else None
        if not (isinstance(ids, torch.Tensor) and ids.dtype in (torch.int32, torch.int64)
                and ids.numel() and int(ids.min()) >= 0 and int(ids.max()) < own.shape[0]):
            tensor.data = table().to(dtype=own.dtype, device=own.device).reshape(own.shape)
            _fresh_casts()
            return None
        wanted, renumbered = torch.unique(ids, return_inverse=True)
        tensor.data = table.rows(wanted.cpu()).to(dtype=own.dtype, device=own.device)
        module.padding_idx = None  # a row of the whole table; it matters to gradients only
        _fresh_casts()
        return (renumbered, *args[1:])

    def leave(module: torch.nn.Module, args: tuple, output: Any) -> None:
        tensor.data = own
        module.padding_idx = padding
        _fresh_casts()

    return [module.register_forward_pre_hook(enter),
            module.register_forward_hook(leave, always_call=True)]


@contextmanager
def _in_eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, every module of ``model`` is in eval mode; after it, each is in the
    mode it was (a model in training with a frozen BatchNorm, or in eval with one Dropout
    kept on, keeps each module's own flag, which one ``model.train(flag)`` would overwrite)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:  # parents first: each child then sets its own
            module.train(training)


def _fresh_casts() -> None:
    """Forget autocast's low-precision copies of the weights: inside ``torch.autocast`` a
    weight is cast once and the copy reused, so a weight swapped in (or put back) would
    compute with the cast of the one before it."""
    torch.clear_autocast_cache()


def _batch_tensors(batch: object) -> list[torch.Tensor]:
    """The tensors a batch gives the model (itself, its positional or keyword arguments)."""
    values = batch.values() if isinstance(batch, Mapping) else (
        batch if isinstance(batch, tuple | list) else [batch])
    return [value for value in values if isinstance(value, torch.Tensor)]


def _digest(tensor: torch.Tensor) -> int | None:
    """A hash of the tensor's values (None for a dtype torch cannot hash)."""
    try:
        return int(torch.hash_tensor(tensor.detach()))
    except (RuntimeError, TypeError, NotImplementedError):
        return None


class _State:
    """A tensor's version and values, to tell whether a pass changed it in place: an in-place
    operation counts in the version even where it leaves the values (a weight divided by 1
    once, as RWKV's eval mode rescales its layers), so the values decide."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.version, self.digest = tensor, tensor._version, _digest(tensor)

    def changed(self) -> bool:
        return self.tensor._version != self.version and (
            self.digest is None or _digest(self.tensor) != self.digest)


@contextmanager
def _renormed_copies(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the tables of the model's embeddings with ``max_norm`` are copies of
    what they hold now (the model's own, or a replacement swapped in). Such an embedding
    rescales, in place, each row it looks up whose norm is over ``max_norm``: a pass computes
    what the user's call computes, yet leaves the model's weights (and the result's tensors
    swapped in) as they were; the reference pass had rescaled the user's weights before
    they were quantized."""
    tables = renormed_tables(model)
    saved = [table.data for table in tables]
    try:
        for table in tables:
            table.data = table.data.clone()
        yield
    finally:
        for table, data in zip(tables, saved, strict=True):
            table.data = data


def _take_gradient(tensor: torch.Tensor, index: int, totals: torch.Tensor,
                   along: torch.Tensor | None = None) -> None:
    """Add a weight's squared gradient to its total as soon as backward has made it, and
    free it: a backward pass holds one weight's gradient, not the model's. Summed in one
    compiled pass: torch's sum of a large tensor rounds by its thread count. A sparse
    gradient (``nn.Embedding(sparse=True)``) counts its coalesced values: the rows it leaves
    out are zeros, and a row looked up twice is summed before it is squared. ``along``: the
    gradient's matrix columns times these factors first (`Calibration.sensitivities`)."""
    grad = tensor.grad
    if grad.is_sparse:
        grad = grad.coalesce().values()
    elif along is not None:
        grad = grad.reshape(grad.shape[0], -1) * along.to(grad.device, grad.dtype)
    totals[index] += squared_sums(grad, grad)[0]
    tensor.grad = None


def _vectors(output: torch.Tensor, detach: bool = True, widen: bool = True) -> torch.Tensor:
    """The output as the vectors whose cosines are compared: float64, or (``widen`` False) a
    copy in its own floating dtype, which widens to the same float64 when compared (the
    float model's references, kept in half the memory of float64). A complex output is the
    real vector of its real and imaginary parts (its real part alone would miss half of it)."""
    out = output.detach() if detach else output
    if out.is_complex():
        out = torch.view_as_real(out).flatten(-2) if out.ndim else torch.view_as_real(out)
    out = out.double() if widen or not out.is_floating_point() else out.clone()
    if out.ndim >= 4:  # a feature map: one vector per example
        return out.reshape(out.shape[0], math.prod(out.shape[1:]))
    if out.ndim >= 2 and out.shape[-1] > 1:
        return out.reshape(-1, out.shape[-1])
    return out.reshape(1, -1)


def _score_count(output: torch.Tensor, batch: object) -> int | None:
    """How many examples an output of one value per example, (n,) or (n, 1), scores; None
    for any other output (what `_vectors` compares as one un-centred vector per batch), and
    where ``batch`` (None: a callable's, unknown) is no batch of those n examples: the
    features of one unbatched example are a vector, not scores."""
    if not (output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1)):
        return None
    inputs = [] if batch is None else _batch_tensors(batch)
    if inputs and (inputs[0].ndim < 2 or inputs[0].shape[0] != output.shape[0]):
        return None
    return output.shape[0]


def _offset_dominated(scores: torch.Tensor) -> bool:
    """Whether the scores lie farther from zero than they spread (their mean past their
    standard deviation), so that their cosine is more the offset's than the scores'."""
    values = scores.double()
    return bool(values.mean().abs() > values.std(correction=0))


class Calibration:
    """Reference outputs of ``model`` on ``calib``, and the distortion of any weight swap.

    In a ``cluster`` (qlis/workers/cluster.py) each rank runs its share of the batches (a
    contiguous run of the fitting batches and of the held-out ones) and every measure adds
    the ranks' parts in the batches' order (qlis/measure/batch_sums.py): the same bits as one
    process. With a ``spill``, the reference outputs wait in its file, not in memory: they
    are read once per measure, and are as large as a block's activations."""

    def __init__(self, model: torch.nn.Module, calib: CalibSpec,
                 cluster: Cluster | None = None, spill: SpillFile | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise InputError("calibration needs the model as an nn.Module")
        if isinstance(model, torch.jit.ScriptModule):
            raise InputError(
                "calibration hooks the model's layers and swaps their weights, which a "
                "TorchScript module (torch.jit.script or trace) does not allow: pass the "
                "nn.Module it was made from, or compress without calib="
            )
        if not callable(calib):
            if isinstance(calib, str | bytes):  # a Sequence, of one-character "batches"
                raise ConfigError(
                    f"calib= takes a list of input batches or a callable(model) -> outputs, "
                    f"not a {type(calib).__name__} (a text file is `qlis pack --calib`'s; "
                    "in Python, tokenize its lines into batches)")
            if isinstance(calib, torch.Tensor | Mapping) or not isinstance(calib, Sequence):
                raise ConfigError(
                    "calib= takes a list of input batches or a callable(model) -> outputs"
                )
            if len(calib) == 0:
                raise ConfigError("calib= is an empty list of batches")
        elif cluster is not None:
            raise ConfigError("a callable calib= runs the model its own way and cannot be "
                              "split over ranks: pass a list of input batches")
        inference = next((name for name, t in model.named_parameters() if t.is_inference()),
                         None)
        if inference is not None:
            raise InputError(
                f"the model's parameter {inference!r} is an inference tensor (made under "
                "torch.inference_mode()): calibration measures gradients, which it cannot "
                "have; build or load the model outside inference mode")
        self.model = model
        self.calib = calib
        self._token_masks: dict[int, torch.Tensor | None] = {}  # `_token_rows`, by batch
        # batches that say they were made up (`synthetic_calibration`'s, and what wraps
        # them): the quality measured on them is not the user's data's
        self.synthetic = not callable(calib) and all(
            getattr(self._batch(i), "synthetic", False) is True for i in range(len(calib)))
        self._buffers = {id(module): (module, {name: None if b is None else b.detach().clone()
                                               for name, b in module._buffers.items()})
                         for module in model.modules()}
        """Each module's buffers before any pass (as it registered them), which every call of
        the model starts from: a forward that updates a running normaliser or grows a
        history would otherwise make each batch's output depend on the batches before it
        (a pass measuring 2 of 8 batches read them in another state than the reference's:
        cosine 0.982 with no weight changed) and leave the user's model changed."""
        self.cluster = cluster
        self.passes = 0
        self.seconds = 0.0
        self.unreached: set[str] = set()
        """Weights whose effect on the outputs a policy measured as none (never run, or off
        the path to the compared outputs): the compression names them in its warnings."""
        self.output_covariances: dict[str, torch.Tensor] = {}
        """Per embedding table `sensitivities` measured, E[g g^T] of the gradients g that
        reach its output rows: what a row's error costs the outputs, direction by direction
        (reconstruction's error feedback for a table lookup, which has no input covariance)."""
        self.row_shares: dict[str, torch.Tensor] = {}
        """Per table of `output_covariances` that only lookups use (not tied to an output
        layer), each row's expected share of the lookups (`lookup_shares`): how much a row's
        error weighs against another's. Empty with synthetic batches, whose tokens are no
        user's."""
        self.column_factors: dict[str, np.ndarray] = {}
        """Per weight that rd steps per input column (qlis/quantize/column_scales.py), the
        factors of its columns' steps: rd measures its candidates with them, and
        reconstruction fits the layer on that grid."""
        self.batch = 0
        """The key of the model call running now (hooks read it: `OrderedSum` keys)."""
        self.scores_per_batch: int | None = None
        """Where every calibration output is one value per example (a score), not centred,
        or one per batch: the most in a batch (their cosine says little of the scores)."""
        self.calls: list[tuple[tuple, dict]] = []
        count = 1 if callable(calib) else len(calib)
        split = not callable(calib) and count >= HOLDOUT_EVERY
        self.held_out = [i for i in range(count) if split and i % HOLDOUT_EVERY == 3]
        """Batches measured, never fitted to (none with fewer than HOLDOUT_EVERY batches or
        a callable: then quality is measured on the fitting batches, and says so)."""
        self.fitting = [i for i in range(count) if i not in self.held_out]
        world = cluster.world if cluster is not None else 1
        if len(self.fitting) < world:
            raise ConfigError(f"{len(self.fitting)} calibration batches to fit on for {world} "
                              "ranks: give each rank at least one (more, smaller batches)")
        self.local = set(share_of(self.fitting, cluster) + share_of(self.held_out, cluster))
        """The batches this rank runs (all of them in one process)."""
        with together(cluster):
            self.reference = self._references(spill)
        values = sum(v.numel() for v in self.reference.values())
        if not (sum(cluster.all_gather_json(values)) if cluster is not None else values):
            raise InputError("the calibration outputs are empty")

    def _references(self, spill: SpillFile | None) -> dict[int, torch.Tensor]:
        """The original model's output vectors on this rank's batches, checked (each kept
        in ``spill``, where given, as it comes)."""
        handle = None
        inputs: list[tuple[int, _State]] = []
        if callable(self.calib):  # record the model calls it makes, to replay them in `feed`

            def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                inputs.extend((len(self.calls), _State(t)) for t in
                              [*_batch_tensors(args), *_batch_tensors(kwargs)])
                self.calls.append((args, kwargs))

            handle = self.model.register_forward_pre_hook(record, with_kwargs=True)
        else:
            inputs = [(i, _State(t)) for i in sorted(self.local)
                      for t in _batch_tensors(self._batch(i))]
        runs = self._runs(False)
        renormed = {id(t) for t in renormed_tables(self.model)}
        weights = [(name, _State(t)) for name, t in self.model.named_parameters()
                   if id(t) not in renormed]
        counts: list[int | None] = []

        def reference_of(key: int, output: Any) -> torch.Tensor:
            tensor = first_tensor(output)
            counts.append(_score_count(tensor, None if callable(self.calib) else
                                       self._batch(key)))
            vectors = self._output_vectors(key, tensor, widen=False)
            return vectors if spill is None else spill.keep_tensor(vectors)

        try:
            kept = self.run_calls(runs, checked=True, keep=reference_of)
        finally:
            if handle is not None:
                handle.remove()
        edited = next((name for name, state in weights if state.changed()), None)
        if edited is not None:
            raise InputError(
                f"the model's forward changed its weight {edited!r} in place: calibration "
                "runs the model several times with some weights swapped for others, which "
                "it cannot measure (nn.Embedding's max_norm is the one such change it "
                "handles); compress without calib=")
        edited = next((i for i, state in inputs if state.changed()), None)
        if edited is not None and callable(self.calib):
            raise InputError(
                f"the input of the calib callable's model call {edited} changed after the "
                "call (one tensor refilled for every call, or edited by the forward): "
                "calibration replays each call, so give each its own input tensor")
        if edited is not None:
            raise InputError(
                f"the model's forward changed calibration batch {edited}'s input in place: "
                "calibration runs each batch several times and needs it unchanged (clone an "
                "input inside forward before editing it)")
        reference = {key: vectors for (key, _), vectors in zip(runs, kept, strict=True)}
        if counts and None not in counts and (max(counts) == 1 or _offset_dominated(
                torch.cat([vectors.reshape(-1) for vectors in reference.values()]))):
            self.scores_per_batch = max(counts)
        for i, vectors in reference.items():
            if not bool(torch.isfinite(vectors).all()):
                where = "the callable's output" if callable(self.calib) else f"batch {i}"
                text = f"the model's output on the calibration data ({where}) holds NaN or inf"
                broken = _first_not_finite(self.model)
                if broken is not None:
                    raise InputError(f"{text}: its tensor {tensor_label(broken)} holds NaN or "
                                     "inf; repair the model's weights")
                raise InputError(f"{text}: calibrate on inputs the model computes finitely "
                                 "(or fix the settings of a model that computes NaN itself)")
        if runs:  # the first call again: every measure compares one run with another
            key = runs[0][0]
            again = self._output_vectors(key, first_tensor(self.run_calls(runs[:1])[0]))
            first = reference[key].double()
            self._check_shape(key, again, first.shape)
            difference = float((again - first).norm()) / max(float(first.norm()), 1e-300)
            if difference > _REPEATABLE:
                raise InputError(
                    f"the model's output on the calibration data ({self._where(key)}) differs "
                    f"from one run to the next (relative difference {difference:.2g}, the "
                    "model unchanged): calibration measures a compression by comparing "
                    "runs, which a model that samples as it runs (random hashing, dropout in "
                    "eval mode) does not allow; compress without calib=")
        return reference

    def run_calls(self, runs: Sequence[Run],
                  replacements: Mapping[str, Replacement] | None = None,
                  stop: type[Exception] | None = None, checked: bool = False,
                  eager_bytes: int | None = None,
                  keep: Callable[[int, Any], Any] | None = None) -> list[Any]:
        """Make each of ``runs`` (calls of the model or of its parts, keyed by batch) in eval
        mode without gradients, with ``replacements`` swapped in (`swapped`), and return
        their outputs (counted as one pass), or what ``keep(batch, output)`` keeps of each
        as it comes (a language model's logits and cache, whole, for 32 batches held 1.2 GB
        at once); a call that raises ``stop`` (a hook that has seen what it needed) is cut
        short and gives no output. ``checked``: a batch the model cannot take is an
        InputError that says which. Not inference mode: a model that caches what it
        computes (BEiT's relative position index) would keep inference tensors, which the
        gradient passes then cannot use."""
        start = time.perf_counter()
        outputs = []
        try:
            with (torch.no_grad(), _in_eval_mode(self.model),
                  self.swapped(replacements or {}, eager_bytes), _renormed_copies(self.model)):
                for n, (i, run) in enumerate(runs):
                    self.batch = i
                    _fresh_casts()
                    if n and not callable(self.calib):  # a callable's calls are one sequence
                        self._restore_buffers()
                    try:
                        output = run()
                    except Exception as err:
                        if stop is not None and isinstance(err, stop):
                            continue
                        if isinstance(err, QlisError):
                            raise
                        batch = None if callable(self.calib) else self._batch(i)
                        raise _model_failed(err, self._where(i), checked, self.model,
                                            batch) from err
                    outputs.append(output if keep is None else keep(i, output))
                    del output
        finally:
            _fresh_casts()
            self._restore_buffers()
        self.passes += 1
        self.seconds += time.perf_counter() - start
        return outputs

    def _runs(self, replay: bool, batches: list[int] | None = None) -> list[Run]:
        """The model calls of one pass on this rank's batches: all of them, or those of
        ``batches`` (a callable's calls are not split: keyed by their order)."""
        if callable(self.calib) and replay and self.calls:
            return [(k, lambda call=call: self.model(*call[0], **call[1]))
                    for k, call in enumerate(self.calls)]
        if callable(self.calib):
            return [(0, lambda: self.calib(self.model))]
        chosen = range(len(self.calib)) if batches is None else batches
        return [(i, partial(self._call, self._batch(i))) for i in chosen if i in self.local]

    def _batch(self, index: int) -> Any:
        """Batch ``index`` of a list of batches (a Sequence of the user's: read with care)."""
        try:
            return self.calib[index]
        except Exception as err:
            raise InputError(f"calib= batch {index} could not be read: {type(err).__name__}: "
                             f"{first_line(err)}") from err

    def _output_vectors(self, key: int, output: torch.Tensor, detach: bool = True,
                        widen: bool = True) -> torch.Tensor:
        """`_vectors` of batch ``key``'s output, without the positions its attention mask
        leaves out: the padding of a batch of lines of unequal length (nine tenths of one of
        GPT-2's) counted in the cosine, which met a min_cosine of 0.99 that the real tokens
        (0.9889) did not. Only an output of one vector per token: (batch, length, width) as
        the mask is (batch, length), or sequence-first, (length, batch, width), as
        nn.Transformer's default (the mask read in the flat order of the other dropped
        real tokens and kept padding)."""
        vectors = _vectors(output, detach, widen)
        mask = self._token_rows(key)
        if mask is None or output.ndim != 3:
            return vectors
        if output.shape[:2] == mask.shape:
            return vectors[mask.reshape(-1).to(vectors.device)]
        if output.shape[:2] == mask.T.shape:
            return vectors[mask.T.reshape(-1).to(vectors.device)]
        return vectors

    def _token_rows(self, key: int) -> torch.Tensor | None:
        """Which positions of batch ``key`` are real tokens: its 0/1 ``attention_mask`` as
        bools (None for a callable, or a batch without one); read once per batch, not at
        every pass."""
        if callable(self.calib):
            return None
        if key not in self._token_masks:
            batch = self._batch(key)
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            usable = isinstance(mask, torch.Tensor) and mask.ndim == 2 and bool(
                ((mask == 0) | (mask == 1)).all())
            self._token_masks[key] = mask.bool() if usable else None
        return self._token_masks[key]

    def _where(self, batch: int) -> str:
        return "the callable" if callable(self.calib) else f"batch {batch}"

    def _restore_buffers(self) -> None:
        """The buffers as they were before the first pass (`_buffers`): values a call changed
        copied back into the same tensors (inside inference mode, which also writes an
        inference tensor), a buffer a call replaced by another shape or kind put back, one it
        registered taken out."""
        for module, saved in self._buffers.values():
            for name in module._buffers.keys() - saved.keys():
                del module._buffers[name]
            for name, value in saved.items():
                buffer = module._buffers.get(name)
                if value is None or buffer is None or (buffer.shape, buffer.dtype,
                                                       buffer.device) != (
                        value.shape, value.dtype, value.device):
                    module._buffers[name] = None if value is None else value.clone()
                elif not torch.equal(value, buffer):
                    with torch.inference_mode():
                        buffer.copy_(value)

    @property
    def forward_calls(self) -> int:
        """How many times one `feed` calls the model on this rank (a callable that calls only
        parts of the model counts once: it cannot be replayed call by call)."""
        if callable(self.calib):
            return len(self.calls) or 1
        return len(self.local.intersection(self.fitting))

    def feed(self, stop: type[Exception] | None = None,
             replacements: Mapping[str, Replacement] | None = None,
             eager_bytes: int | None = None) -> None:
        """One pass over the fitting batches for the hooks the caller placed on the model,
        with ``replacements`` swapped in (outputs are dropped); a callable's model calls are
        replayed one by one, so ``stop`` ends only the current one."""
        self.run_calls(self._runs(True, self.fitting), replacements, stop,
                       eager_bytes=eager_bytes)

    def _call(self, batch: Any) -> Any:
        if callable(batch):
            return batch(self.model)
        if isinstance(batch, Mapping):
            return self.model(**batch)
        if isinstance(batch, tuple | list):
            return self.model(*batch)
        return self.model(batch)

    def measured_batches(self, held_out: bool = True) -> list[int]:
        """The batches quality is measured on: the held-out ones when there are (and
        ``held_out``), else the fitting ones."""
        return self.held_out if held_out and self.held_out else self.fitting

    def outputs_with(self, replacements: Mapping[str, Replacement],
                     batches: list[int] | None = None) -> dict[int, torch.Tensor]:
        """The output vectors with some state-dict entries replaced (the model is restored
        after), on this rank's ``batches`` (default: every batch), by batch."""
        runs = self._runs(False, batches)
        vectors = self.run_calls(runs, replacements, keep=lambda key, output: (
            self._output_vectors(key, first_tensor(output))))
        return {key: found for (key, _), found in zip(runs, vectors, strict=True)}

    @contextmanager
    def swapped(self, replacements: Mapping[str, Replacement],
                eager_bytes: int | None = None) -> Iterator[None]:
        """Within the block, the model computes with some state-dict entries replaced.

        A replacement is a tensor, or a callable that makes one (a layer dequantized when
        asked). Callables are made up front while they total at most ``eager_bytes`` (None:
        `EAGER_BYTES`); beyond, each is made when the module that multiplies by it runs and
        dropped when it returns (`LayerInputs.module`, or the embedding whose table it is:
        given only the rows its call looks up where the replacement can make them,
        `LazyTable`), so that a pass holds one layer's float copy, not the model's (other
        tensors no layer kind names, and tensors two modules share, such as tied
        embeddings, are still made up front)."""
        targets = {name: self._tensor(name) for name in replacements}
        saved = {name: t.data for name, t in targets.items()}
        lazy = {name: value for name, value in replacements.items()
                if not isinstance(value, torch.Tensor)}
        lazy_bytes = sum(targets[name].numel() * 4 for name in lazy)
        on_call = {}
        if lazy_bytes > (EAGER_BYTES if eager_bytes is None else eager_bytes):
            shared = _shared_tensors(self.model)
            on_call = {name: module for name in lazy
                       if (module := _calling_module(self.model, name)) is not None
                       and id(targets[name]) not in shared}
        handles = []
        try:
            for name, t in targets.items():
                if name in on_call:
                    module, make = on_call[name], lazy[name]
                    rows = isinstance(make, LazyTable) and _looks_up_rows(module)
                    handles += (_rows_on_call if rows else _swapped_on_call)(module, t, make)
                    continue
                value = replacements[name]
                value = value if isinstance(value, torch.Tensor) else value()
                t.data = value.to(dtype=t.dtype, device=t.device).reshape(t.shape)
            yield
        finally:
            for handle in handles:
                handle.remove()
            for name, t in targets.items():
                t.data = saved[name]

    def _tensor(self, name: str) -> torch.Tensor:
        module_name, _, attr = name.rpartition(".")
        try:
            module = self.model.get_submodule(module_name) if module_name else self.model
        except AttributeError:
            raise InputError(f"the model has no tensor {name!r}") from None
        tensor = getattr(module, attr, None)
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"the model has no tensor {name!r}")
        return tensor

    def measure(self, replacements: Mapping[str, Replacement],
                held_out: bool = True) -> dict[str, Any]:
        """Output distortion with ``replacements``: mean cosine, 1 - cosine, relative MSE, on
        the held-out batches (``held_out``, when there are) or the fitting ones, and which."""
        batches = self.measured_batches(held_out)
        measured = self.compare(self.outputs_with(replacements, batches))
        return {**measured, "batches": len(batches),
                "held_out": bool(held_out and self.held_out)}

    def sensitivities(self, names: list[str], samples: int = 4, seed: int = 0,
                      column_factors: Mapping[str, np.ndarray] | None = None,
                      ) -> dict[str, float] | None:
        """Per weight, the mean output 1 - cosine per unit of relative weight error, when
        every weight of it takes independent noise (what rounding does at these rates).
        A weight with ``column_factors`` (one per input column of its (outputs, inputs)
        matrix) is measured as that matrix with its columns divided by them, the weight rd
        rounds to a step per input column (qlis/quantize/column_scales.py): its gradients
        times the factors, its relative error that of the divided matrix.

        For small noise of variance v per weight, 1 - cos(f, f + J e) averages
        v ||P J||^2 / (2 ||f||^2) per output vector f (P: off the direction of f); with r a
        random Gaussian vector per output, ||P J||^2 = E ||J^T P r||^2, the gradient of
        r.P f: ``samples`` backward passes estimate it for every weight at once (Hutchinson),
        where a probe per layer needs a forward pass each. None when the outputs carry no
        gradient (a callable that computes them under no_grad), the model has no backward
        (an autograd Function without one) or a weight is a buffer: measure probes instead.

        The same passes measure each embedding table's `output_covariances` (the gradients
        at its output rows, plus, for a table tied to output layers, what their products
        cost: `_add_head_gram`), within `OUTPUT_COVARIANCE_BYTES`.
        """
        tensors = {name: self._tensor(name) for name in names}
        flags = {id(p): p.requires_grad for p in self.model.parameters()}
        # a buffer (BatchNorm's running statistics, selected as a layer) may not require
        # grad where the module uses it: probes measure it
        if not all(t.is_leaf and t.is_floating_point() and id(t) in flags
                   for t in tensors.values()):
            return None
        grads = {name: t.grad for name, t in tensors.items()}
        handles = []
        # per batch (over the samples), each weight's squared gradients; the last entry
        # counts the batch's output vectors
        batch_totals = torch.zeros(len(names) + 1, dtype=torch.float64)
        totals = OrderedSum((len(names) + 1,), self.cluster is not None)
        tables = self._tables(names)
        batch_grams = {name: torch.zeros(2 * (uses.table.embedding_dim,), dtype=torch.float64)
                       for name, uses in tables.items()}
        grams = {name: OrderedSum(gram.shape, self.cluster is not None)
                 for name, gram in batch_grams.items()}
        # made-up batches' tokens say nothing of which rows a user's data looks up
        batch_counts = {name: torch.zeros(uses.table.num_embeddings, dtype=torch.float64)
                        for name, uses in tables.items()
                        if not uses.tied and not self.synthetic}
        counts = {name: OrderedSum(tuple(c.shape), self.cluster is not None)
                  for name, c in batch_counts.items()}
        runs = self._runs(False, self.fitting)
        factors = {name: torch.from_numpy(column_factors[name]).float() for name in names
                   if column_factors and name in column_factors}
        start = time.perf_counter()
        weights = list(tensors.values())
        try:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for index, (name, t) in enumerate(tensors.items()):
                t.requires_grad_(True)
                t.grad = None  # the user's own gradients are put back after
                handles.append(t.register_post_accumulate_grad_hook(partial(
                    _take_gradient, index=index, totals=batch_totals, along=factors.get(name))))
            for name, uses in tables.items():
                handles += [lookup.register_forward_hook(
                    _gram_hook(batch_grams[name], uses.tied, batch_counts.get(name)))
                    for lookup in uses.lookups]
                handles += [head.register_forward_hook(_head_gram_hook(batch_grams[name]))
                            for head in uses.heads]
            with torch.enable_grad(), _in_eval_mode(self.model), _renormed_copies(self.model):
                for i, run in runs:
                    batch_totals.zero_()
                    for gram in [*batch_grams.values(), *batch_counts.values()]:
                        gram.zero_()
                    reference = self.reference[i].double()
                    batch_totals[-1] = len(reference)
                    norms = reference.norm(dim=1, keepdim=True)
                    unit = reference / norms.clamp(min=1e-300)
                    for sample in range(samples):  # noise of its own per batch and sample
                        _fresh_casts()
                        try:
                            output = first_tensor(run())
                        except QlisError:
                            raise
                        except Exception as err:
                            raise _model_failed(err, self._where(i), False) from err
                        if not output.requires_grad:
                            return None
                        f = self._output_vectors(i, output, detach=False)
                        self._check_shape(i, f)
                        generator = torch.Generator().manual_seed(
                            hash((seed, sample, i)) & (2**63 - 1))
                        r = torch.randn(reference.shape, generator=generator, dtype=torch.float64)
                        r = r - (r * unit).sum(dim=1, keepdim=True) * unit
                        r = torch.where(norms > 0, r / (math.sqrt(2) * norms), 0.0)
                        try:  # into the weights alone: not the batch's own graph or grads
                            torch.autograd.backward((f * r.to(f.device)).sum(), inputs=weights)
                        except Exception as err:
                            if isinstance(err, MemoryError) or allocation_failed(err):
                                raise _model_failed(err, self._where(i), False) from err
                            return None  # a model without a backward: probes measure it
                    totals.add((i,), batch_totals)
                    for name, gram in batch_grams.items():
                        grams[name].add((i,), gram)
                    for name, looked_up in batch_counts.items():
                        counts[name].add((i,), looked_up)
        finally:
            _fresh_casts()
            self._restore_buffers()
            for handle in handles:
                handle.remove()
            for name, t in tensors.items():
                t.grad = grads[name]
            for p in self.model.parameters():
                p.requires_grad_(flags.get(id(p), False))
            for t in tensors.values():
                if id(t) not in flags:
                    t.requires_grad_(False)
            self.passes += samples
            self.seconds += time.perf_counter() - start
        gather_totals(self.cluster, [totals, *grams.values(), *counts.values()])
        *squared, count = totals.total().tolist()
        means = {name: (gram.total() / (samples * count)).float() for name, gram in grams.items()}
        # none (a table off the path to the outputs, or never run), one beyond float32
        # (gradients that overflow) or NaN (a lookup of a forward of its own, `_gram_hook`)
        # says nothing: those tables are rounded to nearest
        self.output_covariances = {name: mean for name, mean in means.items()
                                   if bool(mean.any()) and bool(torch.isfinite(mean).all())}
        # every sample's backward counted each lookup once
        shares = {name: lookup_shares(torch.round(total.total() / samples),
                                      tables[name].table.weight)
                  for name, total in counts.items() if name in self.output_covariances}
        self.row_shares = {name: share for name, share in shares.items() if share is not None}
        measured = {name: t if name not in factors else divided_columns(
                        t, column_factors[name], transposed=False)
                    for name, t in tensors.items()}
        return {name: squared[index] / samples / count
                * squared_sums(t, t)[0] / max(t.numel(), 1)
                for index, (name, t) in enumerate(measured.items())}

    def _tables(self, names: list[str]) -> dict[str, TableUses]:
        """The embedding tables among ``names`` whose output covariances fit (in all, over
        every fitting batch) `OUTPUT_COVARIANCE_BYTES`, smallest first, with their uses."""
        shared = _shared_tensors(self.model)
        found = {name: uses for name in names
                 if (uses := _table(self.model, name, shared)) is not None}
        chosen, spent = {}, 0
        for name, uses in sorted(found.items(), key=lambda item: item[1].table.embedding_dim):
            spent += uses.table.embedding_dim ** 2 * 8 * len(self.fitting)
            if spent > OUTPUT_COVARIANCE_BYTES:
                break
            chosen[name] = uses
        return chosen

    def _check_shape(self, batch: int, vectors: torch.Tensor,
                     expected: torch.Size | None = None) -> None:
        """Refuse a pass's output vectors that are not the shape the first pass gave."""
        expected = self.reference[batch].shape if expected is None else expected
        if vectors.shape != expected:
            raise InputError(
                f"the model's output on the calibration data ({self._where(batch)}) changed "
                f"shape between passes ({list(expected)} vectors, then {list(vectors.shape)}):"
                " calibration needs a model that computes the same way on every pass")

    def compare(self, outputs: Mapping[int, torch.Tensor]) -> dict[str, Any]:
        """Distortion of ``outputs`` (output vectors by batch: this rank's) from the original
        model's, over every rank's. Outputs holding NaN or inf (a model the quantization
        broke) count as cosine 0 where they are not finite, and make ``finite`` false and
        ``rel_mse`` None (JSON has no NaN). ``cosine_stderr`` is the standard error of the
        mean cosine over the output vectors: how far another sample of the same data may
        measure it (None from a single vector, whose spread says nothing)."""
        # per batch: cosines summed, vectors, squared error, energy, non-finite outputs,
        # squared cosines summed
        totals = OrderedSum((6,), self.cluster is not None)
        for key, out in outputs.items():
            self._check_shape(key, out)
            ref = self.reference[key].double()
            dot = (ref * out).sum(dim=1)
            norms = ref.norm(dim=1) * out.norm(dim=1)
            cos = torch.where(norms > 0, dot / norms.clamp(min=1e-300),
                              (ref.norm(dim=1) == out.norm(dim=1)).double())
            energy, error = squared_sums(ref, out)
            totals.add((key,), torch.tensor([
                math.fsum(cos.tolist()), float(len(cos)), error, energy,
                float((~torch.isfinite(out)).sum()), math.fsum(cos.square().tolist())],
                dtype=torch.float64))
        gather_totals(self.cluster, [totals])
        cosine_sum, count, error, energy, not_finite, square_sum = totals.total().tolist()
        finite = not_finite == 0
        cosine = cosine_sum / max(count, 1.0)
        spread = max(square_sum - count * cosine * cosine, 0.0) / max(count - 1.0, 1.0)
        return {
            "cosine": cosine,
            "one_minus_cosine": 1.0 - cosine,
            "cosine_stderr": math.sqrt(spread / count) if count >= 2 else None,
            "rel_mse": None if not finite else error / energy if energy > 0 else 0.0,
            "finite": finite,
        }
