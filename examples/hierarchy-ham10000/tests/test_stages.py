"""The example stages, used through hierarchy's registry and shared dataset builder."""
from __future__ import annotations

import csv
import sys
from collections import defaultdict
from importlib.metadata import entry_points
from pathlib import Path

import pytest

HAM_DX = {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
EXPECTED = {"benign_vs_malignant": ("benign", "malignant"),
            "lesion_type": ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")}


def read_manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_dx(ham_root: Path) -> dict[str, str]:
    with open(ham_root / "HAM10000_metadata.csv", newline="") as f:
        return {row["image_id"]: row["dx"] for row in csv.DictReader(f)}


def test_stages_register_cleanly(ham_stages):
    from hierarchy.registry import get_registry, get_stage

    for name, labels in EXPECTED.items():
        assert get_stage(name).labels == labels
    assert get_registry().failures == []


def test_benign_malignant_map_covers_every_dx_once():
    from hierarchy_ham10000.benign_vs_malignant import BENIGN_DX, LABEL_MAP, MALIGNANT_DX

    assert set(MALIGNANT_DX) == {"mel", "bcc", "akiec"}
    assert set(BENIGN_DX) == {"nv", "bkl", "df", "vasc"}
    assert set(LABEL_MAP) == HAM_DX


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dataset_labels_follow_dx_and_lesions_stay_in_one_split(ham_stages, ham_root, tmp_path, name):
    from hierarchy_ham10000.benign_vs_malignant import LABEL_MAP
    from hierarchy.registry import get_stage

    from hierarchy.data.builder import build_dataset

    cls = get_stage(name)
    info = build_dataset(cls().config.dataset, tmp_path / "ds", labels=cls.labels, stage=cls.name,
                         roots={"ham10000": ham_root}, progress=False)
    rows = read_manifest(tmp_path / "ds")
    dx_of = read_dx(ham_root)
    assert info["num_items"] == len(rows) == len(dx_of)
    want = LABEL_MAP if name == "benign_vs_malignant" else {dx: dx for dx in HAM_DX}
    assert all(r["label"] == want[dx_of[Path(r["path"]).stem]] for r in rows)
    splits = defaultdict(set)
    for r in rows:
        splits[r["group"]].add(r["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert all(info["counts"]["by_split"]["val"][lab] > 0 for lab in cls.labels)


def test_entry_points_when_installed():
    eps = {ep.name: ep.value for ep in entry_points(group="hierarchy.stages") if ep.name in EXPECTED}
    if not eps:
        pytest.skip("hierarchy-ham10000 is not pip-installed")
    assert eps == {name: f"hierarchy_ham10000.{name}" for name in EXPECTED}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_pyproject_declares_one_entry_point_per_stage():
    import tomllib

    data = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert data["project"]["entry-points"]["hierarchy.stages"] == {
        name: f"hierarchy_ham10000.{name}" for name in EXPECTED}
