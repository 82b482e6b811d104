"""Sums over calibration batches that are the same bits however the batches are split over
the ranks of a job (qlis/workers/cluster.py), so that N ranks write the archive one process
writes.

Floating-point addition is not associative: a sum split over ranks, and its parts added in
another order, rounds differently. Two remedies, by size:

- `OrderedSum` (vectors and scalars: mean inputs, cosines, gradient totals): each term is
  keyed by where it comes in one process's pass (batch, then call), and the terms are added
  in that order. One process adds them as they come, which is that order; ranks gather every
  term (`gather_totals`) and add them in it.
- `FixedPointSum` (input covariances: width^2 per layer, too large to gather per batch): each
  term is rounded to integers on a grid 2^-46 of the largest sum the terms can make, far
  finer than the float32 the covariance is used in, and integers add exactly in any order.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np
import torch

from qlis.errors import ClusterError
from qlis.workers.cluster import Cluster, framed, unframed
from qlis.workers.memory import release_freed_memory

Key = tuple[int, ...]
HEADROOM_BITS = 16
"""How much larger than the float model's largest term a term may be (2^16: a layer's
inputs 256x larger in norm) before the grid's integers could overflow, and the pass is
measured again on a grid sized by what was seen."""
_SUM_BITS = 62  # the largest integer sum: int64 with a bit to spare
_CHUNK = 1 << 18  # entries added or converted at once (a band: 2 MiB of float64)


class OrderedSum:
    """A float64 sum of keyed terms, added in key order (module doc). ``distributed``: the
    terms are kept until `gather_totals` adds every rank's; otherwise they must come in key
    order and are added as they come."""

    def __init__(self, shape: tuple[int, ...], distributed: bool = False) -> None:
        self.shape = shape
        self.distributed = distributed
        self.terms: dict[Key, torch.Tensor] = {}
        self._total = torch.zeros(shape, dtype=torch.float64)
        self._last: Key | None = None

    def add(self, key: Key, value: torch.Tensor) -> None:
        if self._last is not None and key <= self._last:
            raise RuntimeError(f"term {key} after {self._last}: terms must come in key order")
        self._last = key
        if self.distributed:
            self.terms[key] = value.to(torch.float64).reshape(self.shape).clone()
        else:
            self._total += value.to(torch.float64).reshape(self.shape)

    def total(self) -> torch.Tensor:
        """The sum (in a job: after `gather_totals`)."""
        return self._total


def gather_totals(cluster: Cluster | None, sums: list[OrderedSum]) -> None:
    """Complete ``sums`` (the same list, in the same order, on every rank) with every rank's
    terms, added in key order; one exchange for them all. Without a cluster: nothing to do."""
    if cluster is None:
        return
    head, blobs = [], []
    for index, ordered in enumerate(sums):
        for key, value in ordered.terms.items():
            head.append([index, list(key)])
            blobs.append(value.numpy().tobytes())
    message = framed(head, blobs)
    found: list[list[tuple[Key, torch.Tensor]]] = [[] for _ in sums]
    for rank, data in enumerate(cluster.all_gather_bytes(message)):
        for index, key, value in _terms(data, sums, rank):
            found[index].append((key, value))
    for ordered, terms in zip(sums, found, strict=True):
        terms.sort(key=lambda term: term[0])
        if any(a[0] == b[0] for a, b in zip(terms, terms[1:], strict=False)):
            raise ClusterError("two ranks measured the same calibration batch")
        total = torch.zeros(ordered.shape, dtype=torch.float64)
        for _, value in terms:
            total += value
        ordered._total, ordered.terms = total, {}


def _terms(data: bytes, sums: list[OrderedSum], rank: int,
           ) -> list[tuple[int, Key, torch.Tensor]]:
    """The (sum index, key, value) terms of one rank's message, checked to add up."""
    try:
        head, offset = unframed(data)
        terms = []
        for index, key in head:
            if not (isinstance(index, int) and 0 <= index < len(sums)
                    and all(isinstance(k, int) for k in key)):
                raise ValueError(f"a term of sum {index!r} keyed {key!r}")
            shape = sums[index].shape
            size = math.prod(shape) * 8
            value = np.frombuffer(data, dtype=np.float64, count=size // 8, offset=offset)
            terms.append((index, tuple(key),
                          torch.from_numpy(value.copy()).reshape(shape)))
            offset += size
        if offset != len(data):
            raise ValueError("the terms do not add up to the message")
        return terms
    except (ValueError, TypeError, IndexError, struct.error) as err:
        raise ClusterError(f"rank {rank} sent sums that do not parse ({err})") from None


class FixedPointSum:
    """Sums of X^T X over parts of input rows, one (width, width) sum per output group, on an
    integer grid: exact in any order (module doc).

    ``largest_trace`` and ``terms`` come from the float model's pass: the largest trace of one
    term and how many terms a pass adds. Every entry of such a matrix is at most its trace, so
    a grid on which ``terms`` traces ``2^HEADROOM_BITS`` times larger still fit in int64
    holds every partial sum exactly. A term beyond that is not added: ``overflow`` keeps the
    largest such trace, and the caller measures again with it.

    Only the upper triangle is held, in ``bands`` of rows (band ``k``: rows ``start:stop``,
    columns ``start:``, for every group): half the integers of the full sums, no float64
    term of width^2 while adding, and `take` frees each band as it converts it. A band's
    product and its integers are made in two buffers of the largest band's size, kept from
    the first term to `take`: thousands of terms make no allocation each (each one freed
    was a band's worth of pages the heap kept, or a fresh mapping to fault in)."""

    def __init__(self, shape: tuple[int, ...], largest_trace: float, terms: int) -> None:
        self.allowed = min(max(largest_trace, 1e-280), 1e280) * 2.0 ** HEADROOM_BITS
        self.exponent = math.ceil(math.log2(self.allowed * max(terms, 1))) - _SUM_BITS
        self.shape = shape
        groups, width = shape[0], shape[-1]
        band = _band(width)
        self.bands: list[torch.Tensor] | None = [
            torch.zeros(groups, min(band, width - start), width - start, dtype=torch.int64)
            for start in range(0, width, band)]
        self.overflow = 0.0
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    def add_gram(self, group: int, rows: torch.Tensor, trace: float) -> None:
        """Add X^T X of ``rows`` (float64, (n, width)) to ``group``'s sum; ``trace`` is its
        trace, the rows' sum of squares."""
        if not trace <= self.allowed:  # NaN too
            self.overflow = max(self.overflow, trace if math.isfinite(trace) else math.inf)
            return
        scale = math.ldexp(1.0, -self.exponent)  # a power of two: scaling is exact
        if self._scratch is None and self.bands:  # the first band's entries: the most
            entries = self.bands[0][0].numel()
            self._scratch = (torch.empty(entries, dtype=torch.float64),
                             torch.empty(entries, dtype=torch.int64))
        start = 0
        for band in self.bands:
            stop = start + band.shape[1]
            shape, entries = band.shape[1:], band[0].numel()
            product = self._scratch[0][:entries].view(shape)
            torch.matmul(rows[:, start:stop].T, rows[:, start:], out=product)
            integers = self._scratch[1][:entries].view(shape)
            band[group] += integers.copy_(product.mul_(scale).round_())  # integral: exact
            start = stop

    def reduce_onto(self, cluster: Cluster, owner: int) -> None:
        """Add every rank's sums into rank ``owner``'s (integers: exact in any order)."""
        for band in self.bands:
            cluster.sum_onto(band, owner)

    def take(self, rows: Sequence[int]) -> torch.Tensor:
        """The sums over ``rows`` (each group's row count, at least 1), float32 (groups,
        width, width), or (width, width) for one group (no view of a larger tensor, so that
        the fit can free it): each band is converted (through float64, as the sums are) into
        the upper triangle and freed, then the lower triangle is mirrored from it, so that no
        moment holds more than the integers' half and the float32 result."""
        groups, width = self.shape[0], self.shape[-1]
        counts = torch.tensor(rows, dtype=torch.float64)[:, None, None]
        scale = math.ldexp(1.0, self.exponent)
        shape = (width, width) if groups == 1 else (groups, width, width)
        result = torch.empty(shape, dtype=torch.float32)
        total = result.view(groups, width, width)
        start = 0
        while self.bands:
            band = self.bands.pop(0)
            stop = start + band.shape[1]
            total[:, start:stop, start:] = band.double().mul_(scale).div_(counts)
            del band
            release_freed_memory()  # a band below glibc's mmap threshold sits in the heap
            start = stop
        self.bands = self._scratch = None
        step = _band(width)
        for start in range(step, width, step):
            total[:, start:start + step, :start] = total[:, :start, start:start + step].mT
        return result


def _band(width: int) -> int:
    """Rows of a (width, width) sum worked on at once: `_CHUNK` entries."""
    return max(1, _CHUNK // max(width, 1))
