"""The shared dataset builder (hierarchy.data.builder) on tiny synthetic HAM10000 / COCO fixtures."""
from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import pytest

from hierarchy.data import synth
from hierarchy.data.labelled import read_manifest
from hierarchy.data.builder import build_dataset, split_sizes
from hierarchy.data.dataset_config import DatasetConfig
from hierarchy.core.errors import DatasetError

LABELS = ("skin", "nonskin")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    synth.make_ham10000(root / "ham", n_lesions=30, max_images_per_lesion=3, size=(32, 24), seed=1)
    synth.make_coco(root / "coco", n_images=12, size=(32, 24), seed=1)
    return root


@pytest.fixture
def src(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the sources, so a test may damage them."""
    shutil.copytree(pristine, tmp_path / "src")
    return tmp_path / "src"


def config(src: Path, **kw: object) -> DatasetConfig:
    ham = {"type": "ham10000", "root": str(src / "ham"), "label": "skin", **kw.pop("ham", {})}
    coco = {"type": "coco", "root": str(src / "coco"), "label": "nonskin", **kw.pop("coco", {})}
    return DatasetConfig.model_validate({"sources": kw.pop("sources", [ham, coco]), **kw})


def build(cfg: DatasetConfig, out: Path, labels: tuple[str, ...] = LABELS, **kw: object) -> dict:
    return build_dataset(cfg, out, labels=labels, stage="test_stage", progress=False, **kw)


def metadata(src: Path) -> list[dict[str, str]]:
    with open(src / "ham" / "HAM10000_metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def splits_per_group(out: Path, source: str = "ham10000") -> dict[str, set[str]]:
    seen: dict[str, set[str]] = defaultdict(set)
    for s in read_manifest(out):
        if s.source == source:
            seen[s.group].add(s.split)
    return seen


def test_skin_vs_nonskin_no_lesion_crosses_splits(src: Path, tmp_path: Path) -> None:
    info = build(config(src, test_fraction=0.2), tmp_path / "out")
    groups = splits_per_group(tmp_path / "out")
    assert groups and all(len(s) == 1 for s in groups.values())
    assert {s for v in groups.values() for s in v} == {"train", "val", "test"}
    samples = read_manifest(tmp_path / "out")
    assert all(s.path.is_file() for s in samples)
    assert len(samples) == info["num_items"] == len(metadata(src)) + 24
    assert all(info["counts"]["by_split"]["val"][lab] > 0 for lab in LABELS)
    assert info["train_class_counts"] == info["counts"]["by_split"]["train"]
    lines = (tmp_path / "out" / "manifest.csv").read_text().splitlines()
    assert lines[0] == "path,label,split,source,group,sex,age,localization,dx_type"  # + ham10000 metadata
    assert all(line.startswith("../src/") for line in lines[1:])  # relative to out: movable together


def test_label_map_skips_unmapped_dx(src: Path, tmp_path: Path) -> None:
    label_map = {"nv": "benign", "bkl": "benign", "mel": "malignant", "bcc": "malignant"}
    cfg = config(src, sources=[{"type": "ham10000", "root": str(src / "ham"), "label_map": label_map}])
    info = build(cfg, tmp_path / "out", labels=("benign", "malignant"))
    rows = metadata(src)
    skipped = [r for r in rows if r["dx"] not in label_map]
    assert info["problems"]["skipped_rows"]["count"] == len(skipped) > 0
    assert info["num_items"] == len(rows) - len(skipped)
    assert all(info["counts"]["by_split"]["val"][lab] > 0 for lab in ("benign", "malignant"))
    by_id = {r["image_id"]: label_map[r["dx"]] for r in rows if r["dx"] in label_map}
    assert all(by_id[s.path.stem] == s.label for s in read_manifest(tmp_path / "out"))


def _coco_files(src: Path, with_person: bool) -> set[str]:
    from pycocotools.coco import COCO

    files = set()
    for name in ("train2017", "val2017"):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(src / "coco" / "annotations" / f"instances_{name}.json"))
        person = set(coco.getImgIds(catIds=[1]))
        ids = person if with_person else set(coco.getImgIds()) - person
        files |= {f"{name}/{img['file_name']}" for img in coco.loadImgs(sorted(ids))}
    return files


def test_coco_category_filters(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    coco_only = {"type": "coco", "root": str(src / "coco"), "label": "nonskin"}
    build(config(src, sources=[{**coco_only, "exclude_categories": ["person"]}]), tmp_path / "ex")
    assert {s.group for s in read_manifest(tmp_path / "ex")} == _coco_files(src, with_person=False)
    build(config(src, sources=[{**coco_only, "include_categories": ["person"]}]), tmp_path / "in")
    assert {s.group for s in read_manifest(tmp_path / "in")} == _coco_files(src, with_person=True)
    assert "loading annotations" not in capsys.readouterr().out  # pycocotools chatter goes to stderr
    with pytest.raises(DatasetError, match="persn") as e:
        build(config(src, sources=[{**coco_only, "exclude_categories": ["persn"]}]), tmp_path / "bad")
    assert "'person'" in str(e.value) and "'tv'" in str(e.value)


def test_problems_are_reported_and_skipped(src: Path, tmp_path: Path) -> None:
    rows = metadata(src)
    files = {p.stem: p for p in (src / "ham").rglob("*.jpg")}
    missing, broken = files[rows[0]["image_id"]], files[rows[1]["image_id"]]
    missing.unlink()
    broken.write_bytes(b"this is not a jpeg")
    unlisted = src / "ham" / "HAM10000_images_part_2" / "extra" / "SYN_9999999.jpg"
    unlisted.parent.mkdir()
    shutil.copy(files[rows[2]["image_id"]], unlisted)
    info = build(config(src), tmp_path / "out")
    p = info["problems"]
    assert p["missing_files"]["count"] == 1 and p["missing_files"]["items"][0]["image_id"] == rows[0]["image_id"]
    assert p["unlisted_files"]["count"] == 1 and p["unlisted_files"]["items"][0]["path"] == str(unlisted)
    assert p["unreadable"]["count"] == 1 and p["unreadable"]["by_type"] == {"undecodable": 1}
    assert p["unreadable"]["items"][0]["path"] == str(broken)
    stems = {s.path.stem for s in read_manifest(tmp_path / "out")}
    assert not stems & {missing.stem, broken.stem, unlisted.stem}
    assert info["num_items"] == len(rows) - 2 + 24


def test_rerun_is_byte_identical(src: Path, tmp_path: Path) -> None:
    cfg = config(src, test_fraction=0.1, max_per_class=20)
    build(cfg, tmp_path / "out", materialize="link")
    first = {n: (tmp_path / "out" / n).read_bytes() for n in ("manifest.csv", "dataset.json")}
    build(cfg, tmp_path / "out", materialize="link")
    assert {n: (tmp_path / "out" / n).read_bytes() for n in first} == first


def test_seed_controls_the_split(src: Path, tmp_path: Path) -> None:
    a = build(config(src, seed=1), tmp_path / "a" / "out")
    b = build(config(src, seed=1), tmp_path / "b" / "out")
    c = build(config(src, seed=2), tmp_path / "c" / "out")
    text = {k: (tmp_path / k / "out" / "manifest.csv").read_text() for k in "abc"}
    assert text["a"] == text["b"] and a["manifest_sha256"] == b["manifest_sha256"]
    assert text["a"] != text["c"] and a["manifest_sha256"] != c["manifest_sha256"]


def snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p == skip or skip in p.parents:
                continue
            st = p.lstat()
            out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def test_writes_only_inside_out(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = snapshot(tmp_path, out)
    time.sleep(0.01)
    build(config(src, test_fraction=0.2), out, materialize="copy")
    build(config(src, test_fraction=0.2, seed=3), out, materialize="link")
    assert snapshot(tmp_path, out) == before
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def tree(out: Path) -> dict[str, Path]:
    return {str(p.relative_to(out)): p for p in out.glob("*/*/*") if p.parts[-3] in ("train", "val", "test")}


def expected_tree(out: Path) -> dict[str, Path]:
    return {f"{s.split}/{s.label}/{s.path.name}": s.path for s in read_manifest(out)}


def test_materialize_link_and_copy(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build(config(src, seed=1), out, materialize="link")
    links = tree(out)
    assert links.keys() == expected_tree(out).keys()
    assert all(p.is_symlink() and not os.path.isabs(os.readlink(p)) for p in links.values())
    assert all(p.resolve() == expected_tree(out)[k].resolve() for k, p in links.items())
    inode = {k: p.lstat().st_ino for k, p in links.items()}
    build(config(src, seed=2), out, materialize="link")  # other split: stale links go, kept ones stay
    links = tree(out)
    assert links.keys() == expected_tree(out).keys()
    kept = set(inode) & set(links)
    assert kept and all(links[k].lstat().st_ino == inode[k] for k in kept)
    build(config(src, seed=2), out, materialize="copy")
    copies = tree(out)
    assert copies.keys() == expected_tree(out).keys()
    assert all(not p.is_symlink() and p.read_bytes() == expected_tree(out)[k].read_bytes() for k, p in copies.items())
    inode = {k: p.stat().st_ino for k, p in copies.items()}
    build(config(src, seed=2), out, materialize="copy")
    assert {k: p.stat().st_ino for k, p in tree(out).items()} == inode
    build(config(src, seed=2), out)  # materialize none: the old tree is removed
    assert not tree(out) and not (out / "train").exists()


def test_materialize_refuses_an_out_that_contains_a_source(src: Path) -> None:
    with pytest.raises(DatasetError, match="inside it"):
        build(config(src), src, materialize="link")


def test_roots_override_and_unknown_key(src: Path, tmp_path: Path) -> None:
    cfg = config(src, ham={"root": "/nonexistent/ham", "name": "derm"}, coco={"root": "/nonexistent/coco"})
    with pytest.raises(DatasetError, match="not a directory"):
        build(cfg, tmp_path / "out")
    info = build(cfg, tmp_path / "out", roots={"derm": src / "ham", "coco": src / "coco"})
    assert set(info["counts"]["by_source"]) == {"derm", "coco"}
    assert info["config"]["sources"][0]["root"] == str(src / "ham")
    with pytest.raises(DatasetError, match="unknown source key") as e:
        build(cfg, tmp_path / "out", roots={"ham10000": src / "ham"})
    assert "derm" in str(e.value) and "coco" in str(e.value)


def test_duplicate_source_keys_are_rejected(src: Path, tmp_path: Path) -> None:
    ham = {"type": "ham10000", "root": str(src / "ham"), "label": "skin"}
    with pytest.raises(DatasetError, match="duplicate source key"):
        build(config(src, sources=[ham, ham]), tmp_path / "out")


def test_labels_must_belong_to_the_stage(src: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="'ham10000'.*'skin'"):
        build(config(src), tmp_path / "out", labels=("lesion", "nonskin"))
    synth.make_image_folder(tmp_path / "folder", ["skin", "other"], n_per_label=2, size=(16, 16))
    folder = {"type": "folder", "root": str(tmp_path / "folder")}
    with pytest.raises(DatasetError, match="'folder'.*'other'"):
        build(config(src, sources=[folder]), tmp_path / "out")


def test_non_utf8_file_name_survives(src: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    synth.make_image_folder(folder, LABELS, n_per_label=3, size=(16, 16))
    weird = folder / "skin" / os.fsdecode(b"caf\xe9 \xff,\"odd\".jpg")
    try:
        shutil.copy(folder / "skin" / "skin_0000.jpg", weird)
    except (OSError, UnicodeError):
        pytest.skip("file system refuses non-UTF-8 names")
    info = build(config(src, sources=[{"type": "folder", "root": str(folder)}]), tmp_path / "out")
    assert info["num_items"] == 7
    assert b"caf\xe9 \xff" in (tmp_path / "out" / "manifest.csv").read_bytes()
    paths = {s.path for s in read_manifest(tmp_path / "out")}
    assert weird in paths and all(p.is_file() for p in paths)


def test_folder_source_with_fixed_split(src: Path, tmp_path: Path) -> None:
    synth.make_image_folder(tmp_path / "datasets" / "train", ["skin"], n_per_label=4, size=(16, 16))
    root = tmp_path / "datasets" / "train" / "skin"
    folder = {"type": "folder", "root": str(root), "label": "skin", "split": "train"}
    coco = {"type": "coco", "root": str(src / "coco"), "label": "nonskin"}
    info = build(config(src, sources=[folder, coco]), tmp_path / "out")
    assert info["counts"]["by_source"]["folder"] == {"skin": {"train": 4}}
    assert info["counts"]["by_split"]["val"]["nonskin"] > 0


def test_max_images_keeps_whole_lesions(src: Path, tmp_path: Path) -> None:
    cfg = config(src, ham={"max_images": 12})
    info = build(cfg, tmp_path / "out")
    per_lesion = defaultdict(int)
    for r in metadata(src):
        per_lesion[r["lesion_id"]] += 1
    got = defaultdict(int)
    for s in read_manifest(tmp_path / "out"):
        if s.source == "ham10000":
            got[s.group] += 1
    assert 0 < sum(got.values()) <= 12 and info["sources"]["ham10000"]["after_max_images"] == sum(got.values())
    assert all(per_lesion[g] == n for g, n in got.items())
    assert build(cfg, tmp_path / "again")["manifest_sha256"] == info["manifest_sha256"]


def test_balance_caps_are_reported(src: Path, tmp_path: Path) -> None:
    info = build(config(src, max_per_class=6), tmp_path / "a")
    assert all(n <= 6 for split in info["balance"]["after"].values() for n in split.values())
    assert info["balance"]["before"]["train"]["skin"] > 6 and info["balance"]["dropped"] > 0
    info = build(config(src, max_ratio=1.5), tmp_path / "b")
    train = info["train_class_counts"]
    assert max(train.values()) <= 1.5 * min(train.values())
    assert info["balance"]["before"]["train"]["skin"] > train["skin"]


@pytest.mark.parametrize("n,val,test,expected", [(1, 0.2, 0.1, (0, 0)), (2, 0.2, 0.0, (1, 0)), (3, 0.2, 0.1, (1, 1)),
                                                 (10, 0.2, 0.1, (2, 1)), (2, 0.5, 0.4, (1, 0))])
def test_split_sizes(n: int, val: float, test: float, expected: tuple[int, int]) -> None:
    assert split_sizes(n, val, test) == expected


@pytest.mark.real_data
def test_real_data_skin_vs_nonskin(tmp_path: Path) -> None:
    if not (SHARED_DATA / "ham10000" / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    cfg = DatasetConfig.model_validate({
        "sources": [
            {"type": "ham10000", "root": str(SHARED_DATA / "ham10000"), "label": "skin"},
            {"type": "coco", "root": str(SHARED_DATA / "coco"), "label": "nonskin"},
        ],
        "test_fraction": 0.1,
    })
    start = time.perf_counter()
    info = build(cfg, tmp_path / "out")
    elapsed = time.perf_counter() - start
    groups = splits_per_group(tmp_path / "out")
    assert len(groups) == 7470 and all(len(s) == 1 for s in groups.values())
    print(f"\nreal data: {info['num_items']} images in {elapsed:.1f}s; by split {info['counts']['by_split']}; "
          f"lesions {len(groups)}; problems { {k: v['count'] for k, v in info['problems'].items()} }")
