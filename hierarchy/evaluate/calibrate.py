"""Re-calibrating a trained stage on labelled data: temperature scaling and the abstention threshold.

``hierarchy calibrate RUN_DIR --data DATA`` predicts DATA once (raw logits), refits the temperature
(unless asked not to), tunes the threshold to a target on the temperature-scaled probabilities and
rewrites the run's ``metadata.json`` atomically. ``threshold: auto`` in a pipeline then uses it.
"""
from __future__ import annotations

import inspect
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hierarchy.core.errors import ConfigError, HierarchyError

if TYPE_CHECKING:
    from hierarchy.models.checkpoint import CheckpointMetadata
    from hierarchy.data.labelled import Sample
    from hierarchy.config.stage import Predictor

DEFAULT_TARGET = {"max_risk": 0.01}


@dataclass
class Scored:
    logits: np.ndarray  # (N, C) raw, before temperature
    y: np.ndarray  # (N,) label indices
    errors: list[dict[str, str]]  # images that could not be decoded


def _load(path: Path, size: int) -> Any:
    """(3, size, size) uint8 through the same decoder as ``hierarchy run``, or the typed error."""
    from hierarchy.data.decode import decode_uint8
    from hierarchy.core.errors import ImageError

    try:
        return decode_uint8(path, [size])[size]
    except ImageError as exc:
        return exc


def predict_samples(predictor: "Predictor", samples: Sequence["Sample"], batch_size: int = 32,
                    workers: int | None = None, progress: bool = True) -> Scored:
    """Raw logits for every decodable sample (decoded like ``hierarchy run`` does)."""
    import torch
    from tqdm import tqdm

    from hierarchy.engine.router import default_workers

    index = {lab: i for i, lab in enumerate(predictor.labels)}
    preset = predictor.preset
    logits, ys, errors = [], [], []
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool, \
            tqdm(total=len(samples), desc="calibrate", unit="img", file=sys.stderr,
                 disable=None if progress else True, mininterval=0.5) as bar:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            images = list(pool.map(lambda s: _load(s.path, preset.size), chunk))
            good = [(s, img) for s, img in zip(chunk, images) if not isinstance(img, Exception)]
            errors += [{"path": str(s.path), "type": img.type, "message": img.message}
                       for s, img in zip(chunk, images) if isinstance(img, Exception)]
            if good:
                pred = predictor.predict(torch.stack([x for _, x in good]), return_logits=True)
                logits.append(np.asarray(pred.logits, dtype=np.float32))
                ys += [index[s.label] for s, _ in good]
            bar.update(len(chunk))
    width = len(predictor.labels)
    return Scored(np.concatenate(logits) if logits else np.zeros((0, width), np.float32), np.asarray(ys, np.int64), errors)


def scaled_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) computed exactly as TorchPredictor does (float32, torch), so a tuned
    threshold compares against the same numbers the router will see."""
    import torch

    return torch.softmax(torch.from_numpy(np.asarray(logits, np.float32)) / float(temperature), dim=1).numpy()


def default_target(meta: "CheckpointMetadata") -> dict[str, Any]:
    """The stored threshold's target, else the run's ``train.threshold_target``, else max_risk 0.01."""
    stored = (meta.threshold or {}).get("target")
    train = (getattr(meta, "train", None) or {}).get("threshold_target")
    return dict(stored or train or DEFAULT_TARGET)


def _state(scored: Scored, temperature: float, threshold: float | None) -> dict[str, Any]:
    from hierarchy.metrics.classification import expected_calibration_error, nll, selective_summary

    p = scaled_probs(scored.logits, temperature).astype(np.float64)
    conf, ok = np.clip(p.max(axis=1), 0.0, 1.0), p.argmax(axis=1) == scored.y
    sel = selective_summary(conf, ok, conf >= threshold if threshold is not None else np.ones(len(ok), bool))
    acc = sel["accuracy_accepted"]
    return {"temperature": float(temperature), "ece": expected_calibration_error(conf, ok, 15),
            "nll": nll(scored.logits, scored.y, temperature), "accuracy": float(ok.mean()), "threshold": threshold,
            "coverage": sel["coverage"], "risk": None if acc is None else 1.0 - acc}


def calibrate_run(run_dir: Path, data: Path, *, split: str | None = None, target: dict | None = None,
                  refit_temperature: bool = True, device: str = "auto", precision: str = "auto",
                  batch_size: int = 32, workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Refit temperature and threshold of the run on ``data``; update metadata.json; return a summary."""
    from registry import get_stage

    from hierarchy.models.checkpoint import read_metadata, resolve_checkpoint, update_metadata
    from hierarchy.evaluate.runner import select_samples
    from hierarchy.metrics.thresholds import check_target, tune_threshold
    from hierarchy.train.report import calibration

    _, meta_path = resolve_checkpoint(run_dir)
    meta = read_metadata(meta_path)
    labels = list(meta.labels)
    target = dict(target or default_target(meta))
    try:
        check_target(target, labels)
    except ValueError as exc:
        raise ConfigError("threshold target", [str(exc)]) from None
    samples, info = select_samples(Path(data), split, labels=labels)
    predictor = get_stage(meta.stage)().load_predictor(meta_path.parent, device=device, precision=precision)
    if "return_logits" not in inspect.signature(predictor.predict).parameters:
        raise HierarchyError(f"stage '{meta.stage}': its predictor does not return logits; calibrate needs them")
    scored = predict_samples(predictor, samples, batch_size, workers, progress)
    if len(scored.y) == 0:
        raise HierarchyError(f"{data}: none of the {len(samples)} image(s) could be decoded")
    cal = calibration(scored.logits, scored.y) if refit_temperature else None
    new_t = cal["temperature"] if cal else meta.temperature
    tuned = tune_threshold(scaled_probs(scored.logits, new_t), scored.y, target, labels)
    fields: dict[str, Any] = {"threshold": {**tuned, "data": str(data), "split": info["split"]}}
    if cal:
        fields.update(temperature=cal["temperature"], calibration={
            "method": "temperature", "split": info["split"], "data": str(data), **cal})
    before = _state(scored, meta.temperature, (meta.threshold or {}).get("threshold"))
    update_metadata(meta_path, **fields)
    return {"run": str(meta_path.parent), "metadata": str(meta_path), "data": info, "n": int(len(scored.y)),
            "decode_errors": scored.errors, "refit_temperature": refit_temperature, "target": target,
            "threshold": fields["threshold"], "before": before, "after": _state(scored, new_t, tuned["threshold"])}


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
    if not summary["refit_temperature"]:
        lines.append("temperature kept (--no-temperature)")
    lines.append(f"updated {summary['metadata']}")
    return "\n".join(lines)
