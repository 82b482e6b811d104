"""Choosing one setting per layer from its rate–distortion curve (additive distortion).

Each layer offers candidates (size in bytes, distortion). Only the lower convex hull of a
layer's curve can be part of a Lagrangian optimum; walking all layers' hull steps in order
of decreasing distortion saved per byte (greedy marginal gain) gives a path of allocations,
each of which is optimal for its own total size (no allocation of that size or less has a
lower total distortion, when distortions add up). A size budget takes the last point of the
path that fits, then spends what is left on the best further steps that still fit; a
quality target takes the first point of the path that meets it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from qlis.errors import ConfigError


@dataclass(frozen=True)
class Curve:
    """One layer's candidates: parallel arrays of sizes (bytes) and distortions."""

    sizes: np.ndarray
    distortions: np.ndarray

    def __post_init__(self) -> None:
        if len(self.sizes) == 0 or len(self.sizes) != len(self.distortions):
            raise ConfigError("a curve needs as many sizes as distortions, at least one")


def lower_hull(curve: Curve) -> list[int]:
    """Candidate indices on the lower convex hull, by increasing size, strictly decreasing
    distortion (dominated and non-convex candidates are dropped).

    >>> lower_hull(Curve(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 9.5, 2.0, 1.9])))
    [0, 2, 3]
    """
    order = np.lexsort((curve.distortions, curve.sizes))
    hull: list[int] = []
    for i in order:
        s, d = float(curve.sizes[i]), float(curve.distortions[i])
        if hull and d >= float(curve.distortions[hull[-1]]):
            continue  # not better than a smaller (or equal-size) candidate
        while len(hull) >= 2:
            s1, d1 = float(curve.sizes[hull[-2]]), float(curve.distortions[hull[-2]])
            s2, d2 = float(curve.sizes[hull[-1]]), float(curve.distortions[hull[-1]])
            # drop the middle point when it lies on or above the chord from hull[-2] to i
            if (d2 - d1) * (s - s1) >= (d - d1) * (s2 - s1):
                hull.pop()
            else:
                break
        hull.append(int(i))
    return hull


def _greedy_moves(curves: Sequence[Curve]) -> tuple[list[int], list[tuple[int, int]]]:
    """The path's first allocation and its moves (layer, candidate), one hull step each,
    steepest distortion decrease per byte first."""
    hulls = [lower_hull(c) for c in curves]
    steps = []
    for layer, (curve, hull) in enumerate(zip(curves, hulls, strict=True)):
        for j in range(1, len(hull)):
            a, b = hull[j - 1], hull[j]
            gain = float(curve.distortions[a] - curve.distortions[b])
            cost = float(curve.sizes[b] - curve.sizes[a])
            steps.append((-gain / cost, layer, j))
    steps.sort()
    return [hull[0] for hull in hulls], [(layer, hulls[layer][j]) for _, layer, j in steps]


def greedy_path(curves: Sequence[Curve]) -> list[list[int]]:
    """Allocations (candidate index per layer) from the smallest to the most precise, one
    hull step at a time, steepest distortion decrease per byte first."""
    current, moves = _greedy_moves(curves)
    path = [list(current)]
    for layer, candidate in moves:
        current[layer] = candidate
        path.append(list(current))
    return path


def totals(curves: Sequence[Curve], choice: Sequence[int]) -> tuple[float, float]:
    """(total size, total distortion) of an allocation."""
    size = sum(float(c.sizes[i]) for c, i in zip(curves, choice, strict=True))
    dist = sum(float(c.distortions[i]) for c, i in zip(curves, choice, strict=True))
    return size, dist


class _Path:
    """The greedy path without its copies: point ``k`` is the first allocation after ``k``
    moves. Along the path sizes strictly grow and distortions strictly fall (hull steps), so
    a target splits it in two; running totals find the split in one pass, and `totals` then
    settles it exactly (their sums round alike to the last bit only in layer order)."""

    def __init__(self, curves: Sequence[Curve]) -> None:
        self.curves = curves
        self.start, self.moves = _greedy_moves(curves)
        size, dist = totals(curves, self.start)
        before = list(self.start)
        size_steps, dist_steps = [size], [dist]
        for layer, candidate in self.moves:
            curve, old = curves[layer], before[layer]
            size_steps.append(float(curve.sizes[candidate] - curve.sizes[old]))
            dist_steps.append(float(curve.distortions[candidate] - curve.distortions[old]))
            before[layer] = candidate
        self.sizes, self.distortions = np.cumsum(size_steps), np.cumsum(dist_steps)

    def __len__(self) -> int:
        return len(self.moves) + 1

    def point(self, k: int) -> list[int]:
        choice = list(self.start)
        for layer, candidate in self.moves[:k]:
            choice[layer] = candidate
        return choice

    def first(self, meets: Callable[[float, float], bool], estimate: int) -> int | None:
        """The first point that ``meets`` its exact totals (a property that holds from some
        point on), searched from ``estimate`` outwards; None when no point does."""
        k = min(max(estimate, 0), len(self) - 1)
        while k > 0 and meets(*totals(self.curves, self.point(k - 1))):
            k -= 1
        while k < len(self) and not meets(*totals(self.curves, self.point(k))):
            k += 1
        return k if k < len(self) else None


def allocate_for_size(curves: Sequence[Curve], budget: float) -> list[int]:
    """The least total distortion whose total size is within ``budget`` (see module doc);
    the smallest allocation when none fits (the caller says the target was missed)."""
    path = _Path(curves)
    too_big = path.first(lambda size, _: size > budget,
                         int(np.searchsorted(path.sizes, budget, side="right")))
    last_fitting = (len(path) if too_big is None else too_big) - 1
    if last_fitting < 0:
        return path.point(0)
    choice = path.point(last_fitting)
    size = totals(curves, choice)[0]
    while True:  # spend the rest of the budget on the best single upgrades that still fit
        best = None
        for layer, curve in enumerate(curves):
            now = choice[layer]
            for i in range(len(curve.sizes)):
                extra = float(curve.sizes[i] - curve.sizes[now])
                gain = float(curve.distortions[now] - curve.distortions[i])
                if gain > 0 and size + extra <= budget:
                    score = gain / extra if extra > 0 else float("inf")
                    if best is None or score > best[0]:
                        best = (score, layer, i, extra)
        if best is None:
            return choice
        _, layer, i, extra = best
        choice[layer] = i
        size += extra


def allocate_for_distortion(curves: Sequence[Curve], max_distortion: float) -> list[int]:
    """The smallest point of the greedy path whose total distortion is <= ``max_distortion``
    (the most precise allocation when none reaches it)."""
    path = _Path(curves)
    meets = path.distortions <= max_distortion
    estimate = int(np.argmax(meets)) if meets.any() else len(path) - 1
    meeting = path.first(lambda _, dist: dist <= max_distortion, estimate)
    return path.point(len(path) - 1 if meeting is None else meeting)
