"""Each linear layer's mean square per input column on the float model's calibration inputs:
what rd's steps per input column follow (qlis/quantize/column_scales.py).

Linear layers only: a convolution stepped per unfolded input column lost output quality once
fitted with error feedback (MobileNetV2 at 12x, feature cosine 0.9480 -> 0.9246, 0.9269 with
no column coarser than the layer's step; docs/method.md), where MiniLM's linear layers gain.

One forward pass over the fitting batches, a pre-hook per layer adding the squares of its
input rows column by column (float64, one term per call of its module, in the pass's order:
`OrderedSum`), so a job's ranks, each running its own batches, end with the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from qlis.measure.batch_sums import OrderedSum, gather_totals
from qlis.measure.calibrate import Calibration
from qlis.measure.layer_inputs import LayerInputs, float64_parts, layer_inputs


def input_column_energies(calibration: Calibration,
                          names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Per ``nn.Linear`` weight of ``names``, the mean square of each input column (float64)
    over the fitting batches; weights of other kinds, and those the calibration never runs,
    are left out."""
    watched = {name: inputs for name in names
               if (inputs := layer_inputs(calibration.model, name)) is not None
               and isinstance(inputs.module, nn.Linear) and inputs.groups == 1
               and not inputs.transposed}
    distributed = calibration.cluster is not None
    # per weight: the squares of each column, then the number of rows
    sums = {name: OrderedSum((inputs.width + 1,), distributed)
            for name, inputs in watched.items()}
    calls: dict[str, tuple[int, int]] = dict.fromkeys(watched, (-1, -1))

    def hook(module: nn.Module, args: tuple, kwargs: dict, name: str,
             inputs: LayerInputs) -> None:
        batch, last = calls[name]
        calls[name] = (calibration.batch, last + 1 if batch == calibration.batch else 0)
        term = torch.zeros(inputs.width + 1, dtype=torch.float64)
        for chunk in inputs.chunks(args, kwargs):
            for part in float64_parts(chunk[0]):
                term[:-1] += part.square().sum(dim=0)
            term[-1] += chunk[0].shape[0]
        sums[name].add(calls[name], term)

    handles = [inputs.module.register_forward_pre_hook(
        partial(hook, name=name, inputs=inputs), with_kwargs=True)
        for name, inputs in watched.items()]
    try:
        calibration.feed()
    finally:
        for handle in handles:
            handle.remove()
    gather_totals(calibration.cluster, list(sums.values()))
    totals = {name: ordered.total() for name, ordered in sums.items()}
    return {name: total[:-1] / total[-1] for name, total in totals.items() if total[-1] > 0}
