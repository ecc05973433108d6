"""The agreement guard of an int8 export: how far the quantised model's outputs drift from the fp32
model's on the same val images. Pure numpy; :mod:`hierarchy.engine.quantize` runs both models.

Refusal is by top-1 agreement alone (``agreement >= min_agreement``); ranking (AUROC of each class's
probability, one vs rest, averaged), calibration (ECE with the run's temperature) and the OOD score (the share of images whose accept/reject decision flips at the stored
threshold, and the scores' correlation) are measured and recorded, and a large drift is a warning.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hierarchy.engine.predictor import calibrated
from hierarchy.metrics.classification import expected_calibration_error, roc_auc

if TYPE_CHECKING:
    from hierarchy.ood.scores import OODScorer

N_BINS = 15
ECE_WARN = 0.02  # |ECE int8 - ECE fp32| above this is worth a warning
AUROC_WARN = 0.005  # AUROC int8 this far below fp32
OOD_FLIPS_WARN = 0.01  # share of OOD decisions that flip


def guard_metrics(fp32: tuple[np.ndarray, np.ndarray], int8: tuple[np.ndarray, np.ndarray], y: np.ndarray,
                  temperature: float, scorer: "OODScorer | None" = None) -> dict[str, Any]:
    """``fp32`` and ``int8`` are (logits, features) of the same images, ``y`` their label indices."""
    (logits32, feats32), (logits8, feats8) = fp32, int8
    p32, p8 = calibrated(logits32, temperature), calibrated(logits8, temperature)
    top32, top8 = p32.argmax(axis=1), p8.argmax(axis=1)
    out: dict[str, Any] = {
        "agreement": float((top32 == top8).mean()) if len(y) else 0.0,
        "accuracy_fp32": float((top32 == y).mean()) if len(y) else None,
        "accuracy_int8": float((top8 == y).mean()) if len(y) else None,
        "auroc_fp32": auroc(p32, y), "auroc_int8": auroc(p8, y),
        "ece_fp32": ece(p32, y), "ece_int8": ece(p8, y),
        "max_abs_prob_diff": float(np.abs(p32 - p8).max()) if len(y) else None,
    }
    out.update(ood_drift(scorer, (logits32, feats32), (logits8, feats8)))
    return out


def ece(probs: np.ndarray, y: np.ndarray) -> float | None:
    if not len(y):
        return None
    conf = np.clip(probs.max(axis=1).astype(np.float64), 0.0, 1.0)
    return float(expected_calibration_error(conf, probs.argmax(axis=1) == y, N_BINS))


def auroc(probs: np.ndarray, y: np.ndarray) -> float | None:
    """Macro one-vs-rest ROC AUC of the probabilities over the classes present in ``y`` (None if < 2)."""
    values = [roc_auc(y == c, probs[:, c]) for c in np.unique(y)] if len(y) else []
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def ood_drift(scorer: "OODScorer | None", fp32: tuple[np.ndarray, np.ndarray],
              int8: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """The OOD score's method, its correlation fp32 vs int8 and the share of decisions that flip."""
    if scorer is None or not len(fp32[0]):
        return {"ood_method": None, "ood_score_correlation": None, "ood_decision_flips": None}
    s32 = scorer.score(fp32[1], fp32[0]).astype(np.float64)
    s8 = scorer.score(int8[1], int8[0]).astype(np.float64)
    corr = float(np.corrcoef(s32, s8)[0, 1]) if len(s32) > 1 and s32.std() > 0 and s8.std() > 0 else None
    flips = None if scorer.threshold is None else float(((s32 > scorer.threshold) != (s8 > scorer.threshold)).mean())
    return {"ood_method": scorer.method, "ood_score_correlation": corr, "ood_decision_flips": flips}


def drift_warnings(metrics: dict[str, Any]) -> list[str]:
    """What measured beyond the warning levels (the guard itself is agreement)."""
    out = []
    e32, e8 = metrics.get("ece_fp32"), metrics.get("ece_int8")
    if e32 is not None and e8 is not None and abs(e8 - e32) > ECE_WARN:
        out.append(f"ECE moves from {e32:.4f} (fp32) to {e8:.4f} (int8); consider `hierarchy calibrate "
                   "--engine onnx --precision int8`")
    a32, a8 = metrics.get("auroc_fp32"), metrics.get("auroc_int8")
    if a32 is not None and a8 is not None and a32 - a8 > AUROC_WARN:
        out.append(f"AUROC drops from {a32:.4f} (fp32) to {a8:.4f} (int8)")
    flips = metrics.get("ood_decision_flips")
    if flips is not None and flips > OOD_FLIPS_WARN:
        out.append(f"{100 * flips:.1f}% of val images change their OOD accept/reject decision in int8")
    return out
