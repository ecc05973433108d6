"""Reading labelled data (hierarchy.data.labelled): builder manifests, split trees, ImageFolders, label CSVs."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hierarchy.data import synth
from hierarchy.data.labelled import Sample, load_samples, manifest_sha256, read_manifest
from hierarchy.data.builder import build_dataset
from hierarchy.data.dataset_config import DatasetConfig
from hierarchy.core.errors import DatasetError

LABELS = ("skin", "nonskin")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("built")
    synth.make_ham10000(root / "ham", n_lesions=12, size=(24, 18), seed=2)
    synth.make_coco(root / "coco", n_images=6, size=(24, 18), seed=2)
    cfg = DatasetConfig.model_validate({"sources": [
        {"type": "ham10000", "root": str(root / "ham"), "label": "skin"},
        {"type": "coco", "root": str(root / "coco"), "label": "nonskin"},
    ]})
    build_dataset(cfg, root / "out", labels=LABELS, stage="skin_vs_nonskin", progress=False)
    return root / "out"


def test_builder_output(built: Path) -> None:
    everything = load_samples(built, labels=LABELS)
    assert everything == load_samples(built / "manifest.csv")
    train, val = load_samples(built, "train", LABELS), load_samples(built, "val", LABELS)
    assert train and val and len(train) + len(val) == len(everything)
    assert {s.split for s in train} == {"train"} and {s.source for s in everything} == {"ham10000", "coco"}
    assert all(s.path.is_absolute() and s.path.is_file() for s in everything)
    assert load_samples(built, "test") == []
    with pytest.raises(DatasetError, match="unknown label.*'skin'"):
        load_samples(built, labels=("nonskin", "other"))


def test_manifest_sha256(built: Path) -> None:
    digest = hashlib.sha256((built / "manifest.csv").read_bytes()).hexdigest()
    assert manifest_sha256(built) == manifest_sha256(built / "manifest.csv") == digest
    assert json.loads((built / "dataset.json").read_text())["manifest_sha256"] == digest


def test_seed_style_split_tree(tmp_path: Path) -> None:
    synth.make_image_folder(tmp_path / "data" / "train", LABELS, n_per_label=3, size=(16, 16))
    synth.make_image_folder(tmp_path / "data" / "val", LABELS, n_per_label=2, size=(16, 16), seed=1)
    train = load_samples(tmp_path / "data", "train", LABELS)
    val = load_samples(tmp_path / "data", "val", LABELS)
    assert len(train) == 6 and len(val) == 4
    assert {(s.label, s.split) for s in val} == {("skin", "val"), ("nonskin", "val")}
    assert all(s.path.parent.name == s.label for s in train + val)
    assert len(load_samples(tmp_path / "data")) == 10
    digest = manifest_sha256(tmp_path / "data")  # a fingerprint of the listing when there is no manifest
    assert digest == manifest_sha256(tmp_path / "data") and len(digest) == 64
    (tmp_path / "data" / "val" / "skin" / "skin_0000.jpg").rename(tmp_path / "data" / "val" / "nonskin" / "moved.jpg")
    assert manifest_sha256(tmp_path / "data") != digest
    with pytest.raises(DatasetError, match="unknown label"):
        load_samples(tmp_path / "data", "train", ("skin",))


def test_flat_image_folder(tmp_path: Path) -> None:
    synth.make_image_folder(tmp_path / "flat", ["a", "b", "c"], n_per_label=2, size=(16, 16))
    samples = load_samples(tmp_path / "flat", labels=("a", "b", "c"))
    assert [s.label for s in samples] == ["a", "a", "b", "b", "c", "c"]
    assert all(s.split is None for s in samples)
    with pytest.raises(DatasetError, match="no train/val/test split"):
        load_samples(tmp_path / "flat", "train")


def test_multi_level_csv(tmp_path: Path) -> None:
    synth.make_image_folder(tmp_path / "imgs", ["skin"], n_per_label=2, size=(16, 16))
    csv_file = tmp_path / "truth.csv"
    csv_file.write_text(
        "path,label,benign_malignant,dx\n"
        "imgs/skin/skin_0000.jpg,skin,malignant,mel\n"
        f"{tmp_path / 'imgs' / 'skin' / 'skin_0001.jpg'},skin,benign,nv\n"
    )
    samples = load_samples(csv_file, labels=LABELS)
    assert samples == [
        Sample(tmp_path / "imgs" / "skin" / "skin_0000.jpg", "skin", extra_labels=("malignant", "mel")),
        Sample(tmp_path / "imgs" / "skin" / "skin_0001.jpg", "skin", extra_labels=("benign", "nv")),
    ]
    with pytest.raises(DatasetError, match="no train/val/test split"):
        load_samples(csv_file, "val")


def test_csv_label_column_may_be_named_by_stage(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("path,skin_vs_nonskin,benign_malignant\na.jpg,skin,benign\n")
    (s,) = read_manifest(tmp_path / "t.csv")
    assert (s.label, s.extra_labels, s.path) == ("skin", ("benign",), tmp_path / "a.jpg")


@pytest.mark.parametrize("text,match", [
    ("", "empty file"),
    ("file,label\na.jpg,x\n", "no 'path' column"),
    ("path,label,split\na.jpg,x,train\nb.jpg,x\n", r"t\.csv:3: expected 3 columns"),
    ("path,label,split\na.jpg,x,train\nb.jpg,x,holdout\n", r"t\.csv:3: split 'holdout'"),
    ("path,label\na.jpg,x\n,y\n", r"t\.csv:3: empty path"),
    ("path,label\na.jpg,\n", r"t\.csv:2: empty label"),
])
def test_bad_rows_name_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(DatasetError, match=match):
        read_manifest(tmp_path / "t.csv")


def test_missing_data(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_samples(tmp_path / "nope")
    with pytest.raises(DatasetError, match="manifest not found"):
        read_manifest(tmp_path)
