"""`PlanExecutor`: how one compression executes plans, layer by layer (on every core) or
reconstructed in forward order on the calibration data, remembering its last results so that
a plan a policy measured while choosing is not executed twice."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

from qlis.measure.calibrate import Calibration
from qlis.plan.execute import LayerPlan, Realized, StoredTensor, execute_layer, lazily
from qlis.plan.plans import LayerConfig, Plan
from qlis.plan.sizes import unplanned_bytes
from qlis.quantize.quantizers import QuantizedTensor
from qlis.quantize.reconstruct import reconstruct
from qlis.workers.spill_file import SpillFile
from qlis.workers.threads import ordered_map


class PlanExecutor:
    """Executes plans as one ``compress`` call does: layer by layer, or reconstructed in
    forward order on the calibration data (``calibration`` given). The last two results are
    kept, so a plan a policy measured while choosing is not executed twice. ``progress`` gets
    the parameter count of every layer executed, in every pass; with a ``spill``, each
    executed layer's codes wait in its file, not in memory (qlis/workers/spill_file.py)."""

    def __init__(self, state: Mapping[str, torch.Tensor], scores: Mapping[str, float],
                 calibration: Calibration | None, bias_correction: bool,
                 rounding_sweeps: int = 0,
                 progress: Callable[[int], None] | None = None,
                 jobs: int | None = None, spill: SpillFile | None = None,
                 rest: Callable[[torch.Tensor], StoredTensor] | None = None,
                 steps_from: Calibration | None = None) -> None:
        self.state = state
        self.rest = rest or (lambda tensor: tensor)
        """How a tensor outside the plan is stored (the policy's `stored_rest`)."""
        self._rested: dict[str, StoredTensor] = {}  # `rest` of the input's, made once
        self.spill = spill
        self.jobs = jobs
        self.scores = scores
        self.calibration = calibration
        self.bias_correction = bias_correction
        self.rounding_sweeps = rounding_sweeps
        self.steps_from = steps_from
        """The calibration whose `column_factors` (rd's steps per input column) the layers
        take, fitted to it or not (``calibration`` is None without error feedback)."""
        self.progress = progress
        self._done: dict[str, tuple[dict[str, StoredTensor], list[LayerPlan]]] = {}

    def execute(self, name: str, weight: torch.Tensor, config: LayerConfig,
                **how: Any) -> tuple[StoredTensor, LayerPlan]:
        """One layer as this compression executes it (data-free unless ``how`` has a
        ``hessian``)."""
        if how.get("hessian") is not None:
            how["sweeps"] = self.rounding_sweeps
        if self.steps_from is not None:
            how["column_factors"] = self.steps_from.column_factors.get(name)
        stored, layer = execute_layer(name, weight, config, self.scores.get(name), **how)
        return self._keep(stored), layer

    def _keep(self, stored: StoredTensor) -> StoredTensor:
        """A layer as this compression keeps it (its codes in the spill, when there is one),
        whichever rank executed it."""
        if self.spill is None or not isinstance(stored, QuantizedTensor):
            return stored
        codes = self.spill.keep_array(stored.codes)
        return stored if codes is stored.codes else dataclasses.replace(stored, codes=codes)

    def run(self, plan: Plan) -> tuple[dict[str, StoredTensor], list[LayerPlan]]:
        """Every tensor as stored (the input's own where unchanged), and the plan rows."""
        key = json.dumps(plan.to_json(), sort_keys=True)
        if key in self._done:
            return self._done[key]
        stored: dict[str, StoredTensor] = {
            name: t if name in plan else self._rest_of(name, t) for name, t in self.state.items()}
        if self.calibration is not None:
            done = reconstruct(self.calibration, plan, self.state, self.execute,
                               self.bias_correction, self.progress, self._keep)
            stored.update(done.tensors)
            stored.update({name: self.rest(bias) for name, bias in done.biases.items()})
            layers = [done.layers[name] for name in plan]
        else:
            layers = []
            names = list(plan)
            executed = ordered_map(lambda n: self.execute(n, self.state[n], plan[n]), names,
                                   self.jobs)
            for name, (tensor, layer) in zip(names, executed, strict=True):
                stored[name] = tensor
                layers.append(layer)
                if self.progress is not None:
                    self.progress(layer.numel)
        self._done = {**dict(list(self._done.items())[-1:]), key: (stored, layers)}
        return stored, layers

    def _rest_of(self, name: str, tensor: torch.Tensor) -> StoredTensor:
        """`rest` of an input tensor, made once (a calibrated rd runs many plans)."""
        if name not in self._rested:
            self._rested[name] = self.rest(tensor)
        return self._rested[name]

    def realize(self, plan: Plan) -> Realized:
        """``plan`` executed: the tensors it changes (a quantized one as how to dequantize
        it, made when a calibration pass needs it), and its layers' bytes."""
        stored, layers = self.run(plan)
        changed = {name: lazily(t) for name, t in stored.items() if t is not self.state[name]}
        # corrected biases outside the plan: what they add to the fixed part counts too (a
        # model's zero biases, coded in a few bytes, took their full float16 size once
        # corrected: a calibrated BERT at target_ratio=8 wrote 7.57x)
        grown = 0.0
        for name, tensor in stored.items():
            if name not in plan and tensor is not (before := self._rest_of(name, self.state[name])):
                grown += unplanned_bytes(tensor) - unplanned_bytes(before)
        return Realized(changed, sum(layer.coded_bytes for layer in layers) + grown,
                        {layer.name: layer.feedback for layer in layers
                         if layer.feedback is not None})
