"""Model cards: ``hierarchy card RUN_DIR|PIPELINE`` writes ``MODEL_CARD.md`` (and, for a run, the same
fields under ``card`` in ``metadata.json``; for a pipeline, ``MODEL_CARD.json`` beside the YAML).

A card says what the model is for and not for (editable: ``--intended-use`` / ``--out-of-scope`` /
``--limitation``, kept on regeneration; default: not a diagnosis), what it was trained on (sources,
counts per label and split, the manifest's sha256), the recipe, its metrics on val and in every
evaluation report found or given (``report.json`` under the run directory or ``--report``), subgroup
results, OOD behaviour, limitations, versions and hashes. Everything comes from files already on
disk; nothing is re-computed, so a card is cheap and ``hierarchy train`` writes one at the end.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from hierarchy.core.errors import HierarchyError
from hierarchy.core.fsutil import atomic_write_json, atomic_write_text, sha256_file
from hierarchy.engine.card_md import render_card
from hierarchy.models.metadata import read_metadata, resolve_checkpoint, update_metadata

CARD_FILE = "MODEL_CARD.md"
PIPELINE_CARD_JSON = "MODEL_CARD.json"
INTENDED_USE = ("Research and decision support: ranking or triaging images for review by a qualified person. "
                "The output is NOT a diagnosis and must not be used as one.")
OUT_OF_SCOPE = ("Diagnosis or treatment decisions without a clinician; populations, devices, body sites or image "
                "types unlike the training data; use without re-validation on local data.")
LIMITATIONS = ("Metrics hold only for data like the evaluation data; subgroups with few images have wide intervals.",
               "Confidence thresholds and decision thresholds were tuned on one calibration set.",
               "Out-of-distribution rejection catches unlike images, not every failure.")
EDITABLE = ("intended_use", "out_of_scope", "limitations")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _editable(previous: dict[str, Any] | None, edits: dict[str, Any]) -> dict[str, Any]:
    prev = previous or {}
    defaults = {"intended_use": INTENDED_USE, "out_of_scope": OUT_OF_SCOPE, "limitations": list(LIMITATIONS)}
    return {k: edits.get(k) or prev.get(k) or defaults[k] for k in EDITABLE}


def _reports(paths: Sequence[Path]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        rep = _read_json(p / "report.json" if p.is_dir() else p)
        if rep and rep.get("format") == "hierarchy.evaluation":
            out.append(_report_summary(rep, p))
    return out


def _report_summary(rep: dict[str, Any], path: Path) -> dict[str, Any]:
    e2e = rep.get("end_to_end") or {}
    stages = {sid: {"n": s.get("n"), "accuracy": s.get("accuracy"), "roc_auc": s.get("roc_auc"),
                    "ece": (s.get("calibration") or {}).get("ece_after"),
                    "coverage": (s.get("selective") or {}).get("coverage"),
                    "recall": {lab: c.get("recall") for lab, c in (s.get("per_class") or {}).items()}}
              for sid, s in (rep.get("stages") or {}).items()}
    subgroups = {col: {"worst": (b.get("end_to_end") or {}).get("worst", {}).get("accuracy"),
                       "groups": {g: {"n": v["n"], "small_n": v["small_n"], "accuracy": v["metrics"]["accuracy"]}
                                  for g, v in (b.get("end_to_end") or {}).get("groups", {}).items()}}
                 for col, b in ((rep.get("subgroups") or {}).get("columns") or {}).items()}
    ood = rep.get("ood")
    return {"path": str(path), "data": rep.get("data", {}).get("path"), "split": rep.get("data", {}).get("split"),
            "n": e2e.get("n"), "accuracy": e2e.get("accuracy"), "coverage": (e2e.get("selective") or {}).get("coverage"),
            "stages": stages, "subgroups": subgroups,
            "ood": None if not ood else {k: v for k, v in ood.items() if isinstance(v, (int, float, str))}}


def run_card(run_dir: Path, *, reports: Sequence[Path] = (), edits: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card of one training run (stage checkpoint), from its metadata, dataset.json and reports."""
    from hierarchy import __version__

    weights, meta_path = resolve_checkpoint(run_dir)
    meta = read_metadata(meta_path)
    extra = meta.model_extra or {}
    ds = meta.dataset or {}
    dataset_json = _read_json(Path(ds["path"]) / "dataset.json") if ds.get("path") else None
    found = sorted(meta_path.parent.rglob("report.json")) + [Path(p) for p in reports]
    return {
        "format": "hierarchy.model_card", "kind": "run", "name": meta.stage, "labels": list(meta.labels),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "created_by": f"hierarchy {__version__}",
        **_editable(extra.get("card"), edits or {}),
        "training_data": {"path": ds.get("path"), "manifest_sha256": ds.get("manifest_sha256"),
                          "sources": [s.get("type") for s in ((dataset_json or {}).get("config") or {}).get("sources", [])],
                          "counts": ((dataset_json or {}).get("counts") or {}).get("by_split")},
        "recipe": {"arch": meta.arch, "preset": meta.preset, "train": extra.get("train")},
        "validation": {"best": meta.best, "temperature": meta.temperature, "calibration": extra.get("calibration"),
                       "threshold": meta.threshold, "decide": extra.get("decide")},
        "evaluations": _reports(found),
        "ood": meta.ood and {**{k: v for k, v in meta.ood.items() if isinstance(v, (int, float, str, bool))},
                             "tune": _ood_tune(meta.ood)},
        "versions": meta.versions, "hashes": {"weights_sha256": sha256_file(weights)},
    }


def _ood_tune(ood: dict[str, Any]) -> dict[str, Any]:
    """How the OOD threshold was tuned and what it kept, for the card (the per-class offsets stay in metadata)."""
    tune = ood.get("tune") or {}
    return {"views": tune.get("views"), "kept": tune.get("kept"), "kept_plain_val": tune.get("kept_plain_val"),
            "per_class": bool(ood.get("per_class"))}


def pipeline_card(pipe: Any, source: Path, *, reports: Sequence[Path] = (),
                  edits: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card of a pipeline: its stages' cards (for stages with a checkpoint) and the reports given."""
    from hierarchy import __version__

    stages = {}
    for sid in pipe.depth_order():
        node, weights = pipe.stages[sid], pipe.weights_path(sid)
        try:
            stages[sid] = {"stage": node.stage, "threshold": node.threshold, "decide": node.decide, "ood": node.ood,
                           "routes": node.routes, **({"card": run_card(weights)} if weights is not None else {})}
        except HierarchyError as exc:
            stages[sid] = {"stage": node.stage, "error": str(exc)}
    previous = _read_json(source.parent / PIPELINE_CARD_JSON)
    return {"format": "hierarchy.model_card", "kind": "pipeline", "name": pipe.name, "description": pipe.description,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "created_by": f"hierarchy {__version__}", **_editable(previous, edits or {}),
            "root": pipe.root, "order": pipe.depth_order(), "stages": stages,
            "evaluations": _reports([Path(p) for p in reports]),
            "hashes": {"pipeline_sha256": sha256_file(source)}}


def write_run_card(run_dir: Path, **kw: Any) -> Path:
    """MODEL_CARD.md in the run directory and ``card`` in its metadata.json; returns the card's path."""
    card = run_card(run_dir, **kw)
    _, meta_path = resolve_checkpoint(run_dir)
    update_metadata(meta_path, card=card)
    atomic_write_text(meta_path.parent / CARD_FILE, render_card(card))
    return meta_path.parent / CARD_FILE


def write_pipeline_card(pipe: Any, source: Path, out: Path | None = None, **kw: Any) -> Path:
    card = pipeline_card(pipe, source, **kw)
    folder = Path(out) if out else source.parent
    atomic_write_json(folder / PIPELINE_CARD_JSON, card)
    atomic_write_text(folder / CARD_FILE, render_card(card))
    return folder / CARD_FILE
