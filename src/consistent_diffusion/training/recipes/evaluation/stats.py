"""The statistics the evaluation reports: a binomial interval and a least-squares R^2."""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927): centre (p + z^2/2n) / (1 + z^2/n),
    half-width z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2); 95% for z = 1.96."""
    if trials <= 0:
        return (0.0, 1.0)
    p, n = successes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def r_squared(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficient of determination (q,) of least squares with intercept, y (n, q) on x (n, p):
    R^2 = 1 - SS_res / SS_tot per column of y (nan where y is constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    design = np.concatenate([np.ones((len(x), 1)), x.reshape(len(x), -1)], axis=1)
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    residual = ((y - design @ coef) ** 2).sum(0)
    total = ((y - y.mean(0)) ** 2).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1 - residual / total, np.nan)
