"""The int8 path: `hierarchy export RUN --int8 --data DATA` quantises a run on its own training images,
keeps it only when its top-1 agrees with fp32 on the val split, records the guard in metadata.json,
and `hierarchy run --engine onnx --precision int8` serves it; a broken calibration is refused.

The fixture is a *trained* model: ResNet18 at 32 px trained for 5 steps on generated images that are
separable by colour (skin tones vs saturated scenes, hierarchy.data.synth), so its val accuracy is 1.0
and fp32 has clear decisions for int8 to agree with. Plumbing and the guard, not real-image accuracy
(benchmarks/bench_int8.py --run --data measures that on a real trained run).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hierarchy.commands.cli import main
from hierarchy.core.errors import EngineError, ExportError
from hierarchy.core.fsutil import sha256_file
from hierarchy.engine.backends import ENGINES, unmet_need
from hierarchy.engine.backends.base import Checkpoint
from hierarchy.engine.quantize import int8_path_for, int8_problem, quantize_checkpoint

LABELS = ["skin", "non-skin"]
PIPE = ("name: int8\nroot: gate\nstages:\n"  # OOD off: its threshold keeps all val images, so ties tip either way
        "  gate: {{stage: skin_vs_nonskin, weights: {run}, ood: 'off', routes: {{default: stop}}}}\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run dir exported with --int8, its dataset)."""
    from hierarchy.data.synth import make_image_folder
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin
    from hierarchy.train.trainer import train_stage

    root = tmp_path_factory.mktemp("int8")
    make_image_folder(root / "data" / "train", LABELS, n_per_label=12, size=(40, 30), seed=0)
    make_image_folder(root / "data" / "val", LABELS, n_per_label=8, size=(40, 30), seed=1)
    cfg = SkinVsNonskin.Config(train={
        "pretrained": "none", "epochs": 1, "max_steps_per_epoch": 5, "batch_size": 8, "img_size": 32,
        "device": "cpu", "precision": "fp32", "workers": 0, "threshold_target": {"target_coverage": 0.5},
        "out": str(root / "runs")})
    run = train_stage(SkinVsNonskin(cfg), root / "data", progress=False)
    assert main(["-q", "export", str(run), "--int8", "--data", str(root / "data"), "--calibration-images", "16"]) == 0
    return run, root / "data"


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def splits(data: Path) -> tuple[list, list]:
    from hierarchy.data.labelled import load_samples

    samples = load_samples(data)
    return [s for s in samples if s.split == "train"], [s for s in samples if s.split == "val"]


def run_labels(tmp_path: Path, run: Path, images: list[Path], *flags: str) -> tuple[int, list[str | None]]:
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(PIPE.format(run=run))
    out = tmp_path / f"out{'_'.join(flags)}.jsonl"
    rc = main(["-q", "run", str(pipe), *map(str, images), "--format", "jsonl", "-o", str(out), *flags])
    return rc, [json.loads(line)["label"] for line in out.read_text().splitlines()] if rc == 0 else []


def test_guard_passes_and_is_recorded(trained: tuple[Path, Path]) -> None:
    run, _ = trained
    ckpt = Checkpoint.open(run)
    entry = json.loads((run / "metadata.json").read_text())["int8"]["best.int8.onnx"]
    assert entry["passed"] is True and entry["min_agreement"] == 0.995
    assert entry["agreement"] >= 0.995 and entry["accuracy_fp32"] == 1.0
    assert entry["calibration_images"] == 16 and entry["val_images"] == 16
    assert entry["sha256"] == sha256_file(int8_path_for(ckpt.weights))
    assert entry["source_sha256"] == sha256_file(ckpt.weights)
    assert {"onnx", "openvino"} <= set(entry["engines"]) or set(entry["engines"]) == {"onnx"}
    for key in ("ece_fp32", "ece_int8", "ood_decision_flips", "ood_score_correlation", "date"):
        assert key in entry
    assert entry["auroc_fp32"] == 1.0 and abs(entry["auroc_int8"] - entry["auroc_fp32"]) < 0.05
    assert abs(entry["ece_int8"] - entry["ece_fp32"]) < 0.05
    assert int8_problem(ckpt) is None and unmet_need(ENGINES["onnx"], ckpt, "cpu", "int8") is None
    from hierarchy.commands.export import render_int8

    assert f"onnx {100 * entry['engines']['onnx']['agreement']:.2f}% (serves it)" in render_int8(entry)


def test_run_int8_through_the_cli_gives_fp32_labels(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = trained
    images = sorted((data / "val").rglob("*.jpg"))
    rc8, int8 = run_labels(tmp_path, run, images, "--engine", "onnx", "--precision", "int8")
    rc32, fp32 = run_labels(tmp_path, run, images, "--engine", "onnx", "--precision", "fp32")
    assert rc8 == rc32 == 0 and len(int8) == len(images) and int8 == fp32
    if "openvino" in json.loads((run / "metadata.json").read_text())["int8"]["best.int8.onnx"]["engines"]:
        rc, ov = run_labels(tmp_path, run, images, "--engine", "openvino", "--precision", "int8")
        assert rc == 0 and ov == fp32
    from hierarchy.engine.predictor import load_predictor
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin

    assert load_predictor(SkinVsNonskin(), run, device="cpu", precision="int8", engine="onnx").precision == "int8"


def test_broken_calibration_is_refused_recorded_and_not_served(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = trained
    run = copy_run(run, tmp_path)
    train, val = splits(data)
    with pytest.raises(ExportError, match=r"int8 export refused: agreement \d+\.\d\d% < 99\.50%"):
        quantize_checkpoint(Checkpoint.open(run), train, val, calibration_images=16, batch_size=5,  # 4 batches
                            calibration_transform=np.zeros_like)  # constant images: every range collapses
    ckpt = Checkpoint.open(run)
    assert not int8_path_for(ckpt.weights).exists()  # the passing file of before is gone too
    entry = json.loads((run / "metadata.json").read_text())["int8"]["best.int8.onnx"]
    assert entry["passed"] is False and entry["agreement"] < 0.995
    problem = int8_problem(ckpt)
    assert problem and problem.startswith("int8 export failed its guard: agreement")
    assert unmet_need(ENGINES["onnx"], ckpt, "cpu", "int8") == problem
    images = sorted((data / "val").rglob("*.jpg"))[:2]
    rc, _ = run_labels(tmp_path, run, images, "--engine", "onnx", "--precision", "int8")
    assert rc == 2  # ExportError: a configuration problem


def test_an_engine_that_failed_its_guard_does_not_serve_the_file_another_passed(
        trained: tuple[Path, Path], tmp_path: Path) -> None:
    """One file, two int8 runtimes with their own kernels: the record of the guard on ONNX Runtime is
    set to a failing agreement, so only OpenVINO may serve it (by hand, by the tuner's candidates)."""
    pytest.importorskip("openvino")
    from hierarchy.engine.tune import served_precisions

    run, data = trained
    run = copy_run(run, tmp_path)
    meta = json.loads((run / "metadata.json").read_text())
    entry = meta["int8"]["best.int8.onnx"]
    entry["engines"]["onnx"]["agreement"] = 0.9947
    (run / "metadata.json").write_text(json.dumps(meta))
    ckpt = Checkpoint.open(run)
    problem = unmet_need(ENGINES["onnx"], ckpt, "cpu", "int8")
    assert problem == ("int8 export failed its guard on onnx: agreement 99.47% < 99.50%; it passed on openvino "
                       "(--engine openvino --precision int8)")
    assert unmet_need(ENGINES["openvino"], ckpt, "cpu", "int8") is None and int8_problem(ckpt) is None
    assert "int8" not in served_precisions(ENGINES["onnx"], ckpt, "cpu", "auto")
    assert "int8" in served_precisions(ENGINES["openvino"], ckpt, "cpu", "auto")
    images = sorted((data / "val").rglob("*.jpg"))
    rc_ov, ov = run_labels(tmp_path, run, images, "--engine", "openvino", "--precision", "int8")
    rc_onnx, _ = run_labels(tmp_path, run, images[:2], "--engine", "onnx", "--precision", "int8")
    assert rc_ov == 0 and len(ov) == len(images) and rc_onnx == 2
    from hierarchy.commands.export import render_int8

    assert "onnx 99.47% (refused)" in render_int8(entry) and "(serves it)" in render_int8(entry)
    del entry["engines"]["openvino"]
    entry["engines"]["onnx"]["agreement"] = 1.0
    (run / "metadata.json").write_text(json.dumps(meta))
    assert unmet_need(ENGINES["openvino"], Checkpoint.open(run), "cpu", "int8").startswith(
        "int8 export was not checked on openvino (not installed when it was made); it passed on onnx")


def test_replaced_or_stale_int8_file_is_refused(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from hierarchy.engine.backends import onnx_backend

    run = copy_run(trained[0], tmp_path)
    path = int8_path_for(run / "best.safetensors")
    path.write_bytes(path.read_bytes() + b"\0")
    assert "not the file recorded" in int8_problem(Checkpoint.open(run))
    with pytest.raises(ExportError, match="not the file recorded"):
        onnx_backend.load(Checkpoint.open(run), "cpu", "int8")
    meta = json.loads((run / "metadata.json").read_text())
    meta["int8"]["best.int8.onnx"]["source_sha256"] = "0" * 64
    (run / "metadata.json").write_text(json.dumps(meta))
    assert int8_problem(Checkpoint.open(run)).startswith("stale int8 export")


def test_int8_is_refused_on_torch_and_in_training(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from hierarchy.engine.predictor import load_predictor
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin

    run, _ = trained
    with pytest.raises(EngineError, match="--engine onnx or openvino, not torch"):
        load_predictor(SkinVsNonskin(), run, device="cpu", precision="int8", engine="torch")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("best.safetensors", "metadata.json"):
        shutil.copy(run / name, bare / name)
    meta = json.loads((bare / "metadata.json").read_text())
    del meta["int8"]
    (bare / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(EngineError, match="no int8 export: run `hierarchy export .* --int8 --data DATASET`"):
        load_predictor(SkinVsNonskin(), bare, device="cpu", precision="int8")  # auto: no engine can, torch says why
    with pytest.raises(ValueError, match="int8 is an inference precision"):
        SkinVsNonskin.Config(train={"precision": "int8"})


def test_int8_flags_are_checked(trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, data = trained
    assert main(["export", str(run), "--data", str(data)]) == 2
    assert main(["export", str(run), "--int8"]) == 2
    pipe = tmp_path / "p.yaml"
    pipe.write_text(PIPE.format(run=run))
    assert main(["export", str(pipe), "--int8", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "--data applies to --int8 only" in err and "--int8 needs --data" in err and "not a pipeline" in err


def test_the_guard_measures_ranking_drift_and_warns_on_it() -> None:
    import numpy as np

    from hierarchy.engine.int8_guard import drift_warnings, guard_metrics

    y = np.array([0, 0, 1, 1, 2, 2])
    logits32 = 4.0 * np.eye(3)[y]
    feats = np.zeros((6, 2))
    same = guard_metrics((logits32, feats), (logits32.copy(), feats), y, 1.0)
    assert same["auroc_fp32"] == same["auroc_int8"] == 1.0 and not drift_warnings(same)
    # every argmax still right (top-1 agrees), but a class-1 image now has more class-0 probability
    # than a class-0 image has: the ranking thresholds rely on is broken
    logits8 = logits32.copy()
    logits8[0] = [2.0, 1.9, 1.9]
    logits8[2] = [1.9, 2.0, -10.0]
    drifted = guard_metrics((logits32, feats), (logits8, feats), y, 1.0)
    assert drifted["agreement"] == 1.0 and drifted["auroc_int8"] < 1.0
    assert any("AUROC drops" in w for w in drift_warnings(drifted))
