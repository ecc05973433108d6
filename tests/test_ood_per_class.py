"""Class-relative OOD scores: each predicted class keeps ``keep`` of its own val images, so a wide class
(a gate's diverse non-skin photos) no longer sets the threshold for a tight one (skin)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from hierarchy.data.labelled import Sample
from hierarchy.data.preset import Preset
from hierarchy.ood import fit, scores
from hierarchy.train.ood import fit_ood

LABELS = ["skin", "non-skin"]


def test_class_offsets_are_each_class_quantile_and_small_classes_get_the_global_one() -> None:
    rng = np.random.default_rng(0)
    raw = np.concatenate([rng.normal(0, 1, 500), rng.normal(0, 10, 500), rng.normal(50, 1, 20)])
    pred = np.repeat([0, 1, 2], [500, 500, 20])
    off = fit.class_offsets({"m": raw}, pred, 3, keep=0.99, min_n=100)["m"]
    for c in (0, 1):
        assert (raw[pred == c] - off[c] <= 0).mean() >= 0.99
        assert (raw[pred == c] - off[c] <= 0).mean() < 0.995  # the quantile itself, not a loose bound
    assert off[2] == pytest.approx(np.sort(raw)[int(np.ceil(0.99 * len(raw))) - 1])  # too few: global quantile
    assert off[0] < 4 < off[1]  # a class-0 image at raw 4 is beyond its class, inside the global spread


def test_offsets_apply_by_predicted_class_and_survive_safetensors(tmp_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32)
    y = np.arange(40) % 2
    scorer, _ = fit.fit_scorer(x, y, "mahalanobis", k=3, bank_size=20)
    scorer.offsets = {"mahalanobis": np.array([5.0, -2.0], np.float32)}
    scorer.threshold = 0.0
    logits = np.stack([y == 0, y == 1], axis=1).astype(np.float32)  # predicted = y
    raw = scorer.raw_score(x, logits, "mahalanobis")
    np.testing.assert_allclose(scorer.score(x, logits), raw - np.where(y == 0, 5.0, -2.0), rtol=1e-6)
    np.testing.assert_allclose(scorer.score(x, logits, "knn"), scorer.raw_score(x, logits, "knn"))  # no offsets
    meta = {"method": "mahalanobis", "threshold": 0.0, "file": scores.OOD_FILE, "fit": {"k": 3},
            "sha256": scores.save_scorer(scorer, tmp_path)}
    loaded = scores.load_scorer(meta, tmp_path)
    np.testing.assert_allclose(loaded.score(x, logits), scorer.score(x, logits), rtol=1e-5)
    with pytest.raises(ValueError, match="one value per class"):
        scores.OODScorer("mahalanobis", means=scorer.means, precision=scorer.precision,
                         offsets={"mahalanobis": np.zeros(3)})


class ColourPredictor:
    """A stand-in predictor: features = mean colour; 'skin' when red dominates."""
    preset = Preset(size=16)
    labels = LABELS

    def predict(self, x: np.ndarray, return_logits: bool = True, return_features: bool = True) -> SimpleNamespace:
        rgb = x.reshape(len(x), 3, -1).mean(axis=2).astype(np.float32) / 255.0
        skin = (rgb[:, 0] > rgb[:, 1] + 0.12) & (rgb[:, 0] > rgb[:, 2] + 0.12)
        return SimpleNamespace(features=rgb, logits=np.stack([skin, ~skin], axis=1).astype(np.float32) * 4)


def colour_samples(root: Path, split: str, n_skin: int, n_other: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_skin + n_other):
        label = "skin" if i < n_skin else "non-skin"
        colour = [200, 120, 100] + rng.normal(0, 6, 3) if label == "skin" else rng.uniform(0, 255, 3)
        if label == "non-skin" and colour[0] > max(colour[1], colour[2]) + 35:
            colour = colour[[1, 0, 2]]  # keep the wide class predicted as itself
        path = root / split / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), np.clip(colour, 0, 255), np.uint8)).save(path)
        out.append(Sample(path, label, split, "synthetic"))
    return out


def test_per_class_tuning_rejects_an_odd_skin_prediction_a_global_quantile_keeps(tmp_path: Path) -> None:
    train = colour_samples(tmp_path, "train", 150, 150, seed=0)
    val = colour_samples(tmp_path, "val", 120, 60, seed=1)
    odd = np.array([[[230, 60, 170]]], np.uint8)  # red dominates (predicted skin), far from the skin colour
    odd_batch = np.broadcast_to(odd.transpose(2, 0, 1)[None], (1, 3, 16, 16))
    kept = {}
    for per_class in (True, False):
        run = tmp_path / f"run-{per_class}"
        run.mkdir()
        entry = fit_ood(ColourPredictor(), train, val, LABELS, run, method="mahalanobis", k=5, keep=0.99,
                        tune_on="val", per_class=per_class, batch_size=64, workers=0)
        json.dumps(entry)  # plain JSON for metadata.json
        scorer = scores.load_scorer(entry, run)
        pred = ColourPredictor().predict(odd_batch)
        assert pred.logits.argmax() == 0
        kept[per_class] = bool(scorer.score(pred.features, pred.logits)[0] <= scorer.threshold)
        if per_class:
            skin = entry["per_class"]["classes"]["skin"]
            assert entry["threshold"] == 0.0 and skin["own_quantile"] and skin["n"] == 120 and skin["kept"] >= 0.99
            assert not entry["per_class"]["classes"]["non-skin"]["own_quantile"]  # 60 < MIN_CLASS_TUNE
        else:
            assert entry["per_class"] is None and entry["threshold"] > 0
    assert kept == {True: False, False: True}
