"""The configurable training recipe (augmentation, AdamW + warm-up/cosine, label smoothing, EMA)
and calibration that stays honest on a separable val split (temperature floor, no saturated threshold)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hierarchy.config.train import AugmentConfig, TrainConfig
from hierarchy.metrics.thresholds import FALLBACK_CAP, tune_threshold
from hierarchy.train.augment import Augment
from hierarchy.train.recipe import lr_at

ROBUST = {"crop_scale": [0.35, 1.0], "rotate": 30.0, "rot90": True, "vflip": True, "color_jitter": 0.3,
          "hue": 0.05, "jpeg_quality": [40, 95], "downscale": [0.4, 1.0]}


def _images(n: int = 6, size: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g) for _ in range(n)]


def test_default_recipe_is_the_original_flip_draw_for_draw() -> None:
    images = _images()
    torch.manual_seed(7)
    old = [x.flip(-1) if torch.rand(()) < 0.5 else x for x in images]
    after_old = torch.rand(())
    torch.manual_seed(7)
    new = [Augment(True, TrainConfig().augment)(x) for x in images]
    assert all(torch.equal(a, b) for a, b in zip(old, new)) and torch.equal(torch.rand(()), after_old)


def test_robust_augment_changes_images_deterministically() -> None:
    aug = Augment(True, AugmentConfig(**ROBUST))
    images = _images()
    torch.manual_seed(1)
    first = [aug(x) for x in images]
    torch.manual_seed(1)
    again = [aug(x) for x in images]
    assert all(y.dtype == torch.uint8 and y.shape == x.shape for x, y in zip(images, first))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert sum(not torch.equal(x, y) for x, y in zip(images, first)) == len(images)


def test_aperture_darkens_the_corners_and_keeps_the_centre() -> None:
    bright = torch.full((3, 64, 64), 200, dtype=torch.uint8)
    torch.manual_seed(0)
    out = Augment(False, AugmentConfig(aperture=1.0, aperture_radius=(0.9, 1.0)))(bright)
    assert out.dtype == torch.uint8 and out.shape == bright.shape
    assert int(out[:, 0, 0].max()) <= 24 and int(out[:, -1, -1].max()) <= 24  # outside: near-black
    assert torch.equal(out[:, 24:40, 24:40], bright[:, 24:40, 24:40])  # inside: untouched
    torch.manual_seed(0)
    assert torch.equal(Augment(False, AugmentConfig(aperture=0.0, rot90=True))(bright), bright)


def test_aperture_radius_beyond_the_corners_changes_nothing() -> None:
    x = _images(1, 48)[0]
    torch.manual_seed(0)
    assert torch.equal(Augment(False, AugmentConfig(aperture=1.0, aperture_radius=(1.6, 1.6)))(x), x)


def test_augment_config_rejects_bad_ranges() -> None:
    with pytest.raises(ValueError, match="crop_scale"):
        TrainConfig(augment={"crop_scale": [0.5, 1.5]})
    with pytest.raises(ValueError, match="jpeg_quality"):
        TrainConfig(augment={"jpeg_quality": [0, 90]})
    with pytest.raises(ValueError, match="aperture_radius"):
        TrainConfig(augment={"aperture": 0.2, "aperture_radius": [1.2, 0.8]})
    with pytest.raises(ValueError, match="aperture"):
        TrainConfig(augment={"aperture": 1.5})
    with pytest.raises(ValueError, match="augment.vfilp"):
        TrainConfig(augment={"vfilp": True})


def test_lr_schedule_warmup_then_cosine_to_zero() -> None:
    cfg = TrainConfig(lr=1.0, epochs=4, schedule="cosine", warmup_epochs=1)
    steps = 10
    lrs = [lr_at(cfg, s, steps) for s in range(40)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up over epoch 1
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01
    assert lrs[10 + 15] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))
    assert {lr_at(TrainConfig(lr=0.5), s, steps) for s in range(40)} == {0.5}  # default: constant


def test_all_knobs_train_end_to_end(tmp_path: Path) -> None:
    from hierarchy.data.synth import make_image_folder
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin
    from hierarchy.train.trainer import train_stage

    for split, seed in (("train", 0), ("val", 1)):
        make_image_folder(tmp_path / "data" / split, ["skin", "non-skin"], n_per_label=6, size=(40, 30), seed=seed)
    cfg = SkinVsNonskin.Config(train={
        "pretrained": "none", "backbone": "timm/resnet10t", "epochs": 2, "max_steps_per_epoch": 2, "batch_size": 6,
        "img_size": 32, "device": "cpu", "workers": 0, "precision": "fp32", "optimizer": "adamw",
        "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 0.5, "label_smoothing": 0.1, "ema": 0.9,
        "augment": ROBUST, "temperature_floor": 1.0, "ood": False, "out": str(tmp_path / "runs")})
    run = train_stage(SkinVsNonskin(cfg), tmp_path / "data", progress=False)
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["train"]["augment"]["rot90"] is True and meta["train"]["ema"] == 0.9
    assert meta["temperature"] >= 1.0 and meta["calibration"]["floor"] == 1.0
    state = torch.load(run / "train_state.pt", weights_only=True)
    from hierarchy.models.checkpoint import load_weights

    best = load_weights(run / "last.safetensors")
    assert all(torch.equal(best[k], state["ema"][k]) for k in best)  # the published weights are the EMA
    assert any(not torch.equal(state["model"][k], state["ema"][k]) for k in best if best[k].is_floating_point())


def test_temperature_is_fitted_on_augmented_val_views(tmp_path: Path) -> None:
    """``calibration_views: 3`` fits T on 3 augmented views of each of the 12 val images; the views
    are drawn after training from their own seeded RNG, so the weights equal those of a run without them.
    (A fixture model trained for 2 steps: plumbing, not calibration quality; bench_gate_quality measures that.)"""
    from hierarchy.data.synth import make_image_folder
    from hierarchy.models.checkpoint import load_weights
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin
    from hierarchy.train.trainer import train_stage

    for split, seed in (("train", 0), ("val", 1)):
        make_image_folder(tmp_path / "data" / split, ["skin", "non-skin"], n_per_label=6, size=(40, 30), seed=seed)
    metas, weights = [], []
    for views in (0, 3):
        cfg = SkinVsNonskin.Config(train={
            "pretrained": "none", "backbone": "timm/resnet10t", "epochs": 1, "max_steps_per_epoch": 2, "batch_size": 6,
            "img_size": 32, "device": "cpu", "workers": 0, "precision": "fp32", "augment": ROBUST, "ood": False,
            "temperature_floor": 0.05, "calibration_views": views, "out": str(tmp_path / "runs"), "name": f"v{views}"})
        run = train_stage(SkinVsNonskin(cfg), tmp_path / "data", progress=False)
        metas.append(json.loads((run / "metadata.json").read_text())["calibration"])
        weights.append(load_weights(run / "best.safetensors"))
    plain, views = metas
    assert plain["views"] == 0 and plain["n"] == 12 and views["views"] == 3 and views["n"] == 36
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert views["fitted"] != plain["fitted"]
    with pytest.raises(ValueError, match="calibration_views"):
        TrainConfig(calibration_views=-1)


def test_saturated_threshold_falls_back_to_chows_rule() -> None:
    probs = np.array([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)  # a separable val split, saturated probabilities
    y = np.array([0] * 5 + [1] * 5)
    out = tune_threshold(probs, y, {"max_risk": 0.01}, ["a", "b"])
    assert out["threshold"] == pytest.approx(0.99) and "saturated" in out["fallback"]
    assert out["achieved"]["coverage"] == 1.0 and out["achieved"]["risk"] == 0.0
    assert tune_threshold(probs, y, {"max_risk": 0.0}, ["a", "b"])["threshold"] == FALLBACK_CAP
    unsaturated = tune_threshold(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]), {"max_risk": 0.01}, ["a", "b"])
    assert "fallback" not in unsaturated and unsaturated["threshold"] == pytest.approx(0.8)


def test_temperature_floor_never_sharpens() -> None:
    from hierarchy.train.report import calibration

    logits = np.array([[4.0, -4.0], [-4.0, 4.0]] * 10)  # separable: the fit wants T << 1
    targets = np.array([0, 1] * 10)
    assert calibration(logits, targets)["temperature"] == 0.5
    cal = calibration(logits, targets, floor=1.0)
    assert cal["temperature"] == 1.0 and cal["fitted"] < 1.0
