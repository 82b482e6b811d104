"""Policies: monotone QLIS -> (k, bits) mapping, rank quantiles, budget mode, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from qlis import ConfigError, LevelsPolicy, make_policy
from qlis.plan.policy import PAPER_BITS_LEVELS, PAPER_K_LEVELS

scores = st.lists(
    st.floats(0, 1, allow_nan=False) | st.sampled_from([0.25, 0.5, 0.75]), min_size=1, max_size=60
)
k_levels = st.lists(st.floats(0, 3), min_size=1, max_size=6, unique=True).map(
    lambda ks: tuple(sorted(ks, reverse=True))
)
bits_levels = st.lists(st.integers(1, 8), min_size=1, max_size=6, unique=True).map(
    lambda bs: tuple(sorted(bs))
) | st.sampled_from([(None,), (1, 2, 4, 8, None), (4, None)])


def _precision(bits):
    return 99 if bits is None else bits


def _assert_monotone(qlis: list[float], assignment) -> None:
    """A higher QLIS never gets fewer bits nor a larger k; equal scores get equal levels."""
    for i, (k_i, b_i) in enumerate(assignment):
        for j, (k_j, b_j) in enumerate(assignment):
            if qlis[i] > qlis[j]:
                assert _precision(b_i) >= _precision(b_j) and k_i <= k_j
            elif qlis[i] == qlis[j]:
                assert (k_i, b_i) == (k_j, b_j)


@given(scores, k_levels, bits_levels)
def test_rank_quantile_mapping_is_monotone(qlis, ks, bits):
    policy = LevelsPolicy(k_levels=ks, bits_levels=bits)
    assignment = policy.assign(np.array(qlis))
    assert len(assignment) == len(qlis)
    assert all(k in ks and b in bits for k, b in assignment)
    _assert_monotone(qlis, assignment)
    if len(set(qlis)) == len(qlis) > 1:
        # the lowest score gets the least precise level, the highest the most precise
        lo, hi = int(np.argmin(qlis)), int(np.argmax(qlis))
        assert assignment[lo] == (ks[0], bits[0])
        assert assignment[hi] == (ks[-1], bits[-1])


def test_rank_quantiles_cut_equal_groups():
    policy = make_policy("lapq")
    qlis = np.linspace(0.1, 0.9, 20)[::-1]  # order of the layers does not matter
    assignment = policy.assign(qlis)
    ks = [k for k, _ in assignment][::-1]
    bits = [b for _, b in assignment][::-1]
    assert ks == [k for k in PAPER_K_LEVELS for _ in range(4)]
    assert bits == [b for b in PAPER_BITS_LEVELS for _ in range(5)]
    # a lone layer is the most important one
    assert policy.assign(np.array([0.3])) == [(0.0, 8)]


@st.composite
def budgets(draw):
    """Random scores, a policy with several levels and a monotone cost model."""
    qlis = draw(st.lists(st.floats(0, 1), min_size=1, max_size=25))
    ks = draw(k_levels)
    bits = draw(bits_levels)
    n = len(qlis)
    sizes = draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n))
    keep = {k: 1.0 / (1.0 + k) for k in ks}  # a larger k keeps fewer weights
    fixed = draw(st.integers(0, 50_000))
    original = 32 * sum(sizes) + fixed

    def paper_bits(assignment):
        return fixed + sum(
            size * keep[k] * (32 if b is None else b)
            for size, (k, b) in zip(sizes, assignment, strict=True)
        )

    return qlis, LevelsPolicy(k_levels=ks, bits_levels=bits), paper_bits, original


@given(budgets(), st.floats(1, 200))
def test_budget_mode_reaches_the_target_or_refuses(budget, target):
    qlis, policy, paper_bits, original = budget
    policy = make_policy(policy, paper_cr=target)
    least = [(policy.k_levels[0], policy.bits_levels[0])] * len(qlis)
    most = [(policy.k_levels[-1], policy.bits_levels[-1])] * len(qlis)
    if original / paper_bits(least) < target:
        with pytest.raises(ConfigError, match="out of reach"):
            policy.assign(np.array(qlis), paper_bits, original)
        return
    assignment = policy.assign(np.array(qlis), paper_bits, original)
    assert original / paper_bits(assignment) >= target
    _assert_monotone(qlis, assignment)
    best = int(np.argmax(qlis))
    for k, b in assignment:
        assert assignment[best][0] <= k and _precision(assignment[best][1]) >= _precision(b)
    if original / paper_bits(most) >= target:
        assert assignment == most  # no need to lose anything


@given(budgets())
def test_budget_mode_spends_no_more_than_needed(budget):
    """With the target set at what the plain rank mapping gives, budget mode is not coarser."""
    qlis, policy, paper_bits, original = budget
    plain = policy.assign(np.array(qlis))
    target = original / paper_bits(plain)
    assume(target >= 1)
    shifted = make_policy(policy, paper_cr=target).assign(np.array(qlis), paper_bits, original)
    assert original / paper_bits(shifted) >= target * (1 - 1e-12)
    assert paper_bits(shifted) >= paper_bits(plain) * (1 - 1e-12)


def test_budget_mode_needs_costs():
    with pytest.raises(ConfigError, match="bit costs"):
        make_policy("lapq", paper_cr=4).assign(np.array([0.1, 0.2]))


def test_presets():
    assert make_policy("prune").k_levels == (1.0,) and make_policy("prune").bits_levels == (None,)
    assert make_policy("quant").bits_levels == (8,) and make_policy("quant").k_levels == (0.0,)
    assert make_policy("lap").k_levels == PAPER_K_LEVELS == (1.5, 1.0, 0.5, 0.25, 0.0)
    assert make_policy("laq").bits_levels == PAPER_BITS_LEVELS == (1, 2, 4, 8)
    lapq = make_policy("lapq")
    assert (lapq.k_levels, lapq.bits_levels) == (PAPER_K_LEVELS, PAPER_BITS_LEVELS)
    assert (lapq.granularity, lapq.method, lapq.paper_cr) == ("tensor", "affine", None)


def test_options():
    assert make_policy("prune", k=0.25).k_levels == (0.25,)
    assert make_policy("quant", bits=2).bits_levels == (2,)
    assert make_policy("lapq", granularity="channel").granularity == "channel"
    assert make_policy("lap", k_levels=[1.0, 0.0]).k_levels == (1.0, 0.0)
    assert make_policy("quant", bits=None).bits_levels == (8,)  # None: keep the preset
    base = LevelsPolicy(k_levels=(1.0, 0.0), bits_levels=(2, 8))
    assert make_policy(base) is base
    assert make_policy(base, paper_cr=5.0) == LevelsPolicy(
        k_levels=(1.0, 0.0), bits_levels=(2, 8), paper_cr=5.0
    )
    assert make_policy(base, bits=4).bits_levels == (4,)


@pytest.mark.parametrize("policy", ["nope", "LAPQ"])
def test_unknown_policy(policy):
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy(policy)


@pytest.mark.parametrize("policy", ["lapq", LevelsPolicy()])
def test_unknown_option(policy):
    with pytest.raises(ConfigError, match="unknown option.*bogus"):
        make_policy(policy, bogus=1)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"k_levels": ()}, "k_levels must be a non-empty list"),
        ({"bits_levels": ()}, "bits_levels must be a non-empty list"),
        ({"k_levels": (0.0, 1.0)}, "largest"),
        ({"k_levels": (-1.0,)}, r"in \[0, inf\)"),
        ({"bits_levels": (0,)}, r"integers in \[1, 8\]"),
        ({"bits_levels": (9,)}, r"integers in \[1, 8\]"),
        ({"bits_levels": (2.5,)}, r"integers in \[1, 8\]"),
        ({"bits_levels": (8, 4)}, "fewest"),
        ({"bits_levels": (None, 8)}, "most precise"),
        ({"granularity": "row"}, "granularity"),
        ({"paper_cr": 0.5}, "paper_cr"),
        ({"paper_cr": True}, "paper_cr"),
        ({"paper_cr": float("nan")}, "paper_cr"),
    ],
)
def test_policy_validation(fields, match):
    with pytest.raises(ConfigError, match=match):
        LevelsPolicy(**fields)


@pytest.mark.parametrize("policy", ["prune", "quant", "lap", "laq", "lapq"])
def test_target_ratio_means_real_bytes_so_the_paper_policies_refuse_it(policy):
    with pytest.raises(ConfigError, match="real archive ratio.*paper_cr"):
        make_policy(policy, target_ratio=5)
    assert make_policy(policy, paper_cr=5).paper_cr == 5


@pytest.mark.parametrize("options, match", [
    ({"bits": 4, "bits_levels": (2, 4)}, "either bits .* or bits_levels"),
    ({"k": 1.0, "k_levels": (2.0, 1.0)}, "either k .* or k_levels"),
])
def test_a_shortcut_never_replaces_levels_given_with_it(options, match):
    """``bits``/``k`` set a single level: levels given too were replaced unseen."""
    for policy in ("quant", "prune", "lapq", "levels"):
        with pytest.raises(ConfigError, match=match):
            make_policy(policy, **options)
