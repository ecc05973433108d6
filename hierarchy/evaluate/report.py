"""Writing an evaluation (report.json, report.md, records.jsonl, PNG plots) and the stdout summary."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hierarchy.core.errors import HierarchyError
from hierarchy.core.fsutil import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from hierarchy.evaluate.runner import Evaluation

MAX_MD_ITEMS = 50  # decode errors / blamed items listed in report.md (report.json has all)


def unique_dir(base: Path) -> Path:
    """``base`` if absent or empty, else the first of base2, base3... that this call creates itself
    (mkdir claims it, so two evaluations never share a numbered directory)."""
    if base.is_dir() and not any(base.iterdir()):
        return base
    for i in range(1, 10_000):
        cand = base if i == 1 else base.with_name(f"{base.name}{i}")
        try:
            cand.mkdir(parents=True)
            return cand
        except FileExistsError:
            continue
    raise HierarchyError(f"too many evaluations named {base.name} in {base.parent}")


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "x"


def write_evaluation(ev: "Evaluation", out: Path) -> Path:
    """Write every output into a new directory (see ``unique_dir``); return it."""
    out = unique_dir(Path(out))
    report = ev.report
    report["files"] = {"report": "report.json", "markdown": "report.md", "records": "records.jsonl",
                       "plots": write_plots(report, out)}
    if report.get("ood"):
        from hierarchy.evaluate.ood import strip_scores, write_ood_plots

        report["files"]["ood_plots"] = write_ood_plots(report, out)
        strip_scores(report)  # plotted; report.json keeps the summary numbers
    if report.get("subgroups"):
        from hierarchy.evaluate.subgroup_files import write_subgroup_plots

        report["files"]["subgroup_plots"] = write_subgroup_plots(report, out)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "records.jsonl", "".join(json.dumps(_record(it)) + "\n" for it in ev.items))
    atomic_write_text(out / "report.md", render_markdown(report))
    return out


def _record(it: dict) -> dict[str, Any]:
    truth = it["truth"]
    return {**it["record"], "truth": truth.stages, "truth_path": [lab for _, lab in truth.path]}


# ---------------------------------------------------------------- plots


def write_plots(report: dict, out: Path) -> dict[str, Any]:
    from hierarchy.metrics.plots import plot_confusion, plot_risk_coverage

    plots: dict[str, Any] = {"stages": {}}
    for sid, s in report["stages"].items():
        name = safe_name(sid)
        conf = f"confusion_{name}.png"
        plot_confusion(s["confusion"]["counts"], s["labels"], out / conf,
                       title=f"{sid} ({s['stage']}): confusion, n={s['n']}")
        plots["stages"][sid] = {"confusion": conf, "reliability": _reliability(sid, s, out / f"reliability_{name}.png")}
    e2e = report["end_to_end"]
    plot_confusion(e2e["confusion"]["counts"], e2e["labels"], out / "confusion_end_to_end.png",
                   title=f"{report['pipeline']['name']}: end-to-end confusion, n={e2e['n']}")
    curves = {f"stage {sid}": s["risk_coverage"] for sid, s in report["stages"].items()}
    if len(curves) == 1:  # one stage: the end-to-end curve is the same curve
        curves = {f"{next(iter(curves))} = end to end": e2e["risk_coverage"]}
    else:
        curves["end to end"] = e2e["risk_coverage"]
    plot_risk_coverage(curves, out / "risk_coverage.png", title=f"{report['pipeline']['name']}: risk-coverage")
    plots.update(end_to_end_confusion="confusion_end_to_end.png", risk_coverage="risk_coverage.png")
    return plots


def _reliability(sid: str, s: dict, path: Path) -> str:
    from hierarchy.metrics.plots import plot_reliability

    cal = s["calibration"]
    title = f"{sid}: reliability, n={cal['n']} ({cal['n_bins']} bins)"
    if cal["bins_before"] is not None and cal["temperature"] != 1.0:
        plot_reliability(cal["bins_before"], path, title=f"{title}\nbefore = T 1, after = T {cal['temperature']:.3f}",
                         ece=cal["ece_before"], bins_after=cal["bins_after"], ece_after=cal["ece_after"])
    else:
        plot_reliability(cal["bins_after"], path, title=f"{title}, T {cal['temperature']:.3f}", ece=cal["ece_after"])
    return path.name


# ---------------------------------------------------------------- text


def _f(x: Any, nd: int = 3) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _stage_row(sid: str, s: dict) -> list[str]:
    cal, sel = s["calibration"], s["selective"]
    return [sid, str(s["n"]), _f(s["accuracy"]), _f(s["macro"]["f1"]), _f(s["roc_auc"]), _f(cal["ece_before"]),
            _f(cal["ece_after"]), _f(cal["temperature"]), _f(s["threshold"]["value"]), _f(sel["coverage"]),
            _f(sel["accuracy_accepted"])]


SUMMARY_HEADER = ["stage", "n", "acc", "macroF1", "AUC", "ECE T=1", "ECE T", "T", "thresh", "cover", "acc@cover"]


def summary_rows(report: dict) -> list[list[str]]:
    e2e = report["end_to_end"]
    rows = [_stage_row(sid, s) for sid, s in report["stages"].items()]
    rows.append(["end-to-end", str(e2e["n"]), _f(e2e["accuracy"]), _f(e2e["macro"]["f1"]), "-", "-", "-",
                 "-", "-", _f(e2e["selective"]["coverage"]), _f(e2e["selective"]["accuracy_accepted"])])
    return rows


def summary_table(report: dict, out: Path | None = None) -> str:
    """The human summary printed to stdout."""
    rows = [SUMMARY_HEADER] + summary_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(SUMMARY_HEADER))]
    lines = [f"{_headline(report)}"]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    e2e = report["end_to_end"]
    h = e2e["hierarchical"]
    lines.append(f"hierarchical P/R/F1 {h['precision']:.3f}/{h['recall']:.3f}/{h['f1']:.3f}; "
                 f"statuses {', '.join(f'{k} {v}' for k, v in e2e['statuses'].items() if v) or 'none'}")
    lines.append("errors by first wrong stage: " + (_blame(e2e["error_attribution"]) or "none"))
    if report.get("subgroups"):
        from hierarchy.evaluate.subgroup_files import subgroup_summary_lines

        lines += subgroup_summary_lines(report)
    if out is not None:
        lines.append(f"report: {out / 'report.md'}")
    return "\n".join(lines)


def _headline(report: dict) -> str:
    d = report["data"]
    return (f"evaluate {report['pipeline']['name']}: {d['path']} ({d['layout']}, split {d['split']}) - "
            f"{d['n_evaluated']} of {d['n_samples']} image(s) evaluated, {report['decode_errors']['count']} decode error(s)")


def _blame(att: dict) -> str:
    return "; ".join(f"{sid} {n} (wrong {att['by_kind'][sid]['wrong']}, abstained {att['by_kind'][sid]['abstained']})"
                     for sid, n in att["counts"].items())


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_markdown(report: dict) -> str:
    parts = [_md_head(report), _md_end_to_end(report)]
    parts += [_md_stage(sid, s, report["files"]["plots"]["stages"][sid]) for sid, s in report["stages"].items()]
    if report.get("ood"):
        from hierarchy.evaluate.ood import render_ood_markdown

        parts.append(render_ood_markdown(report))
    if report.get("subgroups"):
        from hierarchy.evaluate.subgroup_files import render_subgroups_markdown

        parts.append(render_subgroups_markdown(report))
    parts += [_md_truth(report), _md_decode_errors(report)]
    return "\n\n".join(parts) + "\n"


def _md_head(report: dict) -> str:
    p, d = report["pipeline"], report["data"]
    lines = [f"# Evaluation: {p['name']}", "",
             f"- pipeline: `{p.get('file') or p['name']}` ({' -> '.join(p['order'])})",
             f"- data: `{d['path']}` ({d['layout']}, split `{d['split']}`): {d['n_samples']} image(s), "
             f"{d['n_evaluated']} evaluated, {report['decode_errors']['count']} decode error(s)",
             f"- created {report['created_at']} by {report['created_by']} in {report.get('seconds', 0):.1f}s", "",
             "## Summary", ""]
    return "\n".join(lines + _table(SUMMARY_HEADER, summary_rows(report)))


def _md_end_to_end(report: dict) -> str:
    e, sel, h = report["end_to_end"], report["end_to_end"]["selective"], report["end_to_end"]["hierarchical"]
    att = e["error_attribution"]
    lines = ["## End to end", "",
             f"- accuracy (all items, an abstention counts as wrong): {_f(e['accuracy'])} (n={e['n']})",
             f"- coverage {_f(sel['coverage'])}, abstention rate {_f(sel['abstention_rate'])}, "
             f"accuracy on accepted {_f(sel['accuracy_accepted'])}",
             f"- hierarchical precision / recall / F1: {h['precision']:.3f} / {h['recall']:.3f} / {h['f1']:.3f}",
             f"- accuracy with every threshold off: {_f(e['accuracy_without_thresholds'])}",
             f"- statuses: {', '.join(f'{k} {v}' for k, v in e['statuses'].items())}", "",
             "Per class (recall counts an abstention as a miss):", ""]
    lines += _table(["class", "precision", "recall", "F1", "support"],
                    [[lab, _f(c["precision"]), _f(c["recall"]), _f(c["f1"]), str(c["support"])]
                     for lab, c in e["per_class"].items()])
    lines += ["", "### Error attribution (first stage that went wrong)", ""]
    rows = [[sid, str(att["by_kind"][sid]["wrong"]), str(att["by_kind"][sid]["abstained"]), str(n)]
            for sid, n in att["counts"].items()]
    lines += _table(["stage", "wrong", "abstained", "total"], rows or [["-", "0", "0", "0"]])
    lines += ["", f"{att['n_errors']} error(s) in {att['n_items']} item(s); {att['n_deeper_than_truth']} answered "
              "deeper than their truth (not errors)."]
    lines += [f"- `{it['path']}`: {it['kind']} at `{it['stage_id']}` (truth {' > '.join(it['truth'])}, "
              f"predicted {' > '.join(it['predicted']) or '-'})" for it in att["items"][:MAX_MD_ITEMS]]
    plots = report["files"]["plots"]
    curves = "; ".join(f"{sid} {s['risk_coverage']['aurc']:.4f}" for sid, s in report["stages"].items())
    lines += ["", f"![end-to-end confusion]({plots['end_to_end_confusion']})", "", "### Risk-coverage", "",
              f"AURC (lower is better): {curves}; end to end {e['risk_coverage']['aurc']:.4f} "
              f"(end-to-end score: {e['risk_coverage']['score']}).", "", f"![risk-coverage]({plots['risk_coverage']})"]
    return "\n".join(lines)


def _md_stage(sid: str, s: dict, plots: dict) -> str:
    cal, sel, thr, pipe = s["calibration"], s["selective"], s["threshold"], s["in_pipeline"]
    stored = thr.get("stored") or {}
    lines = [f"## Stage `{sid}` ({s['stage']})", "",
             f"- n {s['n']} (items whose truth reaches this stage), accuracy {_f(s['accuracy'])}, "
             f"macro F1 {_f(s['macro']['f1'])}, ROC-AUC {_f(s['roc_auc'])}"
             + (f" (positive: {s['roc_auc_positive']})" if s["roc_auc_positive"] else ""),
             f"- threshold {_f(thr['value'])} (setting: {thr['setting']}"
             + (f"; stored target {stored.get('target')}, met {stored.get('met')}" if stored else "") + ")",
             f"- coverage {_f(sel['coverage'])}, abstention rate {_f(sel['abstention_rate'])}, "
             f"accuracy on accepted {_f(sel['accuracy_accepted'])}",
             f"- calibration: T {cal['temperature']:.4f}; ECE {_f(cal['ece_before'], 4)} (T=1) -> {_f(cal['ece_after'], 4)}; "
             f"NLL {_f(cal['nll_before'], 4)} -> {_f(cal['nll_after'], 4)}",
             f"- in the cascade: reached by {pipe['n_reached']}, accuracy there {_f(pipe['accuracy'])}, "
             f"accepted {pipe['n_accepted']}, abstained {pipe['n_abstained']}, rejected {pipe['n_rejected']}", ""]
    rows = [[lab, _f(c["precision"]), _f(c["recall"]), _f(c["f1"]), str(c["support"])] for lab, c in s["per_class"].items()]
    lines += _table(["class", "precision", "recall", "F1", "support"], rows) + [""]
    counts = s["confusion"]["counts"]
    lines += _table(["true \\ predicted"] + s["labels"], [[lab] + [str(v) for v in row] for lab, row in zip(s["labels"], counts)])
    lines += ["", f"![{sid} confusion]({plots['confusion']}) ![{sid} reliability]({plots['reliability']})"]
    from hierarchy.evaluate.subgroup_files import render_decide_markdown

    return "\n".join(lines + render_decide_markdown(sid, s.get("decide")))


def _md_truth(report: dict) -> str:
    t = report["truth"]
    lines = ["## Truth", "", f"- semantics: {t['semantics']}",
             f"- explicit stage columns: {', '.join(t['explicit_columns']) or 'none'}; ignored columns: "
             f"{', '.join(t['ignored_columns']) or 'none'}",
             f"- items with truth per stage: {', '.join(f'{k} {v}' for k, v in t['per_stage'].items())}"]
    lines += [f"- warning: {w}" for w in t["warnings"]]
    return "\n".join(lines)


def _md_decode_errors(report: dict) -> str:
    errs = report["decode_errors"]
    lines = ["## Decode errors", "", f"{errs['count']} image(s) could not be decoded (excluded from every metric)."]
    lines += [f"- `{e['path']}`: {e['type']}: {e['message']}" for e in errs["items"][:MAX_MD_ITEMS]]
    if errs["count"] > MAX_MD_ITEMS:
        lines.append(f"- ... {errs['count'] - MAX_MD_ITEMS} more in report.json")
    return "\n".join(lines)
