"""Learned rounding: codes chosen by coordinate descent on the layer's output error plus the
codes' coded length, on any quantizer's grid.

GPTQ (qlis/quantize/gptq.py) rounds each column once, greedily, and never revisits it; it also
ignores what a code costs to store, so at low rates its codes spread out and the entropy-coded
size grows (+5-15% bits). Here, starting from GPTQ's codes, every weight in turn takes the
code that minimises

    tr(E H E^T) + lambda * sum(code lengths),    E = W_hat - W,

given all the others (as QuantEase does for the first term; a rate term as video codecs' RDOQ
adds). For one weight the first term is ``H_jj * (value - target)^2`` with ``target`` the
error-compensating value, so the candidates are the codes around the target and the weight's
current code (each step can only lower the objective). Code lengths are ``-log2 p(code)`` from
the layer's current code histogram; ``lambda = 2 ln 2 * D / N`` is the slope of a quantizer's
distortion–rate curve at the current distortion ``D`` (D ∝ 2^-2R), so one bit saved is traded
for the error one bit of rate would remove.

Columns are visited in blocks, as GPTQ does: the gradient ``E H`` of the block is kept exact
with rank-1 updates and the rest of the matrix is updated once per block.
"""

from __future__ import annotations

import math

import torch

from qlis.quantize.grid import Grid

BLOCK = 128


def _length_table(codes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Bits per code (-log2 of its frequency) as a dense table from the smallest code - 1;
    codes outside the table cost one bit more than the rarest present code."""
    values, counts = torch.unique(codes, return_counts=True)
    lengths = -torch.log2(counts.double() / codes.numel()).float()
    low = int(values[0]) - 1
    table = torch.full((int(values[-1]) - low + 2,), float(lengths.max()) + 1.0)
    table[(values - low).long()] = lengths
    return table, low


def _lengths(table: torch.Tensor, low: int, codes: torch.Tensor) -> torch.Tensor:
    return table[(codes - low).clamp_(0, len(table) - 1).long()]


def refine_codes(
    matrix: torch.Tensor,
    grid: Grid,
    codes: torch.Tensor,
    covariances: torch.Tensor,
    sweeps: int,
    rate_weight: float = 1.0,
    frozen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes for ``matrix`` (outputs, inputs) on ``grid``, refined from ``codes`` by
    ``sweeps`` passes of coordinate descent (module doc). ``covariances`` (groups, inputs,
    inputs): the damped input covariance of each equal group of outputs; ``frozen``: weights
    whose code must not change (pruned zeros). ``rate_weight`` scales lambda (0: error only).
    """
    groups, width = covariances.shape[0], matrix.shape[1]
    rows = matrix.shape[0]
    per = rows // groups
    h = covariances.float()
    diagonal = torch.diagonal(h, dim1=1, dim2=2)  # (groups, width)
    codes = codes.float().clone()
    columns = [grid.column(j) for j in range(width)]
    for _ in range(sweeps):
        error = (grid.decode(codes) - matrix).reshape(groups, per, width)
        gradient = torch.bmm(error, h)  # (groups, per, width): E H
        distortion = float((error * gradient).sum(dtype=torch.float64))
        if distortion <= 0:
            break
        table, low = _length_table(codes)
        lam = rate_weight * 2 * math.log(2) * distortion / matrix.numel()
        changed = False
        for start in range(0, width, BLOCK):
            stop = min(start + BLOCK, width)
            deltas = torch.zeros(groups, per, stop - start)
            for i, j in enumerate(range(start, stop)):
                changed |= _descend_column(
                    j, i, start, stop, matrix, codes, columns[j], error, gradient, deltas,
                    h, diagonal, table, low, lam, frozen)
            if stop < width:
                gradient[:, :, stop:] += torch.bmm(deltas, h[:, start:stop, stop:])
        if not changed:
            break
    return codes


def _descend_column(
    j: int, i: int, start: int, stop: int, matrix: torch.Tensor, codes: torch.Tensor,
    column: Grid, error: torch.Tensor, gradient: torch.Tensor, deltas: torch.Tensor,
    h: torch.Tensor, diagonal: torch.Tensor, table: torch.Tensor, low: int, lam: float,
    frozen: torch.Tensor | None,
) -> bool:
    """One coordinate step on column ``j`` (all rows at once); True if a code changed."""
    groups, per, _ = error.shape
    h_jj = diagonal[:, j, None].expand(groups, per).reshape(-1)
    live = h_jj > 0
    e_j = error[:, :, j].reshape(-1)
    # the value that zeroes the gradient along this weight, the others fixed
    target = matrix[:, j] - (gradient[:, :, j].reshape(-1) - h_jj * e_j) / torch.where(
        live, h_jj, 1.0)
    current = codes[:, j]
    nearest = column.encode(target[:, None])[:, 0]
    step = torch.sign(target - column.decode(nearest[:, None])[:, 0])
    beyond = column.neighbour(nearest, step)
    best, best_cost = current, None
    for candidate in (current, nearest, beyond):
        value = column.decode(candidate[:, None])[:, 0]
        cost = h_jj * (value - target).square() + lam * _lengths(table, low, candidate)
        if best_cost is None:
            best_cost = cost
            continue
        better = cost < best_cost
        best = torch.where(better, candidate, best)
        best_cost = torch.where(better, cost, best_cost)
    keep = ~live if frozen is None else ~live | frozen[:, j]
    best = torch.where(keep, current, best)
    if torch.equal(best, current):
        return False
    delta = (column.decode(best[:, None]) - column.decode(current[:, None]))[:, 0]
    codes[:, j] = best
    delta = delta.reshape(groups, per)
    error[:, :, j] += delta
    deltas[:, :, i] = delta
    gradient[:, :, start:stop] += delta[:, :, None] * h[:, j, None, start:stop]
    return True
