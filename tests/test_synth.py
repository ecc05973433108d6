"""Synthetic data generators (hierarchy.data.synth) write the real formats, deterministically."""
from __future__ import annotations

import contextlib
import csv
import io
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hierarchy.data import synth
from hierarchy.data.imageio import load_image


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_ham10000_format(tmp_path: Path) -> None:
    root = synth.make_ham10000(tmp_path / "ham", n_lesions=14, max_images_per_lesion=3, size=(40, 30))
    with open(root / "HAM10000_metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == synth.HAM_COLUMNS
    assert all(re.fullmatch(r"SYN_\d{7}", r["image_id"]) and re.fullmatch(r"SYN_L\d{7}", r["lesion_id"]) for r in rows)
    assert {r["dx"] for r in rows} == set(synth.DX_STYLE)  # every dx appears when n_lesions >= 7
    per_lesion = Counter(r["lesion_id"] for r in rows)
    assert len(per_lesion) == 14 and max(per_lesion.values()) > 1
    assert len({r["dx"] for r in rows if r["lesion_id"] == rows[0]["lesion_id"]}) == 1
    part1, part2 = (sorted(x.stem for x in (root / f"HAM10000_images_part_{k}").glob("*.jpg")) for k in (1, 2))
    assert part1 and part2 and sorted(part1 + part2) == sorted(r["image_id"] for r in rows)
    img = load_image(root / "HAM10000_images_part_1" / f"{rows[0]['image_id']}.jpg")
    assert img.size == (40, 30) and img.mode == "RGB"
    assert not list(root.rglob("*.tmp"))


def test_coco_format(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    root = synth.make_coco(tmp_path / "coco", sets=("train2017", "val2017"), n_images=10, size=(48, 36))
    ids = []
    for name in ("train2017", "val2017"):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(root / "annotations" / f"instances_{name}.json"))
        assert coco.loadCats([1])[0]["name"] == "person"
        assert len(coco.getImgIds(catIds=[1])) == 5  # about half contain a person
        for img in coco.loadImgs(coco.getImgIds()):
            assert re.fullmatch(r"\d{12}\.jpg", img["file_name"]) and (root / name / img["file_name"]).is_file()
            assert load_image(root / name / img["file_name"]).size == (img["width"], img["height"]) == (48, 36)
            ids.append(img["id"])
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 48 and y + h <= 36 and ann["area"] == w * h and ann["iscrowd"] == 0
    assert len(set(ids)) == 20


def test_ood_and_image_folder(tmp_path: Path) -> None:
    ood = synth.make_ood(tmp_path / "ood", n=6, size=(20, 10))
    assert len(list(ood.glob("*.jpg"))) == 6
    arr = np.asarray(load_image(next(ood.glob("*.jpg"))), dtype=np.int16)
    assert arr.shape == (10, 20, 3) and np.abs(arr[..., 0] - arr[..., 2]).max() < 30  # grey
    folder = synth.make_image_folder(tmp_path / "f", ["x", "y"], n_per_label=3, size=(16, 16))
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jpg")) == [
        f"{lab}/{lab}_{i:04d}.jpg" for lab in "xy" for i in range(3)]


@pytest.mark.parametrize("make", [
    lambda r, s: synth.make_ham10000(r, n_lesions=8, size=(24, 18), seed=s),
    lambda r, s: synth.make_coco(r, n_images=4, size=(24, 18), seed=s),
    lambda r, s: synth.make_ood(r, n=4, size=(24, 18), seed=s),
    lambda r, s: synth.make_image_folder(r, ["a", "b"], n_per_label=2, size=(16, 16), seed=s),
])
def test_deterministic_given_seed(tmp_path: Path, make) -> None:
    a, b, c = (files(make(tmp_path / k, seed)) for k, seed in (("a", 5), ("b", 5), ("c", 6)))
    assert a == b and a != c


def _features(path: Path) -> np.ndarray:
    return np.asarray(load_image(path).resize((8, 6)), dtype=np.float64).ravel() / 255


def _nearest_centroid_accuracy(x: np.ndarray, y: list[str]) -> float:
    """Leave-half-out nearest centroid: fit on even items, score on odd ones."""
    labels = sorted(set(y))
    y_arr = np.array(y)
    fit, score = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    cents = np.stack([x[fit & (y_arr == lab)].mean(0) for lab in labels])
    pred = np.array(labels)[np.argmin(((x[score][:, None] - cents[None]) ** 2).sum(-1), axis=1)]
    return float((pred == y_arr[score]).mean())


def test_skin_and_dx_are_easy_to_separate(tmp_path: Path) -> None:
    ham = synth.make_ham10000(tmp_path / "ham", n_lesions=70, max_images_per_lesion=1, size=(48, 36),
                              dx_weights={dx: 1.0 for dx in synth.DX_STYLE})
    coco = synth.make_coco(tmp_path / "coco", sets=("train2017",), n_images=40, size=(48, 36))
    with open(ham / "HAM10000_metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ham_files = [next(ham.glob(f"*/{r['image_id']}.jpg")) for r in rows]
    coco_files = sorted((coco / "train2017").glob("*.jpg"))
    x = np.stack([_features(p) for p in ham_files + coco_files])
    gate = ["skin"] * len(ham_files) + ["nonskin"] * len(coco_files)
    order = np.random.default_rng(0).permutation(len(gate))
    assert _nearest_centroid_accuracy(x[order], [gate[i] for i in order]) >= 0.95
    # a linear-ish probe on pixels already tells lesion types apart; a CNN does better
    assert _nearest_centroid_accuracy(x[: len(ham_files)], [r["dx"] for r in rows]) >= 0.5
