"""SRCC, KRCC and PLCC between predicted scores and MOS (scipy), with the optional logistic fit.

Image-quality papers report PLCC either on raw predictions or after mapping them through the
4-parameter logistic of VQEG, f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2, fitted by
least squares. Both are given; which one a table shows is always named.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

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


def fit_logistic(pred: Sequence[float], mos: Sequence[float]) -> np.ndarray:
    """Least-squares parameters (b1, b2, b3, b4) of `logistic4` mapping pred onto mos."""
    p, m = _arrays(pred, mos)
    p0 = [m.max(), m.min(), float(np.mean(p)), float(np.std(p)) or 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, _ = optimize.curve_fit(logistic4, p, m, p0=p0, maxfev=20000)
    return params


def plcc_logistic(pred: Sequence[float], mos: Sequence[float]) -> float:
    """PLCC after the 4-parameter logistic fit; NaN when the fit does not converge."""
    p, m = _arrays(pred, mos)
    if p.size < 5 or np.ptp(p) == 0:
        return math.nan
    try:
        params = fit_logistic(p, m)
    except (RuntimeError, optimize.OptimizeWarning):
        return math.nan
    return _corr(stats.pearsonr, logistic4(p, *params), m)


def correlations(
    pred: Sequence[float], mos: Sequence[float], logistic: bool = False
) -> dict[str, float]:
    """{'srcc', 'krcc', 'plcc'} and, with `logistic`, 'plcc_logistic'."""
    out = {"srcc": srcc(pred, mos), "krcc": krcc(pred, mos), "plcc": plcc(pred, mos)}
    if logistic:
        out["plcc_logistic"] = plcc_logistic(pred, mos)
    return out
