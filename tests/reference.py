"""Independent reference computations of the method's quantities (numpy / heapq, no qlis).

The tests compare qlis against these; they follow DESIGN.md's equations directly and share
no code with the library.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import torch

_SAME_WIDTH_INT = {64: torch.int64, 32: torch.int32, 16: torch.int16, 8: torch.int8}


def width(dtype: torch.dtype) -> int:
    """B: bits per stored element."""
    if dtype.is_floating_point:
        return torch.finfo(dtype).bits
    return torch.iinfo(dtype).bits


def patterns(tensor: torch.Tensor) -> np.ndarray:
    """The stored bit pattern of every element, as signed integers of the same width."""
    return tensor.contiguous().view(_SAME_WIDTH_INT[width(tensor.dtype)]).reshape(-1).numpy()


def entropy(tensor: torch.Tensor) -> float:
    """H: Shannon entropy (bits) of the distinct stored bit patterns, via np.unique."""
    if tensor.numel() == 0:
        return 0.0
    _, counts = np.unique(patterns(tensor), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def sparsity(tensor: torch.Tensor, eps: float) -> float:
    """S: fraction of weights with |w| < eps, compared in float64."""
    if tensor.numel() == 0:
        return 0.0
    return float((np.abs(tensor.double().numpy()) < eps).mean())


def is_layer(tensor: torch.Tensor) -> bool:
    """The default selection: floating point with 2 or more dimensions."""
    return tensor.is_floating_point() and tensor.ndim >= 2


def stats(state: dict[str, torch.Tensor], beta: float = 0.5, eps: float = 1e-3) -> dict:
    """name -> dict(P, E, S, EWDS, QLIS, sigma) for every default-selected tensor, in order."""
    layers = {n: t for n, t in state.items() if is_layer(t)}
    total = sum(t.numel() for t in layers.values())
    out = {}
    for name, t in layers.items():
        p = t.numel() / total
        e = entropy(t) / width(t.dtype)
        s = sparsity(t, eps)
        ewds = e * (1 - s)
        out[name] = {
            "P": p,
            "E": e,
            "S": s,
            "EWDS": ewds,
            "QLIS": beta * p + (1 - beta) * (1 - ewds),
            "sigma": float(t.double().numpy().std()) if t.numel() else 0.0,
        }
    return out


def keep_mask(weight: torch.Tensor, k: float) -> np.ndarray:
    """LAP: keep |w| >= k * sigma, sigma the population std, all in float64; k = 0 keeps all."""
    w = weight.double().numpy()
    if k == 0 or w.size == 0:
        return np.ones(w.shape, dtype=bool)
    return np.abs(w) >= k * w.std()


def huffman_bits(counts) -> int:
    """Total bits of an optimal Huffman code for these symbol counts (sum of the merge weights).

    A lone symbol costs 1 bit per occurrence, as a real bit stream would need.
    """
    heap = [int(c) for c in np.asarray(counts).ravel() if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


def student_t(shape, df: float, scale: float, rng: np.random.Generator) -> torch.Tensor:
    """Heavy-tailed float32 weights: Student-t samples (``df`` degrees of freedom) * ``scale``."""
    return torch.from_numpy((rng.standard_t(df, size=shape) * scale).astype(np.float32))


def normalized_frequencies(counts: np.ndarray, scale: int) -> np.ndarray:
    """The rANS table rule, as plainly as it reads: round the scaled counts (at least 1),
    then move one unit at a time to the symbol where it gains the most bits (or loses the
    fewest), the lowest symbol first among equals."""
    total = 1 << scale
    freqs = [max(1, int(c * total / counts.sum() + 0.5)) for c in counts]
    while sum(freqs) != total:
        step = 1 if sum(freqs) < total else -1
        movable = [i for i in range(len(freqs)) if step > 0 or freqs[i] > 1]
        best = max(movable, key=lambda i: (counts[i] * np.log2((freqs[i] + step) / freqs[i]),
                                           -i))
        freqs[best] += step
    return np.array(freqs, dtype=np.int64)


def ans_table(counts: np.ndarray, tolerance: float, max_scale: int = 16,
              ) -> tuple[np.ndarray, int]:
    """The rANS table's scale rule: at each scale that holds the alphabet, the coded bits
    plus the table's varints (every frequency but the last); the smallest scale within
    ``tolerance`` of the best."""
    first = max(1, (len(counts) - 1).bit_length())
    costs = {}
    for scale in range(first, max_scale + 1):
        freqs = normalized_frequencies(counts, scale)
        bits = sum(c * (scale - math.log2(f)) for c, f in zip(counts, freqs, strict=True))
        varints = sum(1 + (f >= 1 << 7) + (f >= 1 << 14) + (f >= 1 << 21) for f in freqs[:-1])
        costs[scale] = bits + 8 * varints
    limit = min(costs.values()) * (1 + tolerance)
    scale = next(s for s, cost in costs.items() if cost <= limit)
    return normalized_frequencies(counts, scale), scale
