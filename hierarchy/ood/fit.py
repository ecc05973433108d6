"""Fitting the out-of-distribution scorers of :mod:`hierarchy.ood.scores` (numpy, float64 where it matters).

:func:`fit_scorer` fits every method on the TRAIN split's features; :func:`tune` picks each threshold
to keep a share of the VAL split; :func:`compare` reports how each method separates a known-OOD set.
``hierarchy train`` calls them at the end of a run (:mod:`hierarchy.train.ood`). See docs/ood.md.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hierarchy.ood.scores import DEFAULT_K, DEFAULT_METHOD, OODScorer, l2_normalize

BANK_SIZE = 2000  # train features kept for knn (class-stratified subsample)
MAX_FIT_IMAGES = 20000  # train images used to fit (class-stratified subsample beyond this)
MIN_CLASS_TUNE = 100  # val images a class needs to get its own offset (fewer: a quantile too noisy to trust)


def ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    """Ledoit-Wolf shrinkage intensity in [0, 1] for centred rows ``x`` (N, D), as in scikit-learn."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        return 1.0
    x2 = x ** 2
    trace_per_dim = x2.sum(axis=0) / n
    mu = trace_per_dim.sum() / d
    beta_ = float((x2.T @ x2).sum())
    delta_ = float(((x.T @ x) ** 2).sum()) / n ** 2
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * trace_per_dim.sum() + d * mu ** 2) / d
    return 0.0 if delta <= 0 else float(min(max(beta, 0.0), delta) / delta)


def fit_mahalanobis(features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Class means (of the classes present), the shared shrunk precision matrix, and the shrinkage."""
    x, y = np.asarray(features, dtype=np.float64), np.asarray(targets)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need (N >= 2, D) features with N targets, got {x.shape} and {len(y)}")
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    shrinkage = ledoit_wolf_shrinkage(centred)
    cov = centred.T @ centred / len(x)
    scale = max(float(np.trace(cov)) / cov.shape[0], 1e-12)
    eye = np.eye(cov.shape[0])
    shrunk = (1.0 - shrinkage) * cov + shrinkage * scale * eye + 1e-6 * scale * eye
    return means.astype(np.float32), np.linalg.inv(shrunk).astype(np.float32), shrinkage


def stratified_subsample(targets: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``size`` rows, classes kept in proportion (each at least one)."""
    y = np.asarray(targets)
    if len(y) <= size:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        take = max(1, round(size * len(idx) / len(y)))
        picked.append(rng.choice(idx, size=min(take, len(idx)), replace=False))
    return np.sort(np.concatenate(picked))[:size] if picked else np.zeros(0, int)


def fit_knn_bank(features: np.ndarray, targets: np.ndarray, size: int = BANK_SIZE, seed: int = 0) -> np.ndarray:
    """L2-normalised, class-stratified subsample (at most ``size`` rows) of the train features, fp16."""
    idx = stratified_subsample(targets, size, seed)
    return l2_normalize(np.asarray(features, dtype=np.float32)[idx]).astype(np.float16)


def fit_scorer(features: np.ndarray, targets: np.ndarray, method: str = DEFAULT_METHOD, k: int = DEFAULT_K,
               bank_size: int = BANK_SIZE, seed: int = 0) -> tuple[OODScorer, dict[str, Any]]:
    """Fit every method on train ``features``/``targets``; return the scorer and fit facts."""
    means, precision, shrinkage = fit_mahalanobis(l2_normalize(features), targets)
    bank = fit_knn_bank(features, targets, bank_size, seed)
    scorer = OODScorer(method, means=means, precision=precision, bank=bank, k=k)
    facts = {"split": "train", "n": int(len(targets)), "dim": int(np.asarray(features).shape[1]),
             "classes": int(len(means)), "shrinkage": shrinkage, "bank": int(len(bank)), "k": int(k)}
    return scorer, facts


def tune(scores_in: dict[str, np.ndarray], keep: float, relative: bool = False) -> dict[str, dict[str, float]]:
    """Per method: the threshold keeping ``keep`` of the in-distribution scores (0 for class-relative
    scores, whose offsets already did the tuning), and the share kept."""
    from hierarchy.metrics.thresholds import threshold_for_tpr_in

    out = {}
    for m, s in scores_in.items():
        t = 0.0 if relative else threshold_for_tpr_in(s, keep)
        out[m] = {"threshold": t, "kept": float((s <= t).mean())}
    return out


def class_offsets(raw: dict[str, np.ndarray], predicted: np.ndarray, n_classes: int, keep: float,
                  min_n: int = MIN_CLASS_TUNE) -> dict[str, np.ndarray]:
    """Per method, (C,) offsets: the ``keep`` quantile of the raw scores of the tuning images predicted
    as each class with at least ``min_n`` of them, else the quantile of the whole set. Subtracted from
    the raw score of an image predicted as that class (:meth:`OODScorer.relative`), they make 0 the
    threshold that keeps ``keep`` of every well-populated class."""
    from hierarchy.metrics.thresholds import threshold_for_tpr_in

    predicted = np.asarray(predicted)
    out = {}
    for m, s in raw.items():
        s = np.asarray(s, dtype=np.float64)
        off = np.full(n_classes, _up32(threshold_for_tpr_in(s, keep)), np.float32)
        for c in range(n_classes):
            if (predicted == c).sum() >= min_n:
                off[c] = _up32(threshold_for_tpr_in(s[predicted == c], keep))
        out[m] = off
    return out


def _up32(q: float) -> np.float32:
    """``q`` as float32, rounded up: the image at the quantile is still kept after the cast."""
    v = np.float32(q)
    return np.nextafter(v, np.float32(np.inf)) if float(v) < q else v  # float(): NEP 50 would compare in float32


def compare(scores_in: dict[str, np.ndarray], scores_out: dict[str, np.ndarray],
            thresholds: dict[str, float] | None = None) -> dict[str, dict[str, float | None]]:
    """Per method: AUROC, FPR at 95% TPR and (with ``thresholds``) the share of OOD rejected."""
    from hierarchy.metrics.thresholds import fpr_at_tpr, ood_auroc

    out: dict[str, dict[str, float | None]] = {}
    for m in scores_in:
        row: dict[str, float | None] = {"auroc": ood_auroc(scores_in[m], scores_out[m]),
                                        "fpr95": fpr_at_tpr(scores_in[m], scores_out[m], 0.95)}
        if thresholds is not None and m in thresholds:
            row["rejected"] = float((scores_out[m] > thresholds[m]).mean()) if len(scores_out[m]) else None
        out[m] = row
    return out
