"""Re-calibrating a trained stage on labelled data: temperature scaling and the abstention threshold.

``hierarchy calibrate RUN_DIR --data DATA`` predicts DATA once (raw logits), refits the temperature
(unless asked not to), tunes the threshold to a target on the temperature-scaled probabilities and
rewrites the run's ``metadata.json`` atomically. ``threshold: auto`` in a pipeline then uses it.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from hierarchy.core.errors import ConfigError, HierarchyError
from hierarchy.engine.predictor import calibrated

if TYPE_CHECKING:
    from hierarchy.models.metadata import CheckpointMetadata
    from hierarchy.data.labelled import Sample
    from hierarchy.config.stage import Predictor

DEFAULT_TARGET = {"max_risk": 0.01}


@dataclass
class Scored:
    logits: np.ndarray  # (N, C) raw, before temperature
    y: np.ndarray  # (N,) label indices
    errors: list[dict[str, str]]  # images that could not be decoded
    views: np.ndarray | None = None  # (V * N, C) raw logits of V augmented views, each image's V views in a row


def predict_samples(predictor: "Predictor", samples: Sequence["Sample"], batch_size: int = 32,
                    workers: int | None = None, progress: bool = True, views: int = 0,
                    augment: Callable[[np.ndarray], np.ndarray] | None = None) -> Scored:
    """Raw logits for every decodable sample (decoded like ``hierarchy run`` does); with ``views`` and
    ``augment`` (uint8 (3, S, S) -> same) also the logits of ``views`` augmented copies of each."""
    from tqdm import tqdm

    from hierarchy.data.batches import decode_batches, decode_item

    index = {lab: i for i, lab in enumerate(predictor.labels)}
    preset = predictor.preset
    logits, seen, ys, errors = [], [], [], []
    batches = decode_batches([s.path for s in samples], lambda p: decode_item(p, [preset]), batch_size, workers)
    with tqdm(total=len(samples), desc="calibrate", unit="img", file=sys.stderr,
              disable=None if progress else True, mininterval=0.5) as bar:
        for k, items in enumerate(batches):
            chunk = samples[k * batch_size:k * batch_size + len(items)]
            good = [(s, d) for s, d in zip(chunk, items) if d.error is None]
            errors += [{"path": str(d.path), "type": getattr(d.error, "type", "error"),
                        "message": getattr(d.error, "message", str(d.error))} for d in items if d.error is not None]
            if good:
                arrays = [d.array(preset) for _, d in good]
                logits.append(_logits(predictor, arrays))
                if views and augment is not None:
                    seen.append(_logits(predictor, [augment(a) for a in arrays for _ in range(views)]))
                ys += [index[s.label] for s, _ in good]
            bar.update(len(items))
    width = len(predictor.labels)
    empty = np.zeros((0, width), np.float32)
    return Scored(np.concatenate(logits) if logits else empty, np.asarray(ys, np.int64), errors,
                  (np.concatenate(seen) if seen else empty) if views and augment is not None else None)


def _logits(predictor: "Predictor", arrays: list[np.ndarray]) -> np.ndarray:
    from hierarchy.engine.router import make_batch

    return np.asarray(predictor.predict(make_batch(arrays, predictor), return_logits=True).logits, dtype=np.float32)


def view_augment(meta: "CheckpointMetadata") -> Callable[[np.ndarray], np.ndarray]:
    """The run's own training augmentation (``train.hflip`` and ``train.augment`` from metadata.json)
    as a uint8 (3, S, S) numpy function, as ``train.calibration_views`` applies it to val."""
    import torch

    from hierarchy.config.train import TrainConfig
    from hierarchy.train.augment import Augment

    stored = (getattr(meta, "train", None) or {})
    cfg = TrainConfig(**{k: stored[k] for k in ("hflip", "augment") if k in stored})
    recipe = Augment(cfg.hflip, cfg.augment)
    return lambda a: recipe(torch.from_numpy(np.ascontiguousarray(a))).contiguous().numpy()


def run_views(meta: "CheckpointMetadata") -> int:
    """The number of views the run was trained to fit its temperature on (``train.calibration_views``), else 0."""
    value = (getattr(meta, "train", None) or {}).get("calibration_views")
    return value if isinstance(value, int) and value > 0 else 0


def default_target(meta: "CheckpointMetadata") -> dict[str, Any]:
    """The stored threshold's target, else the run's ``train.threshold_target``, else max_risk 0.01."""
    stored = (meta.threshold or {}).get("target")
    train = (getattr(meta, "train", None) or {}).get("threshold_target")
    return dict(stored or train or DEFAULT_TARGET)


def _state(scored: Scored, temperature: float, threshold: float | None) -> dict[str, Any]:
    from hierarchy.metrics.classification import expected_calibration_error, nll, selective_summary

    p = calibrated(scored.logits, temperature).astype(np.float64)
    conf, ok = np.clip(p.max(axis=1), 0.0, 1.0), p.argmax(axis=1) == scored.y
    sel = selective_summary(conf, ok, conf >= threshold if threshold is not None else np.ones(len(ok), bool))
    acc = sel["accuracy_accepted"]
    return {"temperature": float(temperature), "ece": expected_calibration_error(conf, ok, 15),
            "nll": nll(scored.logits, scored.y, temperature), "accuracy": float(ok.mean()), "threshold": threshold,
            "coverage": sel["coverage"], "risk": None if acc is None else 1.0 - acc}


def run_floor(meta: "CheckpointMetadata") -> float:
    """The temperature floor the run was trained with (``train.temperature_floor``), else 0.5."""
    recorded = (meta.model_dump(mode="json").get("calibration") or {}).get("floor")
    return float(recorded) if isinstance(recorded, (int, float)) and 0 < recorded <= 1 else 0.5


def calibrate_run(run_dir: Path, data: Path, *, split: str | None = None, target: dict | None = None,
                  refit_temperature: bool = True, device: str = "auto", precision: str = "auto",
                  engine: str = "auto", batch_size: int = 32, workers: int | None = None,
                  progress: bool = True, target_recall: Sequence[str] = (), views: int | None = None) -> dict[str, Any]:
    """Refit temperature and threshold of the run on ``data``; with ``target_recall`` (``["mel=0.95"]``)
    also tune per-label decision thresholds (``decide: auto``); update metadata.json; return a summary.
    ``views`` (None: the run's ``train.calibration_views``) fits the temperature on that many views of
    each image through the run's training augmentation; the threshold is always tuned on ``data`` as is."""
    from hierarchy.registry import get_stage

    from hierarchy.engine.router import load_stage_predictor
    from hierarchy.evaluate.runner import select_samples
    from hierarchy.models.metadata import read_metadata, resolve_checkpoint, update_metadata
    from hierarchy.metrics.decisions import parse_recall_targets, tune_decide
    from hierarchy.metrics.thresholds import check_target, tune_threshold
    from hierarchy.train.report import calibration

    _, meta_path = resolve_checkpoint(run_dir)
    meta = read_metadata(meta_path)
    labels = list(meta.labels)
    target = dict(target or default_target(meta))
    try:
        check_target(target, labels)
        recall_targets = parse_recall_targets(target_recall, labels)
    except ValueError as exc:
        raise ConfigError("threshold target", [str(exc)]) from None
    samples, info = select_samples(Path(data), split, labels=labels)
    predictor = load_stage_predictor(meta.stage, get_stage(meta.stage)(), meta_path.parent, device, precision, engine)
    if "return_logits" not in inspect.signature(predictor.predict).parameters:
        raise HierarchyError(f"stage '{meta.stage}': its predictor does not return logits; calibrate needs them")
    views = (run_views(meta) if views is None else views) if refit_temperature else 0
    scored = _score(predictor, samples, meta, batch_size, workers, progress, views)
    if len(scored.y) == 0:
        raise HierarchyError(f"{data}: none of the {len(samples)} image(s) could be decoded")
    fit_on, fit_y = (scored.views, np.repeat(scored.y, views)) if views else (scored.logits, scored.y)
    cal = calibration(fit_on, fit_y, run_floor(meta)) if refit_temperature else None
    new_t = cal["temperature"] if cal else meta.temperature
    tuned = tune_threshold(calibrated(scored.logits, new_t), scored.y, target, labels)
    fields: dict[str, Any] = {"threshold": {**tuned, "data": str(data), "split": info["split"]}}
    if recall_targets:
        fields["decide"] = {**tune_decide(calibrated(scored.logits, new_t), scored.y, labels, recall_targets),
                            "data": str(data), "split": info["split"]}
    if cal:
        fields.update(temperature=cal["temperature"], calibration={
            "method": "temperature", "split": info["split"], "data": str(data), "views": views, **cal})
    before = _state(scored, meta.temperature, (meta.threshold or {}).get("threshold"))
    update_metadata(meta_path, **fields)
    return {"run": str(meta_path.parent), "metadata": str(meta_path), "data": info, "n": int(len(scored.y)),
            "decode_errors": scored.errors, "refit_temperature": refit_temperature, "views": views, "target": target,
            "threshold": fields["threshold"], "decide": fields.get("decide"), "before": before, "after": _state(scored, new_t, tuned["threshold"])}


def _score(predictor: "Predictor", samples: Sequence["Sample"], meta: "CheckpointMetadata", batch_size: int,
           workers: int | None, progress: bool, views: int) -> Scored:
    """predict_samples with the run's augmentation; the views come from a torch generator seeded by the
    run's ``train.seed``, so the same run and data give the same temperature (the caller's RNG is untouched)."""
    import torch

    if not views:
        return predict_samples(predictor, samples, batch_size, workers, progress)
    seed = (getattr(meta, "train", None) or {}).get("seed", 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed if isinstance(seed, int) else 0)
        return predict_samples(predictor, samples, batch_size, workers, progress, views, view_augment(meta))


def render(summary: dict[str, Any]) -> str:
    """Before/after table for stdout."""
    b, a = summary["before"], summary["after"]
    d = summary["data"]
    rows = [("temperature", "temperature", 4), ("ECE (15 bins)", "ece", 4), ("NLL", "nll", 4),
            ("accuracy", "accuracy", 3), ("threshold", "threshold", 4), ("coverage", "coverage", 3), ("risk", "risk", 3)]

    def f(x: Any, nd: int) -> str:
        return "-" if x is None else f"{x:.{nd}f}"

    lines = [f"calibrated {summary['run']} on {d['path']} (split {d['split']}): n={summary['n']}, "
             f"{len(summary['decode_errors'])} decode error(s)", f"{'':<15}{'before':>10}{'after':>10}"]
    lines += [f"{name:<15}{f(b[key], nd):>10}{f(a[key], nd):>10}" for name, key, nd in rows]
    t = summary["threshold"]
    achieved = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in t["achieved"].items())
    lines.append(f"target {summary['target']}: {'met' if t['met'] else 'NOT met'} ({achieved})"
                 + (f" - {t['reason']}" if not t["met"] else ""))
    if summary.get("decide"):
        d = summary["decide"]
        lines.append(f"decide: {'met' if d['met'] else 'NOT met'} - " + "; ".join(
            f"{lab} >= {t:.4f}: recall {d['achieved'][lab]['recall']:.3f} (target {d['target']['recall'][lab]}), "
            f"precision {d['achieved'][lab]['precision']:.3f}" for lab, t in d["thresholds"].items())
            + " (use `decide: auto` in the pipeline)")
    if not summary["refit_temperature"]:
        lines.append("temperature kept (--no-temperature)")
    elif summary.get("views"):
        lines.append(f"temperature fitted on {summary['views']} augmented view(s) of each image "
                     f"({summary['views'] * summary['n']} in all); threshold tuned on the images as is")
    lines.append(f"updated {summary['metadata']}")
    return "\n".join(lines)
