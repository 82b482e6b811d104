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
last dimension (per token, per embedding); outputs of width 1 (a score per input) are
compared as one vector per batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from qlis.errors import ConfigError, InputError
from qlis.measure.layer_inputs import layer_inputs

CalibSpec = Sequence[Any] | Callable[[torch.nn.Module], Any]
Replacement = torch.Tensor | Callable[[], torch.Tensor]
"""A tensor a calibration pass computes with instead of the model's own, or how to make it."""
EAGER_BYTES = 256 << 20
"""Replacements made when asked total at most this much float32 before they are made layer by
layer instead (`Calibration.swapped`)."""
HOLDOUT_EVERY = 4
"""With at least this many batches, every fourth one is held out: reconstruction and the
allocation's probes fit on the others, and the output quality that ``min_cosine`` aims at and
the result reports is measured on the held-out ones, which no layer was fitted to."""
_MISFIT_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, KeyError)
"""What a model raises for inputs of the wrong shape, dtype or keywords."""


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor a model output stands for (first of a tuple, dict or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    values: Iterable[Any] = ()
    if isinstance(output, Mapping):
        values = output.values()
    elif isinstance(output, Sequence):
        values = output
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise InputError(
        f"the model returned a {type(output).__name__} without a tensor; pass "
        "calib=callable(model) -> tensor to say which output to compare"
    )


def _shared_tensors(model: torch.nn.Module) -> set[int]:
    """Ids of the tensors that more than one module holds (tied weights)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, tensor in model.named_parameters(remove_duplicate=False):
        (shared if id(tensor) in seen else seen).add(id(tensor))
    return shared


def _swapped_on_call(module: torch.nn.Module, tensor: torch.Tensor,
                     make: Callable[[], torch.Tensor]) -> list:
    """Hooks that give ``tensor`` the value ``make()`` while ``module`` runs."""
    own = tensor.data

    def enter(module: torch.nn.Module, args: tuple) -> None:
        tensor.data = make().to(dtype=tensor.dtype, device=tensor.device).reshape(tensor.shape)

    def leave(module: torch.nn.Module, args: tuple, output: Any) -> None:
        tensor.data = own

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


def _take_gradient(tensor: torch.Tensor, name: str, totals: dict[str, float]) -> None:
    """Add a weight's squared gradient to its total as soon as backward has made it, and
    free it: a backward pass holds one weight's gradient, not the model's."""
    totals[name] += float(tensor.grad.double().square().sum())
    tensor.grad = None


def _vectors(output: torch.Tensor, detach: bool = True) -> torch.Tensor:
    """The output as the vectors whose cosines are compared (float64)."""
    out = (output.detach() if detach else output).double()
    if out.ndim >= 2 and out.shape[-1] > 1:
        return out.reshape(-1, out.shape[-1])
    return out.reshape(1, -1)


class Calibration:
    """Reference outputs of ``model`` on ``calib``, and the distortion of any weight swap."""

    def __init__(self, model: torch.nn.Module, calib: CalibSpec) -> None:
        if not isinstance(model, torch.nn.Module):
            raise InputError("calibration needs the model as an nn.Module")
        if not callable(calib):
            if isinstance(calib, torch.Tensor | Mapping) or not isinstance(calib, Sequence):
                raise ConfigError(
                    "calib= takes a list of input batches or a callable(model) -> outputs"
                )
            if len(calib) == 0:
                raise ConfigError("calib= is an empty list of batches")
        self.model = model
        self.calib = calib
        self.passes = 0
        self.seconds = 0.0
        self.calls: list[tuple[tuple, dict]] = []
        handle = None
        if callable(calib):  # record the model calls it makes, to replay them in `feed`
            handle = model.register_forward_pre_hook(
                lambda module, args, kwargs: self.calls.append((args, kwargs)), with_kwargs=True)
        try:
            self.reference = [_vectors(first_tensor(output)) for output in
                              self.run_calls(self._runs(False), checked=True)]
        finally:
            if handle is not None:
                handle.remove()
        count = len(self.reference)
        split = not callable(calib) and count >= HOLDOUT_EVERY
        self.held_out = [i for i in range(count) if split and i % HOLDOUT_EVERY == 3]
        """Batches measured, never fitted to (none with fewer than HOLDOUT_EVERY batches or
        a callable: then quality is measured on the fitting batches, and says so)."""
        self.fitting = [i for i in range(count) if i not in self.held_out]
        if not any(v.numel() for v in self.reference):
            raise InputError("the calibration outputs are empty")
        for i, vectors in enumerate(self.reference):
            if not bool(torch.isfinite(vectors).all()):
                where = "the callable's output" if callable(calib) else f"batch {i}"
                raise InputError(f"the model's output on the calibration data ({where}) holds "
                                 "NaN or inf: calibrate on inputs the model computes finitely")

    def run_calls(self, runs: Sequence[Callable[[], Any]],
                  replacements: Mapping[str, Replacement] | None = None,
                  stop: type[Exception] | None = None, checked: bool = False) -> list[Any]:
        """Call each of ``runs`` (calls of the model or of its parts) in eval and inference
        mode, with ``replacements`` swapped in, and return their outputs (counted as one
        pass); a call that raises ``stop`` (a hook that has seen what it needed) is cut short
        and gives no output. ``checked``: a batch the model cannot take is an InputError that
        says which."""
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        outputs = []
        try:
            with torch.inference_mode(), self.swapped(replacements or {}):
                for i, run in enumerate(runs):
                    try:
                        outputs.append(run())
                    except Exception as err:
                        if stop is not None and isinstance(err, stop):
                            continue
                        if checked and isinstance(err, _MISFIT_ERRORS):
                            where = "the callable" if callable(self.calib) else f"batch {i}"
                            raise InputError(
                                f"the calibration data does not fit the model ({where}): "
                                f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                            ) from None
                        raise
        finally:
            self.model.train(was_training)
        self.passes += 1
        self.seconds += time.perf_counter() - start
        return outputs

    def _runs(self, replay: bool, batches: list[int] | None = None) -> list[Callable[[], Any]]:
        """The model calls of one pass: every batch, or those of ``batches`` (a callable's
        calls are not split)."""
        if callable(self.calib) and replay and self.calls:
            return [lambda call=call: self.model(*call[0], **call[1]) for call in self.calls]
        if callable(self.calib):
            return [lambda: self.calib(self.model)]
        chosen = range(len(self.calib)) if batches is None else batches
        return [lambda batch=self.calib[i]: self._call(batch) for i in chosen]

    @property
    def forward_calls(self) -> int:
        """How many times one `feed` calls the model (a callable that calls only parts of
        the model counts once: it cannot be replayed call by call)."""
        if callable(self.calib):
            return len(self.calls) or 1
        return len(self.fitting)

    def feed(self, stop: type[Exception] | None = None,
             replacements: Mapping[str, Replacement] | None = None) -> None:
        """One pass over the fitting batches for the hooks the caller placed on the model,
        with ``replacements`` swapped in (outputs are dropped); a callable's model calls are
        replayed one by one, so ``stop`` ends only the current one."""
        self.run_calls(self._runs(True, self.fitting), replacements, stop)

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
                     batches: list[int] | None = None) -> list[torch.Tensor]:
        """The outputs with some state-dict entries replaced (the model is restored after),
        on ``batches`` (default: every batch)."""
        return [_vectors(first_tensor(output)) for output in
                self.run_calls(self._runs(False, batches), replacements)]

    @contextmanager
    def swapped(self, replacements: Mapping[str, Replacement]) -> Iterator[None]:
        """Within the block, the model computes with some state-dict entries replaced.

        A replacement is a tensor, or a callable that makes one (a layer dequantized when
        asked). Callables are made up front while they total at most ``EAGER_BYTES``;
        beyond, each is made when the module that multiplies by it runs and dropped when it
        returns (`LayerInputs.module`), so that a pass holds one layer's float copy, not the
        model's (tensors no layer kind names, and tensors two modules share, such as tied
        embeddings, are still made up front)."""
        targets = {name: self._tensor(name) for name in replacements}
        saved = {name: t.data for name, t in targets.items()}
        lazy = {name: value for name, value in replacements.items()
                if not isinstance(value, torch.Tensor)}
        lazy_bytes = sum(targets[name].numel() * 4 for name in lazy)
        on_call = {}
        if lazy_bytes > EAGER_BYTES:
            shared = _shared_tensors(self.model)
            on_call = {name: inputs.module for name in lazy
                       if (inputs := layer_inputs(self.model, name)) is not None
                       and id(targets[name]) not in shared}
        handles = []
        try:
            for name, t in targets.items():
                if name in on_call:
                    handles += _swapped_on_call(on_call[name], t, lazy[name])
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
        measured = self.compare(self.outputs_with(replacements, batches), batches)
        return {**measured, "batches": len(batches),
                "held_out": bool(held_out and self.held_out)}

    def sensitivities(self, names: list[str], samples: int = 4, seed: int = 0,
                      ) -> dict[str, float] | None:
        """Per weight, the mean output 1 - cosine per unit of relative weight error, when
        every weight of it takes independent noise (what rounding does at these rates).

        For small noise of variance v per weight, 1 - cos(f, f + J e) averages
        v ||P J||^2 / (2 ||f||^2) per output vector f (P: off the direction of f); with r a
        random Gaussian vector per output, ||P J||^2 = E ||J^T P r||^2, the gradient of
        r.P f: ``samples`` backward passes estimate it for every weight at once (Hutchinson),
        where a probe per layer needs a forward pass each. None when the outputs carry no
        gradient (a callable that computes them under no_grad): measure probes instead.
        """
        tensors = {name: self._tensor(name) for name in names}
        if not all(t.is_leaf and t.is_floating_point() for t in tensors.values()):
            return None
        flags = {id(p): p.requires_grad for p in self.model.parameters()}
        grads = {name: t.grad for name, t in tensors.items()}
        handles = []
        totals = dict.fromkeys(names, 0.0)
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for name, t in tensors.items():
                t.requires_grad_(True)
                t.grad = None  # the user's own gradients are put back after
                handles.append(t.register_post_accumulate_grad_hook(
                    lambda t, name=name: _take_gradient(t, name, totals)))
            with torch.enable_grad():
                for _ in range(samples):
                    for i, run in zip(self.fitting, self._runs(False, self.fitting),
                                      strict=True):
                        output = first_tensor(run())
                        if not output.requires_grad:
                            return None
                        f = _vectors(output, detach=False)
                        reference = self.reference[i]
                        norms = reference.norm(dim=1, keepdim=True)
                        unit = reference / norms.clamp(min=1e-300)
                        r = torch.randn(reference.shape, generator=generator, dtype=torch.float64)
                        r = r - (r * unit).sum(dim=1, keepdim=True) * unit
                        r = torch.where(norms > 0, r / (math.sqrt(2) * norms), 0.0)
                        (f * r.to(f.device)).sum().backward()
        finally:
            for handle in handles:
                handle.remove()
            for name, t in tensors.items():
                t.grad = grads[name]
            for p in self.model.parameters():
                p.requires_grad_(flags.get(id(p), False))
            for t in tensors.values():
                if id(t) not in flags:
                    t.requires_grad_(False)
            self.model.train(was_training)
            self.passes += samples
            self.seconds += time.perf_counter() - start
        count = sum(len(self.reference[i]) for i in self.fitting)
        return {name: totals[name] / samples / count
                * float(t.detach().double().square().mean()) for name, t in tensors.items()}

    def compare(self, outputs: list[torch.Tensor],
                batches: list[int] | None = None) -> dict[str, Any]:
        """Distortion of ``outputs`` (of ``batches``; default every batch) from the original
        model's. Outputs holding NaN or inf (a model the quantization broke) count as cosine
        0 where they are not finite, and make ``finite`` false and ``rel_mse`` None (JSON has
        no NaN)."""
        references = self.reference if batches is None else [self.reference[i] for i in batches]
        cosines, error, energy = [], 0.0, 0.0
        finite = all(bool(torch.isfinite(out).all()) for out in outputs)
        for ref, out in zip(references, outputs, strict=True):
            dot = (ref * out).sum(dim=1)
            norms = ref.norm(dim=1) * out.norm(dim=1)
            cos = torch.where(norms > 0, dot / norms.clamp(min=1e-300),
                              (ref.norm(dim=1) == out.norm(dim=1)).double())
            cosines.append(cos)
            error += float((out - ref).square().sum())
            energy += float(ref.square().sum())
        cosine = float(torch.cat(cosines).mean())
        return {
            "cosine": cosine,
            "one_minus_cosine": 1.0 - cosine,
            "rel_mse": None if not finite else error / energy if energy > 0 else 0.0,
            "finite": finite,
        }
