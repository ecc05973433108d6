"""Temperature scaling and threshold tuning after training, and `hierarchy calibrate`."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hierarchy.commands.cli import main
from hierarchy.config.train import TrainConfig
from hierarchy.engine.predictor import load_predictor

RUN_FIELDS = {"threshold", "target", "achieved", "n", "met", "data", "split"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Generated data, the real builder, and a model trained for 2 steps (plumbing, not accuracy).
    fp32 so that re-predicting the val split reproduces the logits calibration saw; OOD fitting off
    (not under test here, and it triples the training time)."""
    from hierarchy.data import synth

    root = tmp_path_factory.mktemp("calib")
    synth.make_ham10000(root / "ham", n_lesions=16, seed=1)
    synth.make_coco(root / "coco", n_images=10, seed=1)
    assert main(["build-dataset", "skin_vs_nonskin", "--ham10000", str(root / "ham"), "--coco", str(root / "coco"),
                 "--out", str(root / "ds")]) == 0
    (root / "cfg.yaml").write_text("train: {ood: false, threshold_target: {target_precision: 0.9, label: skin}}\n")
    assert main(["train", "skin_vs_nonskin", "--config", str(root / "cfg.yaml"), "--data", str(root / "ds"),
                 "--pretrained", "none", "--img-size", "32", "--epochs", "1", "--max-steps", "2", "--batch-size", "16",
                 "--precision", "fp32", "--out", str(root / "runs")]) == 0
    return root, root / "runs" / "skin_vs_nonskin" / "train"


def val_predictions(root, run):
    """(probs at the stored T, raw logits, truth) of the val split, through the shared predictor."""
    import torch

    from hierarchy.evaluate.runner import select_samples
    from hierarchy.data.imageio import load_image
    from hierarchy.registry import get_stage

    predictor = load_predictor(get_stage("skin_vs_nonskin")(), run, device="cpu", precision="fp32")
    samples, _ = select_samples(root / "ds", "val")
    batch = torch.stack([predictor.preset.to_uint8(load_image(s.path, draft_size=32)) for s in samples])
    pred = predictor.predict(batch, return_logits=True)
    y = np.array([list(predictor.labels).index(s.label) for s in samples])
    return pred.probs, pred.logits, y, predictor


def test_temperature_from_training_keeps_labels_and_does_not_raise_nll(trained):
    from hierarchy.metrics.classification import nll, softmax

    root, run = trained
    meta = json.loads((run / "metadata.json").read_text())
    cal = meta["calibration"]
    assert cal["nll_after"] <= cal["nll_before"] and cal["temperature"] == meta["temperature"] > 0
    probs, logits, y, predictor = val_predictions(root, run)
    t = meta["temperature"]
    assert predictor.temperature == t
    assert np.allclose(probs, softmax(logits, t), atol=1e-5)  # the predictor applies the stored T
    assert (probs.argmax(1) == logits.argmax(1)).all()
    assert nll(logits, y, t) <= nll(logits, y, 1.0) + 1e-6


def test_training_tunes_the_configured_threshold(trained):
    root, run = trained
    meta = json.loads((run / "metadata.json").read_text())
    thr = meta["threshold"]
    assert RUN_FIELDS <= set(thr) and thr["split"] == "val" and thr["data"] == str(root / "ds")
    n_val = sum(",val," in line for line in (root / "ds" / "manifest.csv").read_text().splitlines())
    assert thr["target"] == {"target_precision": 0.9, "label": "skin"} and thr["n"] == n_val
    assert "precision" in thr["achieved"] and 0.0 < thr["threshold"] <= 1.0


def test_calibrate_on_another_set_with_decode_errors(trained, capsys):
    root, run = trained
    before = json.loads((run / "metadata.json").read_text())
    rows = [line for line in (root / "ds" / "manifest.csv").read_text().splitlines()[1:] if ",train," in line]
    csv = root / "ds" / "calib.csv"  # the train split as an independent "calibration set", plus a broken file
    csv.write_text("path,label\n" + "".join(f"{r.split(',')[0]},{r.split(',')[1]}\n" for r in rows) + "nope.jpg,skin\n")
    assert main(["calibrate", str(run), "--data", str(csv), "--max-risk", "0.2", "--format", "json",
                 "--precision", "fp32"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == len(rows) and len(summary["decode_errors"]) == 1
    assert summary["after"]["nll"] <= summary["before"]["nll"] + 1e-6  # T refitted on this very set
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["threshold"]["target"] == {"max_risk": 0.2} and meta["threshold"]["split"] == "all"
    assert meta["threshold"]["threshold"] == summary["after"]["threshold"]
    assert meta["calibration"]["data"] == str(csv) and meta["temperature"] == summary["after"]["temperature"]
    assert meta["epochs"] == before["epochs"]  # everything else is kept


def test_calibrate_no_temperature_and_default_target(trained, capsys):
    root, run = trained
    before = json.loads((run / "metadata.json").read_text())
    assert main(["calibrate", str(run), "--data", str(root / "ds"), "--no-temperature", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "temperature kept" in out and "before" in out and "after" in out
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["temperature"] == before["temperature"] and meta["calibration"] == before["calibration"]
    assert meta["threshold"]["target"] == before["threshold"]["target"]  # no flag: the stored target
    assert meta["threshold"]["split"] == "val"


@pytest.mark.parametrize("flags,message", [
    (["--label", "skin"], "--label only applies"),
    (["--target-precision", "0.9"], "needs --label"),
    (["--target-precision", "0.9", "--label", "cat"], "needs 'label', one of"),
    (["--max-risk", "1.5"], r"\[0, 1\]"),
])
def test_calibrate_rejects_bad_targets(trained, capsys, flags, message):
    import re

    root, run = trained
    assert main(["calibrate", str(run), "--data", str(root / "ds")] + flags) == 2
    assert re.search(message, capsys.readouterr().err)


def test_calibrate_target_flags_are_exclusive(trained, capsys):
    root, run = trained
    with pytest.raises(SystemExit) as info:
        main(["calibrate", str(run), "--data", str(root / "ds"), "--max-risk", "0.1", "--target-coverage", "0.9"])
    assert info.value.code == 2


@pytest.mark.parametrize("target", [
    {"max_risk": 0.1, "target_coverage": 0.5}, {"target_coverage": 0.5, "label": "skin"}, {"target_precision": 0.9},
    {"max_risk": 2}, {"coverage": 0.5},
])
def test_train_config_threshold_target_validation(target):
    with pytest.raises(ValueError, match="threshold_target"):
        TrainConfig(threshold_target=target)


def test_train_config_threshold_target_default_and_off():
    assert TrainConfig().threshold_target == {"max_risk": 0.01}
    assert TrainConfig(threshold_target=None).threshold_target is None
    assert TrainConfig(threshold_target={"target_coverage": 0.95}).threshold_target == {"target_coverage": 0.95}


def test_calibrate_keeps_the_runs_temperature_floor(trained, tmp_path, capsys):
    import shutil

    root, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["calibration"]["floor"] = 1.0  # as `train.temperature_floor: 1.0` records it
    (copy / "metadata.json").write_text(json.dumps(meta))
    assert main(["calibrate", str(copy), "--data", str(root / "ds"), "--precision", "fp32", "--format", "json"]) == 0
    capsys.readouterr()
    after = json.loads((copy / "metadata.json").read_text())
    assert after["calibration"]["floor"] == 1.0 and after["temperature"] >= 1.0
    assert after["temperature"] == max(1.0, after["calibration"]["fitted"])


def test_calibrate_ood_refits_the_score_and_run_uses_it(trained, tmp_path, capsys):
    import shutil

    from hierarchy.train.ood import outlier_sources

    root, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert json.loads((copy / "metadata.json").read_text()).get("ood") is None  # trained with ood: false
    assert main(["calibrate", str(copy), "--data", str(root / "ds"), "--ood", "--ood-method", "knn", "--ood-keep",
                 "0.9", "--precision", "fp32", "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    meta = json.loads((copy / "metadata.json").read_text())
    assert meta["ood"] == summary["ood"] and meta["ood"]["method"] == "knn" and meta["ood"]["keep"] == 0.9
    assert meta["ood"]["tune"]["views"] == "shifted" and meta["ood"]["data"] == str(root / "ds")
    n_val = sum(1 for line in (root / "ds" / "manifest.csv").read_text().splitlines() if ",val," in line)
    assert meta["ood"]["tune"]["n"] == n_val and 0.85 <= meta["ood"]["tune"]["kept"] <= 0.95
    assert (copy / "ood.safetensors").is_file()
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"name: p\nroot: g\nstages:\n  g: {{stage: skin_vs_nonskin, weights: {copy}, ood: auto, "
                    "routes: {default: stop}}\n")
    img = next((root / "ham").rglob("*.jpg"))
    assert main(["run", str(pipe), str(img), "--format", "jsonl", "--precision", "fp32"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["status"] in ("ok", "rejected", "abstained") and "ood" in json.dumps(record)
    # generated negatives are out of distribution by design: never part of the keep-rate tuning
    (tmp_path / "ds2").mkdir()
    (tmp_path / "ds2" / "dataset.json").write_text(json.dumps({"sources": {
        "ham10000": {"type": "ham10000"}, "negs": {"type": "outliers"}}}))
    assert outlier_sources(tmp_path / "ds2") == {"negs"} and outlier_sources(tmp_path / "nope") == set()


def test_calibrate_ood_fits_on_aperture_views_and_a_later_refit_keeps_the_share(trained, tmp_path, capsys):
    import shutil

    root, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    common = ["--data", str(root / "ds"), "--ood", "--precision", "fp32", "--format", "json"]
    assert main(["calibrate", str(copy), *common]) == 0
    plain = json.loads(capsys.readouterr().out)["ood"]["fit"]
    assert "aperture_share" not in plain
    assert main(["calibrate", str(copy), *common, "--ood-fit-aperture", "0.5"]) == 0
    fit = json.loads(capsys.readouterr().out)["ood"]["fit"]
    assert fit["aperture_share"] == 0.5 and fit["aperture_radius"] == [0.8, 1.3]
    assert fit["n"] == plain["n"] + round(0.5 * plain["n"])  # every train image once, half of them again
    assert main(["calibrate", str(copy), *common]) == 0  # no flag: the run's own share
    assert json.loads((copy / "metadata.json").read_text())["ood"]["fit"]["aperture_share"] == 0.5
    capsys.readouterr()


def _copy_with_train(run, tmp_path, **train):
    """A copy of the fixture run whose metadata.json ``train`` block says ``train`` (as a run trained
    with those settings records it)."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["train"] = {**meta["train"], **train}
    (copy / "metadata.json").write_text(json.dumps(meta))
    return copy


def _calibrate_json(copy, data, capsys, *flags):
    assert main(["calibrate", str(copy), "--data", str(data), "--precision", "fp32", "--format", "json", *flags]) == 0
    return json.loads(capsys.readouterr().out), json.loads((copy / "metadata.json").read_text())


def test_calibrate_views_fit_the_temperature_on_augmented_views(trained, tmp_path, capsys):
    root, run = trained
    copy = _copy_with_train(run, tmp_path, augment={"rotate": 90, "color_jitter": 0.5, "crop_scale": [0.3, 1.0]})
    n_val = sum(1 for line in (root / "ds" / "manifest.csv").read_text().splitlines() if ",val," in line)
    plain, meta0 = _calibrate_json(copy, root / "ds", capsys, "--views", "0")
    assert meta0["calibration"]["views"] == 0 and meta0["calibration"]["n"] == n_val
    seen, meta2 = _calibrate_json(copy, root / "ds", capsys, "--views", "2")
    assert meta2["calibration"]["views"] == 2 and meta2["calibration"]["n"] == 2 * n_val
    assert meta2["calibration"]["fitted"] != pytest.approx(meta0["calibration"]["fitted"], abs=1e-6)
    assert seen["n"] == n_val and meta2["threshold"]["n"] == n_val  # the threshold: the images as is
    again, meta2b = _calibrate_json(copy, root / "ds", capsys, "--views", "2")
    assert meta2b["calibration"]["fitted"] == meta2["calibration"]["fitted"]  # seeded by train.seed
    assert main(["calibrate", str(copy), "--data", str(root / "ds"), "--precision", "fp32", "--views", "2"]) == 0
    assert "fitted on 2 augmented view(s) of each image" in capsys.readouterr().out


def test_calibrate_uses_the_runs_calibration_views_by_default(trained, tmp_path, capsys):
    root, run = trained
    copy = _copy_with_train(run, tmp_path, calibration_views=3, augment={"rotate": 45})
    n_val = sum(1 for line in (root / "ds" / "manifest.csv").read_text().splitlines() if ",val," in line)
    summary, meta = _calibrate_json(copy, root / "ds", capsys)
    assert summary["views"] == 3 and meta["calibration"]["views"] == 3 and meta["calibration"]["n"] == 3 * n_val
    summary, meta = _calibrate_json(copy, root / "ds", capsys, "--no-temperature")
    assert summary["views"] == 0 and meta["calibration"]["views"] == 3  # the stored calibration is kept


@pytest.mark.parametrize("value", ["-1", "33", "two"])
def test_calibrate_rejects_bad_views(trained, capsys, value):
    root, run = trained
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", str(run), "--data", str(root / "ds"), "--views", value])
    assert exc.value.code == 2 and "argument --views" in capsys.readouterr().err
