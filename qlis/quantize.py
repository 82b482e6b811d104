"""Quantizers: a weight tensor -> small integer codes plus the parameters to dequantize them.

Every quantizer keeps an exact zero exactly zero (so LAPQ's pruned weights survive), returns
its codes as a uint8 numpy array (what the archive's codecs store) and dequantizes with one
deterministic function, so the archive reproduces ``CompressionResult.state_dict()`` to the bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from qlis.errors import ArchiveError, ConfigError, InputError
from qlis.registry import Registry
from qlis.strategy import Strategy

GRANULARITIES = ("tensor", "channel")


@dataclass
class QuantizedTensor:
    """Integer codes (uint8, shaped like the weight), alphabet size, and dequantization params."""

    codes: np.ndarray
    n_levels: int
    quantizer: dict
    params: dict[str, np.ndarray]
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def code_bits(self) -> int:
        """Bits a fixed-width code needs (the alphabet rounded up to a power of two)."""
        return max(1, math.ceil(math.log2(max(self.n_levels, 2))))

    def dequantize(self) -> torch.Tensor:
        return get_quantizer(self.quantizer).dequantize(self)


class Quantizer(Strategy):
    """Maps a weight to a QuantizedTensor and back. Subclasses implement both directions."""

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        raise NotImplementedError

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        raise NotImplementedError


quantizer_registry: Registry[Quantizer] = Registry("quantizer", "qlis.quantizers")


def register_quantizer(cls: type[Quantizer]) -> type[Quantizer]:
    """Register a Quantizer subclass under its ``strategy_id`` (usable as a decorator)."""
    quantizer_registry.register(cls.strategy_id, cls)
    return cls


def get_quantizer(config: dict | str) -> Quantizer:
    """A quantizer from its config dict (or a bare id with default parameters)."""
    config = {"id": config} if isinstance(config, str) else config
    return quantizer_registry.get(config["id"]).from_config(config)


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def _rows(weight: torch.Tensor, granularity: str) -> torch.Tensor:
    """float32 view as (groups, elements): one row per output channel, or a single row."""
    w = weight.detach().float()
    if granularity == "channel" and w.ndim >= 1 and w.shape[0] > 0:
        return w.reshape(w.shape[0], -1)
    return w.reshape(1, -1)


def _column(params: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(params, dtype=np.float32)).reshape(-1, 1)


def _rows_of(q: QuantizedTensor, granularity: str) -> torch.Tensor:
    codes = torch.from_numpy(np.ascontiguousarray(q.codes))
    if granularity == "channel" and codes.ndim >= 1 and codes.shape[0] > 0:
        return codes.reshape(codes.shape[0], -1)
    return codes.reshape(1, -1)


@register_quantizer
class AffineQuantizer(Quantizer):
    """Uniform affine min-max quantization to ``bits`` (2-8), per tensor or per output channel.

    The range is widened to include 0 and the zero point is an integer code, so 0 maps to 0
    exactly; every value in range is within scale/2 of its dequantized value.

    >>> q = AffineQuantizer(bits=2).quantize(torch.tensor([-1.0, 0.0, 2.0]))
    >>> q.codes.tolist(), q.dequantize().tolist()
    ([0, 1, 3], [-1.0, 0.0, 2.0])
    """

    strategy_id = "affine"

    def __init__(self, bits: int = 8, granularity: str = "tensor") -> None:
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ConfigError(f"affine quantization takes 2 to 8 bits (1 bit: binary), got {bits}")
        _check_granularity(granularity)
        self.bits = bits
        self.granularity = granularity

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        rows = _rows(weight, self.granularity)
        top = (1 << self.bits) - 1
        if rows.numel():
            lo = rows.amin(dim=1).clamp(max=0.0)
            hi = rows.amax(dim=1).clamp(min=0.0)
        else:
            lo = hi = torch.zeros(rows.shape[0])
        scale = (hi - lo) / top
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.round(-lo / scale).clamp(0, top)
        codes = torch.round(rows / scale[:, None] + zero_point[:, None]).clamp(0, top)
        return QuantizedTensor(
            codes=codes.to(torch.uint8).reshape(weight.shape).numpy(),
            n_levels=top + 1,
            quantizer=self.get_config(),
            params={"scale": scale.numpy(), "zero_point": zero_point.numpy()},
            dtype=weight.dtype,
        )

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        rows = _rows_of(q, self.granularity).float()
        values = (rows - _column(q.params["zero_point"])) * _column(q.params["scale"])
        return values.reshape(q.shape).to(q.dtype)


@register_quantizer
class BinaryQuantizer(Quantizer):
    """1 bit: sign(w) * mean|w| (per tensor or channel); zeros stay zero as a third symbol.

    alpha is the mean magnitude of the non-zero weights, the least-squares scale for those
    signs. Without zeros the codes are {0: -alpha, 1: +alpha}; with zeros {0: -a, 1: 0, 2: +a}.

    >>> BinaryQuantizer().quantize(torch.tensor([-1.0, 3.0])).dequantize().tolist()
    [-2.0, 2.0]
    """

    strategy_id = "binary"

    def __init__(self, granularity: str = "tensor") -> None:
        _check_granularity(granularity)
        self.granularity = granularity

    @property
    def bits(self) -> int:
        return 1

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        rows = _rows(weight, self.granularity)
        nonzero = rows != 0
        alpha = rows.abs().sum(dim=1) / nonzero.sum(dim=1).clamp(min=1)
        has_zeros = bool((~nonzero).any())
        sign = torch.sign(rows)
        codes = sign + 1 if has_zeros else (sign > 0).to(torch.float32)
        return QuantizedTensor(
            codes=codes.to(torch.uint8).reshape(weight.shape).numpy(),
            n_levels=3 if has_zeros else 2,
            quantizer=self.get_config(),
            params={"alpha": alpha.numpy()},
            dtype=weight.dtype,
        )

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        rows = _rows_of(q, self.granularity).float()
        sign = rows - 1 if q.n_levels == 3 else rows * 2 - 1
        return (sign * _column(q.params["alpha"])).reshape(q.shape).to(q.dtype)


@register_quantizer
class KMeansQuantizer(Quantizer):
    """Weight sharing (Deep Compression): a 2**bits-entry codebook fitted by 1-D k-means.

    When the weight holds exact zeros one entry is reserved for 0.0. The codebook is fitted on
    at most ``sample_size`` values (seeded), then every weight takes its nearest entry.

    >>> q = KMeansQuantizer(bits=1).quantize(torch.tensor([1.0, 1.1, 5.0, 5.2]))
    >>> [round(v, 2) for v in q.dequantize().tolist()]
    [1.05, 1.05, 5.1, 5.1]
    """

    strategy_id = "kmeans"

    def __init__(
        self, bits: int = 4, iterations: int = 20, sample_size: int = 1 << 18, seed: int = 0
    ) -> None:
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ConfigError(f"k-means quantization takes 1 to 8 bits, got {bits}")
        self.bits = bits
        self.iterations = iterations
        self.sample_size = sample_size
        self.seed = seed

    def _fit(self, values: torch.Tensor, k: int) -> torch.Tensor:
        if values.numel() > self.sample_size:
            gen = torch.Generator().manual_seed(self.seed)
            values = values[torch.randint(values.numel(), (self.sample_size,), generator=gen)]
        distinct = torch.unique(values)
        if distinct.numel() <= k:
            return distinct
        centroids = torch.quantile(values, (torch.arange(k) + 0.5) / k).unique()
        for _ in range(self.iterations):
            assign = _nearest(values, centroids)
            sums = torch.bincount(assign, weights=values, minlength=centroids.numel())
            counts = torch.bincount(assign, minlength=centroids.numel())
            updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
            updated, _ = updated.sort()
            if torch.equal(updated, centroids):
                break
            centroids = updated
        return centroids

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        flat = weight.detach().float().reshape(-1)
        nonzero = flat[flat != 0]
        has_zeros = nonzero.numel() < flat.numel()
        k = (1 << self.bits) - int(has_zeros)
        centroids = self._fit(nonzero, k) if k > 0 and nonzero.numel() else torch.zeros(0)
        if has_zeros or centroids.numel() == 0:
            centroids = torch.cat([centroids, torch.zeros(1)]).unique()
        codes = _nearest(flat, centroids) if flat.numel() else torch.zeros(0, dtype=torch.long)
        return QuantizedTensor(
            codes=codes.to(torch.uint8).reshape(weight.shape).numpy(),
            n_levels=centroids.numel(),
            quantizer=self.get_config(),
            params={"codebook": centroids.numpy()},
            dtype=weight.dtype,
        )

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        codebook = torch.from_numpy(np.ascontiguousarray(q.params["codebook"], dtype=np.float32))
        codes = torch.from_numpy(np.ascontiguousarray(q.codes)).long()
        return codebook[codes].reshape(q.shape).to(q.dtype)


_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _float16_scale(scale: torch.Tensor) -> np.ndarray:
    """The smallest float16 >= each positive float32 scale, within the float16 range.

    Rounding up keeps the group's range inside the grid; a scale under the smallest float16
    becomes that subnormal (2**-24), one over 65504 becomes 65504 (the extremes then clamp).
    """
    wanted = np.minimum(scale.numpy(), np.float32(_FLOAT16_MAX))
    half = wanted.astype(np.float16)
    low = half.astype(np.float32) < wanted
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    return half


def _group_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(shape[0], prod(shape[1:])) view; a 0-d or 1-D tensor is one row."""
    if tensor.ndim >= 2:
        return tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:]))
    return tensor.reshape(1, -1)


def _grouped(rows: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, groups, group_size), the last group of each row padded with zeros."""
    n_groups = -(-rows.shape[1] // group_size)
    pad = n_groups * group_size - rows.shape[1]
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], n_groups, group_size)


@register_quantizer
class GroupAffineQuantizer(Quantizer):
    """Group-wise affine quantization (the torchao int4 / GGUF-block family): one float16
    scale (and zero point) per ``group_size`` consecutive weights along the input dimension.

    The weight is viewed as (shape[0], prod(shape[1:])); a row not divisible by
    ``group_size`` ends with a shorter group. 32, 64 and 128 are the usual group sizes.
    Asymmetric: min-max with 0 exactly representable, the zero point an integer code.
    Symmetric: codes centred on ``2**(bits-1)``, scale ``max|w| / (2**(bits-1) - 1)``.
    The scale is computed in float32 and rounded up to float16, and the codes are derived
    from that float16 scale, so ``(code - zero_point) * scale`` in float32 (then cast to the
    weight's dtype) is what a reader anywhere computes; 0 stays exactly 0.

    >>> q = GroupAffineQuantizer(bits=2, group_size=2).quantize(torch.tensor([-1.0, 2, 0, 3]))
    >>> q.codes.tolist(), q.params["scale"].tolist(), q.dequantize().tolist()
    ([0, 3, 0, 3], [[1.0, 1.0]], [-1.0, 2.0, 0.0, 3.0])
    """

    strategy_id = "group"

    def __init__(self, bits: int = 4, group_size: int = 128, symmetric: bool = False) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ConfigError(f"group quantization takes 2 to 8 bits, got {bits!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ConfigError(f"group_size must be a positive integer (32-128), got {group_size!r}")
        if not isinstance(symmetric, bool):
            raise ConfigError(f"symmetric must be true or false, got {symmetric!r}")
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        rows = _group_rows(weight.detach().float())
        groups = _grouped(rows, self.group_size)
        top = (1 << self.bits) - 1
        centre = 1 << (self.bits - 1)
        if self.symmetric:
            scale = groups.abs().amax(dim=2) / (centre - 1)
        else:
            lo = groups.amin(dim=2).clamp(max=0.0)
            scale = (groups.amax(dim=2).clamp(min=0.0) - lo) / top
        if not bool(torch.isfinite(scale).all()):
            raise InputError("group quantization needs finite weights (found inf or NaN)")
        half = _float16_scale(torch.where(scale > 0, scale, torch.ones_like(scale)))
        step = torch.from_numpy(half.astype(np.float32))
        if self.symmetric:
            zero_point = torch.full_like(step, float(centre))
        else:
            zero_point = torch.round((0.0 - lo) / step).clamp(0, top)  # never -0.0
        codes = torch.round(groups / step[..., None] + zero_point[..., None]).clamp(0, top)
        codes = codes.reshape(rows.shape[0], codes.shape[1] * codes.shape[2])[:, : rows.shape[1]]
        params = {"scale": half}
        if not self.symmetric:
            params["zero_point"] = zero_point.numpy().astype(np.float16)
        return QuantizedTensor(
            codes=codes.to(torch.uint8).reshape(weight.shape).numpy(),
            n_levels=top + 1,
            quantizer=self.get_config(),
            params=params,
            dtype=weight.dtype,
        )

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        rows = _group_rows(torch.from_numpy(np.ascontiguousarray(q.codes)).float())
        groups = _grouped(rows, self.group_size)
        shape = groups.shape[:2]
        names = ["scale"] if self.symmetric else ["scale", "zero_point"]
        arrays = [np.asarray(q.params.get(name, np.zeros(0))) for name in names]
        if any(array.shape != shape for array in arrays):
            raise ArchiveError(
                f"group quantization of a {list(q.shape)} tensor needs {'/'.join(names)} "
                f"of shape {list(shape)}, got {[list(array.shape) for array in arrays]}"
            )
        step = torch.from_numpy(arrays[0].astype(np.float32))
        if self.symmetric:
            zero_point = torch.full_like(step, float(1 << (self.bits - 1)))
        else:
            zero_point = torch.from_numpy(arrays[1].astype(np.float32))
        values = (groups - zero_point[..., None]) * step[..., None]
        values = values.reshape(rows.shape[0], values.shape[1] * values.shape[2])
        return values[:, : rows.shape[1]].reshape(q.shape).to(q.dtype)


def _nearest(values: torch.Tensor, sorted_centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each value (centroids sorted ascending)."""
    midpoints = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
    return torch.bucketize(values, midpoints)


def make_quantizer(bits: int, granularity: str = "tensor", method: str = "affine") -> Quantizer:
    """The quantizer a policy uses for ``bits``: the paper's binarization at 1 bit, else ``method``.

    >>> make_quantizer(1), make_quantizer(4, "channel")
    (BinaryQuantizer(granularity='tensor'), AffineQuantizer(bits=4, granularity='channel'))
    """
    if method == "kmeans":
        return KMeansQuantizer(bits=bits)
    if method != "affine":
        return get_quantizer({"id": method, "bits": bits})
    if bits == 1:
        return BinaryQuantizer(granularity=granularity)
    return AffineQuantizer(bits=bits, granularity=granularity)


MAX_LEVELS = 1 << 16


def code_dtype(n_levels: int) -> type:
    """The narrowest unsigned numpy dtype that holds codes ``< n_levels`` (uint8 or uint16)."""
    if n_levels > MAX_LEVELS:
        raise ConfigError(f"{n_levels} code levels exceed the limit of {MAX_LEVELS}")
    return np.uint8 if n_levels <= 256 else np.uint16


def round_with_offset(scaled: torch.Tensor, rounding: float) -> torch.Tensor:
    """sign(x) * floor(|x| + rounding): nearest at 0.5, a dead zone around 0 below it."""
    return torch.copysign(scaled.abs().add_(rounding).floor_(), scaled)


@register_quantizer
class UniformQuantizer(Quantizer):
    """Entropy-coded uniform quantization: a fixed step, integer codes of any range.

    The scalar rate–distortion frontier: with an entropy coder behind it a uniform step is
    within 0.25 bit of the best any scalar quantizer can do at the same error. ``step`` is
    the step itself (relative to nothing), or ``rel_mse`` asks for the step whose high-rate
    error ``step**2 / 12`` is that fraction of the layer's (or channel's) mean square.
    ``rounding`` below 0.5 widens the zero bin (a dead zone) and lowers the rate.
    Value of code ``c``: ``(c - offset) * step[row]``; 0 stays exactly 0.

    >>> q = UniformQuantizer(step=0.5).quantize(torch.tensor([-1.0, 0.0, 0.3, 2.0]))
    >>> q.codes.tolist(), q.dequantize().tolist()
    ([0, 2, 3, 6], [-1.0, 0.0, 0.5, 2.0])
    """

    strategy_id = "uniform"

    def __init__(
        self,
        step: float | None = None,
        rel_mse: float | None = None,
        granularity: str = "tensor",
        rounding: float = 0.5,
    ) -> None:
        if (step is None) == (rel_mse is None):
            raise ConfigError("uniform quantization takes exactly one of step= or rel_mse=")
        if step is not None and not (isinstance(step, int | float) and 0 < step < math.inf):
            raise ConfigError(f"step must be a positive finite number, got {step!r}")
        if rel_mse is not None and not (isinstance(rel_mse, int | float) and 0 < rel_mse < 1):
            raise ConfigError(f"rel_mse must be in (0, 1), got {rel_mse!r}")
        if not (isinstance(rounding, int | float) and 0 < rounding <= 0.5):
            raise ConfigError(f"rounding must be in (0, 0.5], got {rounding!r}")
        _check_granularity(granularity)
        self.step = None if step is None else float(step)
        self.rel_mse = None if rel_mse is None else float(rel_mse)
        self.granularity = granularity
        self.rounding = float(rounding)

    def steps(self, rows: torch.Tensor) -> torch.Tensor:
        """The step of each row (float32): fixed, or from the row's mean square."""
        if self.step is not None:
            return torch.full((rows.shape[0],), self.step, dtype=torch.float32)
        if not rows.shape[1]:
            return torch.ones(rows.shape[0])
        peak = rows.abs().amax(dim=1, keepdim=True)  # scaled first: no under/overflow
        scale = torch.where(peak > 0, peak, torch.ones_like(peak))
        rms = (rows / scale).square().mean(dim=1).sqrt() * scale.squeeze(1)
        step = math.sqrt(12.0 * self.rel_mse) * rms
        return torch.where(step > 0, step, torch.ones_like(step)).float()

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        rows = _rows(weight, self.granularity)
        step = self.steps(rows)
        levels = round_with_offset(rows / step[:, None], self.rounding)
        low, high = (float(v) for v in torch.aminmax(levels)) if levels.numel() else (0, 0)
        if not math.isfinite(low) or not math.isfinite(high):
            raise ConfigError("uniform quantization needs finite weights")
        low, high = int(low), int(high)
        n_levels = high - low + 1
        if n_levels > MAX_LEVELS:
            raise ConfigError(
                f"a step this small needs {n_levels} levels for this layer's range "
                f"(at most {MAX_LEVELS}); use a larger step or rel_mse"
            )
        shifted = levels.sub_(low)
        if code_dtype(n_levels) is np.uint8:
            codes = shifted.to(torch.uint8).numpy()
        else:
            codes = shifted.to(torch.int32).numpy().astype(np.uint16)
        return QuantizedTensor(
            codes=codes.reshape(weight.shape),
            n_levels=n_levels,
            quantizer=self.get_config(),
            params={"step": step.numpy(), "offset": np.array([-low], dtype=np.float32)},
            dtype=weight.dtype,
        )

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        codes = np.ascontiguousarray(q.codes).astype(np.float32)
        rows = _rows_of(QuantizedTensor(codes, q.n_levels, q.quantizer, {}, q.dtype),
                        self.granularity)
        values = (rows - float(q.params["offset"].reshape(-1)[0])) * _column(q.params["step"])
        return values.reshape(q.shape).to(q.dtype)
