"""SRCC, KRCC and PLCC between predicted scores and MOS (scipy), with the optional logistic fit.

Image-quality papers report PLCC either on raw predictions or after mapping them through the
4-parameter logistic of VQEG, f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2, fitted by
least squares. Both are given; which one a table shows is always named. Unbounded, that fit
collapses to a step function on poor predictions (a 1-bit model with SRCC 0.015 got "PLCC"
0.566 from two fitted values), so it is bounded, started as VQEG says, and a degenerate fit is
reported as such (NaN, with the reason) instead of as a number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from qlis_iqa.errors import IQAError


def _arrays(pred: Sequence[float], mos: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p, m = np.asarray(pred, dtype=np.float64), np.asarray(mos, dtype=np.float64)
    if p.shape != m.shape or p.ndim != 1:
        raise IQAError(f"predictions {p.shape} and scores {m.shape} must be 1-D of one length")
    if p.size < 2:
        raise IQAError(f"correlations need at least 2 images, got {p.size}")
    return p, m


def _safe(value: float) -> float:
    """NaN (not an exception) when a correlation is undefined, e.g. constant predictions."""
    return float(value) if np.isfinite(value) else math.nan


def _corr(fn, p: np.ndarray, m: np.ndarray) -> float:
    if np.ptp(p) == 0 or np.ptp(m) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _safe(fn(p, m)[0])


def srcc(pred: Sequence[float], mos: Sequence[float]) -> float:
    """Spearman rank-order correlation."""
    return _corr(stats.spearmanr, *_arrays(pred, mos))


def krcc(pred: Sequence[float], mos: Sequence[float]) -> float:
    """Kendall rank-order correlation (tau-b)."""
    return _corr(stats.kendalltau, *_arrays(pred, mos))


def plcc(pred: Sequence[float], mos: Sequence[float]) -> float:
    """Pearson linear correlation of the raw predictions."""
    return _corr(stats.pearsonr, *_arrays(pred, mos))


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The VQEG 4-parameter logistic mapping from predictions to the MOS scale."""
    z = np.clip(-(x - b3) / (abs(b4) + 1e-12), -500.0, 500.0)
    return (b1 - b2) / (1.0 + np.exp(z)) + b2


MIN_SLOPE_SCALE = 0.05  # |b4| >= this x std(pred): narrower is a step function, not a mapping
MAX_PLATEAU_SHARE = 0.9  # a fit that puts more points than this on its two plateaus is a step
MIN_FITTED_LEVELS = 3  # distinct fitted values (to 1e-3 of the MOS range) a mapping must have


@dataclass(frozen=True)
class LogisticFit:
    """A 4-parameter logistic fit: its parameters, PLCC, and why it is degenerate (if it is).

    A degenerate fit (`reason` set) has `plcc` NaN: it is reported as degenerate, never as a
    number, because a step-shaped logistic fits noise and inflates the PLCC.
    """

    params: tuple[float, float, float, float] | None
    plcc: float
    reason: str = ""

    @property
    def degenerate(self) -> bool:
        return bool(self.reason)


def _degenerate(reason: str, params: np.ndarray | None = None) -> LogisticFit:
    return LogisticFit(None if params is None else tuple(map(float, params)), math.nan, reason)


def logistic_fit(pred: Sequence[float], mos: Sequence[float]) -> LogisticFit:
    """Fit `logistic4` from pred onto mos by bounded least squares, and judge the fit.

    Started as VQEG recommends (b1 = max(mos), b2 = min(mos), b3 = mean(pred), b4 = std(pred)),
    on standardised data, with b3 inside the predictions' range (widened by their spread) and
    |b4| between MIN_SLOPE_SCALE and 100 standard deviations of the predictions. Degenerate:
    fewer than 5 points or constant data, a failed fit, a slope scale at its lower bound, fewer
    than MIN_FITTED_LEVELS distinct fitted values, or more than MAX_PLATEAU_SHARE of the points
    on the plateaus.
    """
    p, m = _arrays(pred, mos)
    if p.size < 5:
        return _degenerate(f"{p.size} points are too few for 4 parameters")
    sp, sm = float(np.std(p)), float(np.std(m))
    if sp == 0 or sm == 0:
        return _degenerate("constant predictions or scores")
    u, v = (p - p.mean()) / sp, (m - m.mean()) / sm
    lo_u, hi_u, lo_v, hi_v = float(u.min()), float(u.max()), float(v.min()), float(v.max())
    span_v = hi_v - lo_v
    lower = [lo_v - 20 * span_v, lo_v - 20 * span_v, lo_u - 1.0, MIN_SLOPE_SCALE]
    upper = [hi_v + 20 * span_v, hi_v + 20 * span_v, hi_u + 1.0, 100.0]
    start = [hi_v, lo_v, 0.0, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fitted, _ = optimize.curve_fit(
                logistic4, u, v, p0=start, bounds=(lower, upper), max_nfev=5000
            )
        except (RuntimeError, ValueError, optimize.OptimizeWarning) as exc:
            return _degenerate(f"the fit failed ({str(exc)[:60]})")
    b1, b2, b3, b4 = (float(x) for x in fitted)
    params = np.array([m.mean() + sm * b1, m.mean() + sm * b2, p.mean() + sp * b3, sp * abs(b4)])
    if not np.all(np.isfinite(params)):
        return _degenerate("the fit diverged")
    if abs(b4) <= MIN_SLOPE_SCALE * 1.01:
        return _degenerate("slope scale at its lower bound (a step function)", params)
    y = logistic4(u, b1, b2, b3, b4)
    levels = np.unique(np.round(y / (1e-3 * span_v))).size
    if levels < MIN_FITTED_LEVELS:
        return _degenerate(f"{levels} distinct fitted values", params)
    height = abs(b1 - b2)
    on_plateau = np.minimum(np.abs(y - b1), np.abs(y - b2)) <= 0.01 * height
    if height == 0 or on_plateau.mean() > MAX_PLATEAU_SHARE:
        return _degenerate("the fitted curve is a step (points on its plateaus)", params)
    return LogisticFit(tuple(map(float, params)), _corr(stats.pearsonr, y, v))


def fit_logistic(pred: Sequence[float], mos: Sequence[float]) -> np.ndarray:
    """Parameters (b1, b2, b3, b4) of `logistic4` mapping pred onto mos; IQAError if degenerate."""
    fit = logistic_fit(pred, mos)
    if fit.params is None or fit.degenerate:
        raise IQAError(f"the logistic fit is degenerate: {fit.reason}")
    return np.array(fit.params)


def plcc_logistic(pred: Sequence[float], mos: Sequence[float]) -> float:
    """PLCC after the 4-parameter logistic fit; NaN when the fit is degenerate."""
    return logistic_fit(pred, mos).plcc


def correlations(
    pred: Sequence[float], mos: Sequence[float], logistic: bool = False
) -> dict[str, float]:
    """{'srcc', 'krcc', 'plcc'} and, with `logistic`, 'plcc_logistic' (NaN: degenerate fit)."""
    out = {"srcc": srcc(pred, mos), "krcc": krcc(pred, mos), "plcc": plcc(pred, mos)}
    if logistic:
        out["plcc_logistic"] = plcc_logistic(pred, mos)
    return out
