"""Rate–distortion allocation: hull, greedy path optimality (brute force), targets."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from qlis.plan.allocate import (
    Curve,
    allocate_for_distortion,
    allocate_for_size,
    greedy_path,
    lower_hull,
    totals,
)


@st.composite
def curves(draw, max_layers: int = 4, max_candidates: int = 4):
    """Small random rate–distortion curves (any shape: not necessarily convex or monotone)."""
    n_layers = draw(st.integers(1, max_layers))
    result = []
    for _ in range(n_layers):
        n = draw(st.integers(1, max_candidates))
        sizes = draw(st.lists(st.integers(1, 60), min_size=n, max_size=n))
        dists = draw(st.lists(st.integers(0, 60), min_size=n, max_size=n))
        result.append(Curve(np.array(sizes, dtype=float), np.array(dists, dtype=float)))
    return result


def _brute_force_best(layers: list[Curve], budget: float) -> float:
    best = float("inf")
    for choice in itertools.product(*(range(len(c.sizes)) for c in layers)):
        size, dist = totals(layers, choice)
        if size <= budget:
            best = min(best, dist)
    return best


@given(curves())
def test_every_point_of_the_greedy_path_is_optimal_for_its_size(layers):
    for point in greedy_path(layers):
        size, dist = totals(layers, point)
        assert dist <= _brute_force_best(layers, size) + 1e-9


@given(curves(), st.integers(1, 250))
def test_size_allocation_fits_and_beats_every_path_point_that_fits(layers, budget):
    path = greedy_path(layers)
    if totals(layers, path[0])[0] > budget:  # out of reach: the smallest allocation
        assert allocate_for_size(layers, budget) == path[0]
        return
    size, dist = totals(layers, allocate_for_size(layers, budget))
    assert size <= budget
    fitting = [totals(layers, p)[1] for p in path if totals(layers, p)[0] <= budget]
    assert dist <= min(fitting)


@given(curves(), st.integers(0, 200))
def test_distortion_allocation_is_the_smallest_path_point_meeting_the_target(layers, limit):
    choice = allocate_for_distortion(layers, limit)
    size, dist = totals(layers, choice)
    path = greedy_path(layers)
    if dist <= limit:
        # no allocation smaller than the chosen one on the path meets the target
        assert all(totals(layers, p)[1] > limit for p in path if totals(layers, p)[0] < size)
    else:
        assert choice == path[-1]  # unreachable: the most precise allocation


def test_hull_drops_dominated_and_concave_points():
    curve = Curve(np.array([1.0, 2.0, 3.0, 4.0, 2.5]), np.array([10.0, 9.5, 2.0, 1.9, 12.0]))
    assert lower_hull(curve) == [0, 2, 3]
    assert lower_hull(Curve(np.array([5.0]), np.array([1.0]))) == [0]
