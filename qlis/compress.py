"""``qlis.compress``: score the layers, plan (k, bits) per layer, prune and quantize.

The result keeps what the archive needs (integer codes and their parameters, float tensors
for everything stored losslessly), the per-layer plan, and the paper's ratios.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from qlis.codecs import huffman_code_lengths
from qlis.policy import Assignment, Policy, make_policy
from qlis.prune import SigmaPruner
from qlis.quantize import QuantizedTensor, make_quantizer
from qlis.select import SelectSpec
from qlis.stats import InspectionReport, inspect
from qlis.tensors import as_state_dict, storage_bits

StoredTensor = torch.Tensor | QuantizedTensor


@dataclass(frozen=True)
class LayerPlan:
    """What happened to one layer: its score, the chosen k and bits, and the cost in error."""

    name: str
    numel: int
    qlis: float
    k: float
    bits: int | None
    sparsity: float
    rel_mse: float
    kept: int
    paper_bits: float
    huffman_bits: float


class CompressionResult:
    """The outcome of ``qlis.compress``.

    ``tensors`` holds, for every tensor of the input in its order, either a QuantizedTensor
    (codes + parameters) or a float tensor kept as it is (pruned layers and everything not
    selected). ``cr``/``hcr`` are the paper's idealised ratios (no index or metadata cost).
    """

    def __init__(
        self,
        tensors: dict[str, StoredTensor],
        layers: list[LayerPlan],
        policy: Policy,
        report: InspectionReport,
        original_bits: int,
        paper_bits: float,
        huffman_bits: float,
    ) -> None:
        self.tensors = tensors
        self.layers = layers
        self.policy = policy
        self.report = report
        self.original_bits = original_bits
        self.paper_bits = paper_bits
        self.huffman_bits = huffman_bits

    @property
    def cr(self) -> float:
        """Paper CR: original bits / (b_l bits per non-zero weight; the rest at full size)."""
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
        """The tensors the compressed model computes with (dequantized), for every input tensor."""
        return {
            name: t.dequantize() if isinstance(t, QuantizedTensor) else t
            for name, t in self.tensors.items()
        }

    def summary(self) -> dict:
        """Plain-JSON totals: policy, sizes and ratios."""
        return {
            "policy": self.policy.name,
            "layers": len(self.layers),
            "tensors": len(self.tensors),
            "original_bytes": self.original_bytes,
            "cr": self.cr,
            "hcr": self.hcr,
        }

    def __repr__(self) -> str:
        return (
            f"CompressionResult(policy={self.policy.name!r}, layers={len(self.layers)}, "
            f"cr={self.cr:.2f}, hcr={self.hcr:.2f})"
        )


def _huffman_bits(codes: np.ndarray, n_levels: int) -> float:
    counts = np.bincount(codes.reshape(-1), minlength=n_levels)
    return float((counts * huffman_code_lengths(counts)).sum())


def _compress_layer(
    name: str, weight: torch.Tensor, qlis: float, k: float, bits: int | None, policy: Policy
) -> tuple[StoredTensor, LayerPlan]:
    pruned = SigmaPruner(k).prune(weight)[0] if k > 0 else weight
    width = storage_bits(weight.dtype)
    kept = int(torch.count_nonzero(pruned))
    if bits is None:
        stored: StoredTensor = pruned
        approx = pruned
        paper = huffman = float(kept * width)
    else:
        stored = make_quantizer(bits, policy.granularity, policy.method).quantize(pruned)
        approx = stored.dequantize()
        paper = float(kept * bits)
        codes = stored.codes if kept == weight.numel() else stored.codes[(pruned != 0).numpy()]
        huffman = _huffman_bits(codes, stored.n_levels)
    reference = weight.float().reshape(-1)
    difference = approx.float().reshape(-1) - reference
    energy = float(torch.dot(reference, reference))
    error = float(torch.dot(difference, difference))
    plan = LayerPlan(
        name=name,
        numel=weight.numel(),
        qlis=qlis,
        k=k,
        bits=bits,
        sparsity=1.0 - kept / max(weight.numel(), 1),
        rel_mse=error / energy if energy > 0 else 0.0,
        kept=kept,
        paper_bits=paper,
        huffman_bits=huffman,
    )
    return stored, plan


def _budget_costs(state: dict, report: InspectionReport, policy: Policy):
    """Paper bits of any assignment, from kept-weight counts measured once per (layer, k)."""
    kept = [
        {
            k: int(torch.count_nonzero(SigmaPruner(k).prune(state[layer.name])[0]))
            for k in policy.k_levels
        }
        for layer in report.layers
    ]
    widths = [storage_bits(state[layer.name].dtype) for layer in report.layers]
    selected = {layer.name for layer in report.layers}
    fixed = sum(t.numel() * storage_bits(t.dtype) for n, t in state.items() if n not in selected)

    def paper_bits(assignment: Assignment) -> float:
        return fixed + sum(
            kept[i][k] * (bits if bits is not None else widths[i])
            for i, (k, bits) in enumerate(assignment)
        )

    return paper_bits


def compress(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    policy: str | Policy = "lapq",
    beta: float = 0.5,
    *,
    eps: float = 1e-3,
    select: SelectSpec = None,
    inplace: bool = False,
    progress: Callable[[int], None] | None = None,
    **options,
) -> CompressionResult:
    """Prune and/or quantize every selected layer as the policy plans from its QLIS.

    ``options`` configure the policy: ``k`` (policy "prune"), ``bits`` (policy "quant"),
    ``k_levels``, ``bits_levels``, ``granularity`` ("tensor" or "channel"), ``method``
    ("affine" or "kmeans"), ``target_ratio`` (budget mode). A module is left untouched unless
    ``inplace=True``, which loads the dequantized weights into it. ``progress`` is called
    with the number of parameters of each layer once it is done. Tensors the result keeps as
    they are (not selected, or neither pruned nor quantized) share memory with the input.

    >>> result = compress(torch.nn.Linear(64, 64), policy="quant", bits=4)
    >>> result.layers[0].bits, result.policy.name
    (4, 'quant')
    """
    state = as_state_dict(model_or_state_dict)
    plan_policy = make_policy(policy, **options)
    report = inspect(state, beta=beta, eps=eps, select=select)
    original_bits = sum(t.numel() * storage_bits(t.dtype) for t in state.values())
    scores = np.array([layer.QLIS for layer in report.layers])
    if plan_policy.target_ratio is None:
        assignment = plan_policy.assign(scores)
    else:
        costs = _budget_costs(state, report, plan_policy)
        assignment = plan_policy.assign(scores, costs, original_bits)

    stored: dict[str, StoredTensor] = dict(state)
    layers = []
    for layer, (k, bits) in zip(report.layers, assignment, strict=True):
        stored[layer.name], plan = _compress_layer(
            layer.name, state[layer.name], layer.QLIS, k, bits, plan_policy
        )
        layers.append(plan)
        if progress is not None:
            progress(plan.numel)
    selected = {layer.name for layer in report.layers}
    fixed_bits = sum(
        t.numel() * storage_bits(t.dtype) for n, t in state.items() if n not in selected
    )
    result = CompressionResult(
        tensors=stored,
        layers=layers,
        policy=plan_policy,
        report=report,
        original_bits=original_bits,
        paper_bits=fixed_bits + sum(p.paper_bits for p in layers),
        huffman_bits=fixed_bits + sum(p.huffman_bits for p in layers),
    )
    if inplace and isinstance(model_or_state_dict, torch.nn.Module):
        model_or_state_dict.load_state_dict(result.state_dict())
    return result
