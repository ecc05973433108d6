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
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from hierarchy.engine.predictor import Predictor
from hierarchy.ood.fit import (MAX_FIT_IMAGES, MIN_CLASS_TUNE, class_offsets, compare, fit_scorer,
                               stratified_subsample, tune)
from hierarchy.ood.scores import OOD_FILE, OODScorer, save_scorer

if TYPE_CHECKING:
    from torch import nn

    from hierarchy.data.labelled import Sample

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


# What a new archive does to images (colour, compression, resolution): the val views the threshold is
# tuned on with ``ood_tune: shifted``. A quantile of the val split as it is does not transfer: val shares
# the training archive's cameras and processing, so its tail is that archive's (docs/ood.md).
SHIFT_VIEWS = {"color_jitter": 0.3, "hue": 0.03, "jpeg_quality": (40, 95), "downscale": (0.4, 1.0), "p": 0.8}


def fit_for_run(ctx: "TrainContext", model: "nn.Module") -> dict[str, Any]:
    """Fit on train, tune on val, sanity-check on generated textures; return ``{"ood": {...}}``."""
    cfg = ctx.cfg
    if not cfg.ood:
        return {}
    entry = fit_ood(_predictor(ctx, model), ctx.loaders.train.dataset.samples, ctx.loaders.val.dataset.samples,
                    list(ctx.stage.labels), ctx.run_dir, method=cfg.ood_method, k=cfg.ood_k, keep=float(cfg.ood_keep),
                    tune_on=cfg.ood_tune, per_class=cfg.ood_per_class, seed=cfg.seed, batch_size=cfg.batch_size,
                    workers=cfg.workers, outlier_sources=outlier_sources(ctx.data),
                    fit_aperture=cfg.ood_fit_aperture, aperture_radius=cfg.augment.aperture_radius)
    return {"ood": entry}


def outlier_sources(data: Path) -> set[str]:
    """Keys of the dataset's ``outliers`` sources (generated negatives), from its dataset.json."""
    import json

    try:
        info = json.loads((Path(data) / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {k for k, v in (info.get("sources") or {}).items() if isinstance(v, dict) and v.get("type") == "outliers"}


def fit_ood(predictor: Predictor, train: Sequence["Sample"], val: Sequence["Sample"], labels: list[str],
            run_dir: Path, *, method: str, k: int, keep: float, tune_on: str = "shifted", per_class: bool = True,
            seed: int = 0, batch_size: int = 64, workers: Any = "auto", outlier_sources: set[str] = frozenset(),
            fit_aperture: float = 0.0, aperture_radius: tuple[float, float] = (0.8, 1.3)) -> dict[str, Any]:
    """Fit every scorer on ``train``'s features (plus ``fit_aperture`` of them seen through a round field
    of view), tune its threshold to keep ``keep`` of ``val`` (left out: images from outlier-exposure
    sources, which are out of distribution by design; ``shifted``: val seen through :data:`SHIFT_VIEWS`;
    ``per_class``: ``keep`` of each predicted class, through class offsets), write ``ood.safetensors``
    into ``run_dir``; return the metadata entry."""
    train = _fit_subsample(train, labels, seed)
    train_f, _, train_y = extract(predictor, _plain_batches(train, labels, predictor.preset, batch_size, workers))
    if fit_aperture > 0:
        aperture = {"aperture": 1.0, "aperture_radius": tuple(aperture_radius)}
        rows = np.random.default_rng(seed).permutation(len(train))[: round(fit_aperture * len(train))]
        views = _view_batches([train[i] for i in sorted(rows)], labels, predictor.preset, batch_size, seed, aperture)
        view_f, _, view_y = extract(predictor, views)
        train_f, train_y = np.concatenate([train_f, view_f]), np.concatenate([train_y, view_y])
    scorer, fit = fit_scorer(train_f, train_y, method, k, seed=seed)
    fit |= {"aperture_share": fit_aperture, "aperture_radius": list(aperture_radius)} if fit_aperture > 0 else {}
    tune_set = [s for s in val if s.source not in outlier_sources] or list(val)
    plain = _raw_scores(scorer, predictor, _plain_batches(tune_set, labels, predictor.preset, batch_size, workers))
    tuned_on = _raw_scores(scorer, predictor, _view_batches(tune_set, labels, predictor.preset, batch_size, seed,
                                                            SHIFT_VIEWS)) if tune_on == "shifted" else plain
    textures = _raw_scores(scorer, predictor, _texture_batches(predictor.preset, batch_size))
    predicted = tuned_on[1].argmax(axis=1)
    if per_class:
        scorer.offsets = class_offsets(tuned_on[0], predicted, len(labels), keep)
    plain, tuned_on, textures = (_relative(scorer, *x) for x in (plain, tuned_on, textures))
    tuned = tune(tuned_on, keep, relative=per_class)
    scorer.threshold = tuned[method]["threshold"]
    sanity = compare(plain, textures, {m: v["threshold"] for m, v in tuned.items()})
    kept_plain = {m: float((plain[m] <= tuned[m]["threshold"]).mean()) for m in tuned}
    entry = {"method": method, "threshold": scorer.threshold, "keep": keep, "file": OOD_FILE,
             "sha256": save_scorer(scorer, run_dir), "fit": fit,
             "tune": {"split": "val", "views": tune_on, "n": len(tuned_on[method]), "kept": tuned[method]["kept"],
                      "kept_plain_val": kept_plain[method], "left_out_sources": sorted(outlier_sources)},
             "per_class": _per_class(scorer, method, tuned_on[method], predicted, labels) if per_class else None,
             "methods": {m: {**tuned[m], "kept_plain_val": kept_plain[m],
                             **{f"textures_{key}": v for key, v in sanity[m].items()}} for m in tuned},
             "sanity_set": f"{len(textures[method])} generated grey stripes/checkerboards/noise "
                           "(hierarchy.data.synth.make_ood)"}
    _plot(run_dir, plain[method], textures[method], scorer.threshold, method)
    _summary(entry)
    return entry


def _per_class(scorer: OODScorer, method: str, scores: np.ndarray, predicted: np.ndarray,
               labels: list[str]) -> dict[str, Any]:
    """Offsets, tuning images and share kept, per predicted class (what metadata.json shows)."""
    rows = {}
    for c, lab in enumerate(labels):
        mine = scores[predicted == c]
        rows[lab] = {"offset": float(scorer.offsets[method][c]), "n": int(len(mine)),
                     "own_quantile": bool(len(mine) >= MIN_CLASS_TUNE),
                     "kept": float((mine <= scorer.threshold).mean()) if len(mine) else None}
    return {"min_n": MIN_CLASS_TUNE, "classes": rows}


def _raw_scores(scorer: OODScorer, predictor: Predictor, batches: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every method's raw scores (no class offsets) and the logits, over ``batches``."""
    feats, logits, _ = extract(predictor, batches)
    return scorer.score_all(feats, logits, raw=True), logits


def _relative(scorer: OODScorer, raw: dict[str, np.ndarray], logits: np.ndarray) -> dict[str, np.ndarray]:
    return {m: scorer.relative(s, logits, m) for m, s in raw.items()}


def _predictor(ctx: "TrainContext", model: "nn.Module") -> Predictor:
    """The best checkpoint as ``hierarchy run`` loads it (device and precision of the run)."""
    from hierarchy.models.checkpoint import load_weights

    best = ctx.run_dir / "best.safetensors"
    if best.is_file():
        model.load_state_dict(load_weights(best))
    return Predictor.from_torch(model, ctx.stage.labels, ctx.preset, device=ctx.device, precision=ctx.precision)


def _fit_subsample(samples: Sequence["Sample"], labels: list[str], seed: int) -> list["Sample"]:
    """A class-stratified subsample of at most MAX_FIT_IMAGES of ``samples`` (all of them when fewer)."""
    samples = list(samples)
    keep = stratified_subsample(np.asarray([labels.index(s.label) for s in samples]), MAX_FIT_IMAGES, seed)
    return [samples[i] for i in keep]


def _plain_batches(samples: Sequence["Sample"], labels: list[str], preset: Any, batch_size: int, workers: Any) -> Any:
    """``samples`` in order, without augmentation or class weighting."""
    from hierarchy.train.loader import ImageDataset, batch_loader

    return batch_loader(ImageDataset(list(samples), labels, preset, train=False, hflip=False), batch_size, None, workers)


def _view_batches(samples: Sequence["Sample"], labels: list[str], preset: Any, batch_size: int, seed: int,
                  augment: dict[str, Any]) -> Any:
    """``samples`` through ``augment`` (AugmentConfig fields), in one thread from a seeded RNG (reproducible)."""
    import torch

    from hierarchy.config.train import AugmentConfig
    from hierarchy.train.augment import Augment
    from hierarchy.train.loader import ImageDataset, batch_loader

    torch.manual_seed(seed)
    ds = ImageDataset(list(samples), labels, preset, train=True, hflip=False,
                      recipe=Augment(False, AugmentConfig(**augment)))
    return batch_loader(ds, batch_size, None, 0)


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
