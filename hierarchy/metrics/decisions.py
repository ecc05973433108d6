"""Cost-sensitive decisions: per-label decision thresholds (a pipeline stage's ``decide:``).

The rule (:data:`hierarchy.engine.pipeline.DECIDE_RULE`): among the labels whose probability reaches
their threshold, the one with the highest probability wins (equal probabilities: the label listed
first); when none does, the top-1 label. The router, the evaluator and the tuning below all call
:func:`decide_labels`, so they can never disagree.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from hierarchy.metrics.arrays import as_class_indices, safe_div

CURVE_POINTS = 101  # thresholds 0.00, 0.01, ..., 1.00 on the reported trade-off curve
SLACK = 1e-6  # tuned thresholds sit this far under the boundary probability (engines differ in the last bits)


def decide_labels(probs: Any, labels: Sequence[str], decide: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(chosen label index, chosen by a decision threshold) for each row of (N, C) ``probs``."""
    p = np.asarray(probs, dtype=np.float64).reshape(len(probs), len(labels))
    top = p.argmax(axis=1)  # the first maximum: equal probabilities go to the label listed first
    if not decide:
        return top, np.zeros(len(p), dtype=bool)
    over = p >= np.array([decide.get(lab, np.inf) for lab in labels])
    forced = over.any(axis=1)
    return np.where(forced, np.where(over, p, -np.inf).argmax(axis=1), top), forced


def recall_precision(pred: np.ndarray, y: np.ndarray, k: int) -> tuple[float, float]:
    """Recall and precision of class ``k`` (0.0 where undefined)."""
    return safe_div(float(((pred == k) & (y == k)).sum()), float((y == k).sum())), \
        safe_div(float(((pred == k) & (y == k)).sum()), float((pred == k).sum()))


def _check(probs: Any, y: Any, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(labels) or not np.all(np.isfinite(p)):
        raise ValueError(f"probs must be a finite (N, {len(labels)}) array, got shape {p.shape}")
    return p, as_class_indices(y, "y", len(labels))


def decision_curve(probs: Any, y: Any, labels: Sequence[str], decide: Mapping[str, float], label: str) -> dict:
    """The operating point of ``label`` at ``decide[label]`` and its recall/precision over thresholds
    0..1 (the other labels' thresholds held)."""
    p, y = _check(probs, y, labels)
    k = list(labels).index(label)

    def at(t: float) -> tuple[float, float]:
        return recall_precision(decide_labels(p, labels, {**decide, label: t})[0], y, k)

    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    curve = [at(float(t)) for t in grid]
    recall, precision = at(float(decide[label]))
    return {"threshold": float(decide[label]), "recall": recall, "precision": precision,
            "n_positive": int((y == k).sum()), "n": int(len(y)),
            "curve": {"thresholds": grid.round(4).tolist(), "recall": [c[0] for c in curve],
                      "precision": [c[1] for c in curve]}}


def parse_recall_targets(specs: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """``["malignant=0.95", ...]`` -> ``{"malignant": 0.95}``; ValueError naming the bad item."""
    out: dict[str, float] = {}
    for spec in specs:
        label, sep, value = spec.partition("=")
        try:
            r = float(value)
        except ValueError:
            r = -1.0
        if not sep or not 0.0 < r <= 1.0:
            raise ValueError(f"--target-recall {spec!r}: expected LABEL=R with R in (0, 1]")
        if label not in labels:
            raise ValueError(f"--target-recall {spec!r}: '{label}' is not a label ({', '.join(labels)})")
        out[label] = r
    return out


def tune_decide(probs: Any, y: Any, labels: Sequence[str], targets: Mapping[str, float]) -> dict[str, Any]:
    """Per-label decision thresholds meeting recall targets: for each label in turn, the HIGHEST
    threshold whose recall (under the rule, the earlier labels' thresholds in force) reaches its
    target; predictions of a label only grow as its threshold falls, so this is a bisection over the
    positives' probabilities. Returns thresholds, the jointly achieved recall/precision and ``met``."""
    p, y = _check(probs, y, labels)
    decide: dict[str, float] = {}
    for label, target in targets.items():
        k = list(labels).index(label)
        cands = np.unique(np.concatenate([[0.0], p[y == k, k]]))[::-1]  # high to low

        def ok(i: int) -> bool:
            t = max(0.0, float(cands[i]) - SLACK)
            return recall_precision(decide_labels(p, labels, {**decide, label: t})[0], y, k)[0] >= target - 1e-12

        lo, hi = 0, len(cands) - 1  # find the first (highest) candidate that is ok
        if not ok(hi):
            lo = hi
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
        decide[label] = max(0.0, float(cands[lo]) - SLACK)
    pred = decide_labels(p, labels, decide)[0]
    achieved = {lab: dict(zip(("recall", "precision"), recall_precision(pred, y, list(labels).index(lab))))
                for lab in targets}
    return {"thresholds": decide, "target": {"recall": dict(targets)}, "achieved": achieved, "n": int(len(y)),
            "met": all(achieved[lab]["recall"] >= t - 1e-12 for lab, t in targets.items())}
