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

from qlis.errors import ConfigError
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
