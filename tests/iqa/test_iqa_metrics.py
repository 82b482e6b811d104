"""Correlations equal scipy's; the 4-parameter logistic fit recovers a known mapping and flags
a fit that collapses to a step function instead of printing a number for it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from qlis_iqa.errors import IQAError
from qlis_iqa.metrics import (
    MIN_SLOPE_SCALE,
    correlations,
    fit_logistic,
    krcc,
    logistic4,
    logistic_fit,
    plcc,
    plcc_logistic,
    srcc,
)

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


def test_step_shaped_fits_are_degenerate() -> None:
    rng = np.random.default_rng(0)
    mos = rng.uniform(0, 5, 600)
    binary = np.where(rng.random(600) < 0.5, 0.30, 0.31) + rng.normal(0, 1e-6, 600)  # 1-bit model
    flat = rng.normal(0, 1e-4, 600)
    flat[:3] += 1.0  # nearly constant, three outliers
    noise = rng.normal(0, 1, 600)  # unrelated to the scores
    for pred in (binary, flat, noise):
        fit = logistic_fit(pred, mos)
        assert fit.degenerate and math.isnan(fit.plcc) and fit.reason
        assert math.isnan(correlations(pred, mos, logistic=True)["plcc_logistic"])
        with pytest.raises(IQAError, match="degenerate"):
            fit_logistic(pred, mos)
    assert "distinct fitted values" in logistic_fit(binary, mos).reason


def test_a_noisy_monotone_relation_is_fitted() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(-3, 3, 400)
    mos = logistic4(x, 4.5, 0.5, 0.3, 0.8) + rng.normal(0, 0.3, 400)
    fit = logistic_fit(x, mos)
    assert not fit.degenerate and fit.params is not None
    assert fit.params[3] == pytest.approx(0.8, rel=0.2) and fit.params[2] == pytest.approx(
        0.3, abs=0.2
    )
    assert plcc(x, mos) < fit.plcc < 1.0
    linear = 2 * x + 1 + rng.normal(0, 0.5, 400)  # a linear relation is a wide logistic
    assert logistic_fit(x, linear).plcc == pytest.approx(plcc(x, linear), abs=0.01)


@settings(max_examples=40, deadline=None)
@given(pairs)
def test_logistic_fit_is_a_number_only_when_sound(pm: tuple[list[float], list[float]]) -> None:
    p, m = np.array(pm[0]), np.array(pm[1])
    fit = logistic_fit(p, m)
    assert fit.degenerate == math.isnan(fit.plcc)
    if not fit.degenerate:
        assert -1.0 <= fit.plcc <= 1.0 + 1e-9
        assert fit.params[3] >= MIN_SLOPE_SCALE * np.std(p)


def test_an_undefined_logistic_plcc_gives_the_fits_own_reason() -> None:
    """Two test images: the 4-parameter fit is refused for too few points; the warning says
    that, not the generic 'a step function'."""
    from qlis_iqa.evaluate import Predictions

    preds = Predictions(["a", "b"], np.array([3.0, 5.0]), np.array([4.5, 4.3]))
    metrics = preds.metrics(logistic=True)
    note = preds.undefined(metrics)
    assert note.startswith("PLCC LOGISTIC undefined (nan)")
    assert "2 points are too few for 4 parameters" in note and "step" not in note
