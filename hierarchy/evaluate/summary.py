"""Turning what :mod:`hierarchy.evaluate.runner` collected into the report dict (per stage and end to end).

Every number comes from :mod:`hierarchy.metrics.classification`; this module only selects, aligns and names.
"""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hierarchy.evaluate.runner import ABSTAINED, N_BINS, Hierarchy

if TYPE_CHECKING:
    from hierarchy.evaluate.runner import _Collector, _StageData
    from hierarchy.engine.pipeline import Pipeline
    from hierarchy.engine.router import LoadedStage, Router

TRUTH_SEMANTICS = ("label = deepest true label; per-stage truth derived by walking the pipeline's routes "
                   "backwards from the stage owning the label; CSV columns named after stage ids override "
                   "(blank = not applicable)")
E2E_SCORE = "min top-1 confidence along the route without thresholds (= one common threshold at every stage)"


def build_report(pipe: "Pipeline", router: "Router", hier: Hierarchy, col: "_Collector", data_info: dict,
                 truth_info: dict, settings: dict) -> dict[str, Any]:
    from hierarchy import __version__

    stages = {sid: stage_block(sid, router.stages[sid], col.stages[sid], pipe.stages[sid].threshold, col.items)
              for sid in hier.order}
    return {
        "format": "hierarchy.evaluation", "schema_version": 1, "created_by": f"hierarchy {__version__}",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pipeline": pipeline_block(pipe, hier),
        "data": {**data_info, "n_evaluated": len(col.items)},
        "truth": {"semantics": TRUTH_SEMANTICS, **truth_info},
        "decode_errors": {"count": len(col.decode_errors), "items": col.decode_errors},
        "stages": stages,
        "end_to_end": end_to_end(col.items, hier),
        "settings": settings,
    }


def pipeline_block(pipe: "Pipeline", hier: Hierarchy) -> dict[str, Any]:
    stages = {sid: {"stage": pipe.stages[sid].stage, "weights": _str(pipe.weights_path(sid)),
                    "labels": hier.labels[sid], "routes": hier.routes[sid]} for sid in hier.order}
    return {"name": pipe.name, "description": pipe.description, "root": pipe.root, "order": hier.order,
            "stages": stages}


def _str(x: Any) -> str | None:
    return None if x is None else str(x)


# ---------------------------------------------------------------- per stage


def _stack(parts: Sequence[np.ndarray | None], width: int) -> np.ndarray | None:
    if any(p is None for p in parts):
        return None
    return np.concatenate(parts) if parts else np.zeros((0, width))


def stage_block(sid: str, st: "LoadedStage", acc: "_StageData", setting: Any, items: list[dict]) -> dict[str, Any]:
    from hierarchy.metrics.classification import classification_report, risk_coverage, roc_auc, selective_summary

    from hierarchy.metrics.decisions import decide_labels

    labels = list(st.predictor.labels)
    y = np.asarray(acc.y, dtype=np.int64)
    probs = np.clip(_stack(acc.probs, len(labels)), 0.0, 1.0)
    pred, forced = decide_labels(probs, labels, st.decide)  # argmax unless a `decide:` threshold fires
    conf = probs[np.arange(len(pred)), pred]
    correct = pred == y
    report = classification_report(y, pred, labels)
    temperature = float(getattr(st.predictor, "temperature", None) or (st.predictor.metadata or {}).get("temperature", 1.0))
    ood = _stack(acc.ood, 1)
    return {
        "stage": st.stage_name, "labels": labels, **report,
        "roc_auc": roc_auc(y == 0, probs[:, 0]) if len(labels) == 2 else None,
        "roc_auc_positive": labels[0] if len(labels) == 2 else None,
        "threshold": {"value": st.threshold, "setting": setting, "ood_threshold": st.ood_threshold,
                      "stored": (st.predictor.metadata or {}).get("threshold")},
        "calibration": calibration_block(probs, _stack(acc.logits, len(labels)), y, temperature),
        "decide": decide_block(st, probs, y, labels),
        "selective": selective_summary(conf, correct, accepted_mask(st, conf, ood, forced)),
        "risk_coverage": risk_coverage(conf, correct),
        "in_pipeline": in_pipeline(sid, items),
    }


def accepted_mask(st: "LoadedStage", conf: np.ndarray, ood: np.ndarray | None,
                  forced: np.ndarray | None = None) -> np.ndarray:
    """The router's decision (hierarchy.engine.router.Router._decide) applied to a whole stage at once:
    ``conf`` is the chosen label's probability, ``forced`` marks labels a ``decide:`` threshold chose
    (never abstained)."""
    ok = np.ones(len(conf), dtype=bool)
    if st.ood_threshold is not None and ood is not None:
        ok &= np.ravel(ood) <= st.ood_threshold  # (0, 1) when no item reached the stage
    if st.threshold is not None:
        ok &= (conf >= st.threshold) | (forced if forced is not None else False)
    return ok


def decide_block(st: "LoadedStage", probs: np.ndarray, y: np.ndarray, labels: list[str]) -> dict[str, Any] | None:
    """For each label with a ``decide:`` threshold: the operating point and the recall/precision
    trade-off over that label's threshold (the other labels' thresholds held)."""
    from hierarchy.metrics.decisions import decision_curve

    if not st.decide:
        return None
    return {lab: decision_curve(probs, y, labels, st.decide, lab) for lab in st.decide}


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)).mean()) if len(y) else 0.0


def calibration_block(probs: np.ndarray, logits: np.ndarray | None, y: np.ndarray, temperature: float) -> dict:
    """ECE/NLL/reliability bins at T = 1 ("before", from raw logits) and at the stored T ("after")."""
    from hierarchy.metrics.classification import expected_calibration_error, reliability_bins, softmax

    before = softmax(logits, 1.0) if logits is not None else (probs if temperature == 1.0 else None)
    out: dict[str, Any] = {"temperature": temperature, "n_bins": N_BINS, "n": int(len(y)),
                           "before_from": "logits" if logits is not None else ("probabilities" if before is not None else None)}
    for name, p in (("before", before), ("after", probs)):
        if p is None:
            out.update({f"ece_{name}": None, f"nll_{name}": None, f"bins_{name}": None})
            continue
        conf, ok = np.clip(p.max(axis=1), 0.0, 1.0), p.argmax(axis=1) == y
        out[f"ece_{name}"] = expected_calibration_error(conf, ok, N_BINS)
        out[f"nll_{name}"] = _nll(p, y)
        out[f"bins_{name}"] = reliability_bins(conf, ok, N_BINS)
    return out


def in_pipeline(sid: str, items: list[dict]) -> dict[str, Any]:
    """What the stage did inside the cascade: items routed to it, its decisions, its accuracy there."""
    entries = [(it, e) for it in items for e in it["record"]["trace"] if e["stage"] == sid]
    judged = [e["label"] == it["truth"].stages[sid] for it, e in entries if sid in it["truth"].stages]
    decisions = Counter(e.get("decision") for _, e in entries)
    return {"n_reached": len(entries), "n_with_truth": len(judged),
            "accuracy": float(np.mean(judged)) if judged else None,
            **{f"n_{d}": decisions[d] for d in ("accepted", "abstained", "rejected")}}


# ---------------------------------------------------------------- end to end


def _e2e_row(it: dict) -> dict[str, Any]:
    truth = [lab for _, lab in it["truth"].path]
    rec, open_rec = it["record"], it["open"]
    trace = rec["trace"]
    pred = [t["label"] for t in trace if t["decision"] == "accepted"]
    depth = len(truth)
    answered = len(pred) >= depth or rec["status"] == "ok"
    label = pred[min(depth, len(pred)) - 1] if answered and pred else ABSTAINED
    open_pred = [t["label"] for t in open_rec["trace"]]
    return {"path": it["path"], "truth": truth, "pred": pred, "stages": [t["stage"] for t in trace],
            "label": label, "answered": answered, "correct": answered and pred[:depth] == truth,
            "score": min(t["confidence"] for t in trace[:depth]),
            "open_ok": open_rec["status"] != "error", "open_correct": open_pred[:depth] == truth,
            "open_score": min((t["confidence"] for t in open_rec["trace"][:depth]), default=0.0)}


def _e2e_labels(hier: Hierarchy, rows: list[dict]) -> list[str]:
    used = {r["truth"][-1] for r in rows} | {r["label"] for r in rows}
    ordered = dict.fromkeys(lab for sid in hier.order for lab in hier.labels[sid])
    return [lab for lab in ordered if lab in used] + [ABSTAINED]


def end_to_end(items: list[dict], hier: Hierarchy) -> dict[str, Any]:
    """End-to-end block. An item counts as answered when the pipeline accepted a decision at every
    level its truth has (coarser truth than the route is judged at the truth's depth)."""
    from hierarchy.metrics.classification import hierarchical_prf, normalize_rows, risk_coverage, selective_summary

    rows = [_e2e_row(it) for it in items if it["truth"].path and it["record"]["status"] != "error"]
    labels = _e2e_labels(hier, rows)
    idx = {lab: i for i, lab in enumerate(labels)}
    cls = e2e_classification([idx[r["truth"][-1]] for r in rows], [idx[r["label"]] for r in rows], labels)
    cm = np.asarray(cls.pop("confusion")["counts"])
    correct = np.array([r["correct"] for r in rows], dtype=bool)
    scores = np.clip([r["score"] for r in rows], 0.0, 1.0)
    opens = [r for r in rows if r["open_ok"]]
    open_rc = risk_coverage(np.clip([r["open_score"] for r in opens], 0.0, 1.0), [r["open_correct"] for r in opens])
    statuses = Counter(it["record"]["status"] for it in items)
    return {
        "n": len(rows), "statuses": {s: statuses[s] for s in ("ok", "abstained", "rejected", "error")},
        "n_without_root_truth": sum(1 for it in items if not it["truth"].path),
        "labels": labels, **cls,
        "selective": selective_summary(scores, correct, [r["answered"] for r in rows]),
        "confusion": {"labels": labels, "counts": cm.tolist(), "normalized": normalize_rows(cm).tolist()},
        "hierarchical": hierarchical_prf([r["truth"] for r in rows], [r["pred"] for r in rows]),
        "error_attribution": attribution(rows),
        "accuracy_without_thresholds": float(np.mean([r["open_correct"] for r in opens])) if opens else None,
        "risk_coverage": {**open_rc, "score": E2E_SCORE},
    }


def e2e_classification(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict[str, Any]:
    """classification_report with the last label ``(abstained)`` kept as a prediction (so it lowers
    recall) but left out of per_class and the macro mean (its support is 0, so weighted is unaffected)."""
    from hierarchy.metrics.classification import classification_report

    rep = classification_report(y_true, y_pred, labels)
    per_class = {lab: rep["per_class"][lab] for lab in labels[:-1]}
    rep["per_class"] = per_class
    rep["macro"] = {k: float(np.mean([c[k] for c in per_class.values()])) if per_class else 0.0
                    for k in ("precision", "recall", "f1")}
    return rep


def attribution(rows: list[dict]) -> dict[str, Any]:
    """metrics.error_attribution, with each blamed item's path, truth and answer attached."""
    from hierarchy.metrics.classification import error_attribution

    out = error_attribution([r["truth"] for r in rows], [r["pred"] for r in rows], [r["stages"] for r in rows])
    for item in out["items"]:
        r = rows[item.pop("index")]
        item.update(path=r["path"], truth=r["truth"], predicted=r["pred"])
    return out
