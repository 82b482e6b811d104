"""Size bounds of a symbol histogram: the Shannon limit and optimal Huffman code lengths.

They live apart from the coders because the compression report (the paper's HCR ratio) and
the benchmark need them without encoding anything.
"""

from __future__ import annotations

import heapq

import numpy as np

from qlis.compiled import njit


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


def optimal_huffman_bits(counts: np.ndarray) -> int:
    """``sum(counts * huffman_code_lengths(counts))`` without building the code: the sum of
    the weights that Huffman's merges create (every merge adds one bit to each symbol below
    it), in a compiled pass over the sorted counts. What the paper's HCR counts per layer.

    >>> optimal_huffman_bits(np.array([5, 1, 1, 0]))
    9
    """
    c = np.asarray(counts).ravel()
    if c.size and (c.min() < 0):
        raise ValueError("symbol counts must be non-negative")
    present = np.sort(c[c > 0].astype(np.int64))
    if present.size <= 1:  # a lone symbol: one bit each
        return int(present.sum())
    return int(_merged_weights(present))


@njit(cache=True, nogil=True)
def _merged_weights(ascending: np.ndarray) -> int:
    # Huffman's merges in linear time (van Leeuwen): merged weights come out in ascending
    # order, so two queues (the leaves, the merged) replace the heap.
    k = ascending.size
    merged = np.empty(k - 1, dtype=np.int64)
    leaf = head = 0
    total = 0
    for tail in range(k - 1):
        pair = 0
        for _ in range(2):
            if head == tail or (leaf < k and ascending[leaf] <= merged[head]):
                pair += ascending[leaf]
                leaf += 1
            else:
                pair += merged[head]
                head += 1
        merged[tail] = pair
        total += pair
    return total
