"""Seeded percentile bootstrap confidence intervals, computed for many statistics on one set of resamples.

The resampling is scipy's own (``scipy.stats.bootstrap(..., paired=True, method="percentile")``
draws ``rng.integers(0, n, (n_resamples, n))`` from ``numpy.random.default_rng(seed)`` and takes
linear-interpolated percentiles), so for a statistic defined on every resample the interval here
equals scipy's for the same seed (tests/test_subgroups.py checks it). Two things scipy does not do
and a subgroup report needs: every statistic of a group (accuracy, per-class recall, AUC, ECE...)
is evaluated on the SAME resamples, drawn once; and a resample on which a statistic is undefined
(a recall with no positives drawn, an AUC with one class) is skipped, not allowed to turn the
interval into NaN; ``n_valid`` says how many resamples remained.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95

Statistic = Callable[[np.ndarray], "float | None"]  # rows of the group (an index array) -> value or None


def resample_indices(n: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(n_resamples, n) indices into 0..n-1, drawn with replacement exactly as scipy's bootstrap draws them."""
    if n < 0 or n_resamples < 1:
        raise ValueError(f"need n >= 0 and n_resamples >= 1, got n={n}, n_resamples={n_resamples}")
    return np.random.default_rng(seed).integers(0, n, (n_resamples, n)) if n else np.zeros((n_resamples, 0), np.int64)


def percentile_interval(values: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float] | None:
    """The (lower, upper) percentile interval of bootstrap values, NaN ignored; None when none is finite."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return None
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(v, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(lo), float(hi)


def _value(stat: Statistic, rows: np.ndarray) -> float:
    v = stat(rows)
    return np.nan if v is None else float(v)


def bootstrap_cis(n: int, statistics: Mapping[str, Statistic], *, n_resamples: int = DEFAULT_RESAMPLES,
                  seed: int = 0, level: float = DEFAULT_LEVEL) -> dict[str, dict[str, Any]]:
    """``{name: {"value", "ci": [lo, hi] | None, "n_valid"}}`` for each statistic of one group of ``n``
    rows. A statistic takes an index array into the group's rows (``arange(n)`` for the point value,
    a resample otherwise) and returns a float, or None where it is undefined."""
    idx = resample_indices(n, n_resamples, seed)
    out: dict[str, dict[str, Any]] = {}
    for name, stat in statistics.items():
        point = stat(np.arange(n))
        if point is None:
            out[name] = {"value": None, "ci": None, "n_valid": 0}
            continue
        values = np.array([_value(stat, rows) for rows in idx])
        ci = percentile_interval(values, level)
        out[name] = {"value": float(point), "ci": None if ci is None else list(ci),
                     "n_valid": int(np.isfinite(values).sum())}
    return out
