"""End to end on generated data: train the three dermatology stages with `hierarchy build-dataset`
and `hierarchy train`, then route a mixed folder through configs/derm_cascade.yaml and check how
deep each image goes: non-skin stops at stage 1, benign at stage 2, malignant reaches stage 3."""
from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from hierarchy.commands.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "hierarchy-ham10000"
CASCADE = REPO / "configs" / "derm_cascade.yaml"
MALIGNANT = {"mel", "bcc", "akiec"}
STAGE_IDS = ["skin", "malignancy", "diagnosis"]
# Measured over 4 data seeds on 60 scenes + 140 lesions held back: every trace depth right, lesion_type
# 60/60 on the malignant ones. resnet10t (timm) is resnet18's recipe with one block per stage: half
# the CPU time at 32 px, so more lesions and epochs fit the time budget.
EPOCHS = {"skin_vs_nonskin": 4, "benign_vs_malignant": 8, "lesion_type": 8}
TRAIN_FLAGS = ["--backbone", "resnet10t", "--pretrained", "none", "--img-size", "32", "--workers", "0",
               "--device", "cpu", "--precision", "fp32", "--cache"]
BATCH = 32
IMG = (48, 36)


@pytest.fixture
def derm_stages(no_autoload, monkeypatch):
    """The gate plus the example distribution's two stages, from source, whatever is installed."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from hierarchy_ham10000 import benign_vs_malignant, lesion_type

    from hierarchy.registry import register_plugin
    from hierarchy.stages.skin_vs_nonskin import plugin as gate

    register_plugin(gate, name="skin_vs_nonskin")
    register_plugin(benign_vs_malignant, name="benign_vs_malignant")
    register_plugin(lesion_type, name="lesion_type")


@pytest.fixture
def one_thread():
    """32-pixel training steps gain nothing from intra-op threads; on a shared 2-core machine two
    spinning threads cost about four times the CPU time of one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def uniform_dx() -> dict[str, float]:
    from hierarchy.data.synth import DX_STYLE

    return {dx: 1.0 for dx in DX_STYLE}


def make_mixed(root: Path) -> dict[str, str]:
    """A flat folder of held-back generated images; returns file name -> truth (a dx, or 'scene')."""
    from hierarchy.data.synth import make_coco, make_ham10000

    ham = make_ham10000(root / "_ham", n_lesions=21, max_images_per_lesion=1, size=IMG, seed=7, dx_weights=uniform_dx())
    coco = make_coco(root / "_coco", sets=("val2017",), n_images=9, size=IMG, seed=7)
    with open(ham / "HAM10000_metadata.csv", newline="") as f:
        dx_of = {row["image_id"]: row["dx"] for row in csv.DictReader(f)}
    (root / "mixed").mkdir()
    truth = {}
    for src in sorted(ham.rglob("*.jpg")) + sorted(coco.rglob("*.jpg")):
        kind = dx_of.get(src.stem, "scene")
        truth[f"{kind}_{src.name}"] = kind
        shutil.copyfile(src, root / "mixed" / f"{kind}_{src.name}")
    return truth


def batch_size(dataset: Path) -> int:
    """BATCH, unless that leaves a last training batch of one image: batch norm cannot train on a
    single 1x1 feature map (the trainer keeps incomplete batches), so take one less then."""
    n_train = sum(json.loads((dataset / "dataset.json").read_text())["counts"]["by_split"]["train"].values())
    return BATCH - 1 if n_train % BATCH == 1 else BATCH


def train_all(tmp_path: Path) -> dict[str, float]:
    """build-dataset + train for each stage into ./runs/<stage>/train; returns seconds per stage."""
    from hierarchy.data.synth import make_coco, make_ham10000

    ham = make_ham10000(tmp_path / "ham", n_lesions=280, max_images_per_lesion=1, size=IMG, seed=1,
                        dx_weights=uniform_dx())  # 40 lesions of every dx; one image each: more variety
    coco = make_coco(tmp_path / "coco", n_images=120, size=IMG, seed=1)  # 240 scenes for the gate
    seconds = {}
    for stage, epochs in EPOCHS.items():
        start = time.perf_counter()
        build = ["-q", "build-dataset", stage, "--ham10000", str(ham), "--out", f"datasets/{stage}"]
        assert main(build + (["--coco", str(coco)] if stage == "skin_vs_nonskin" else [])) == 0
        train = ["-q", "train", stage, "--data", f"datasets/{stage}", "--epochs", str(epochs),
                 "--batch-size", str(batch_size(Path("datasets") / stage)), *TRAIN_FLAGS]
        assert main(train) == 0
        seconds[stage] = time.perf_counter() - start
    return seconds


def test_cascade_points_at_default_run_dirs(derm_stages):
    from hierarchy.engine.pipeline import load_pipeline

    pipe = load_pipeline(CASCADE, check_stages=False)  # the runs are not trained here: no weight checks
    assert pipe.depth_order() == STAGE_IDS
    for sid, node in pipe.stages.items():
        assert node.weights == f"runs/{node.stage}/train/best.safetensors"
        assert isinstance(node.threshold, float)


def run_cascade(tmp_path: Path) -> dict[str, dict]:
    """configs/derm_cascade.yaml with thresholds 0 and OOD off (tiny models: every route is taken),
    run over ./mixed; returns file name -> output record."""
    pipe = yaml.safe_load(CASCADE.read_text())
    for node in pipe["stages"].values():
        node["threshold"], node["ood"] = 0.0, "off"
    (tmp_path / "cascade.yaml").write_text(yaml.safe_dump(pipe))  # weights runs/... beside it: the new runs
    assert main(["run", "cascade.yaml", "mixed", "--format", "jsonl", "-o", "out.jsonl", "--device", "cpu",
                 "--precision", "fp32"]) == 0
    return {Path(r["path"]).name: r for r in map(json.loads, Path("out.jsonl").read_text().splitlines())}


def wrong_depths(recs: dict[str, dict], truth: dict[str, str]) -> dict[str, list]:
    """Images whose trace is not skin | skin > malignancy | skin > malignancy > diagnosis as expected."""
    wrong = {}
    for name, kind in truth.items():
        depth = 1 if kind == "scene" else 3 if kind in MALIGNANT else 2
        trace = recs[name]["trace"]
        if [t["stage"] for t in trace] != STAGE_IDS[:depth]:
            wrong[name] = [(t["stage"], t["label"], round(t["confidence"], 3)) for t in trace]
    return wrong


def test_cascade_trace_depth_end_to_end(derm_stages, one_thread, tmp_path, monkeypatch, capsys):
    start = time.perf_counter()
    monkeypatch.chdir(tmp_path)
    seconds = train_all(tmp_path)
    truth = make_mixed(tmp_path)
    recs = run_cascade(tmp_path)
    assert set(recs) == set(truth)
    diagnosed = [(truth[n], r["label"]) for n, r in recs.items() if len(r["trace"]) == 3]
    correct = sum(a == b for a, b in diagnosed)
    with capsys.disabled():
        print(f"\nderm cascade e2e: {len(truth)} images, lesion_type {correct}/{len(diagnosed)} right, seconds "
              f"{ {k: round(v, 1) for k, v in seconds.items()} }, total {time.perf_counter() - start:.1f}")
    assert wrong_depths(recs, truth) == {}
    assert 3 * correct >= 2 * len(diagnosed), diagnosed  # chance is 1/7
