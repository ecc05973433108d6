"""skin_vs_nonskin on the real HAM10000 + COCO images in ../shared/data (skipped when absent)."""
from __future__ import annotations

import csv
import json
import time

import pytest

from hierarchy.commands.cli import main

pytestmark = pytest.mark.real_data


def test_real_data_build_and_train(real_data, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("stage: skin_vs_nonskin\ndataset:\n  max_ratio: 3\n  sources:\n"
                   "    - {type: ham10000, label: skin}\n    - {type: coco, label: non-skin}\n")
    out = tmp_path / "dataset"
    start = time.perf_counter()
    assert main(["build-dataset", "skin_vs_nonskin", "--config", str(cfg), "--ham10000", str(real_data / "ham10000"),
                 "--coco", str(real_data / "coco"), "--out", str(out)]) == 0
    built = time.perf_counter()
    splits_of: dict[str, set[str]] = {}
    with open(out / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["source"] == "ham10000":
                splits_of.setdefault(row["group"], set()).add(row["split"])
    assert splits_of and all(len(s) == 1 for s in splits_of.values())  # no lesion in two splits
    assert main(["train", "skin_vs_nonskin", "--config", str(cfg), "--data", str(out), "--out", str(tmp_path / "runs"),
                 "--pretrained", "none", "--img-size", "64", "--epochs", "3", "--batch-size", "32"]) == 0
    meta = json.loads((tmp_path / "runs" / "skin_vs_nonskin" / "train" / "metadata.json").read_text())
    best = meta["best"]
    balanced = (best["val_recall_skin"] + best["val_recall_non-skin"]) / 2
    print(f"\nreal data: build {built - start:.1f}s, train {time.perf_counter() - built:.1f}s, "
          f"val acc {best['val_acc']:.4f}, balanced acc {balanced:.4f}, recalls skin {best['val_recall_skin']:.4f} "
          f"non-skin {best['val_recall_non-skin']:.4f}, counts {json.loads((out / 'dataset.json').read_text())['counts']['by_split']}")
    assert balanced > 0.8  # chance is 0.5
