"""Rendering ``report["subgroups"]`` (``evaluate --by``): recall-per-group plots, markdown tables and
the stdout lines, plus the markdown of each stage's ``decide:`` operating point."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hierarchy.evaluate.report import safe_name

METRICS = ("accuracy", "coverage", "ood_rejected", "auc", "ece")


def _ci(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "-"
    ci = m.get("ci")
    return f"{m['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def tables(block: dict) -> list[tuple[str, dict]]:
    return [(f"stage `{sid}`", t) for sid, t in block["stages"].items()] + [("end to end", block["end_to_end"])]


def labels_of(table: dict) -> list[str]:
    first = next(iter(table["groups"].values()), {"metrics": {}})
    return [k.split("/", 1)[1] for k in first["metrics"] if k.startswith("recall/")]


def write_subgroup_plots(report: dict, out: Path) -> dict[str, str]:
    """One PNG per (column, stage or end to end): per-class recall with intervals per group."""
    from hierarchy.metrics.plots import plot_group_recall

    files = {}
    for column, block in report["subgroups"]["columns"].items():
        for where, t in tables(block):
            key = f"{column}/{where.replace('`', '')}"
            name = f"subgroups_{safe_name(column)}_{safe_name(where.replace('`', ''))}.png"
            plot_group_recall(t["groups"], labels_of(t), out / name, title=f"{key}: recall per group (95% CI)")
            files[key] = name
    return files


def _worst_line(t: dict) -> str:
    w = t["worst"].get("accuracy")
    if not w:
        return "worst group (accuracy): - (fewer than two groups)"
    return (f"worst group (accuracy): **{w['group']}** {_ci(w)} (n={w['n']}) vs the others {w['others']:.3f}"
            + (" - its interval lies below the others" if w["ci_below_others"] else ""))


def render_subgroups_markdown(report: dict) -> str:
    sg = report["subgroups"]
    st = sg["settings"]
    plots = report["files"].get("subgroup_plots", {})
    lines = ["## Subgroups", "",
             f"{st['level']:.0%} intervals: {st['method']}, {st['n_resamples']} resamples, seed {st['seed']}. "
             f"Groups with n < {st['min_n']} are marked * and are not named worst while a bigger group exists.", ""]
    for column, block in sg["columns"].items():
        lines += [f"### By `{column}`" + (f" (buckets {', '.join(block['buckets'])})" if block["buckets"] else ""), ""]
        for where, t in tables(block):
            labels = labels_of(t)
            present = [m for m in METRICS if any(m in g["metrics"] for g in t["groups"].values())]
            header = ["group", "n"] + present + [f"recall {lab}" for lab in labels]
            lines += [f"{where}: {_worst_line(t)}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for name, g in t["groups"].items():
                cells = [name + (" *" if g["small_n"] else ""), str(g["n"])]
                cells += [_ci(g["metrics"].get(m)) for m in present]
                cells += [_ci(g["metrics"].get(f"recall/{lab}")) for lab in labels]
                lines.append("| " + " | ".join(cells) + " |")
            key = f"{column}/{where.replace('`', '')}"
            lines += [""] + ([f"![{key}]({plots[key]})", ""] if key in plots else [])
    lines += [f"- warning: {w}" for w in sg["warnings"]]
    return "\n".join(lines)


def subgroup_summary_lines(report: dict) -> list[str]:
    """One stdout line per --by column: the end-to-end worst group."""
    out = []
    for column, block in report["subgroups"]["columns"].items():
        out.append(f"by {column}: end to end {_worst_line(block['end_to_end']).replace('**', '')}")
    n_small = len(report["subgroups"]["warnings"])
    if n_small:
        out.append(f"{n_small} small-n warning(s) (n < {report['subgroups']['settings']['min_n']}); see report.md")
    return out


def render_decide_markdown(sid: str, decide: dict[str, Any] | None) -> list[str]:
    """A stage's ``decide:`` operating points and their recall/precision trade-off (every 0.1)."""
    if not decide:
        return []
    lines = [""]
    for lab, d in decide.items():
        c = d["curve"]
        pts = [(t, r, p) for t, r, p in zip(c["thresholds"], c["recall"], c["precision"]) if round(t * 10, 6) % 1 == 0]
        lines += [f"Decision threshold `{lab}` >= {d['threshold']:.4f}: recall {d['recall']:.3f}, precision "
                  f"{d['precision']:.3f} ({d['n_positive']} positives of {d['n']}). Trade-off:", "",
                  "| p(" + lab + ") >= | " + " | ".join(f"{t:.1f}" for t, _, _ in pts) + " |",
                  "|---|" + "---|" * len(pts),
                  "| recall | " + " | ".join(f"{r:.3f}" for _, r, _ in pts) + " |",
                  "| precision | " + " | ".join(f"{p:.3f}" for _, _, p in pts) + " |", ""]
    return lines
