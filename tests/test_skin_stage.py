"""skin_vs_nonskin through the CLI: build-dataset, train, run, resume, and the checks around them.

Models here are fixture models trained for 1-2 steps at 32 px: they test plumbing, not accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hierarchy.commands.cli import main
from hierarchy.engine.predictor import load_predictor

TINY = ["--pretrained", "none", "--img-size", "32", "--batch-size", "8", "--max-steps", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from hierarchy.data.synth import make_coco, make_ham10000

    root = tmp_path_factory.mktemp("skin")
    ham = make_ham10000(root / "HAM10000", n_lesions=10, size=(48, 36), seed=1)
    coco = make_coco(root / "coco", n_images=8, size=(48, 36), seed=1)
    out = root / "dataset"
    assert main(["build-dataset", "skin_vs_nonskin", "--ham10000", str(ham), "--coco", str(coco), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    assert main(["train", "skin_vs_nonskin", "--data", str(dataset), "--epochs", "1", "--out", str(runs), *TINY]) == 0
    return runs / "skin_vs_nonskin" / "train"


def test_build_dataset_writes_manifest(dataset, capsys):
    info = json.loads((dataset / "dataset.json").read_text())
    assert info["stage"] == "skin_vs_nonskin" and info["labels"] == ["skin", "non-skin"]
    assert (dataset / "manifest.csv").read_text().startswith("path,label,split,source,group")


def test_train_writes_a_complete_run_dir(run_dir):
    for name in ("best.safetensors", "last.safetensors", "train_state.pt", "metadata.json", "metrics.csv",
                 "config.yaml", "curves.png", "confusion_best.png"):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert meta["stage"] == "skin_vs_nonskin" and meta["labels"] == ["skin", "non-skin"]
    assert meta["arch"]["backbone"] == "resnet18" and meta["input_size"] == 32
    assert len(meta["dataset"]["manifest_sha256"]) == 64
    assert {"torch", "torchvision", "hierarchy"} <= set(meta["versions"])
    assert meta["epochs"][0]["epoch"] == 1 and "val_recall_skin" in meta["epochs"][0]
    assert meta["temperature"] > 0


def test_run_on_run_directory_and_file(run_dir, dataset, tmp_path, capsys):
    imgs = sorted((dataset.parent / "coco" / "val2017").glob("*.jpg"))[:3]
    for weights in (run_dir, run_dir / "best.safetensors"):
        pipe = tmp_path / "p.yaml"
        pipe.write_text(f"name: t\nroot: g\nstages:\n  g:\n    stage: skin_vs_nonskin\n    weights: {weights}\n"
                        "    routes: {default: stop}\n")
        assert main(["run", str(pipe), *map(str, imgs), "--format", "jsonl"]) == 0
        recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["path"] for r in recs] == [str(p) for p in imgs]
        assert all(r["status"] == "ok" and r["label"] in {"skin", "non-skin"} for r in recs)
        assert all(abs(sum(r["trace"][0]["probs"].values()) - 1) < 1e-4 for r in recs)


def test_resume_continues_from_next_epoch(dataset, tmp_path):
    runs = tmp_path / "runs"
    assert main(["train", "skin_vs_nonskin", "--data", str(dataset), "--epochs", "1", "--out", str(runs), *TINY]) == 0
    run = runs / "skin_vs_nonskin" / "train"
    assert main(["train", "skin_vs_nonskin", "--resume", str(run), "--epochs", "2"]) == 0
    epochs = [e["epoch"] for e in json.loads((run / "metadata.json").read_text())["epochs"]]
    assert epochs == [1, 2]
    assert not (runs / "skin_vs_nonskin" / "train2").exists()


def test_second_run_gets_new_directory(dataset, run_dir):
    before = (run_dir / "best.safetensors").stat().st_mtime_ns
    assert main(["train", "skin_vs_nonskin", "--data", str(dataset), "--epochs", "1", "--out",
                 str(run_dir.parent.parent), *TINY]) == 0
    assert (run_dir.parent / "train2" / "best.safetensors").is_file()
    assert (run_dir / "best.safetensors").stat().st_mtime_ns == before


def test_offline_imagenet_pretrained_names_file_and_alternatives(dataset, tmp_path, monkeypatch, capsys):
    from hierarchy.models.weights import fetch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(fetch, "probe", lambda *a, **k: False)  # simulate no network
    code = main(["train", "skin_vs_nonskin", "--data", str(dataset), "--epochs", "1", "--out", str(tmp_path),
                 "--pretrained", "imagenet", "--img-size", "32", "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code != 0
    assert str(tmp_path / "torch-home") in err and "resnet18" in err
    assert "--pretrained none" in err and "--pretrained PATH" in err


def test_predictor_refuses_checkpoint_of_other_stage(run_dir, tmp_path):
    from hierarchy.core.errors import CheckpointError
    from hierarchy.config.stage import Stage

    class Other(Stage):
        name = "other_stage"
        labels = ("skin", "non-skin")

    class Relabelled(Stage):
        name = "skin_vs_nonskin"
        labels = ("non-skin", "skin")

    with pytest.raises(CheckpointError, match="other_stage"):
        load_predictor(Other(), run_dir)
    with pytest.raises(CheckpointError, match=str(run_dir)):
        load_predictor(Relabelled(), run_dir)


def test_config_file_mirrors_defaults():
    from hierarchy.config.load import load_stage_config
    from hierarchy.registry import get_stage

    cls = get_stage("skin_vs_nonskin")
    repo = Path(__file__).resolve().parents[1]
    assert load_stage_config(cls, repo / "configs" / "skin_vs_nonskin.yaml") == cls.Config()


def test_demo_small_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--small", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr()
    assert "GENERATED" in out.err
    rows = [line for line in out.out.splitlines()[1:] if line.strip()]
    assert len(rows) == 6 and all("gate:" in r for r in rows)
    assert (tmp_path / "demo" / "pipeline.yaml").is_file()


def test_build_dataset_flags_keep_the_stage_sources(dataset, tmp_path):
    root = dataset.parent
    out = tmp_path / "seeded"
    assert main(["build-dataset", "skin_vs_nonskin", "--ham10000", str(root / "HAM10000"), "--coco", str(root / "coco"),
                 "--seed", "7", "--materialize", "link", "--out", str(out)]) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["config"]["seed"] == 7 and set(info["sources"]) == {"ham10000", "coco"}
    assert (out / "train" / "skin").is_dir()


def test_train_survives_a_last_batch_of_one(tmp_path):
    from hierarchy.data.synth import make_image_folder

    for split, n in (("train", 5), ("val", 2)):
        make_image_folder(tmp_path / "data" / split, ["skin", "non-skin"], n_per_label=n, size=(32, 32))
    # 10 train images in batches of 3: the last batch holds one image, which BatchNorm cannot train on
    assert main(["train", "skin_vs_nonskin", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "runs"),
                 "--pretrained", "none", "--img-size", "32", "--batch-size", "3", "--epochs", "1"]) == 0
    meta = json.loads((tmp_path / "runs" / "skin_vs_nonskin" / "train" / "metadata.json").read_text())
    from hierarchy.core.machine import has_amx
    from hierarchy.models.device import cpu_supports_bf16

    assert meta["precision"] == ("bf16" if cpu_supports_bf16() and has_amx() else "fp32")  # auto, untuned: bf16 with AMX
