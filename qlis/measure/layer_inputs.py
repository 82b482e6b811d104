"""What a weight sees: the rows of inputs that multiply its matrix, for each layer kind that
calibration can reach.

Error feedback and bias correction need, per weight, the inputs X with ``output = W_matrix X``
(one row of X per output position): the layer's input rows for ``nn.Linear`` and Hugging
Face's ``Conv1D`` (whose weight is stored (in, out): ``transposed``), the unfolded patches for
``nn.Conv1d/2d/3d`` (any padding mode, stride, dilation; grouped and depthwise convolutions
give one set of rows per group of outputs), and the query / key / value inputs of the packed
``in_proj_weight`` of ``nn.MultiheadAttention`` (three groups of outputs) and the heads'
outputs that its ``out_proj`` multiplies (recomputed: the module never calls it). Any other tensor
(embeddings, a weight its module uses in a way not listed) has no ``LayerInputs`` and is
quantized data-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PATCH_ROWS = 1 << 14  # unfold at most this many output positions at once (bounded memory)
PART_ELEMENTS = 1 << 20
"""Input rows are widened to float64 this many elements at a time (8 MiB) to be measured:
each part is one term of a layer's exact covariance sum (qlis/measure/batch_sums.py)."""


@dataclass(frozen=True)
class LayerInputs:
    """How one weight's input rows come out of its module's calls.

    ``groups`` output groups (equal slices of the weight's outputs) each see their own rows
    of ``width`` values; ``bias`` is the state-dict name of the bias added to those outputs
    (None without one); ``transposed`` when the weight is stored (inputs, outputs).
    """

    module_name: str
    module: nn.Module
    groups: int
    width: int
    bias: str | None
    transposed: bool
    rows_of_call: Callable[[tuple, dict], Iterator[list[torch.Tensor]]]

    def chunks(self, args: tuple, kwargs: dict) -> Iterator[list[torch.Tensor]]:
        """The input rows of one call, in chunks of bounded size: per chunk, one (n, width)
        tensor per group."""
        return self.rows_of_call(args, kwargs)

    def output_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as float32 (outputs, inputs)."""
        w = weight.detach().float()
        if self.transposed:
            return w.T
        return w.reshape(w.shape[0], -1)


def _first(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


Rows = Callable[[tuple, dict], Iterator[list[torch.Tensor]]]


def _linear_rows(width: int) -> Rows:
    def rows(args: tuple, kwargs: dict) -> Iterator[list[torch.Tensor]]:
        yield [_first(args, kwargs, "input").detach().reshape(-1, width)]

    return rows


def _conv_rows(conv: nn.Module) -> Rows:
    """Unfolded patches (positions, in / groups * prod(kernel)) per group of a convolution,
    a few samples at a time."""
    dims = len(conv.kernel_size)

    def rows(args: tuple, kwargs: dict) -> Iterator[list[torch.Tensor]]:
        x = _first(args, kwargs, "input").detach()
        if x.ndim == dims + 1:  # an unbatched input
            x = x[None]
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        for d in range(dims):
            span = conv.dilation[d] * (conv.kernel_size[d] - 1) + 1
            x = x.unfold(2 + d, span, conv.stride[d])[..., :: conv.dilation[d]]
        # (N, C, L_1..L_d, k_1..k_d) -> (N * L, C * prod(k)), channels outermost as in W
        channels = x.shape[1]
        positions = math.prod(x.shape[2 : 2 + dims])
        x = x.permute(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
        per_group = channels // conv.groups * math.prod(conv.kernel_size)
        step = max(1, _PATCH_ROWS // max(positions, 1))
        for start in range(0, x.shape[0], step):
            patches = x[start : start + step].reshape(-1, channels * math.prod(conv.kernel_size))
            yield [patches[:, g * per_group : (g + 1) * per_group] for g in range(conv.groups)]

    return rows


def _attention_rows(attention: nn.MultiheadAttention) -> Rows:
    names = ("query", "key", "value")

    def rows(args: tuple, kwargs: dict) -> Iterator[list[torch.Tensor]]:
        given = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
        yield [t.detach().reshape(-1, attention.embed_dim) for t in given]

    return rows


def _attention_output_rows(attention: nn.MultiheadAttention) -> Rows:
    """The input of ``out_proj``: the heads' outputs side by side, which
    nn.MultiheadAttention computes inside its functional forward and never passes to
    out_proj's own forward. The same call again, with an identity output projection (and no
    bias), returns exactly those rows, on either of its paths (fast or not)."""
    projection = attention.out_proj

    def rows(args: tuple, kwargs: dict) -> Iterator[list[torch.Tensor]]:
        weight, bias = projection.weight, projection.bias
        saved = weight.data, None if bias is None else bias.data
        try:
            weight.data = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
            if bias is not None:
                bias.data = torch.zeros_like(bias.data)
            with torch.no_grad():
                heads = attention.forward(*args, **kwargs)[0]
        finally:
            weight.data = saved[0]
            if bias is not None:
                bias.data = saved[1]
        yield [heads.detach().reshape(-1, attention.embed_dim)]

    return rows


def _out_projection_of(model: nn.Module, module_name: str) -> nn.MultiheadAttention | None:
    """The nn.MultiheadAttention whose ``out_proj`` is ``module_name``, if it is one."""
    parent_name, _, child = module_name.rpartition(".")
    if child != "out_proj":
        return None
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent if isinstance(parent, nn.MultiheadAttention) else None


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2 family): a Linear whose weight is stored (in, out)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor)
            and weight.ndim == 2 and getattr(module, "nf", None) == weight.shape[1])


def layer_inputs(model: nn.Module, name: str) -> LayerInputs | None:
    """How the weight ``name`` of ``model`` sees its inputs, or None when calibration cannot
    say (not a weight of a supported layer kind).

    >>> model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    >>> inputs = layer_inputs(model, "0.weight")
    >>> inputs.groups, inputs.width, inputs.bias
    (2, 18, '0.bias')
    """
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return None
    prefix = f"{module_name}." if module_name else ""

    def bias_name(attribute: str) -> str | None:
        return f"{prefix}{attribute}" if getattr(module, attribute, None) is not None else None

    attention = _out_projection_of(model, module_name) if attr == "weight" else None
    if attention is not None:
        return LayerInputs(module_name.rpartition(".")[0], attention, 1, attention.embed_dim,
                           bias_name("bias"), False, _attention_output_rows(attention))
    if attr == "weight" and isinstance(module, nn.Linear):
        return LayerInputs(module_name, module, 1, module.in_features, bias_name("bias"), False,
                           _linear_rows(module.in_features))
    if attr == "weight" and isinstance(module, _CONV):
        width = module.in_channels // module.groups * math.prod(module.kernel_size)
        return LayerInputs(module_name, module, module.groups, width, bias_name("bias"), False,
                           _conv_rows(module))
    if attr == "weight" and _is_hf_conv1d(module):
        width = module.weight.shape[0]
        return LayerInputs(module_name, module, 1, width, bias_name("bias"), True,
                           _linear_rows(width))
    if (attr == "in_proj_weight" and isinstance(module, nn.MultiheadAttention)
            and module.in_proj_weight is not None):
        return LayerInputs(module_name, module, 3, module.embed_dim, bias_name("in_proj_bias"),
                           False, _attention_rows(module))
    return None


def float64_parts(rows: torch.Tensor) -> Iterator[torch.Tensor]:
    """``rows`` (n, width) in float64, at most `PART_ELEMENTS` at a time (bounded copies).
    The copies share one buffer: a part is valid until the next one is asked for."""
    step = max(1, PART_ELEMENTS // max(rows.shape[1], 1))
    if not rows.shape[0]:
        return
    if rows.dtype == torch.float64 and rows.device.type == "cpu":
        yield from rows.split(step)
        return
    buffer = torch.empty(min(step, rows.shape[0]), rows.shape[1], dtype=torch.float64)
    for part in rows.split(step):
        yield buffer[: part.shape[0]].copy_(part)


def call_inputs(args: tuple, kwargs: dict) -> Any:
    """The first positional (or keyword) tensor of a call: what identifies its input."""
    if args:
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
