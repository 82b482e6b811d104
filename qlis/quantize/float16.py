"""Half precision as a quantizer: each value as its nearest float16, restored to its dtype.

What ``rd`` stores the tensors outside the layers as (biases, norms, BatchNorm statistics):
kept float32, a MobileNetV2's BatchNorm parameters took a fifth of its budget at 8x and a
third at 12x, bytes its convolutions then lacked (docs/method.md, "Tensors outside the
layers"). Float16 keeps 11 significant bits, the precision every half-precision checkpoint
ships with.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from qlis.errors import ConfigError
from qlis.measure.distortion import peak_abs
from qlis.quantize.quantizers import (
    MAX_LEVELS,
    ParamSpec,
    QuantizedTensor,
    Quantizer,
    register_quantizer,
)

FLOAT16_MAX = 65504.0
MAX_RELATIVE_ERROR = 2.0 ** -20
"""The largest ``||x - float16(x)||^2 / ||x||^2`` at which a tensor is `narrowed` (about 1e-6):
rounding in float16's normal range gives at most 2^-22 per value; values below its normal
range (6.1e-5), rounded to a multiple of 2^-24, may lift it, up to a hundredth of the weight
error rd's default leaves in a layer (DEFAULT_MAX_DISTORTION, 1e-4)."""


@register_quantizer
class Float16Quantizer(Quantizer):
    """Each value as its nearest float16 (IEEE half precision), dequantized to the tensor's
    dtype. Codes are the float16 bit patterns (65,536 levels), stored with whichever codec is
    smallest (`codes_codec`): the patterns of a bias or a norm rarely repeat. No grid (it is
    not uniform), so error feedback rounds to nearest and the low-bit runtime dequantizes.

    >>> q = Float16Quantizer().quantize(torch.tensor([1.0, 1 / 3, 0.0]))
    >>> q.dequantize().tolist() == [1.0, float(torch.tensor(1 / 3).half()), 0.0]
    True
    """

    strategy_id = "float16"
    params = {}
    codes_codec: ClassVar[str | None] = "auto"

    def narrowed(self, tensor: torch.Tensor) -> QuantizedTensor | None:
        """``tensor`` quantized where float16 holds it (float32, finite, within its range, a
        relative squared error of at most MAX_RELATIVE_ERROR): what ``rd`` narrows; None
        elsewhere."""
        if tensor.dtype != torch.float32 or not tensor.numel():
            return None
        if not peak_abs(tensor) <= FLOAT16_MAX:  # nan and inf fail too
            return None
        q = self.quantize(tensor)
        return q if self.relative_error(tensor, q) <= MAX_RELATIVE_ERROR else None

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        values = weight.detach()
        if not values.is_floating_point():
            raise ConfigError(f"float16 stores floating-point tensors, not {values.dtype}")
        finite = values[torch.isfinite(values)]
        if finite.numel() and float(finite.abs().max()) > FLOAT16_MAX:
            raise ConfigError(f"values up to {float(finite.abs().max()):.4g} lie beyond "
                              f"float16's range ({FLOAT16_MAX:g})")
        codes = values.half().contiguous().view(torch.int16).numpy().view(np.uint16)
        return QuantizedTensor(codes.copy(), MAX_LEVELS, self.get_config(), {}, weight.dtype)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        codes = np.ascontiguousarray(q.codes, dtype=np.uint16)
        return torch.from_numpy(codes.view(np.float16).copy()).to(q.dtype).reshape(q.shape)

    def level_range(self) -> tuple[int, int]:
        return MAX_LEVELS, MAX_LEVELS

    def param_specs(self, shape: tuple[int, ...], n_levels: int) -> dict[str, ParamSpec]:
        return {}
