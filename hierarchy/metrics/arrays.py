"""Input checks and safe arithmetic shared by the metric modules (numpy only).

Each ``as_*`` function returns a 1-D numpy array or raises ``ValueError`` naming the argument.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def as_vector(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def as_class_indices(x: Any, name: str, n_classes: int) -> np.ndarray:
    """int64 class indices in ``[0, n_classes)``; integral floats are accepted."""
    a = as_vector(x, name)
    if a.size and a.dtype.kind not in "iu":
        if a.dtype.kind != "f" or not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError(f"{name} must hold integer class indices, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= n_classes):
        raise ValueError(f"{name} has class indices outside [0, {n_classes})")
    return a


def as_finite(x: Any, name: str) -> np.ndarray:
    """float64 values, none NaN or infinite."""
    a = as_vector(x, name).astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def as_bools(x: Any, name: str) -> np.ndarray:
    """Booleans, from bool or 0/1 input."""
    a = as_vector(x, name)
    if a.dtype.kind != "b" and a.size and not np.all((a == 0) | (a == 1)):
        raise ValueError(f"{name} must be boolean (or 0/1)")
    return a.astype(bool)


def as_confidences(x: Any) -> np.ndarray:
    """Finite float64 values in [0, 1]."""
    a = as_finite(x, "confidences")
    if a.size and (a.min() < 0.0 or a.max() > 1.0):
        raise ValueError("confidences must lie in [0, 1]")
    return a


def same_length(**arrays: Sequence[Any]) -> int:
    """The common length of the named arrays; ``ValueError`` listing every length otherwise."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"length mismatch: {lengths}")
    return next(iter(lengths.values()))


def ratio(num: Any, den: Any) -> np.ndarray:
    """Elementwise ``num / den`` as float64, 0.0 where ``den`` is 0 (never NaN)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def safe_div(num: float, den: float) -> float:
    """``num / den`` as a Python float, 0.0 when ``den`` is 0."""
    return float(num) / float(den) if den else 0.0


def desc_cuts(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort order (confidence descending) and the last sorted index of each tie group."""
    order = np.argsort(-conf, kind="stable")
    c = conf[order]
    ends = np.r_[np.flatnonzero(c[1:] != c[:-1]), len(c) - 1] if len(c) else np.zeros(0, int)
    return order, ends
