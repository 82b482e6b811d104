"""Correlations equal scipy's; the 4-parameter logistic fit recovers a known mapping."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from qlis_iqa.errors import IQAError
from qlis_iqa.metrics import correlations, fit_logistic, krcc, logistic4, plcc, plcc_logistic, srcc

pairs = st.integers(3, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(-100, 100), min_size=n, max_size=n),
        st.lists(st.floats(0, 5), min_size=n, max_size=n),
    )
)


@given(pairs)
def test_equal_to_scipy(pm: tuple[list[float], list[float]]) -> None:
    p, m = np.array(pm[0]), np.array(pm[1])
    if np.ptp(p) == 0 or np.ptp(m) == 0:
        assert math.isnan(srcc(p, m)) and math.isnan(plcc(p, m))
        return
    for ours, ref in ((srcc, stats.spearmanr), (krcc, stats.kendalltau), (plcc, stats.pearsonr)):
        expected = ref(p, m)[0]
        got = ours(p, m)
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_logistic_fit_recovers_the_mapping() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, 200)
    mos = logistic4(x, 4.5, 0.5, 0.3, 0.8)
    params = fit_logistic(x, mos)
    np.testing.assert_allclose(logistic4(x, *params), mos, atol=1e-4)
    assert plcc_logistic(x, mos) == pytest.approx(1.0, abs=1e-6)
    assert plcc(x, mos) < 0.99  # the raw relation is not linear
    out = correlations(x, mos, logistic=True)
    assert set(out) == {"srcc", "krcc", "plcc", "plcc_logistic"} and out["srcc"] == 1.0


def test_degenerate_inputs() -> None:
    with pytest.raises(IQAError, match="at least 2"):
        srcc([1.0], [2.0])
    with pytest.raises(IQAError, match="one length"):
        plcc([1.0, 2.0], [1.0, 2.0, 3.0])
    assert math.isnan(plcc_logistic([1, 2, 3], [1, 2, 3]))  # too few points for 4 parameters
    assert math.isnan(plcc_logistic([1.0] * 6, list(range(6))))
