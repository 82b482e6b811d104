"""Size bounds of a symbol histogram: the Shannon limit and optimal Huffman code lengths.

They live apart from the coders because the compression report (the paper's HCR ratio) and
the benchmark need them without encoding anything.
"""

from __future__ import annotations

import heapq

import numpy as np


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon bound, in total bits, of a sequence with these symbol counts.

    This is what an ideal entropy coder with a static model reaches (``sum c * log2(N / c)``),
    the yardstick for the ANS codec and for the "entropy" ratios in reports.
    """
    c = np.asarray(counts, dtype=np.float64).ravel()
    c = c[c > 0]
    if c.size == 0:
        return 0.0
    total = c.sum()
    return float(np.sum(c * (np.log2(total) - np.log2(c))))


def huffman_code_lengths(counts: np.ndarray) -> np.ndarray:
    """Optimal (unlimited-length) Huffman code length of every symbol; 0 where the count is 0.

    A lone present symbol gets length 1, as a real bit stream would need. ``sum(counts *
    lengths)`` is the optimal Huffman size in bits: the paper's HCR ratio counts exactly this.
    """
    c = np.asarray(counts).ravel()
    if c.size and (c.min() < 0):
        raise ValueError("symbol counts must be non-negative")
    lengths = np.zeros(c.size, dtype=np.int64)
    present = np.flatnonzero(c)
    if present.size == 1:
        lengths[present[0]] = 1
    if present.size <= 1:
        return lengths
    # Heap of (weight, order, node); leaves are 0..k-1, internal nodes k.. ; `parent` links
    # each node to its parent so that a leaf's depth is its code length.
    k = present.size
    heap = [(int(c[s]), i, i) for i, s in enumerate(present)]
    heapq.heapify(heap)
    parent = [0] * (2 * k - 1)
    next_node = k
    while len(heap) > 1:
        w1, _, n1 = heapq.heappop(heap)
        w2, _, n2 = heapq.heappop(heap)
        parent[n1] = parent[n2] = next_node
        heapq.heappush(heap, (w1 + w2, next_node, next_node))
        next_node += 1
    depth = [0] * (2 * k - 1)
    for node in range(2 * k - 3, -1, -1):  # parents have larger ids: walk top-down
        depth[node] = depth[parent[node]] + 1
    lengths[present] = depth[:k]
    return lengths
