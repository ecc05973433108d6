"""``hierarchy evaluate --ood DIR``: how well each stage's OOD score separates known-OOD images
from the evaluation data, and what the pipeline does with them.

* per stage: every OOD image is shown to the stage (as if routed there) and its scores are compared
  with those of the in-distribution items true to that stage: AUROC, FPR at 95% TPR, share rejected
  by the stage's OOD threshold, share kept of in-distribution, and a histogram PNG;
* end to end (thresholds on, the real router): how many OOD images the pipeline rejected, and at
  which stage (the root gate's share is the headline), abstained on, or answered;
* risk-coverage with OOD mixed in: an OOD item is always an error when accepted. Curves rank by
  confidence alone and by confidence with OOD-rejected items last (what the OOD score buys).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hierarchy.core.errors import DatasetError

if TYPE_CHECKING:
    from hierarchy.data.batches import Decoded
    from hierarchy.evaluate.runner import _Collector
    from hierarchy.engine.router import LoadedStage, Router


def ood_paths(folder: Path) -> list[Path]:
    from hierarchy.data.imageio import iter_image_files

    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"--ood {folder}: not a directory of images")
    paths = sorted(iter_image_files(folder))
    if not paths:
        raise DatasetError(f"--ood {folder}: no images found")
    return paths


def evaluate_ood(router: "Router", collector: "_Collector", folder: Path, batch_size: int = 32,
                 workers: int | None = None) -> dict[str, Any]:
    """The ``ood`` block of the evaluation report (see the module docstring)."""
    from hierarchy.data.batches import decode_batches

    paths = ood_paths(folder)
    decoded: list["Decoded"] = []
    for chunk in decode_batches(paths, router.decode, max(batch_size, 64), workers):
        decoded += [d for d in chunk if d.error is None]
    if not decoded:
        raise DatasetError(f"--ood {folder}: none of the {len(paths)} images could be decoded")
    records = router.route(decoded, batch_size)
    stages = {sid: stage_ood(router.stages[sid], collector.stages[sid], decoded, batch_size)
              for sid in router.order}
    return {"path": str(folder), "n": len(decoded), "n_undecodable": len(paths) - len(decoded),
            "stages": stages, "end_to_end": end_to_end(records, router.pipeline.root),
            "risk_coverage": risk_coverage_with_ood(collector, records, router.pipeline.root)}


def _scores(predictor: Any, items: Sequence["Decoded"], batch_size: int) -> np.ndarray | None:
    """The stage's OOD scores for ``items`` (None when its predictor gives none)."""
    from hierarchy.engine.router import make_batch

    out = []
    for start in range(0, len(items), batch_size):
        pred = predictor.predict(make_batch([d.array(predictor.preset) for d in items[start:start + batch_size]],
                                            predictor))
        if pred.ood is None:
            return None
        out.append(np.asarray(pred.ood, dtype=np.float64))
    return np.concatenate(out) if out else np.zeros(0)


def stage_ood(st: "LoadedStage", acc: Any, items: Sequence["Decoded"], batch_size: int) -> dict[str, Any]:
    """Separation of in-distribution (items true to the stage) and OOD scores at one stage."""
    from hierarchy.metrics.thresholds import fpr_at_tpr, ood_auroc

    s_out = _scores(st.predictor, items, batch_size)
    parts = acc.ood
    s_in = None if not parts or any(p is None for p in parts) else np.concatenate(parts)
    method = ((st.predictor.metadata or {}).get("ood") or {}).get("method")
    out: dict[str, Any] = {"method": method, "threshold": st.ood_threshold, "n_in": 0 if s_in is None else len(s_in),
                           "n_out": len(items), "auroc": None, "fpr95": None, "rejected": None, "kept_in": None}
    if s_out is None or s_in is None:
        out["note"] = "the stage's predictor gives no OOD score (no OOD statistics in its checkpoint)"
        return out
    out.update(auroc=ood_auroc(s_in, s_out), fpr95=fpr_at_tpr(s_in, s_out, 0.95) if len(s_in) else None,
               scores_in=s_in.tolist(), scores_out=s_out.tolist())
    if st.ood_threshold is not None:
        out["rejected"] = float((s_out > st.ood_threshold).mean())
        out["kept_in"] = float((s_in <= st.ood_threshold).mean()) if len(s_in) else None
    return out


def end_to_end(records: list[dict], root: str) -> dict[str, Any]:
    """What the pipeline (thresholds on) did with the OOD images; accepted ones are errors."""
    n = len(records)
    statuses = Counter(r["status"] for r in records)
    by_stage = Counter(r["stage"] for r in records if r["status"] == "rejected")
    answered = Counter(r["label"] for r in records if r["status"] == "ok")
    share = (lambda k: k / n if n else 0.0)
    return {"n": n, "statuses": dict(statuses), "rejected": share(statuses["rejected"]),
            "rejected_at_root": share(by_stage[root]), "rejected_by_stage": dict(by_stage),
            "abstained": share(statuses["abstained"]), "accepted_as_error": share(statuses["ok"]),
            "answered_labels": dict(answered)}


def _in_distribution(collector: "_Collector", root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidence, correct, OOD-rejected) of the root decision for the evaluated items with root truth."""
    rows = [(it["record"]["trace"][0], it["truth"].stages[root]) for it in collector.items
            if it["record"]["trace"] and root in it["truth"].stages]
    conf = np.clip([e["confidence"] for e, _ in rows], 0.0, 1.0)
    correct = np.array([e["label"] == truth for e, truth in rows], bool)
    return conf, correct, np.array([e.get("decision") == "rejected" for e, _ in rows], bool)


def risk_coverage_with_ood(collector: "_Collector", records: list[dict], root: str) -> dict[str, Any]:
    """Root-stage risk-coverage: in-distribution only, with OOD mixed in (OOD = error when accepted),
    ranked by confidence, and ranked with OOD-rejected items last."""
    from hierarchy.metrics.classification import risk_coverage, selective_summary

    conf_in, ok_in, rej_in = _in_distribution(collector, root)
    first = [r["trace"][0] for r in records if r["trace"]]
    conf_out = np.clip([e["confidence"] for e in first], 0.0, 1.0)
    rej_out = np.array([e.get("decision") == "rejected" for e in first], bool)
    conf = np.r_[conf_in, conf_out]
    ok = np.r_[ok_in, np.zeros(len(conf_out), bool)]
    ranked = np.where(np.r_[rej_in, rej_out], conf - 1.0, conf)  # rejected below every accepted item
    accepted = np.r_[~rej_in, ~rej_out]
    return {"stage": root, "n_in": int(len(conf_in)), "n_out": int(len(conf_out)),
            "in_distribution": risk_coverage(conf_in, ok_in),
            "with_ood_confidence": risk_coverage(conf, ok),
            "with_ood_reject": {**risk_coverage((ranked + 1.0) / 2.0, ok),
                                "score": "(confidence + 1 - rejected) / 2: OOD-rejected items rank last"},
            "operating_point": selective_summary(conf, ok, accepted)}


# ---------------------------------------------------------------- report outputs


def write_ood_plots(report: dict, out: Path) -> dict[str, str]:
    """Score histograms per stage (in-distribution vs OOD) and the risk-coverage plot with OOD."""
    from hierarchy.metrics.plots import plot_risk_coverage, plot_score_histogram

    block, files = report["ood"], {}
    for sid, s in block["stages"].items():
        if s.get("scores_in") is None:
            continue
        name = f"ood_scores_{_safe(sid)}.png"
        plot_score_histogram(s["scores_in"], s["scores_out"], out / name, s["threshold"],
                             title=f"{sid}: OOD score ({s['method']}), AUROC {_f(s['auroc'])}")
        files[sid] = name
    rc = block["risk_coverage"]
    curves = {"in-distribution only": rc["in_distribution"], "+ OOD, ranked by confidence": rc["with_ood_confidence"],
              "+ OOD, OOD-rejected last": rc["with_ood_reject"]}
    plot_risk_coverage(curves, out / "risk_coverage_ood.png", title=f"{rc['stage']}: risk-coverage with OOD images")
    files["risk_coverage"] = "risk_coverage_ood.png"
    return files


def render_ood_markdown(report: dict) -> str:
    block = report.get("ood")
    if not block:
        return ""
    plots = report.get("files", {}).get("ood_plots", {})
    e2e, rc = block["end_to_end"], block["risk_coverage"]
    lines = ["## Out-of-distribution images", "",
             f"{block['n']} known-OOD images from `{block['path']}` ({block['n_undecodable']} undecodable, skipped).",
             "", "| stage | method | threshold | AUROC | FPR@95%TPR | OOD rejected | in-dist kept | n in | n OOD |",
             "|---|---|---|---|---|---|---|---|---|"]
    for sid, s in block["stages"].items():
        lines.append(f"| {sid} | {s['method'] or '-'} | {_f(s['threshold'], 4)} | {_f(s['auroc'])} | "
                     f"{_f(s['fpr95'])} | {_f(s['rejected'])} | {_f(s['kept_in'])} | {s['n_in']} | {s['n_out']} |")
    lines += ["", f"End to end (thresholds on): {_f(e2e['rejected'])} rejected ({_f(e2e['rejected_at_root'])} by the "
              f"root gate), {_f(e2e['abstained'])} abstained, **{_f(e2e['accepted_as_error'])} accepted (errors)**; "
              f"answered as {', '.join(f'{k} {v}' for k, v in e2e['answered_labels'].items()) or '-'}.", ""]
    point = rc["operating_point"]
    lines += [f"Risk-coverage at `{rc['stage']}` with the OOD images mixed in (an accepted OOD image is an error): "
              f"at the pipeline's OOD threshold, coverage {_f(point['coverage'])}, accuracy of accepted "
              f"{_f(point['accuracy_accepted'])}; AURC in-distribution {_f(rc['in_distribution']['aurc'])}, with OOD "
              f"ranked by confidence {_f(rc['with_ood_confidence']['aurc'])}, with OOD-rejected last "
              f"{_f(rc['with_ood_reject']['aurc'])}.", ""]
    lines += [f"![{'risk-coverage with OOD' if name == 'risk_coverage' else f'{name} OOD scores'}]({file})"
              for name, file in plots.items()]
    return "\n".join(lines)


def ood_summary_line(report: dict) -> str:
    """One stdout line: the root stage's separation and what the pipeline did with the OOD images."""
    block = report.get("ood")
    if not block:
        return ""
    root = block["risk_coverage"]["stage"]
    s, e2e = block["stages"][root], block["end_to_end"]
    return (f"ood: {block['n']} image(s) from {block['path']}: {root} AUROC {_f(s['auroc'])}, FPR@95%TPR "
            f"{_f(s['fpr95'])}; end to end rejected {_f(e2e['rejected'])} (root {_f(e2e['rejected_at_root'])}), "
            f"abstained {_f(e2e['abstained'])}, accepted (errors) {_f(e2e['accepted_as_error'])}")


def strip_scores(report: dict) -> None:
    """Drop the raw score lists (plotted already) so report.json stays small."""
    for s in (report.get("ood") or {}).get("stages", {}).values():
        s.pop("scores_in", None)
        s.pop("scores_out", None)


def _safe(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "x"


def _f(x: Any, nd: int = 3) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))
