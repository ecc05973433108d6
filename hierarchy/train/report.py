"""After training: temperature scaling on the val split (or augmented views of it), training plots,
and final metadata."""
from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from hierarchy.train.trainer import RunState, TrainContext

log = logging.getLogger("hierarchy.train")


def best_eval(ctx: "TrainContext", model: "nn.Module") -> dict[str, Any]:
    """Validation logits of the best checkpoint (re-computed when a resumed run has none in memory)."""
    if ctx.best_eval is not None:
        return ctx.best_eval
    from hierarchy.models.checkpoint import load_weights
    from hierarchy.train.trainer import evaluate_model

    model.load_state_dict(load_weights(ctx.run_dir / "best.safetensors"))
    return evaluate_model(model, ctx.loaders.val, ctx.device, ctx.precision, len(ctx.stage.labels))


def calibration(logits: np.ndarray, targets: np.ndarray, floor: float = 0.5) -> dict[str, Any]:
    """Temperature scaling fitted on val, never below ``floor`` (``train.temperature_floor``): a
    separable val split drives T towards 0 (infinitely sharp); a floor of 1 never sharpens."""
    from hierarchy.metrics.classification import expected_calibration_error, fit_temperature, nll, softmax

    if len(targets) == 0:
        return {"temperature": 1.0}
    fitted = fit_temperature(logits, targets)
    t = max(floor, fitted)
    out: dict[str, Any] = {"temperature": t, "fitted": fitted, "floor": floor, "n": int(len(targets))}
    for name, temp in (("before", 1.0), ("after", t)):
        p = softmax(logits, temp)
        out[f"ece_{name}"] = expected_calibration_error(p.max(1), p.argmax(1) == targets, n_bins=15)
        out[f"nll_{name}"] = nll(logits, targets, temp)
    return out


def calibration_set(ctx: "TrainContext", model: "nn.Module", ev: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
    """(logits, labels, views) the temperature is fitted on: the best checkpoint's val logits, or with
    ``calibration_views: N`` its logits on N views of every val image through the training
    augmentation, drawn from a generator seeded by the run's seed (the run's own RNG is untouched)."""
    import torch

    from hierarchy.models.checkpoint import load_weights
    from hierarchy.train.augment import Augment
    from hierarchy.train.loader import ImageDataset, Loader, batch_loader
    from hierarchy.train.trainer import evaluate_model

    cfg, views = ctx.cfg, ctx.cfg.calibration_views
    if not views or not len(ev["targets"]):
        return ev["logits"], ev["targets"], 0
    best = ctx.run_dir / "best.safetensors"
    if best.is_file():  # the weights ev was measured with (the EMA's, when on)
        model.load_state_dict(load_weights(best))
    val = (ctx.loaders.val_all or ctx.loaders.val).dataset
    ds = ImageDataset(val.samples, ctx.stage.labels, ctx.preset, train=True, hflip=cfg.hflip, cache=val.cache,
                      recipe=Augment(cfg.hflip, cfg.augment))
    loader = Loader(batch_loader(ds, cfg.batch_size, None, cfg.workers), ctx.preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        parts = [evaluate_model(model, loader, ctx.device, ctx.precision, len(ctx.stage.labels)) for _ in range(views)]
    return np.concatenate([p["logits"] for p in parts]), np.concatenate([p["targets"] for p in parts]), views


def finalize_run(ctx: "TrainContext", state: "RunState", model: "nn.Module") -> None:
    ev = best_eval(ctx, model)
    extra: dict[str, Any] = {}
    if ctx.cfg.calibrate:
        logits, targets, views = calibration_set(ctx, model, ev)
        cal = calibration(logits, targets, ctx.cfg.temperature_floor)
        extra["temperature"] = cal["temperature"]
        extra["calibration"] = {"method": "temperature", "split": "val", "views": views, **cal}
        seen = f"val, {views} augmented views" if views else "val"
        print(f"calibration: temperature {cal['temperature']:.3f} (fitted {cal.get('fitted', 1.0):.3f}, floor "
              f"{ctx.cfg.temperature_floor}), ECE {cal.get('ece_before', 0):.4f} -> {cal.get('ece_after', 0):.4f} "
              f"({seen})", file=sys.stderr)
    extra.update(_tuned_threshold(ctx, ev, extra.get("temperature", 1.0)))
    extra.update(_fit_ood(ctx, model))
    ctx.write_records(state, **extra)
    _plots(ctx, state, ev)
    _first_card(ctx)
    print(f"saved {ctx.run_dir} (best epoch {state.best_epoch})", file=sys.stderr)


def _first_card(ctx: "TrainContext") -> None:
    """MODEL_CARD.md + metadata.json ``card``: a first model card; `hierarchy card` refreshes it later."""
    from hierarchy.core.errors import HierarchyError
    from hierarchy.engine.card import write_run_card

    try:
        write_run_card(ctx.run_dir)
    except (HierarchyError, OSError) as exc:  # a card is documentation: never fail a finished run for it
        log.warning("model card not written: %s", exc)


def _tuned_threshold(ctx: "TrainContext", ev: dict[str, Any], temperature: float) -> dict[str, Any]:
    """``{"threshold": {...}}`` tuned on val to ``cfg.threshold_target`` (what ``threshold: auto`` reads)."""
    from hierarchy.metrics.classification import softmax
    from hierarchy.metrics.thresholds import tune_threshold

    target = ctx.cfg.threshold_target
    if target is None or len(ev["targets"]) == 0:
        return {}
    try:
        tuned = tune_threshold(softmax(ev["logits"], temperature), ev["targets"], target, list(ctx.stage.labels))
    except ValueError as exc:  # e.g. target_precision for a label this stage does not have
        log.warning("threshold not tuned: %s", exc)
        return {}
    achieved = ", ".join(f"{k} {v:.3f}" for k, v in tuned["achieved"].items() if k != "n_accepted")
    print(f"threshold: {tuned['threshold']:.4f} for {target} ({'met' if tuned['met'] else 'NOT met'}; {achieved}; "
          f"val n={tuned['n']})", file=sys.stderr)
    if "fallback" in tuned:
        log.warning("threshold: %s", tuned["fallback"])
    return {"threshold": {**tuned, "data": str(ctx.data), "split": "val"}}


def _fit_ood(ctx: "TrainContext", model: "nn.Module") -> dict[str, Any]:
    """Out-of-distribution scorer fitted on the train split (see hierarchy/ood/fit.py); empty when off."""
    from hierarchy.train.ood import fit_for_run

    return fit_for_run(ctx, model)


def _plots(ctx: "TrainContext", state: "RunState", ev: dict[str, Any]) -> None:
    try:
        from hierarchy.metrics.classification import confusion_matrix
        from hierarchy.metrics.plots import plot_confusion, plot_training_curves
    except ImportError as exc:  # matplotlib missing: plots are optional output
        log.warning("skipping plots: %s", exc)
        return
    plot_training_curves(state.history, ctx.run_dir / "curves.png")
    n = len(ctx.stage.labels)
    cm = confusion_matrix(ev["targets"], ev["logits"].argmax(1), n) if len(ev["targets"]) else np.zeros((n, n), int)
    plot_confusion(cm, list(ctx.stage.labels), ctx.run_dir / "confusion_best.png",
                   title=f"{ctx.stage.name}: val confusion (epoch {state.best_epoch})")
