"""Out-of-distribution fitting at the end of ``hierarchy train``: fit every scorer on the TRAIN
split's features, tune each threshold on the VAL split to keep ``ood_keep`` of it, sanity-check on
generated textures, write ``ood.safetensors`` next to the weights and return the ``ood`` entry of
``metadata.json``. Features come through the shared predictor, the very computation ``hierarchy
run`` does (prepared model, precision), so thresholds carry over. See docs/ood.md.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from hierarchy.engine.predictor import Predictor
from hierarchy.ood.fit import MAX_FIT_IMAGES, compare, fit_scorer, stratified_subsample, tune
from hierarchy.ood.scores import OOD_FILE, OODScorer, save_scorer

if TYPE_CHECKING:
    from torch import nn

    from hierarchy.train.trainer import TrainContext

log = logging.getLogger("hierarchy.train")


def extract(predictor: Predictor, batches: Iterable[tuple[Any, Any]]) -> tuple[np.ndarray, ...]:
    """(features (N, D), logits (N, C), targets (N,)) from uint8 batches, through ``predictor.predict``."""
    feats, logits, ys = [], [], []
    for x, y in batches:
        if len(y) == 0:
            continue
        pred = predictor.predict(np.asarray(x), return_logits=True, return_features=True)
        feats.append(pred.features)
        logits.append(pred.logits)
        ys.append(np.asarray(y))
    if not feats:
        raise ValueError("no images to extract OOD features from")
    return np.concatenate(feats), np.concatenate(logits), np.concatenate(ys)


def fit_for_run(ctx: "TrainContext", model: "nn.Module") -> dict[str, Any]:
    """Fit on train, tune on val, sanity-check on generated textures; return ``{"ood": {...}}``."""
    cfg = ctx.cfg
    if not cfg.ood:
        return {}
    predictor = _predictor(ctx, model)
    train_f, _, train_y = extract(predictor, _train_batches(ctx))
    scorer, fit = fit_scorer(train_f, train_y, cfg.ood_method, cfg.ood_k, seed=cfg.seed)
    val = _score_batches(scorer, predictor, ctx.loaders.val)
    textures = _score_batches(scorer, predictor, _texture_batches(ctx.preset, cfg.batch_size))
    tuned = tune(val, float(cfg.ood_keep))
    scorer.threshold = tuned[scorer.method]["threshold"]
    sanity = compare(val, textures, {m: v["threshold"] for m, v in tuned.items()})
    entry = {"method": scorer.method, "threshold": scorer.threshold, "keep": float(cfg.ood_keep), "file": OOD_FILE,
             "sha256": save_scorer(scorer, ctx.run_dir), "fit": fit,
             "tune": {"split": "val", "n": len(val[scorer.method]), "kept": tuned[scorer.method]["kept"]},
             "methods": {m: {**tuned[m], **{f"textures_{k}": v for k, v in sanity[m].items()}} for m in tuned},
             "sanity_set": f"{len(textures[scorer.method])} generated grey stripes/checkerboards/noise "
                           "(hierarchy.data.synth.make_ood)"}
    _plot(ctx.run_dir, val[scorer.method], textures[scorer.method], scorer.threshold, scorer.method)
    _summary(entry)
    return {"ood": entry}


def _score_batches(scorer: OODScorer, predictor: Predictor, batches: Any) -> dict[str, np.ndarray]:
    feats, logits, _ = extract(predictor, batches)
    return scorer.score_all(feats, logits)


def _predictor(ctx: "TrainContext", model: "nn.Module") -> Predictor:
    """The best checkpoint as ``hierarchy run`` loads it (device and precision of the run)."""
    from hierarchy.models.checkpoint import load_weights

    best = ctx.run_dir / "best.safetensors"
    if best.is_file():
        model.load_state_dict(load_weights(best))
    return Predictor.from_torch(model, ctx.stage.labels, ctx.preset, device=ctx.device, precision=ctx.precision)


def _train_batches(ctx: "TrainContext") -> Any:
    """The train split, in order, without augmentation or class weighting (capped, stratified)."""
    from hierarchy.train.loader import ImageDataset, batch_loader

    ds = ctx.loaders.train.dataset
    keep = stratified_subsample(np.asarray(ds.targets), MAX_FIT_IMAGES, ctx.cfg.seed)
    plain = ImageDataset([ds.samples[i] for i in keep], list(ctx.stage.labels), ctx.preset, train=False, hflip=False)
    return batch_loader(plain, ctx.cfg.batch_size, None, ctx.cfg.workers)


def _texture_batches(preset: Any, batch_size: int, n: int = 60) -> list[tuple[np.ndarray, np.ndarray]]:
    """Generated textures (clearly unlike any photo) as uint8 batches, via the real JPEG + loader path."""
    import tempfile

    from hierarchy.data.batches import decode_batches, decode_item
    from hierarchy.data.synth import make_ood

    side = max(preset.size, 32)
    with tempfile.TemporaryDirectory(prefix="hierarchy-ood-") as tmp:
        files = sorted(make_ood(Path(tmp), n=n, size=(side, side), seed=12345).glob("*.jpg"))
        chunks = decode_batches(files, lambda f: decode_item(f, [preset]), batch_size)
        batches = [np.stack([d.array(preset) for d in chunk if d.error is None]) for chunk in chunks]
    return [(x, np.zeros(len(x), dtype=np.int64)) for x in batches if len(x)]


def _plot(run_dir: Path, scores_in: np.ndarray, scores_out: np.ndarray, threshold: float, method: str) -> None:
    try:
        from hierarchy.metrics.plots import plot_score_histogram
    except ImportError as exc:  # matplotlib missing: plots are optional output
        log.warning("skipping the OOD plot: %s", exc)
        return
    plot_score_histogram(scores_in, scores_out, Path(run_dir) / "ood_scores.png", threshold,
                         title=f"OOD score ({method}): val vs generated textures")


def _summary(entry: dict[str, Any]) -> None:
    parts = [f"{m} AUROC {_fmt(v.get('textures_auroc'))}" for m, v in entry["methods"].items()]
    print(f"ood: {entry['method']} threshold {entry['threshold']:.4g} keeps {entry['tune']['kept']:.3f} of val; "
          f"vs generated textures: {', '.join(parts)}", file=sys.stderr)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
