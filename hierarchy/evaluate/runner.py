"""Evaluating a pipeline on labelled data: per-stage and end-to-end metrics, calibration, abstention.

Truth semantics (see docs/evaluation.md):

* a sample's ``label`` is its DEEPEST true label. The stage owning it is the one reachable stage
  whose labels include it; the truth of each stage above is derived by walking the pipeline's
  routes backwards (``mel`` -> gate: skin, benign_vs_malignant: malignant, lesion_type: mel).
  This is unique when each label belongs to one stage and one (stage, label) routes into each stage;
* CSV columns named after stage ids give explicit per-stage truth and override the derivation
  (a blank cell = not applicable to that stage).

Per-stage metrics use every item with truth at the stage (as if upstream had routed it correctly),
without thresholds; the ``selective`` block then applies the stage's threshold. End-to-end metrics
come from the real router, thresholds on.
"""
from __future__ import annotations

import csv
import dataclasses
import inspect
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from hierarchy.core.errors import DatasetError, LabelMismatchError
from hierarchy.engine.pipeline import STOP, Pipeline

if TYPE_CHECKING:
    from hierarchy.data.batches import Decoded
    from hierarchy.data.labelled import Sample
    from hierarchy.engine.router import Router

ABSTAINED = "(abstained)"
N_BINS = 15
SPLIT_ALL = "all"
_KNOWN_COLUMNS = ("path", "label", "split", "source", "group")


# ---------------------------------------------------------------- data


def data_layout(data: Path) -> str:
    if data.is_file():
        return "manifest" if data.name == "manifest.csv" else "csv"
    if (data / "manifest.csv").is_file():
        return "manifest"
    return "split_tree" if any((data / s).is_dir() for s in ("train", "val", "test")) else "image_folder"


def select_samples(data: Path, split: str | None = None,
                   labels: Sequence[str] | None = None) -> tuple[list["Sample"], dict[str, Any]]:
    """Samples to evaluate: ``split`` None = ``val`` when the data has splits, else all; ``all`` = all."""
    from hierarchy.data.labelled import load_samples

    data = Path(data)
    everything = load_samples(data, None, labels)
    has_splits = any(s.split for s in everything)
    chosen = split or ("val" if has_splits else SPLIT_ALL)
    if chosen != SPLIT_ALL and not has_splits:
        raise DatasetError(f"{data}: has no train/val/test split; use --split all (or omit --split)")
    samples = everything if chosen == SPLIT_ALL else [s for s in everything if s.split == chosen]
    if not samples:
        raise DatasetError(f"{data}: no labelled images{'' if chosen == SPLIT_ALL else f' in split {chosen!r}'}")
    info = {"path": str(data), "layout": data_layout(data), "split": chosen, "n_samples": len(samples),
            "label_counts": dict(Counter(s.label for s in samples))}
    return samples, info


def extra_columns(data: Path) -> list[str]:
    """Names of a CSV's truth columns, in the order of ``Sample.extra_labels``."""
    file = data / "manifest.csv" if data.is_dir() else data
    if not file.is_file():
        return []
    with open(file, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        names = [h.strip() for h in next(csv.reader(f), [])]
    others = [n for n in names if n not in _KNOWN_COLUMNS]
    return others if "label" in names else others[1:]  # without 'label', the first other column is it


# ---------------------------------------------------------------- truth


@dataclass
class Truth:
    stages: dict[str, str]  # stage id -> true label at that stage
    path: list[tuple[str, str]]  # (stage id, label) from the root, following the true labels' routes
    meta: dict[str, str] = field(default_factory=dict)  # the sample's other columns (sex, age...): `--by`


@dataclass
class Hierarchy:
    """The pipeline as a label tree: each stage's labels and where each label routes."""

    root: str
    order: list[str]
    labels: dict[str, list[str]]
    routes: dict[str, dict[str, str]]

    @classmethod
    def from_pipeline(cls, pipe: Pipeline, labels: Mapping[str, Sequence[str]]) -> "Hierarchy":
        order = pipe.depth_order()
        routes = {sid: {lab: pipe.route(sid, lab) for lab in labels[sid]} for sid in order}
        return cls(pipe.root, order, {sid: list(labels[sid]) for sid in order}, routes)

    def parents(self, sid: str) -> list[tuple[str, str]]:
        return [(p, lab) for p in self.order for lab, target in self.routes[p].items() if target == sid]

    def owner(self, label: str, explicit: Mapping[str, str]) -> str:
        owners = [sid for sid in self.order if label in self.labels[sid]]
        if len(owners) > 1:  # an explicit column can say which stage the label belongs to
            owners = [sid for sid in owners if explicit.get(sid) == label] or owners
        if not owners:
            raise ValueError(f"label {label!r} is not a label of any stage "
                             f"(labels: {', '.join(lab for sid in self.order for lab in self.labels[sid])})")
        if len(owners) > 1:
            raise ValueError(f"label {label!r} belongs to stages {owners}; add a column named after the "
                             "right stage id holding it")
        return owners[0]

    def derive(self, label: str, explicit: Mapping[str, str], warnings: set[str] | None = None) -> Truth:
        """Per-stage truth for a deepest ``label`` plus explicit per-stage columns ('' = not applicable)."""
        sid = self.owner(label, explicit)
        stages = {sid: label}
        while len(parents := self.parents(sid)) == 1:
            sid, lab = parents[0]
            stages[sid] = lab
        if len(parents) > 1 and warnings is not None:
            warnings.add(f"truth above stage '{sid}' is ambiguous ({len(parents)} routes lead to it: "
                         f"{', '.join(f'{p}:{lab}' for p, lab in parents)}); give it in stage-id columns")
        for col, value in explicit.items():
            if value:
                stages[col] = value
            else:
                stages.pop(col, None)
        return Truth(stages, self.path(stages))

    def path(self, stages: Mapping[str, str]) -> list[tuple[str, str]]:
        out, sid = [], self.root
        while sid != STOP and sid in stages and len(out) <= len(self.order):
            out.append((sid, stages[sid]))
            sid = self.routes[sid].get(stages[sid], STOP)
        return out


def stage_labels(pipe: Pipeline) -> dict[str, tuple[str, ...]]:
    """Labels of every reachable stage, from the registered stage classes (no weights needed)."""
    from hierarchy.registry import get_stage

    return {sid: tuple(get_stage(pipe.stages[sid].stage).labels) for sid in pipe.depth_order()}


def assign_truth(samples: Sequence["Sample"], hier: Hierarchy, columns: Sequence[str]) -> tuple[list[Truth], dict]:
    """Truth for every sample; raises DatasetError listing unknown/ambiguous labels and bad cells."""
    used = [c for c in columns if c in hier.labels]
    problems: dict[str, None] = {}
    warnings: set[str] = set()
    truths = []
    for s in samples:
        explicit = {c: v for c, v in zip(columns, s.extra_labels) if c in hier.labels}
        for col, value in explicit.items():
            if value and value not in hier.labels[col]:
                problems[f"column {col!r}: {value!r} is not a label of that stage ({', '.join(hier.labels[col])})"] = None
        try:
            truths.append(hier.derive(s.label, explicit, warnings))
        except ValueError as exc:
            problems[str(exc)] = None
    if problems:
        listed = list(problems)
        raise LabelMismatchError("evaluation data does not match the pipeline:\n  " + "\n  ".join(listed[:10])
                           + (f"\n  ... and {len(listed) - 10} more" if len(listed) > 10 else ""))
    info = {"explicit_columns": used, "ignored_columns": [c for c in columns if c not in hier.labels],
            "warnings": sorted(warnings), "per_stage": dict(Counter(sid for t in truths for sid in t.stages)),
            "n_without_root_truth": sum(1 for t in truths if not t.path)}
    return truths, info


# ---------------------------------------------------------------- running


def _predict(predictor: Any, batch: Any) -> Any:
    if "return_logits" in inspect.signature(predictor.predict).parameters:
        return predictor.predict(batch, return_logits=True)
    return predictor.predict(batch)


@dataclass
class _StageData:
    y: list[int] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    logits: list[np.ndarray | None] = field(default_factory=list)
    ood: list[np.ndarray | None] = field(default_factory=list)
    meta: list[dict[str, str]] = field(default_factory=list)


class _Collector:
    """Routes decoded chunks (thresholds on and off) and runs each stage on the items true to it."""

    def __init__(self, router: "Router", hier: Hierarchy, batch_size: int):
        from hierarchy.engine.router import Router

        self.router, self.hier, self.batch_size = router, hier, batch_size
        open_stages = {sid: dataclasses.replace(st, threshold=None, ood_threshold=None) for sid, st in router.stages.items()}
        self.open_router = Router(router.pipeline, open_stages)
        self.stages = {sid: _StageData() for sid in hier.order}
        self.items: list[dict[str, Any]] = []
        self.decode_errors: list[dict[str, str]] = []

    def add(self, truths: Sequence[Truth], decoded: Sequence["Decoded"]) -> None:
        ok = []
        for t, d in zip(truths, decoded):
            if d.error is None:
                ok.append((t, d))
            else:
                self.decode_errors.append({"path": str(d.path), "type": getattr(d.error, "type", "error"),
                                           "message": getattr(d.error, "message", str(d.error))})
        if not ok:
            return
        items = [d for _, d in ok]
        recs = self.router.route(items, self.batch_size)
        opens = self.open_router.route(items, self.batch_size)
        for (t, d), rec, open_rec in zip(ok, recs, opens):
            self.items.append({"path": str(d.path), "truth": t, "record": rec, "open": open_rec})
        for sid in self.hier.order:
            self._stage_pass(sid, [(t, d) for t, d in ok if sid in t.stages])

    def _stage_pass(self, sid: str, pairs: list[tuple[Truth, "Decoded"]]) -> None:
        from hierarchy.engine.router import make_batch

        predictor = self.router.stages[sid].predictor
        index = {lab: i for i, lab in enumerate(predictor.labels)}
        acc = self.stages[sid]
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            pred = _predict(predictor, make_batch([d.array(predictor.preset) for _, d in chunk], predictor))
            acc.y += [index[t.stages[sid]] for t, _ in chunk]
            acc.meta += [t.meta for t, _ in chunk]
            acc.probs.append(np.asarray(pred.probs, dtype=np.float64))
            acc.logits.append(None if pred.logits is None else np.asarray(pred.logits, dtype=np.float64))
            acc.ood.append(None if pred.ood is None else np.asarray(pred.ood, dtype=np.float64))


# ---------------------------------------------------------------- entry point


def _group_specs(by: Sequence[str], columns: list[str], data: Path, truths: list[Truth],
                 samples: Sequence["Sample"]) -> list[Any]:
    """Parse and check ``--by`` against the data's columns; attach each sample's columns to its truth."""
    if not by:
        return []
    from hierarchy.evaluate.subgroups import check_columns, parse_by

    groups = parse_by(by)
    check_columns(groups, columns, data)
    for t, s in zip(truths, samples):
        t.meta = dict(zip(columns, s.extra_labels))
    return groups


@dataclass
class Evaluation:
    report: dict[str, Any]
    items: list[dict[str, Any]]  # one per decoded item: path, truth, prediction (records.jsonl)


def evaluate(pipe: Pipeline, data: Path, *, split: str | None = None, batch_size: int | None = None,
             device: str = "auto", precision: str = "auto", engine: str = "auto", workers: int | None = None,
             progress: bool = True, router: "Router | None" = None, ood: Path | None = None, by: Sequence[str] = (),
             n_resamples: int = 1000, seed: int = 0) -> Evaluation:
    """Run ``pipe`` over labelled ``data`` and compute the full report (nothing is written).
    ``ood``: a folder of known out-of-distribution images, reported under ``report["ood"]``;
    ``by``: ``--by`` specs (``["sex", "age:0-30,30-60,60-"]``): subgroup results under ``report["subgroups"]``
    with ``n_resamples`` bootstrap resamples drawn from ``seed``."""
    from tqdm import tqdm

    from hierarchy.data.batches import decode_batches
    from hierarchy.evaluate.summary import build_report
    from hierarchy.engine.router import Router
    from hierarchy.engine.tune import router_batch_size

    start = time.perf_counter()
    data = Path(data)
    samples, data_info = select_samples(data, split)
    hier = Hierarchy.from_pipeline(pipe, stage_labels(pipe))
    columns = extra_columns(data)
    truths, truth_info = assign_truth(samples, hier, columns)  # before any weights load
    groups = _group_specs(by, columns, data, truths, samples)
    router = router or Router.from_pipeline(pipe, device=device, precision=precision, engine=engine)
    batch_size = router_batch_size(router, batch_size)
    collector = _Collector(router, hier, batch_size)
    chunk = max(batch_size, 64)
    with tqdm(total=len(samples), desc="evaluate", unit="img", file=sys.stderr,
              disable=None if progress else True, mininterval=0.5) as bar:
        for k, decoded in enumerate(decode_batches([s.path for s in samples], router.decode, chunk, workers)):
            collector.add(truths[k * chunk:k * chunk + len(decoded)], decoded)
            bar.update(len(decoded))
    settings = {"batch_size": batch_size, "device": device, "precision": precision, "n_bins": N_BINS,
                "engines": {sid: getattr(st.predictor, "engine", "custom") for sid, st in router.stages.items()}}
    report = build_report(pipe, router, hier, collector, data_info, truth_info, settings)
    if groups:
        from hierarchy.evaluate.subgroups import subgroup_report

        report["subgroups"] = subgroup_report(router, hier, collector, groups, n_resamples=n_resamples, seed=seed)
    if ood is not None:
        from hierarchy.evaluate.ood import evaluate_ood

        report["ood"] = evaluate_ood(router, collector, Path(ood), batch_size, workers)
    report["seconds"] = round(time.perf_counter() - start, 3)
    return Evaluation(report, collector.items)
