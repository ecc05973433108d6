"""Subgroup results (``hierarchy evaluate --by sex,age:0-30,30-60,60-``): every stage's and the end-to-end
metrics per group of a metadata column, with seeded bootstrap 95% intervals, the worst group and a
small-n warning.

Columns come from the evaluated CSV or the builder's manifest (which carries the sources' metadata
columns). A numeric column can be bucketed: ``age:0-30,30-60,60-`` = [0, 30), [30, 60), [60, inf);
a blank or non-numeric cell goes to ``(missing)``, a value in no bucket to ``(other)``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from hierarchy.core.errors import ConfigError, DatasetError
from hierarchy.metrics.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, bootstrap_cis

if TYPE_CHECKING:
    from hierarchy.engine.router import LoadedStage, Router
    from hierarchy.evaluate.runner import Hierarchy, _Collector

MIN_N = 30  # groups smaller than this are flagged (small_n) and never named the worst while a bigger one exists
MISSING, OTHER = "(missing)", "(other)"
_BUCKET = re.compile(r"^(-?\d+(?:\.\d+)?)?-(-?\d+(?:\.\d+)?)?$")


@dataclass(frozen=True)
class GroupBy:
    column: str
    buckets: tuple[tuple[float, float], ...] = ()  # [lo, hi) each; () = the raw values

    def group(self, raw: str) -> str:
        value = (raw or "").strip()
        if not self.buckets:
            return value or MISSING
        try:
            x = float(value)
        except ValueError:
            return MISSING
        for lo, hi in self.buckets:
            if lo <= x < hi:
                return _bucket_name(lo, hi)
        return OTHER


def _bucket_name(lo: float, hi: float) -> str:
    def f(v: float) -> str:
        return f"{v:g}"

    return f"{f(lo)}-" if hi == np.inf else f"{'' if lo == -np.inf else f(lo)}-{f(hi)}"


def parse_by(specs: Sequence[str]) -> list[GroupBy]:
    """``["sex,age:0-30,30-60,60-"]`` -> GroupBy(sex), GroupBy(age, 3 buckets). A comma-separated item
    that looks like a range continues the previous column's buckets."""
    out: list[tuple[str, list[tuple[float, float]]]] = []
    for token in (t.strip() for spec in specs for t in spec.split(",")):
        if not token:
            continue
        column, sep, first = token.partition(":")
        if sep:
            out.append((column.strip(), []))
            token = first
        elif _BUCKET.match(token) and out and out[-1][1]:
            pass
        else:
            out.append((token, []))
            continue
        m = _BUCKET.match(token.strip())
        if not m or not out[-1][0]:
            raise ConfigError("--by", [f"{token!r}: expected COLUMN or COLUMN:LO-HI,LO-HI,LO- (e.g. age:0-30,30-60,60-)"])
        lo, hi = (float(m[1]) if m[1] else -np.inf), (float(m[2]) if m[2] else np.inf)
        if lo >= hi:
            raise ConfigError("--by", [f"{out[-1][0]}: bucket {token!r} is empty (low >= high)"])
        out[-1][1].append((lo, hi))
    if not out:
        raise ConfigError("--by", ["no column given"])
    return [GroupBy(col, tuple(b)) for col, b in out]


def check_columns(by: Sequence[GroupBy], columns: Sequence[str], data: Any) -> None:
    missing = [g.column for g in by if g.column not in columns]
    if missing:
        raise DatasetError(f"{data}: --by column(s) {missing} not in the data; its extra columns are: "
                           f"{', '.join(columns) or 'none'} (a builder manifest carries the sources' metadata)")


# ---------------------------------------------------------------- statistics


@dataclass
class Rows:
    """One stage's (or the end to end's) rows, aligned: truth, decision, and what the metrics need."""

    y: np.ndarray  # true class index
    pred: np.ndarray  # predicted class index (end to end: (abstained) is a class of its own)
    labels: list[str]  # class names whose recall/precision are reported
    accepted: np.ndarray  # bool: counted in coverage
    rejected: np.ndarray | None  # bool: OOD rejects (None: no OOD threshold)
    conf: np.ndarray  # confidence of the decision, for ECE
    score: np.ndarray | None  # (N,) score of labels[0] for a binary AUC, or None
    meta: list[Mapping[str, str]]


def statistics(r: Rows) -> dict[str, Callable[[np.ndarray], float | None]]:
    """Each metric of a group, as a function of an index array into its rows."""
    from hierarchy.metrics.classification import expected_calibration_error, roc_auc
    from hierarchy.evaluate.runner import N_BINS

    correct = r.pred == r.y

    def mean(x: np.ndarray) -> Callable[[np.ndarray], float | None]:
        return lambda i: float(x[i].mean()) if len(i) else None

    def recall(k: int) -> Callable[[np.ndarray], float | None]:
        return lambda i: float(correct[i][r.y[i] == k].mean()) if (r.y[i] == k).any() else None

    def precision(k: int) -> Callable[[np.ndarray], float | None]:
        return lambda i: float((r.y[i][r.pred[i] == k] == k).mean()) if (r.pred[i] == k).any() else None

    stats: dict[str, Callable[[np.ndarray], float | None]] = {"accuracy": mean(correct), "coverage": mean(r.accepted)}
    if r.rejected is not None:
        stats["ood_rejected"] = mean(r.rejected)
    if r.score is not None:
        stats["auc"] = lambda i: roc_auc(r.y[i] == 0, r.score[i]) if len(i) else None
    stats["ece"] = lambda i: expected_calibration_error(r.conf[i], correct[i], N_BINS) if len(i) else None
    for k, lab in enumerate(r.labels):
        stats[f"recall/{lab}"] = recall(k)
        stats[f"precision/{lab}"] = precision(k)
    return stats


def group_table(r: Rows, by: GroupBy, *, n_resamples: int, seed: int, level: float) -> dict[str, Any]:
    """Per group: n, small_n and every metric with its interval; plus the worst group per metric."""
    names = np.array([by.group(m.get(by.column, "")) for m in r.meta], dtype=object)
    groups: dict[str, Any] = {}
    for g in sorted(set(names.tolist()), key=_group_order):
        rows = np.flatnonzero(names == g)
        sub = _subset(r, rows)
        groups[g] = {"n": int(len(rows)), "small_n": bool(len(rows) < MIN_N),
                     "metrics": bootstrap_cis(len(rows), statistics(sub), n_resamples=n_resamples, seed=seed,
                                              level=level)}
    metrics = ["accuracy"] + [f"recall/{lab}" for lab in r.labels]
    return {"groups": groups, "worst": {m: worst_group(groups, r, names, m) for m in metrics}}


def _group_order(g: str) -> tuple:
    m = re.match(r"^(-?\d+(?:\.\d+)?)?-", g)
    return (g in (MISSING, OTHER), float(m[1]) if m and m[1] else -np.inf if m else np.inf, g)


def _subset(r: Rows, rows: np.ndarray) -> Rows:
    return Rows(r.y[rows], r.pred[rows], r.labels, r.accepted[rows],
                None if r.rejected is None else r.rejected[rows], r.conf[rows],
                None if r.score is None else r.score[rows], [r.meta[i] for i in rows])


def worst_group(groups: dict[str, Any], r: Rows, names: np.ndarray, metric: str) -> dict[str, Any] | None:
    """The group with the lowest ``metric`` (among groups of n >= MIN_N when any), with the same
    metric on all other rows pooled and whether the group's interval lies below it."""
    have = {g: v for g, v in groups.items() if v["metrics"][metric]["value"] is not None}
    big = {g: v for g, v in have.items() if not v["small_n"]}
    pool = big or have
    if len(pool) < 2 or len({v["metrics"][metric]["value"] for v in pool.values()}) < 2:
        return None  # one group, or all equal: no group is worse
    g = min(pool, key=lambda k: pool[k]["metrics"][metric]["value"])
    m = pool[g]["metrics"][metric]
    others = np.flatnonzero(names != g)
    rest = statistics(_subset(r, others))[metric](np.arange(len(others)))
    return {"group": g, "value": m["value"], "ci": m["ci"], "n": pool[g]["n"], "small_n": pool[g]["small_n"],
            "others": rest, "ci_below_others": bool(m["ci"] is not None and rest is not None and m["ci"][1] < rest)}


# ---------------------------------------------------------------- rows from the evaluation


def stage_rows(st: "LoadedStage", acc: Any) -> Rows:
    from hierarchy.evaluate.summary import _stack, accepted_mask
    from hierarchy.metrics.decisions import decide_labels

    labels = list(st.predictor.labels)
    y = np.asarray(acc.y, dtype=np.int64)
    probs = np.clip(_stack(acc.probs, len(labels)), 0.0, 1.0)
    pred, forced = decide_labels(probs, labels, st.decide)
    conf = probs[np.arange(len(pred)), pred]
    ood = _stack(acc.ood, 1)
    ood = None if ood is None else ood.reshape(-1)
    rejected = None if st.ood_threshold is None or ood is None else ood > st.ood_threshold
    return Rows(y, pred, labels, accepted_mask(st, conf, ood, forced), rejected, conf,
                probs[:, 0] if len(labels) == 2 else None, list(acc.meta))


def end_to_end_rows(items: list[dict], hier: "Hierarchy") -> Rows:
    from hierarchy.evaluate.runner import ABSTAINED
    from hierarchy.evaluate.summary import _e2e_labels, _e2e_row

    kept = [it for it in items if it["truth"].path and it["record"]["status"] != "error"]
    rows = [_e2e_row(it) for it in kept]
    labels = _e2e_labels(hier, rows)
    idx = {lab: i for i, lab in enumerate(labels)}
    status = np.array([it["record"]["status"] for it in kept], dtype=object)
    return Rows(np.array([idx[r["truth"][-1]] for r in rows], dtype=np.int64),
                np.array([idx[r["label"]] for r in rows], dtype=np.int64),
                [lab for lab in labels if lab != ABSTAINED], np.array([r["answered"] for r in rows], dtype=bool),
                status == "rejected", np.clip(np.array([r["score"] for r in rows], dtype=np.float64), 0.0, 1.0),
                None, [it["truth"].meta for it in kept])


def subgroup_report(router: "Router", hier: "Hierarchy", col: "_Collector", by: Sequence[GroupBy], *,
                    n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = DEFAULT_LEVEL) -> dict:
    """``report["subgroups"]``: for each --by column, every stage's table and the end-to-end one."""
    opts = {"n_resamples": n_resamples, "seed": seed, "level": level}
    columns: dict[str, Any] = {}
    for g in by:
        stages = {sid: group_table(stage_rows(router.stages[sid], col.stages[sid]), g, **opts) for sid in hier.order}
        columns[g.column] = {"buckets": [_bucket_name(lo, hi) for lo, hi in g.buckets] or None, "stages": stages,
                             "end_to_end": group_table(end_to_end_rows(col.items, hier), g, **opts)}
    warnings = [f"{c}={name}: n={v['n']} < {MIN_N} at {where}; its intervals are wide"
                for c, block in columns.items() for where, t in _tables(block) for name, v in t["groups"].items()
                if v["small_n"]]
    return {"settings": {**opts, "method": "percentile bootstrap (scipy's resampling), resamples shared by all "
                         "metrics of a group", "min_n": MIN_N}, "columns": columns, "warnings": warnings}


def _tables(block: dict) -> list[tuple[str, dict]]:
    return [(f"stage {sid}", t) for sid, t in block["stages"].items()] + [("end to end", block["end_to_end"])]
