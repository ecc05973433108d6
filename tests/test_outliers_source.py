"""The ``outliers`` source: generated negatives for outlier exposure (issue 13)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from hierarchy.commands.cli import main
from hierarchy.data import synth
from hierarchy.data.labelled import read_manifest
from hierarchy.data.sources import OutlierSource, Problems, parse_source


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return synth.make_image_folder(tmp_path / "photos", ["a"], n_per_label=3, size=(80, 60)) / "a"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.jpg"))}


def test_outliers_writes_every_kind_deterministically_and_reuses_files(photos: Path, tmp_path: Path) -> None:
    src = OutlierSource(root=photos, label="non-skin", count=8, size=48, out=tmp_path / "a")
    items = src.collect(photos, Problems())
    assert len(items) == 8 and {it.label for it in items} == {"non-skin"}
    assert {Path(it.path).name.split("_")[0] for it in items} == {"gray", "zoom", "texture", "blobs"}
    for it in items:
        with Image.open(it.path) as im:
            assert im.size == (48, 48) and im.mode == "RGB"
    gray = np.asarray(Image.open(next(it.path for it in items if "gray_" in it.path)), np.int16)
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 8  # grey, up to JPEG chroma noise
    again = OutlierSource(root=photos, label="non-skin", count=8, size=48, out=tmp_path / "b")
    again.collect(photos, Problems())
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.jpg")}
    src.collect(photos, Problems())
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.jpg")} == before


def test_outliers_without_photos_makes_only_procedural_kinds(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    items = OutlierSource(root=empty, label="x", count=4, size=32, out=tmp_path / "o").collect(empty, Problems())
    assert {Path(it.path).name.split("_")[0] for it in items} == {"texture", "blobs"}
    problems = Problems()
    assert OutlierSource(root=empty, label="x", kinds=["gray"], count=2, out=tmp_path / "p").collect(empty, problems) == []
    assert "no photos" in problems.entries["unreadable"][0]["error"]


def test_outliers_default_folder_is_in_the_user_cache_and_named_by_its_settings(photos: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIERARCHY_CACHE_DIR", str(tmp_path / "cache"))
    a = OutlierSource(root=photos, label="x", count=2).output_dir(photos)
    b = OutlierSource(root=photos, label="x", count=3).output_dir(photos)
    assert a.parent == tmp_path / "cache" / "outliers" and a != b


def test_unknown_outlier_kind_is_a_typed_error_naming_the_key(photos: Path) -> None:
    with pytest.raises(Exception) as info:
        parse_source({"type": "outliers", "root": str(photos), "label": "x", "kinds": ["fractal"]})
    assert "kinds" in str(info.value)


def test_build_dataset_adds_outliers_to_the_negative_class(photos: Path, tmp_path: Path) -> None:
    ham = synth.make_ham10000(tmp_path / "ham", n_lesions=6, size=(32, 24))
    cfg = {"stage": "skin_vs_nonskin", "dataset": {"verify_images": True, "sources": [
        {"type": "ham10000", "root": str(ham), "label": "skin"},
        {"type": "outliers", "root": str(photos), "label": "non-skin", "count": 10, "size": 32,
         "out": str(tmp_path / "neg")}]}}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["-q", "build-dataset", "skin_vs_nonskin", "--config", str(tmp_path / "d.yaml"),
                 "--out", str(tmp_path / "ds")]) == 0
    rows = [r for r in read_manifest(tmp_path / "ds" / "manifest.csv") if r.source == "outliers"]
    assert len(rows) == 10 and {r.label for r in rows} == {"non-skin"}
    assert {r.split for r in rows} == {"train", "val"}
