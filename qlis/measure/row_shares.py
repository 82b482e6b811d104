"""Each row of an embedding table's expected share of the lookups, from the calibration's.

An error in a table's row costs the outputs only when the row is looked up, and a vocabulary's
rows are looked up by Zipf's law: a few thousand tokens make most of any text, tens of
thousands hardly occur. The calibration counts the lookups that reach the outputs (a
gradient), but a few hundred sentences see a few hundred rows, and a third of the tokens of
other sentences of the same kind are rows they never saw (measured on MiniLM, bench_rd's
split). So the rows seen share the seen mass by their counts, and the rows never seen share
the Good-Turing estimate of the unseen mass (the share of tokens seen once) by how often the
rows of a like norm were seen: a trained table's rows carry their frequency in their norm
(on MiniLM the seen rows' norms rank above the unseen's 71% of the time), which direction,
and how strongly, the calibration's own counts say.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MIN_ROWS = 1 << 14
"""Tables of fewer rows are taken as positions or types, not a vocabulary: their rows are
not looked up by Zipf's law, and rows a calibration's short sentences never reach (late
positions, a second segment) are looked up by every longer input."""
NORM_BINS = 16
"""Quantile bins of the rows' norms over which the seen fraction is counted."""


def lookup_shares(counts: torch.Tensor, table: torch.Tensor) -> torch.Tensor | None:
    """Each row's expected share of the lookups (float64, summing to 1), from ``counts`` (the
    calibration's lookups per row that reached the outputs) and ``table``'s rows; None where
    the calibration looked nothing up or the table has under `MIN_ROWS` rows."""
    counts = counts.detach().to(torch.float64).reshape(-1)
    total = float(counts.sum())
    if not total > 0 or counts.numel() != table.shape[0] or counts.numel() < MIN_ROWS:
        return None
    seen = counts > 0
    unseen_rows = int((~seen).sum())
    if unseen_rows == 0:
        return counts / total
    once = int((counts == 1).sum())
    unseen_mass = min(max(once, 1) / total, 0.5)
    norms = table.detach().to(torch.float64).reshape(table.shape[0], -1).norm(dim=1)
    rank = torch.argsort(torch.argsort(norms, stable=True), stable=True)
    bins = rank * NORM_BINS // len(rank)
    rows_in_bin = torch.bincount(bins, minlength=NORM_BINS).to(torch.float64)
    seen_in_bin = torch.bincount(bins[seen], minlength=NORM_BINS).to(torch.float64)
    likelihood = ((seen_in_bin + 1) / (rows_in_bin + 2))[bins[~seen]]  # Laplace's rule
    shares = counts / total * (1 - unseen_mass)
    shares[~seen] = unseen_mass * likelihood / likelihood.sum()
    return shares


STEP_RANGE = 16.0
"""A row's step is at most this many times finer or coarser than the table's."""


def step_factors(shares: torch.Tensor) -> np.ndarray:
    """Each row's step relative to the table's: 1/sqrt of its share over the shares'
    geometric mean (the steps that minimise the lookup-weighted squared error for a rate, at
    high rates; their geometric mean 1 keeps that rate), in half octaves within
    1/`STEP_RANGE`..`STEP_RANGE` (a few classes of rows, which the ans codec codes each
    with a table of its own)."""
    log_share = torch.log2(shares.to(torch.float64))
    half_octaves = torch.round(-(log_share - log_share.mean()))  # 2 log2(factor)
    limit = 2 * math.log2(STEP_RANGE)
    return np.exp2(half_octaves.clamp(-limit, limit).numpy() / 2)
