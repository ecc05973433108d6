"""Thresholds: tuning the abstention threshold to a target, and out-of-distribution score metrics.

Same conventions as :mod:`hierarchy.metrics.classification` (pure numpy functions, plain Python results,
``ValueError`` on invalid input, None for values that cannot be defined).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from hierarchy.metrics.arrays import as_class_indices, as_finite, desc_cuts, ratio, same_length
from hierarchy.metrics.classification import roc_auc

_EPS = 1e-12  # slack for float comparisons against user targets (199/200 vs 0.995)
TARGET_KEYS = ("target_precision", "target_coverage", "max_risk")
SATURATED = 1.0 - 1e-6  # a threshold this close to 1 accepts only saturated probabilities
FALLBACK_CAP = 0.999  # the highest fallback threshold (max_risk 0 would ask for exactly 1)


def check_target(target: Any, labels: Sequence[str] | None = None) -> str:
    """Validate a tuning target and return its kind (one of ``TARGET_KEYS``).

    Exactly one kind, a number in range, and ``label`` with (and only with) ``target_precision``.
    ``labels`` None skips the check that ``label`` is one of the stage's labels (used where the
    stage is not known yet, e.g. when validating a training config)."""
    if not isinstance(target, dict):
        raise ValueError(f"target must be a dict, got {type(target).__name__}")
    kinds = [k for k in TARGET_KEYS if k in target]
    unknown = sorted(set(target) - set(TARGET_KEYS) - {"label"})
    if unknown or len(kinds) != 1:
        raise ValueError(f"target needs exactly one of {list(TARGET_KEYS)} (plus 'label' with "
                         f"target_precision); got keys {sorted(target)}")
    kind, value = kinds[0], target[kinds[0]]
    low_ok = kind == "max_risk"  # a risk of 0 is a valid target; a precision/coverage of 0 is not
    in_range = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        (0.0 <= value if low_ok else 0.0 < value) and value <= 1.0)
    if not in_range:
        interval = "[0, 1]" if low_ok else "(0, 1]"
        raise ValueError(f"target {kind} must be a number in {interval}, got {value!r}")
    label = target.get("label")
    if kind == "target_precision" and (not isinstance(label, str) or (labels is not None and label not in labels)):
        raise ValueError(f"target_precision needs 'label', one of {list(labels) if labels else 'the stage labels'}; "
                         f"got {label!r}")
    if kind != "target_precision" and "label" in target:
        raise ValueError(f"'label' only applies to target_precision, not {kind}")
    return kind


def _cut_stats(probs: np.ndarray, y: np.ndarray, label_idx: int | None) -> dict[str, np.ndarray]:
    """Metrics at every distinct top-1 confidence, strictest threshold first."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    order, ends = desc_cuts(conf)
    k = ends + 1
    stats = {"threshold": conf[order][ends], "n_accepted": k, "coverage": k / len(y),
             "risk": ratio(np.cumsum(pred[order] != y[order])[ends], k)}
    if label_idx is not None:
        is_label = pred[order] == label_idx
        n_pred = np.cumsum(is_label)[ends]
        stats["precision"] = ratio(np.cumsum(is_label & (y[order] == label_idx))[ends], n_pred)
        stats["n_predicted_label"] = n_pred
    return stats


def _pick(kind: str, value: float, stats: dict[str, np.ndarray]) -> int | None:
    if kind == "target_precision":
        ok = (stats["precision"] >= value - _EPS) & (stats["n_predicted_label"] > 0)
    elif kind == "max_risk":
        ok = stats["risk"] <= value + _EPS
    else:
        ok = stats["coverage"] >= value - _EPS
    hits = np.flatnonzero(ok)
    if hits.size == 0:
        return None
    return int(hits[0] if kind == "target_coverage" else hits[-1])


def tune_threshold(probs: Any, y: Any, target: dict, labels: list[str]) -> dict:
    """Pick a top-1 confidence threshold ``t`` (accepted = max prob >= t) that meets ``target``.

    - ``{"target_precision": p, "label": L}``: precision of predictions of L among accepted items
      >= p (at least one accepted prediction of L required); picks the LOWEST such t.
    - ``{"max_risk": r}``: error rate among accepted items <= r; picks the LOWEST such t.
    - ``{"target_coverage": c}``: accepted share >= c; picks the HIGHEST such t, since the lowest
      would trivially accept everything.

    Candidates are the distinct confidences, so ties are never split. When none meets the target,
    returns the strictest candidate with ``met: False`` and a ``reason``.

    A saturated pick (>= :data:`SATURATED`: a separable val split whose probabilities round to 1)
    is never returned: it would accept only saturated probabilities, which real inputs from new
    sources rarely give. Instead Chow's rule for calibrated probabilities is used, ``1 - max_risk``
    or ``target_precision`` (capped at :data:`FALLBACK_CAP`; ``1 / n_labels`` for a coverage
    target), with ``fallback`` saying so and ``achieved`` measured at it.
    """
    z = np.asarray(probs, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != len(labels) or not np.all(np.isfinite(z)):
        raise ValueError(f"probs must be a finite (N, {len(labels)}) array, got shape {z.shape}")
    y = as_class_indices(y, "y", len(labels))
    if same_length(probs=z, y=y) == 0:
        raise ValueError("tune_threshold needs at least one sample")
    kind = check_target(target, labels)
    label_idx = labels.index(target["label"]) if kind == "target_precision" else None
    stats = _cut_stats(z, y, label_idx)
    i = _pick(kind, float(target[kind]), stats)
    keys = ("coverage", "risk", "n_accepted") + (("precision",) if label_idx is not None else ())
    out = {"threshold": float(stats["threshold"][i or 0]), "target": dict(target),
           "achieved": {k: stats[k][i or 0].item() for k in keys}, "n": len(y),
           "met": i is not None}
    if i is None:
        key = "precision" if label_idx is not None else "risk"
        best = stats[key].max() if label_idx is not None else stats[key].min()
        out["reason"] = (f"no threshold reaches {kind}={target[kind]}; best achievable {key} is "
                         f"{best:.4f}; returning the strictest threshold")
    return _unsaturated(out, z, y, kind, float(target[kind]), label_idx)


def _unsaturated(out: dict, z: np.ndarray, y: np.ndarray, kind: str, value: float, label_idx: int | None) -> dict:
    if out["threshold"] < SATURATED:
        return out
    t = min(FALLBACK_CAP, {"max_risk": 1.0 - value, "target_precision": value}.get(kind, 1.0 / z.shape[1]))
    conf, pred = z.max(axis=1), z.argmax(axis=1)
    acc = conf >= t
    n = int(acc.sum())
    achieved: dict[str, float] = {"coverage": n / len(y), "risk": float((pred[acc] != y[acc]).mean()) if n else 0.0,
                                  "n_accepted": n}
    if label_idx is not None:
        hit = acc & (pred == label_idx)
        achieved["precision"] = float((y[hit] == label_idx).mean()) if hit.any() else 0.0
    out.update(threshold=float(t), achieved=achieved, fallback=(
        f"the tuned threshold saturated at {out['threshold']:.6f} (val probabilities round to 1, so val cannot "
        f"tell thresholds apart); used Chow's rule for {kind}={value} instead: {t:.4f}"))
    return out


def ood_auroc(scores_in: Any, scores_out: Any) -> float | None:
    """AUROC for separating OOD (positive) from in-distribution; higher score = more OOD.

    None when either side is empty."""
    s_in, s_out = as_finite(scores_in, "scores_in"), as_finite(scores_out, "scores_out")
    labels = np.r_[np.zeros(len(s_in), bool), np.ones(len(s_out), bool)]
    return roc_auc(labels, np.r_[s_in, s_out])


def _rank_index(fraction: float, n: int, name: str) -> int:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {fraction}")
    return max(math.ceil(fraction * n - 1e-9), 1) - 1  # 0.55 * 100 is 55.00000000000001


def fpr_at_tpr(scores_in: Any, scores_out: Any, tpr: float = 0.95) -> float | None:
    """FPR (share of in-distribution flagged) at the strictest threshold flagging >= ``tpr`` of OOD.

    Positive = OOD, flagged iff score >= t, with t the ceil(tpr * n_out)-th highest OOD score;
    in-distribution scores tied with t count as flagged. None when either side is empty.
    """
    s_in, s_out = as_finite(scores_in, "scores_in"), as_finite(scores_out, "scores_out")
    i = _rank_index(tpr, len(s_out), "tpr")
    if len(s_in) == 0 or len(s_out) == 0:
        return None
    t = np.sort(s_out)[::-1][i]
    return float((s_in >= t).mean())


def threshold_for_tpr_in(scores_in: Any, keep: float = 0.99) -> float:
    """Score threshold t keeping at least ``keep`` of in-distribution: keep iff score <= t.

    t is the ceil(keep * n)-th lowest in-distribution score (so OOD = score > t)."""
    s_in = as_finite(scores_in, "scores_in")
    i = _rank_index(keep, len(s_in), "keep")
    if len(s_in) == 0:
        raise ValueError("scores_in is empty")
    return float(np.sort(s_in)[i])
