"""The example third-party distribution examples/hierarchy-ham10000, as users get it: pip-installed.

CI pip-installs it into the test environment, so its entry points are real there; in a developer
environment without it, the tests install it into a temporary ``--target`` and put that on
PYTHONPATH instead of skipping."""
from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from local_dist import pip_install_target, run_pytest
from plugin_dist import hierarchy_cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "hierarchy-ham10000"
DIST, DIST_VERSION = "hierarchy-ham10000", "0.1.0"
EXAMPLE_STAGES = {"benign_vs_malignant": ["benign", "malignant"],
                  "lesion_type": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]}


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """None when the example is pip-installed in this environment, else a --target install of it."""
    try:
        version(DIST)
        return None
    except PackageNotFoundError:
        work = tmp_path_factory.mktemp("example")
        return pip_install_target(EXAMPLE, work / "site", work)


@pytest.fixture
def ham_stages(no_autoload, monkeypatch):
    """The example's stages registered from source (no entry points involved)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from hierarchy_ham10000 import benign_vs_malignant, lesion_type

    from hierarchy.registry import register_plugin

    register_plugin(benign_vs_malignant, name="benign_vs_malignant")
    register_plugin(lesion_type, name="lesion_type")


def test_stages_json_shows_the_example_distribution(example_site):
    proc = hierarchy_cli(["stages", "--json"], site=example_site)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    by_name = {s["name"]: s for s in data["stages"]}
    for name, labels in EXAMPLE_STAGES.items():
        assert by_name[name]["dist"] == DIST and by_name[name]["version"] == DIST_VERSION
        assert by_name[name]["labels"] == labels
        assert by_name[name]["module"] == f"hierarchy_ham10000.{name}"
    assert by_name["skin_vs_nonskin"]["dist"] == "hierarchy-cascade"
    assert data["broken"] == []


def test_plugins_env_selects_one_example_stage(example_site):
    proc = hierarchy_cli(["stages", "--json"], site=example_site, env={"HIERARCHY_PLUGINS": "lesion_type"})
    assert proc.returncode == 0, proc.stderr
    assert [s["name"] for s in json.loads(proc.stdout)["stages"]] == ["lesion_type", "skin_vs_nonskin"]


def test_example_distribution_own_tests_pass(example_site):
    proc = run_pytest(EXAMPLE, example_site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout


def test_example_modules_are_short():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (EXAMPLE / "hierarchy_ham10000").glob("*.py")}
    assert sizes.keys() >= {"benign_vs_malignant.py", "lesion_type.py"}
    assert all(n < 40 for n in sizes.values()), sizes


@pytest.mark.real_data
def test_real_ham10000_disease_datasets_keep_lesions_in_one_split(real_data, ham_stages, tmp_path, capsys):
    from hierarchy.registry import get_stage

    from hierarchy.data.builder import build_dataset

    ham = real_data / "ham10000"
    with open(ham / "HAM10000_metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for name in EXAMPLE_STAGES:
        stage = get_stage(name)()
        info = build_dataset(stage.config.dataset, tmp_path / name, labels=stage.labels, stage=name,
                             roots={"ham10000": ham}, progress=False)
        with open(tmp_path / name / "manifest.csv", newline="") as f:
            manifest = list(csv.DictReader(f))
        splits_of = defaultdict(set)
        for r in manifest:
            splits_of[r["group"]].add(r["split"])
        crossing = sorted(g for g, s in splits_of.items() if len(s) > 1)
        assert not crossing, crossing[:10]
        assert len(manifest) == len(rows) and len(splits_of) == len({r["lesion_id"] for r in rows})
        assert info["problems"]["skipped_rows"]["count"] == 0
        with capsys.disabled():
            print(f"\n{name}: {info['counts']['by_split']} "
                  f"lesions per split {dict(Counter(next(iter(s)) for s in splits_of.values()))}")
