"""`hierarchy train` flags for what happens after training: calibration, threshold target, OOD fit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hierarchy.commands.cli import main
from hierarchy.commands.train import threshold_target


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hierarchy.data.synth import make_image_folder

    root = tmp_path_factory.mktemp("train-cli")
    for split, n in (("train", 6), ("val", 4)):
        make_image_folder(root / split, ["skin", "non-skin"], n_per_label=n, size=(32, 32))
    return root


def train(data: Path, out: Path, *flags: str) -> dict:
    """A fixture model trained for one step (plumbing only); returns its metadata.json."""
    assert main(["train", "skin_vs_nonskin", "--data", str(data), "--out", str(out), "--pretrained", "none",
                 "--img-size", "32", "--batch-size", "8", "--epochs", "1", "--max-steps", "1", *flags]) == 0
    return json.loads((out / "skin_vs_nonskin" / "train" / "metadata.json").read_text())


def test_train_flags_set_the_threshold_target_and_ood_fit(data: Path, tmp_path: Path) -> None:
    meta = train(data, tmp_path, "--threshold-target", "target_coverage=0.5", "--ood-method", "mahalanobis",
                 "--ood-keep", "0.9", "--ood-fit-aperture", "0.25", "--no-calibrate")
    assert meta["threshold"]["target"] == {"target_coverage": 0.5}
    assert meta["ood"]["method"] == "mahalanobis" and meta["ood"]["keep"] == 0.9
    assert meta["train"]["ood_fit_aperture"] == 0.25 and meta["ood"]["fit"]["aperture_share"] == 0.25
    assert meta["temperature"] == 1.0 and meta["train"]["calibrate"] is False


def test_train_flags_switch_tuning_and_ood_off(data: Path, tmp_path: Path) -> None:
    meta = train(data, tmp_path, "--threshold-target", "none", "--no-ood")
    assert meta["threshold"] is None and meta["ood"] is None
    assert meta["train"]["threshold_target"] is None and meta["train"]["ood"] is False


@pytest.mark.parametrize(("flag", "message"), [
    ("max_risk=2", "max_risk must be a number in [0, 1]"),
    ("target_precision=0.9", "needs 'label'"),
])
def test_bad_threshold_target_is_a_usage_error_naming_the_key(data: Path, tmp_path: Path, capsys, flag: str,
                                                              message: str) -> None:
    code = main(["train", "skin_vs_nonskin", "--data", str(data), "--out", str(tmp_path), "--pretrained", "none",
                 "--threshold-target", flag])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "skin_vs_nonskin").exists()


def test_threshold_target_flag_parsing() -> None:
    assert threshold_target("target_precision=0.99,label=mel") == {"target_precision": 0.99, "label": "mel"}
    assert threshold_target("max_risk=0") == {"max_risk": 0.0}
    with pytest.raises(Exception, match="expected KIND=X"):
        threshold_target("max_risk")
    with pytest.raises(Exception, match="expected a number"):
        threshold_target("max_risk=low")
