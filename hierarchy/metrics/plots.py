"""Evaluation plots written as PNG files.

Each ``*_figure`` function builds a standalone ``matplotlib.figure.Figure`` drawn by the Agg canvas
(no pyplot, no display, no global backend switch); the matching ``plot_*`` function writes it
atomically, so a reader never sees a half-written PNG. Inputs are the plain dicts/lists returned by
:mod:`hierarchy.metrics.classification`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hierarchy.core.fsutil import atomic_write_with
from hierarchy.metrics.classification import normalize_rows

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_DPI = 120


def _figure(
    width: float, height: float, nrows: int = 1, ncols: int = 1, **kw: Any
) -> "tuple[Figure, np.ndarray[Any, Any]]":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches the headless Agg canvas to this figure only
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _save(fig: "Figure", path: str | os.PathLike) -> Path:
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))
    return Path(path)


def plot_confusion(
    cm: Any, labels: Sequence[str], path: str | os.PathLike, title: str = "Confusion matrix",
    normalize: bool = True,
) -> Path:
    """:func:`confusion_figure` written to ``path`` as PNG."""
    return _save(confusion_figure(cm, labels, title, normalize), path)


def confusion_figure(
    cm: Any, labels: Sequence[str], title: str = "Confusion matrix", normalize: bool = True,
) -> "Figure":
    """Heatmap of the confusion matrix (rows = truth); each cell shows its count and row %.

    ``normalize`` colours cells by row share (recall view) instead of raw counts."""
    counts = np.asarray(cm, dtype=np.int64)
    n = len(labels)
    if counts.shape != (n, n):
        raise ValueError(f"cm shape {counts.shape} does not match {n} labels")
    sums = counts.sum(axis=1, keepdims=True)
    share = normalize_rows(counts)
    colour = share if normalize else counts
    size = max(4.0, 0.9 * n + 2.5)
    fig, axes = _figure(size + 1.0, size)
    ax = axes[0, 0]
    im = ax.imshow(colour, cmap="Blues", vmin=0, vmax=1 if normalize else max(int(counts.max()), 1))
    fig.colorbar(im, ax=ax, shrink=0.8, label="row share" if normalize else "count")
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels=list(labels), rotation=45, ha="right")
    ax.set_yticks(ticks, labels=[f"{lab} (n={int(s)})" for lab, s in zip(labels, sums[:, 0])])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    high = 0.5 * (1 if normalize else max(int(counts.max()), 1))
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{counts[i, j]}\n{100 * share[i, j]:.1f}%", ha="center", va="center",
                    fontsize=8, color="white" if colour[i, j] > high else "black")
    return fig


def _bar_series(bins: list[dict]) -> tuple[np.ndarray, ...]:
    lo = np.array([b["lo"] for b in bins], dtype=np.float64)
    width = np.array([b["hi"] - b["lo"] for b in bins], dtype=np.float64)
    acc = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins], dtype=np.float64)
    count = np.array([b["count"] for b in bins], dtype=np.float64)
    return lo, width, acc, count


def _label(name: str, ece: float | None) -> str:
    return name if ece is None else f"{name} (ECE {ece:.3f})"


def plot_reliability(
    bins: list[dict], path: str | os.PathLike, title: str = "Reliability diagram",
    ece: float | None = None, bins_after: list[dict] | None = None, ece_after: float | None = None,
) -> Path:
    """:func:`reliability_figure` written to ``path`` as PNG."""
    return _save(reliability_figure(bins, title, ece, bins_after, ece_after), path)


def reliability_figure(
    bins: list[dict], title: str = "Reliability diagram", ece: float | None = None,
    bins_after: list[dict] | None = None, ece_after: float | None = None,
) -> "Figure":
    """Reliability diagram: accuracy per confidence bin against the diagonal, sample counts below.

    ``bins_after``/``ece_after`` overlay a second model state (e.g. after temperature scaling)."""
    series = [("before" if bins_after else "model", bins, ece, "tab:blue")]
    if bins_after:
        series.append(("after", bins_after, ece_after, "tab:orange"))
    fig, axes = _figure(6.0, 6.5, nrows=2, sharex=True, height_ratios=[3, 1])
    top, bottom = axes[0, 0], axes[1, 0]
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for k, (name, b, e, colour) in enumerate(series):
        lo, width, acc, count = _bar_series(b)
        w = width / len(series)
        top.bar(lo + k * w, acc, width=w, align="edge", color=colour, alpha=0.75,
                edgecolor="black", lw=0.5, label=_label(name, e))
        bottom.bar(lo + k * w, count, width=w, align="edge", color=colour, alpha=0.75)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="confidence", ylabel="count")
    return fig


def plot_risk_coverage(
    curves: dict[str, dict], path: str | os.PathLike, title: str = "Risk-coverage",
) -> Path:
    """:func:`risk_coverage_figure` written to ``path`` as PNG."""
    return _save(risk_coverage_figure(curves, title), path)


def risk_coverage_figure(curves: dict[str, dict], title: str = "Risk-coverage") -> "Figure":
    """Risk (error rate of accepted items) against coverage, one step curve per named curve."""
    fig, axes = _figure(6.5, 5.0)
    ax = axes[0, 0]
    for name, rc in curves.items():
        cov, risk = np.asarray(rc["coverage"], float), np.asarray(rc["risk"], float)
        if cov.size == 0:
            continue
        aurc = rc.get("aurc")
        label = name if aurc is None else f"{name} (AURC {aurc:.3f})"
        ax.step(np.r_[0.0, cov], np.r_[risk[0], risk], where="pre", lw=1.8, label=label)
    ax.set(xlim=(0, 1.01), ylim=(0, None), xlabel="coverage (share accepted)",
           ylabel="risk (error rate among accepted)", title=title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="upper left", fontsize=8)
    return fig


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(
    history: list[dict], path: str | os.PathLike, title: str = "Training curves",
) -> Path:
    """:func:`training_curves_figure` written to ``path`` as PNG."""
    return _save(training_curves_figure(history, title), path)


def training_curves_figure(history: list[dict], title: str = "Training curves") -> "Figure":
    """Two panels, loss and accuracy per epoch, train vs validation; missing values are skipped."""
    fig, axes = _figure(11.0, 4.5, ncols=2)
    for ax, metric in zip(axes[0], ("loss", "acc")):
        for split, style in (("train", "-o"), ("val", "-s")):
            xs, ys = _series(history, f"{split}_{metric}")
            if xs:
                ax.plot(xs, ys, style, ms=3, label=split)
        ax.set(xlabel="epoch", ylabel="accuracy" if metric == "acc" else "loss")
        ax.set_title("accuracy" if metric == "acc" else "loss")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_score_histogram(
    scores_in: Any, scores_out: Any, path: str | os.PathLike, threshold: float | None = None,
    title: str = "OOD score distribution",
) -> Path:
    """:func:`score_histogram_figure` written to ``path`` as PNG."""
    return _save(score_histogram_figure(scores_in, scores_out, threshold, title), path)


def score_histogram_figure(
    scores_in: Any, scores_out: Any, threshold: float | None = None, title: str = "OOD score distribution",
) -> "Figure":
    """Overlaid density histograms of in-distribution vs OOD scores, with an optional threshold."""
    s_in, s_out = np.asarray(scores_in, float).ravel(), np.asarray(scores_out, float).ravel()
    both = np.r_[s_in, s_out]
    fig, axes = _figure(6.5, 4.5)
    ax = axes[0, 0]
    if both.size:
        edges = np.histogram_bin_edges(both, bins=min(50, max(10, both.size // 10)))
        sides = ((s_in, "in-distribution", "tab:blue"), (s_out, "OOD", "tab:red"))
        for scores, name, colour in sides:
            if scores.size:
                ax.hist(scores, bins=edges, density=True, alpha=0.5, color=colour,
                        label=f"{name} (n={scores.size})")
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1.2, label=f"threshold {threshold:.3g}")
    ax.set(xlabel="OOD score (higher = more OOD)", ylabel="density", title=title)
    if ax.has_data() or threshold is not None:
        ax.legend(fontsize=8)
    return fig


def plot_group_recall(
    groups: dict[str, Any], labels: Sequence[str], path: str | os.PathLike, title: str = "Recall per subgroup",
) -> Path:
    """:func:`group_recall_figure` written to ``path`` as PNG."""
    return _save(group_recall_figure(groups, labels, title), path)


def group_recall_figure(groups: dict[str, Any], labels: Sequence[str], title: str = "Recall per subgroup") -> "Figure":
    """Per-class recall of each subgroup with its confidence interval as an error bar.
    ``groups``: ``{name: {"n": int, "metrics": {"recall/<label>": {"value", "ci"}}}}`` (evaluate --by)."""
    names = list(groups)
    fig, axes = _figure(max(5.0, 0.7 * len(names) * max(1, len(labels)) + 2.0), 4.5)
    ax = axes[0, 0]
    width = 0.8 / max(1, len(labels))
    for j, lab in enumerate(labels):
        ms = [groups[g]["metrics"].get(f"recall/{lab}") or {} for g in names]
        x = np.arange(len(names)) + (j - (len(labels) - 1) / 2) * width
        v = np.array([np.nan if m.get("value") is None else m["value"] for m in ms])
        lo = np.array([np.nan if not m.get("ci") else m["ci"][0] for m in ms])
        hi = np.array([np.nan if not m.get("ci") else m["ci"][1] for m in ms])
        ax.errorbar(x, v, yerr=np.nan_to_num(np.vstack([v - lo, hi - v]), nan=0.0), fmt="o", capsize=3, label=lab)
    ax.set_xticks(np.arange(len(names)), [f"{g}\nn={groups[g]['n']}" for g in names], fontsize=7,
                  rotation=30 if len(names) > 6 else 0)
    ax.set(ylim=(-0.02, 1.02), ylabel="recall (95% CI)", title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig
