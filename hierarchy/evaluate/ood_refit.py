"""``hierarchy calibrate RUN --data DATA --ood``: refit a trained run's OOD score and its threshold
without retraining (fit on DATA's train split, tune on its val split, as training does); see docs/ood.md."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hierarchy.core.errors import HierarchyError


def refit_ood(run_dir: Path, data: Path, *, method: str | None = None, keep: float | None = None,
              tune_on: str | None = None, per_class: bool | None = None, fit_aperture: float | None = None,
              device: str = "auto", precision: str = "auto", engine: str = "auto",
              batch_size: int = 64) -> dict[str, Any]:
    """Refit and store the run's ``ood`` entry; unset settings keep the run's (else the training defaults)."""
    from hierarchy.config.train import TrainConfig
    from hierarchy.engine.predictor import Predictor
    from hierarchy.engine.router import load_stage_predictor
    from hierarchy.evaluate.runner import select_samples
    from hierarchy.models.metadata import read_metadata, resolve_checkpoint, update_metadata
    from hierarchy.registry import get_stage
    from hierarchy.train.ood import fit_ood, outlier_sources

    _, meta_path = resolve_checkpoint(run_dir)
    meta = read_metadata(meta_path)
    labels = list(meta.labels)
    before = dict(meta.ood or {})
    defaults = TrainConfig()
    settings = {"method": method or before.get("method") or defaults.ood_method,
                "keep": float(keep if keep is not None else before.get("keep") or defaults.ood_keep),
                "tune_on": tune_on or (before.get("tune") or {}).get("views") or defaults.ood_tune,
                "k": int((before.get("fit") or {}).get("k") or defaults.ood_k),
                "per_class": per_class if per_class is not None else
                (before["per_class"] is not None if "per_class" in before else defaults.ood_per_class)}
    fit = before.get("fit") or {}
    settings["fit_aperture"] = float(fit_aperture if fit_aperture is not None else fit.get("aperture_share", 0.0))
    recipe = (meta.train or {}).get("augment") or {}  # the run's own circle when it trained with one
    settings["aperture_radius"] = tuple(fit.get("aperture_radius") or recipe.get("aperture_radius")
                                        or defaults.augment.aperture_radius)
    train, _ = select_samples(Path(data), "train", labels=labels)
    val, _ = select_samples(Path(data), "val", labels=labels)
    predictor = load_stage_predictor(meta.stage, get_stage(meta.stage)(), meta_path.parent, device, precision, engine)
    if not isinstance(predictor, Predictor):
        raise HierarchyError(f"stage '{meta.stage}' loads its own predictor; refit its OOD score in its own way")
    entry = fit_ood(predictor, train, val, labels, meta_path.parent, batch_size=batch_size,
                    outlier_sources=outlier_sources(Path(data)), **settings)
    entry["data"] = str(data)
    update_metadata(meta_path, ood=entry)
    return {"run": str(meta_path.parent), "before": before, "ood": entry}


def render(summary: dict[str, Any]) -> str:
    b, a = summary["before"], summary["ood"]
    old = (f"{b.get('method')} threshold {b['threshold']:.4g}" if b.get("threshold") is not None else "none")
    return (f"{summary['run']}: OOD {old} -> {a['method']} threshold {a['threshold']:.4g} "
            f"(keeps {a['tune']['kept']:.3f} of {a['tune']['n']} {a['tune']['views']} val views, "
            f"{a['tune']['kept_plain_val']:.3f} of val as is"
            + (", per predicted class" if a.get("per_class") else "") + ")")
