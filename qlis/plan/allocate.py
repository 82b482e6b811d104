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

from collections.abc import Sequence
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


def greedy_path(curves: Sequence[Curve]) -> list[list[int]]:
    """Allocations (candidate index per layer) from the smallest to the most precise, one
    hull step at a time, steepest distortion decrease per byte first."""
    hulls = [lower_hull(c) for c in curves]
    steps = []
    for layer, (curve, hull) in enumerate(zip(curves, hulls, strict=True)):
        for j in range(1, len(hull)):
            a, b = hull[j - 1], hull[j]
            gain = float(curve.distortions[a] - curve.distortions[b])
            cost = float(curve.sizes[b] - curve.sizes[a])
            steps.append((-gain / cost, layer, j))
    steps.sort()
    position = [0] * len(curves)
    current = [hull[0] for hull in hulls]
    path = [list(current)]
    for _, layer, j in steps:
        position[layer] = j
        current[layer] = hulls[layer][j]
        path.append(list(current))
    return path


def totals(curves: Sequence[Curve], choice: Sequence[int]) -> tuple[float, float]:
    """(total size, total distortion) of an allocation."""
    size = sum(float(c.sizes[i]) for c, i in zip(curves, choice, strict=True))
    dist = sum(float(c.distortions[i]) for c, i in zip(curves, choice, strict=True))
    return size, dist


def allocate_for_size(curves: Sequence[Curve], budget: float) -> list[int]:
    """The least total distortion whose total size is within ``budget`` (see module doc);
    the smallest allocation when none fits (the caller says the target was missed)."""
    path = greedy_path(curves)
    fitting = [p for p in path if totals(curves, p)[0] <= budget]
    if not fitting:
        return list(path[0])
    choice = list(fitting[-1])
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
    path = greedy_path(curves)
    for point in path:
        if totals(curves, point)[1] <= max_distortion:
            return point
    return path[-1]
