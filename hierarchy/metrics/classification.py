"""Evaluation metrics for hierarchical classifiers: pure functions on numpy arrays.

Conventions for every function here:

- class labels are int indices into a ``labels`` list; ``correct`` arrays are bool (or 0/1);
- a ratio whose denominator is zero is reported as ``0.0``, never NaN; a value that cannot be
  defined at all (AUC with one class, accuracy of an empty selection) is ``None``;
- results are plain Python ints/floats/lists/dicts, ready for ``json.dumps``;
- invalid inputs (wrong shape, mismatched lengths, out-of-range labels, NaN) raise ``ValueError``.

Threshold tuning and the OOD score metrics live in :mod:`hierarchy.metrics.thresholds`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from hierarchy.metrics.arrays import (
    as_bools,
    as_class_indices,
    as_confidences,
    as_finite,
    desc_cuts,
    ratio,
    safe_div,
    same_length,
)


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int) -> np.ndarray:
    """Integer (n_classes, n_classes) counts; rows = truth, columns = prediction."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    t, p = as_class_indices(y_true, "y_true", n_classes), as_class_indices(y_pred, "y_pred", n_classes)
    same_length(y_true=t, y_pred=p)
    flat = np.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def normalize_rows(cm: Any) -> np.ndarray:
    """Each row divided by its sum (recall view); rows with zero support become zeros, not NaN."""
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2:
        raise ValueError(f"cm must be 2-D, got shape {cm.shape}")
    return ratio(cm, np.broadcast_to(cm.sum(axis=1, keepdims=True), cm.shape))


def classification_report(y_true: Any, y_pred: Any, labels: list[str]) -> dict:
    """Accuracy, per-class/macro/weighted precision-recall-F1 and the confusion matrix.

    Zero division gives 0.0 (a class never predicted has precision 0.0; a class with no support
    has recall 0.0). Macro averages every label in ``labels``, including ones with no support;
    weighted averages by support.
    """
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique, got {labels}")
    cm = confusion_matrix(y_true, y_pred, len(labels))
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    precision, recall = ratio(tp, predicted), ratio(tp, support)
    f1 = ratio(2 * precision * recall, precision + recall)
    per_class = {
        lab: {"precision": float(precision[i]), "recall": float(recall[i]),
              "f1": float(f1[i]), "support": int(support[i])}
        for i, lab in enumerate(labels)
    }
    total = int(support.sum())
    weights = support / total if total else np.zeros(len(labels))
    metrics = {"precision": precision, "recall": recall, "f1": f1}
    return {
        "accuracy": safe_div(tp.sum(), total),
        "n": total,
        "per_class": per_class,
        "macro": {k: float(v.mean()) for k, v in metrics.items()},
        "weighted": {k: float((v * weights).sum()) for k, v in metrics.items()},
        "confusion": {"labels": list(labels), "counts": cm.tolist(),
                      "normalized": normalize_rows(cm).tolist()},
    }


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values all get the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(xs)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return ranks


def roc_auc(y_true_binary: Any, scores: Any) -> float | None:
    """ROC AUC via the Mann-Whitney U statistic (ties count 1/2); None if only one class present."""
    y, s = as_bools(y_true_binary, "y_true_binary"), as_finite(scores, "scores")
    same_length(y_true_binary=y, scores=s)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = _average_ranks(s)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def reliability_bins(confidences: Any, correct: Any, n_bins: int = 15) -> list[dict]:
    """Equal-width bins on [0, 1]; bin b holds lo < conf <= hi (the first bin also holds 0).

    Each bin: ``lo, hi, count, confidence`` (mean), ``accuracy``; the last two are None when empty.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, ok = as_confidences(confidences), as_bools(correct, "correct")
    same_length(confidences=conf, correct=ok)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    ok_sum = np.bincount(idx, weights=ok.astype(np.float64), minlength=n_bins)
    return [
        {"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(count[b]),
         "confidence": float(conf_sum[b] / count[b]) if count[b] else None,
         "accuracy": float(ok_sum[b] / count[b]) if count[b] else None}
        for b in range(n_bins)
    ]


def expected_calibration_error(confidences: Any, correct: Any, n_bins: int = 15) -> float:
    """ECE = sum_b |acc_b - conf_b| * n_b / N over ``reliability_bins``; 0.0 for empty input."""
    bins = reliability_bins(confidences, correct, n_bins)
    n = sum(b["count"] for b in bins)
    gaps = sum(abs(b["accuracy"] - b["confidence"]) * b["count"] for b in bins if b["count"])
    return safe_div(gaps, n)


def risk_coverage(confidences: Any, correct: Any) -> dict:
    """Risk-coverage curve of "accept iff confidence >= t", one point per distinct confidence.

    Point i accepts the k_i most confident items (ties are never split): coverage k_i/N, risk =
    error rate among them, threshold = the smallest accepted confidence. Points run from the
    strictest threshold to coverage 1.0.

    AURC is the area under the step curve, i.e. the mean of the risk over points weighted by the
    coverage each point adds: sum_i risk_i * (cov_i - cov_{i-1}). Without ties this equals the
    usual mean over k = 1..N of the top-k error rate. Lower is better. Empty input gives empty
    lists and aurc 0.0.
    """
    conf, ok = as_confidences(confidences), as_bools(correct, "correct")
    n = same_length(confidences=conf, correct=ok)
    order, ends = desc_cuts(conf)
    k = ends + 1
    risk = ratio(np.cumsum(~ok[order])[ends], k)
    coverage = k / n if n else np.zeros(0)
    aurc = float((risk * np.diff(coverage, prepend=0.0)).sum())
    return {"coverage": coverage.tolist(), "risk": risk.tolist(),
            "thresholds": conf[order][ends].tolist(), "aurc": aurc}


def selective_summary(confidences: Any, correct: Any, accepted_mask: Any) -> dict:
    """Coverage/abstention of a given acceptance decision and the accuracy of what was accepted.

    ``accuracy_accepted`` and ``mean_confidence_accepted`` are None when nothing was accepted.
    """
    conf, ok = as_finite(confidences, "confidences"), as_bools(correct, "correct")
    acc = as_bools(accepted_mask, "accepted_mask")
    n = same_length(confidences=conf, correct=ok, accepted_mask=acc)
    n_acc = int(acc.sum())
    coverage = safe_div(n_acc, n)
    return {
        "n": n, "n_accepted": n_acc, "coverage": coverage,
        "abstention_rate": 1.0 - coverage if n else 0.0,
        "accuracy_accepted": float(ok[acc].mean()) if n_acc else None,
        "mean_confidence_accepted": float(conf[acc].mean()) if n_acc else None,
    }


def _check_paths(true_paths: Sequence[Sequence[str]], pred_paths: Sequence[Sequence[str]]) -> None:
    same_length(true_paths=true_paths, pred_paths=pred_paths)
    for name, paths in (("true_paths", true_paths), ("pred_paths", pred_paths)):
        for i, path in enumerate(paths):
            if isinstance(path, str) or not all(isinstance(p, str) for p in path):
                raise ValueError(f"{name}[{i}] must be a list of label strings, got {path!r}")


def _prefixes(path: Sequence[str]) -> set[tuple[str, ...]]:
    return {tuple(path[: d + 1]) for d in range(len(path))}


def hierarchical_prf(true_paths: list[list[str]], pred_paths: list[list[str]]) -> dict:
    """Hierarchical precision/recall/F1 (Kiritchenko et al. 2005), micro-averaged over items.

    Each path lists the decisions from the first level to the leaf, without a shared root node
    (a constant root would inflate every score). Each path becomes its set of prefixes, so one
    label name at two depths does not collide. hP = sum|T∩P| / sum|P|, hR = sum|T∩P| / sum|T|.
    An abstention is a shorter predicted path: it lowers recall, not precision.
    """
    _check_paths(true_paths, pred_paths)
    inter = n_pred = n_true = 0
    for t, p in zip(true_paths, pred_paths):
        tset, pset = _prefixes(t), _prefixes(p)
        inter, n_pred, n_true = inter + len(tset & pset), n_pred + len(pset), n_true + len(tset)
    hp, hr = safe_div(inter, n_pred), safe_div(inter, n_true)
    return {"precision": hp, "recall": hr, "f1": safe_div(2 * hp * hr, hp + hr)}


def _first_divergence(t: Sequence[str], p: Sequence[str]) -> tuple[int, str] | None:
    for d in range(min(len(t), len(p))):
        if t[d] != p[d]:
            return d, "wrong"
    return (len(p), "abstained") if len(p) < len(t) else None


def error_attribution(
    true_paths: list[list[str]], pred_paths: list[list[str]], stage_ids_per_depth: list[list[str]]
) -> dict:
    """Blame each wrong end-to-end prediction on the stage that made the first wrong decision.

    ``stage_ids_per_depth[i][d]`` is the id of the stage that decided depth ``d`` for item ``i``
    (along its predicted route, including the stage that abstained). Per item:

    - first depth ``d`` where labels differ -> kind ``"wrong"``, blamed on the stage at ``d``;
    - predicted path a strict prefix of the truth -> kind ``"abstained"`` at ``d = len(pred)``,
      blamed on the stage at that depth (the one that abstained);
    - truth a strict prefix of the prediction (truth labelled only to a coarser level) -> not an
      error; counted in ``n_deeper_than_truth``.

    Returns ``counts`` {stage_id: n} (both kinds), ``by_kind`` {stage_id: {wrong, abstained}},
    ``items`` [{index, stage_id, depth, kind}], ``n_items``, ``n_errors``, ``n_deeper_than_truth``.
    """
    _check_paths(true_paths, pred_paths)
    same_length(true_paths=true_paths, stage_ids_per_depth=stage_ids_per_depth)
    items, counts, by_kind, deeper = [], {}, {}, 0
    for i, (t, p) in enumerate(zip(true_paths, pred_paths)):
        hit = _first_divergence(t, p)
        if hit is None:
            deeper += len(p) > len(t)
            continue
        depth, kind = hit
        stages = stage_ids_per_depth[i]
        if isinstance(stages, str) or depth >= len(stages):
            raise ValueError(f"item {i}: no stage id for depth {depth} (stage ids: {stages})")
        stage = stages[depth]
        counts[stage] = counts.get(stage, 0) + 1
        by_kind.setdefault(stage, {"wrong": 0, "abstained": 0})[kind] += 1
        items.append({"index": i, "stage_id": stage, "depth": depth, "kind": kind})
    return {"counts": counts, "by_kind": by_kind, "items": items, "n_items": len(true_paths),
            "n_errors": len(items), "n_deeper_than_truth": deeper}


def _logits(logits: Any) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or not np.all(np.isfinite(z)):
        raise ValueError(f"logits must be a finite (N, C) array, got shape {z.shape}")
    return z


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _check_temperature(T: float) -> None:
    if not (math.isfinite(T) and T > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {T}")


def softmax(logits: Any, T: float = 1.0) -> np.ndarray:
    """Numerically stable softmax of ``logits / T`` over the last axis."""
    _check_temperature(T)
    return np.exp(_log_softmax(np.asarray(logits, dtype=np.float64) / T))


def _nll(z: np.ndarray, y: np.ndarray, T: float) -> float:
    return float(-_log_softmax(z / T)[np.arange(len(y)), y].mean())


def nll(logits: Any, y: Any, T: float = 1.0) -> float:
    """Mean negative log-likelihood (natural log) of ``softmax(logits / T)``; 0.0 for N = 0."""
    _check_temperature(T)
    z = _logits(logits)
    y = as_class_indices(y, "y", z.shape[1])
    same_length(logits=z, y=y)
    return _nll(z, y, T) if len(y) else 0.0


def _golden_min(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-7) -> float:
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def fit_temperature(logits: Any, y: Any) -> float:
    """Temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    Searches u = log T in [-5, 5]: a 41-point grid brackets the minimum, golden-section refines
    it. Never worse than T = 1: returns 1.0 when the optimum does not beat it or N = 0.
    Dividing by T > 0 never changes the argmax.
    """
    z = _logits(logits)
    y = as_class_indices(y, "y", z.shape[1])
    same_length(logits=z, y=y)
    if len(y) == 0:
        return 1.0

    def f(u: float) -> float:
        return _nll(z, y, math.exp(u))

    grid = np.linspace(-5.0, 5.0, 41)
    values = np.array([f(u) for u in grid])
    if not np.any(np.isfinite(values)):
        return 1.0
    i = int(np.nanargmin(values))
    u = _golden_min(f, float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)]))
    best_u, best = min(((u, f(u)), (float(grid[i]), float(values[i]))), key=lambda t: t[1])
    if not math.isfinite(best) or best >= f(0.0):
        return 1.0
    return math.exp(best_u)
