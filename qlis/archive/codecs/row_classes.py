"""Classes of alike rows in a matrix's codes, for the ans codec to code each class with a
table of its own.

One table for a whole matrix codes every row with the matrix's mixed histogram. Rows whose
codes spread differently (steps per row, rows an outlier or the pruner left narrow, a
table's rare tokens rounded coarser than its frequent ones) each cost less under a table
fitted to rows like them: the mixture's entropy exceeds the mean of its parts' by what the
class says about a code. The classes are quantiles of the rows' code variance, 2 to 16 of
them, whichever the size estimate (information, tables, the rows' class ids) makes
smallest; one table where no split pays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qlis.archive.codecs._bounds import entropy_bits
from qlis.compiled import njit

MAX_CLASSES = 16
"""The most classes a stream holds (the finest quantile split; coarser ones merge its
neighbours)."""
SPLITS = (2, 4, 8, MAX_CLASSES)
"""The class counts weighed, each merging neighbouring classes of the finest split."""
MIN_SYMBOLS = 1 << 14
"""Below this many codes one table is kept: a class costs a few dozen bytes of head."""
STREAM_BYTES = 44
"""A class's fixed cost in the estimate: its length and count varints, scale and states."""
TABLE_BYTES_PER_SYMBOL = 1.5
"""A present symbol's cost in a table: its place in the alphabet and its frequency."""
SAVING_BYTES = 64
"""Classes are used only where the estimate says they save more than this."""


@dataclass(frozen=True)
class RowClasses:
    """Each row's class (uint8, 0..count-1, every class used), the estimated stream bytes
    with them, and every symbol's count over all rows."""

    of_row: np.ndarray
    count: int
    estimated_bytes: float
    counts: np.ndarray


@njit(cache=True, nogil=True)
def _row_variances(symbols: np.ndarray, row_length: int) -> np.ndarray:
    # exact integer sums (a row of 2**31 16-bit codes stays within int64), then one division;
    # a row taken as a slice lets the compiler vectorise the sums (10x)
    rows = symbols.size // row_length
    out = np.empty(rows, dtype=np.float64)
    for r in range(rows):
        row = symbols[r * row_length:(r + 1) * row_length]
        total = 0
        squares = 0
        for j in range(row_length):
            v = np.int64(row[j])
            total += v
            squares += v * v
        mean = total / row_length
        out[r] = max(squares / row_length - mean * mean, 0.0)
    return out


@njit(cache=True, nogil=True)
def _class_histograms(symbols: np.ndarray, row_length: int, of_row: np.ndarray,
                      classes: int, bins: int) -> np.ndarray:
    counts = np.zeros((classes, bins), dtype=np.int64)
    for r in range(of_row.size):
        row_counts = counts[of_row[r]]
        base = r * row_length
        for j in range(row_length):
            row_counts[symbols[base + j]] += 1
    return counts


@njit(cache=True, nogil=True)
def quantile_edges(spreads: np.ndarray) -> np.ndarray:
    """``np.quantile(spreads, np.arange(1, MAX_CLASSES) / MAX_CLASSES)`` to the bit (its
    "linear" method's index and interpolation, in its order of operations), compiled: numpy's
    quantile held the GIL a tenth of a second of a ViT-L/14 pack on two threads."""
    ordered = np.sort(spreads)
    last = ordered.size - 1
    edges = np.empty(MAX_CLASSES - 1, dtype=np.float64)
    for k in range(1, MAX_CLASSES):
        virtual = last * (k / MAX_CLASSES)
        below = np.floor(virtual)
        if virtual >= last:
            edges[k - 1] = ordered[last]
            continue
        a, b = ordered[int(below)], ordered[int(below) + 1]
        t = virtual - below
        edges[k - 1] = b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t
    return edges


def finest_classes(spreads: np.ndarray) -> np.ndarray:
    """Each row's class (uint8) in the finest split: the `MAX_CLASSES` quantiles of the
    rows' ``spreads``, which coarser splits merge by neighbours."""
    edges = quantile_edges(np.ascontiguousarray(spreads, dtype=np.float64))
    return np.searchsorted(edges, spreads, side="right").astype(np.uint8)


def stream_bytes(counts: np.ndarray, fixed: float = STREAM_BYTES) -> float:
    """Estimated bytes of one table's stream of codes with these counts: information,
    table, and ``fixed`` bytes of head."""
    present = int(np.count_nonzero(counts))
    return entropy_bits(counts) / 8 + TABLE_BYTES_PER_SYMBOL * present + fixed


def may_split(size: int, row_length: int) -> bool:
    """Whether `row_classes` may split ``size`` codes in rows of ``row_length``: enough of
    them, in two rows or more."""
    return (row_length >= 1 and size >= MIN_SYMBOLS and not size % row_length
            and size // row_length >= 2)


@njit(cache=True, nogil=True)
def _streams_bytes(counts: np.ndarray) -> float:
    # `stream_bytes` of each row of counts that has any, summed: compiled, without the GIL
    # (in Python, its per-class array calls held the GIL for a fifth of a second of a
    # ViT-L/14 pack on two threads)
    total_bytes = 0.0
    for k in range(counts.shape[0]):
        row = counts[k]
        total = 0
        present = 0
        for c in row:
            if c > 0:
                total += c
                present += 1
        if present == 0:
            continue
        bits = 0.0
        log_total = np.log2(np.float64(total))
        for c in row:
            if c > 0:
                bits += c * (log_total - np.log2(np.float64(c)))
        total_bytes += bits / 8 + TABLE_BYTES_PER_SYMBOL * present + STREAM_BYTES
    return total_bytes


def row_classes(symbols: np.ndarray, row_length: int) -> RowClasses | None:
    """The classes that code ``symbols`` (uint8 or uint16, rows of ``row_length``) smallest,
    or None where one table is estimated as small (within `SAVING_BYTES`)."""
    if not may_split(symbols.size, row_length):
        return None
    finest = finest_classes(_row_variances(symbols, row_length))
    bins = int(symbols.max()) + 1  # not all 65536 of 16-bit codes: the splits sum them
    counts = _class_histograms(symbols, row_length, finest, MAX_CLASSES, bins)
    total = counts.sum(axis=0)
    best_bytes = stream_bytes(total) - SAVING_BYTES
    best: RowClasses | None = None
    for classes in SPLITS:
        merged = counts.reshape(classes, -1, bins).sum(axis=1)
        used = np.flatnonzero(merged.sum(axis=1))
        if used.size < 2:
            continue
        of_row = finest // (MAX_CLASSES // classes)
        ids = np.bincount(of_row, minlength=classes)[used]
        estimate = _streams_bytes(merged) + stream_bytes(ids) + 4
        if estimate < best_bytes:
            renumber = np.zeros(classes, dtype=np.uint8)
            renumber[used] = np.arange(used.size)
            best = RowClasses(renumber[of_row], int(used.size), estimate, total)
            best_bytes = estimate
    return best
