"""The dataset builder on hostile trees: symlink loops (directory and file), dangling links, directories
named like images, non-UTF-8 file names (in manifest.csv, dataset.json, problems and materialised trees).
It must finish, record problems instead of crashing, and write nothing outside --out.

test_dataset_builder.py covers the normal builder behaviour and a non-UTF-8 name in a folder source.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hierarchy.commands.cli import main
from hierarchy.data.labelled import read_manifest

NAME = os.fsdecode(b"caf\xe9-\xff")  # a surrogate-escaped str: the bytes are not UTF-8


def image(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(path)
    return path


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A folder source (labels = sub-folders) full of traps, plus one outside file it links to."""
    root = tmp_path / "src"
    for label in ("skin", "non-skin"):
        for i in range(4):
            image(root / label / f"{label}_{i}.png", 40 * i + (100 if label == "skin" else 0))
    image(root / "skin" / f"{NAME}.png", 200)  # good image, non-UTF-8 name
    (root / "non-skin" / f"{NAME}-broken.jpg").write_bytes(b"not a jpeg")  # bad image, non-UTF-8 name
    os.symlink("..", root / "skin" / "up")  # directory symlink loop
    os.symlink(root, root / "non-skin" / "root.png")  # directory symlink with an image name
    os.symlink("self.jpg", root / "skin" / "self.jpg")  # file symlink loop
    os.symlink("gone.jpg", root / "skin" / "dangling.jpg")
    (root / "skin" / "folder.jpg").mkdir()  # a directory named like an image (walked, empty)
    os.symlink(image(tmp_path / "outside" / "far.png", 90), root / "skin" / "far.png")  # a link to a file outside
    return root


def config(tmp_path: Path, root: Path, materialize: str = "none") -> Path:
    text = (f"stage: skin_vs_nonskin\ndataset:\n  sources:\n    - {{type: folder, root: '{root}'}}\n"
            f"  materialize: {materialize}\n")
    path = tmp_path / f"cfg-{materialize}.yaml"
    path.write_text(text)
    return path


def tree_state(root: Path, skip: Path) -> dict[bytes, tuple[int, int, int]]:
    """Every entry under ``root`` except ``skip``, by lstat (links are not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if p == os.fsencode(skip) or p.startswith(os.fsencode(skip) + b"/"):
                continue
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("materialize", ["none", "link", "copy"])
def test_hostile_tree_builds_and_writes_only_inside_out(real_stages, hostile: Path, tmp_path: Path, capsys,
                                                        materialize: str) -> None:
    out = tmp_path / "out"
    cfg = config(tmp_path, hostile, materialize)
    before = tree_state(tmp_path, out)
    assert main(["build-dataset", "skin_vs_nonskin", "--config", str(cfg), "--out", str(out)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert tree_state(tmp_path, out) == before  # nothing created, changed or removed outside --out
    samples = read_manifest(out)
    names = sorted(s.path.name for s in samples)
    assert names == sorted([f"{NAME}.png", "far.png"] + [f"{lab}_{i}.png" for lab in ("skin", "non-skin")
                                                           for i in range(4)])
    assert b"caf\xe9-\xff.png" in (out / "manifest.csv").read_bytes()
    info = json.loads((out / "dataset.json").read_text(encoding="ascii"))  # surrogates are \u-escaped: pure ASCII
    unreadable = info["problems"]["unreadable"]["items"]
    assert [os.fsencode(Path(u["path"]).name) for u in unreadable] == [b"caf\xe9-\xff-broken.jpg"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    if materialize != "none":
        placed = {os.fsencode(p.name) for p in out.glob("*/*/*")}
        assert b"caf\xe9-\xff.png" in placed and len(placed) == len(samples)


def test_non_utf8_ham10000_ids(real_stages, tmp_path: Path, capsys) -> None:
    """A HAM10000 metadata CSV whose image_id is not UTF-8 still finds its file (surrogateescape)."""
    ham = tmp_path / "ham"
    rows = [("L1", "ISIC_1"), ("L2", NAME), ("L3", "ISIC_3"), ("L4", "ISIC_4")]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["lesion_id", "image_id", "dx"])
    for lesion, image_id in rows:
        writer.writerow([lesion, image_id, "nv"])
        image(ham / "images" / f"{image_id}.jpg", 150)
    (ham / "HAM10000_metadata.csv").write_bytes(buf.getvalue().encode("utf-8", "surrogateescape"))
    folder = tmp_path / "scenes"
    for i in range(4):
        image(folder / f"scene_{i}.jpg", 30)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"dataset:\n  sources:\n    - {{type: ham10000, root: '{ham}', label: skin}}\n"
                   f"    - {{type: folder, root: '{folder}', label: non-skin}}\n")
    out = tmp_path / "out"
    assert main(["build-dataset", "skin_vs_nonskin", "--config", str(cfg), "--out", str(out)]) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["problems"]["missing_files"]["count"] == 0 and info["num_items"] == 8
    assert b"caf\xe9-\xff.jpg" in (out / "manifest.csv").read_bytes()
    groups = {s.path.name: s for s in read_manifest(out)}
    assert groups[f"{NAME}.jpg"].path.is_file()


def test_out_inside_the_source_is_not_scanned(real_stages, hostile: Path, tmp_path: Path) -> None:
    """--out under the source root: a rebuild must not pick up its own materialised copies."""
    out = hostile / "skin" / "built"
    cfg = config(tmp_path, hostile, "copy")
    for _ in range(2):
        assert main(["build-dataset", "skin_vs_nonskin", "--config", str(cfg), "--out", str(out)]) == 0
        assert len(read_manifest(out)) == 10
    shutil.rmtree(out)
