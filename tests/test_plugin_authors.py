"""Issue 18: what a first plugin author hits. Our distribution name, no silent plugin failures, static
weight checks in `validate`, exit codes, the five reproducible bugs, the scaffold and the docs reference."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fakes import FakePlugin, solid
from local_dist import run_pytest
from plugin_dist import COLOR_PLUGIN, hierarchy_cli, install_dist

from hierarchy import __version__
from hierarchy.commands._scaffold import plugin_requirement
from hierarchy.commands.cli import main
from hierarchy.config.stage import Stage
from hierarchy.data.sources import FolderSource

REPO = Path(__file__).resolve().parents[1]
REQUIREMENT = "hierarchy-cascade>=0.2,<0.3"
PIP = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]


# ---------------------------------------------------------------- names that are ours


def test_one_dependency_line_everywhere():
    assert plugin_requirement(__version__) == REQUIREMENT
    texts = {p: p.read_text() for p in [REPO / "README.md", REPO / "docs" / "plugins.md",
                                         REPO / "examples" / "hierarchy-ham10000" / "pyproject.toml"]}
    for path, text in texts.items():
        lines = re.findall(r'dependencies = \[([^\]]*)\]', text)
        assert lines and all(line == f'"{REQUIREMENT}"' for line in lines), (path, lines)
        assert not re.search(r'"hierarchy(>=|")', text), path


def test_plugin_built_the_documented_way_resolves_to_this_project(tmp_path):
    """Our wheel has no top-level registry/ or stages/; a plugin built from the documented pyproject
    into a fresh target requires a distribution that is this project, in this version range."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("hierarchy", "registry", "stages"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, cwd=tmp_path)
    plugin = tmp_path / "hierarchy-texture-gate"
    (plugin / "hierarchy_texture_gate").mkdir(parents=True)
    (plugin / "hierarchy_texture_gate" / "__init__.py").write_text("")
    (plugin / "hierarchy_texture_gate" / "plugin.py").write_text(COLOR_PLUGIN)
    (plugin / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "hierarchy-texture-gate"
        version = "0.1.0"
        dependencies = ["{REQUIREMENT}"]

        [project.entry-points."hierarchy.stages"]
        plug_color = "hierarchy_texture_gate.plugin"
        """))
    wheel = next(wheels.glob("hierarchy_cascade-*.whl"))
    subprocess.run([*PIP, "install", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site),
                    str(wheel), str(plugin)], check=True, capture_output=True, cwd=tmp_path)
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == [
        "bin", "hierarchy", "hierarchy_texture_gate"]
    probe = textwrap.dedent("""\
        import json, importlib.metadata as md
        from packaging.requirements import Requirement
        req = Requirement(md.requires("hierarchy-texture-gate")[0])
        dist = md.distribution(req.name)
        files = [str(f) for f in dist.files]
        import hierarchy
        print(json.dumps({"req": str(req), "dist": dist.metadata["Name"], "version": dist.version,
                          "ok": req.specifier.contains(dist.version), "files": files, "module": hierarchy.__file__,
                          "provides": md.packages_distributions()["hierarchy"]}))
        """)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = json.loads(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                                    env=env, cwd=tmp_path).stdout)
    assert out["req"].startswith("hierarchy-cascade") and out["dist"] == "hierarchy-cascade" and out["ok"], out
    assert out["module"].startswith(str(site)) and "hierarchy-cascade" in out["provides"]
    tops = {f.split("/")[0] for f in out["files"]}
    assert "registry" not in tops and "stages" not in tops, tops
    assert "hierarchy/registry/manager.py" in out["files"] and "hierarchy/stages/skin_vs_nonskin/plugin.py" in out["files"]
    proc = hierarchy_cli(["stages", "--json"], site=site, cwd=tmp_path)
    names = {s["name"]: s for s in json.loads(proc.stdout)["stages"]}
    assert names["plug_color"]["dist"] == "hierarchy-texture-gate" and names["skin_vs_nonskin"]["dist"] == "hierarchy-cascade"


# ---------------------------------------------------------------- no silent plugin failures


class Misnamed:
    from hierarchy.registry import hookimpl

    @hookimpl
    def register_stage(self, register):  # one letter short of register_stages
        raise AssertionError("never called")


class Unmarked:
    def register_stages(self, register):  # no @hookimpl: pluggy never sees it
        raise AssertionError("never called")


def _failures():
    from hierarchy.registry import get_registry

    return {f.plugin.name: f for f in get_registry().failures}


def test_misnamed_hook_is_reported_with_the_right_name(no_autoload):
    from hierarchy.registry import register_plugin

    register_plugin(Misnamed(), name="misnamed")
    errors = [str(f) for f in __import__("hierarchy.registry", fromlist=["x"]).get_registry().failures]
    assert any("'register_stage' is not a hierarchy hook" in e and "did you mean 'register_stages'" in e for e in errors)
    assert any("registered no stages" in e for e in errors)


def test_missing_hookimpl_is_a_broken_plugin(no_autoload):
    from hierarchy.registry import register_plugin

    register_plugin(Unmarked(), name="unmarked")
    failure = _failures()["unmarked"]
    assert failure.phase == "register"
    assert "registered no stages: register_stages is not marked with @hookimpl" in failure.error


BAD_DEFAULT = '''
from hierarchy import FolderSource, Stage, hookimpl

class Bad(Stage):
    name = "bad_default"
    labels = ("a", "b")
    sources = (FolderSource(type="dir", root="data"),)

@hookimpl
def register_stages(register):
    register(Bad)
'''

REUSE = COLOR_PLUGIN.replace('name = "plug_color"', 'name = "skin_vs_nonskin"')
FINE = COLOR_PLUGIN.replace('name = "plug_color"', 'name = "plug_fine"')


@pytest.fixture(scope="module")
def author_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("authors")
    site = root / "site"
    install_dist(root, site, "hierarchy-plugcolor", "1.2.3", "plugcolor", {"plugin": COLOR_PLUGIN},
                 {"plug_color": "plugcolor.plugin"})
    install_dist(root, site, "hierarchy-oops", "0.1.0", "oops", {"bad": BAD_DEFAULT, "reuse": REUSE,
                                                                 "again": COLOR_PLUGIN, "fine": FINE},
                 {"bad_default": "oops.bad", "a_reuse": "oops.reuse", "again": "oops.again", "fine": "oops.fine"})
    return site


def test_bad_default_config_is_named_and_the_pipeline_still_runs(author_site, tmp_path):
    data = json.loads(hierarchy_cli(["stages", "--json"], site=author_site).stdout)
    bad = next(b for b in data["broken"] if b["plugin"] == "bad_default")
    assert bad["dist"] == "hierarchy-oops" and "FolderSource" in bad["error"] and "type" in bad["error"]
    pipe = tmp_path / "p.yaml"
    pipe.write_text("name: p\nroot: c\nstages:\n  c: {stage: plug_fine, routes: {default: stop}}\n")
    solid(tmp_path / "img" / "a.png", (250, 0, 0))
    proc = hierarchy_cli(["run", str(pipe), str(tmp_path / "img"), "--format", "jsonl"], site=author_site)
    assert proc.returncode == 0 and json.loads(proc.stdout)["label"] == "red", proc.stderr
    proc = hierarchy_cli(["build-dataset", "bad_default"], site=author_site, cwd=tmp_path)
    assert proc.returncode == 2 and "hierarchy-oops" in proc.stderr and "Traceback" not in proc.stderr


def test_third_party_reusing_a_first_party_name_is_the_broken_one(author_site):
    data = json.loads(hierarchy_cli(["stages", "--json"], site=author_site).stdout)
    by_name = {s["name"]: s for s in data["stages"]}
    assert by_name["skin_vs_nonskin"]["dist"] == "hierarchy-cascade"  # loaded after a_reuse, still wins
    reuse = [b for b in data["broken"] if b["plugin"] == "a_reuse"]
    assert reuse and reuse[0]["phase"] == "conflict" and "hierarchy-cascade" in reuse[0]["error"]
    assert not [b for b in data["broken"] if b["dist"] == "hierarchy-cascade"]
    # two third parties: neither is used, and both are listed as broken
    assert "plug_color" not in by_name
    both = {b["plugin"] for b in data["broken"] if b["phase"] == "conflict" and "'plug_color'" in b["error"]}
    assert both == {"plug_color", "again"}


def test_stages_shows_file_editable_description_and_strict(author_site):
    proc = hierarchy_cli(["stages"], site=author_site)
    assert proc.returncode == 0
    assert "Is this a skin (dermoscopic) image at all?" in proc.stdout
    assert str(REPO / "stages" / "skin_vs_nonskin" / "plugin.py") in proc.stdout  # this repo: an editable install
    assert f"(editable: {REPO})" in proc.stdout
    assert hierarchy_cli(["stages", "--strict"], site=author_site).returncode == 1
    assert hierarchy_cli(["stages", "--strict", "-q"]).returncode == 0


def test_stages_shows_editable_when_the_source_trees_egg_info_shadows_the_install(tmp_path):
    # `pip install -e .` leaves hierarchy_cascade.egg-info (no direct_url.json) in the checkout, which is
    # first on sys.path when run from there, as CI does
    from importlib.metadata import distribution
    shadow = tmp_path / "hierarchy_cascade.egg-info"
    shadow.mkdir()
    (shadow / "PKG-INFO").write_text(f"Metadata-Version: 2.1\nName: hierarchy-cascade\nVersion: {__version__}\n")
    (shadow / "entry_points.txt").write_text(distribution("hierarchy-cascade").read_text("entry_points.txt"))
    proc = hierarchy_cli(["stages"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"(editable: {REPO})" in proc.stdout


def test_import_failure_says_reinstall(tmp_path):
    from hierarchy.registry.checks import import_hint

    assert "re-run `pip install -e /src/x`" in import_hint(ModuleNotFoundError("No module named 'x'"), "/src/x")
    assert import_hint(RuntimeError("boom"), None) == ""


# ---------------------------------------------------------------- static weight checks, exit codes


class Shared(Stage):  # served by the engine's shared predictor: needs weights
    name = "shared_gate"
    labels = ("texture", "object")
    sources = (FolderSource(root="data/shared_gate"),)


class SharedPlugin:
    from hierarchy.registry import hookimpl

    @hookimpl
    def register_stages(self, register):
        register(Shared)


def fake_run(path: Path, stage: str, labels: list[str]) -> Path:
    from hierarchy.data.preset import Preset
    from hierarchy.models.metadata import CheckpointMetadata, write_metadata

    path.mkdir(parents=True)
    (path / "best.safetensors").write_bytes(b"never loaded by validate")
    write_metadata(path / "metadata.json", CheckpointMetadata(
        stage=stage, labels=labels, arch={"backbone": "resnet10t", "library": "timm", "num_classes": len(labels)},
        preset=Preset(size=32).to_dict(), created_by="test"))
    return path


@pytest.fixture
def shared(no_autoload):
    from hierarchy.registry import register_plugin

    register_plugin(SharedPlugin(), name="shared")
    register_plugin(FakePlugin(), name="fakes")


def test_validate_checks_weights_statically(shared, tmp_path, capsys):
    fake_run(tmp_path / "runs" / "shared_gate" / "train", "shared_gate", ["texture", "object"])
    fake_run(tmp_path / "runs" / "other" / "train", "other", ["texture", "object"])
    pipe = tmp_path / "p.yaml"
    pipe.write_text(textwrap.dedent("""\
        name: p
        root: a
        stages:
          a:
            stage: shared_gate
            weights: runs/shared_gate/train
            routes: {texture: b, object: c}
          b:
            stage: shared_gate
            routes: {texture: c, object: d}
          c:
            stage: shared_gate
            weights: runs/shared_gate/trian
            routes: {texture: d, object: stop}
          d:
            stage: shared_gate
            weights: runs/other/train
            routes: {default: stop}
        """))
    assert main(["validate", str(pipe)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"stages\.b: no `weights:`; stage 'shared_gate' needs .* \(line 8\)", err), err
    assert re.search(r"stages\.c\.weights: .*trian: checkpoint not found.* \(line 13\)", err), err
    assert re.search(r"stages\.d\.weights: .*checkpoint is for stage 'other'.* \(line 17\)", err), err
    assert "stages.a" not in err
    assert main(["run", str(pipe), str(tmp_path)]) == 2  # the same checks before run


def test_exit_code_2_for_plugin_checkpoint_and_label_errors(shared, tmp_path, capsys):
    assert main(["build-dataset", "nope"]) == 2
    assert main(["train", "nope"]) == 2
    solid(tmp_path / "data" / "purple" / "p.png", (200, 0, 200))
    pipe = tmp_path / "one.yaml"
    pipe.write_text("name: one\nroot: c\nstages:\n  c: {stage: fake_color, routes: {default: stop}}\n")
    assert main(["evaluate", str(pipe), str(tmp_path / "data"), "--out", str(tmp_path / "ev")]) == 2
    assert "'purple' is not a label of any stage" in capsys.readouterr().err


# ---------------------------------------------------------------- the five bugs


def test_bug1_evaluate_root_dataset_with_ood_on_a_downstream_stage(fake_stages, tmp_path):
    solid(tmp_path / "data" / "red" / "r.png", (250, 5, 5))
    solid(tmp_path / "data" / "other" / "o.png", (5, 250, 5))
    pipe = tmp_path / "p.yaml"
    pipe.write_text("name: two\nroot: c\nstages:\n  c: {stage: fake_color, routes: {red: b, other: stop}}\n"
                    "  b: {stage: fake_bright, ood: 0.5, routes: {default: stop}}\n")
    assert main(["evaluate", str(pipe), str(tmp_path / "data"), "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["stages"]["b"]["selective"]["n"] == 0


def test_bug2_symlinked_label_folders_are_followed(tmp_path, capsys):
    from hierarchy.data.builder import build_dataset
    from hierarchy.data.dataset_config import DatasetConfig
    from hierarchy.data.sources import FolderSource
    from hierarchy.data.synth import make_image_folder

    real = make_image_folder(tmp_path / "elsewhere", ["texture", "object"], n_per_label=5, size=(16, 16))
    root = tmp_path / "data"
    root.mkdir()
    for label in ("texture", "object"):
        os.symlink(real / label, root / label)
    os.symlink(root, root / "texture" / "loop")  # a loop through the links ends
    config = DatasetConfig(sources=[FolderSource(root=root)])
    info = build_dataset(config, tmp_path / "ds", labels=("texture", "object"), stage="is_texture", progress=False)
    assert info["num_items"] == 10
    manifest = (tmp_path / "ds" / "manifest.csv").read_text()
    assert "../data/texture/texture_0000.jpg,texture" in manifest  # named by the link, not its target


def test_bug2_build_dataset_with_no_images_exits_2(no_autoload, tmp_path, capsys, monkeypatch):
    from hierarchy.registry import register_plugin

    register_plugin(SharedPlugin(), name="shared")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert main(["build-dataset", "shared_gate", "--source", f"folder={tmp_path / 'empty'}"]) == 2
    assert "no images found" in capsys.readouterr().err


def test_bug3_failed_train_removes_its_run_directory(no_autoload, tmp_path, capsys, caplog):
    from hierarchy.registry import register_plugin
    from hierarchy.train.rundir import new_run_dir

    register_plugin(SharedPlugin(), name="shared")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    args = ["train", "shared_gate", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "runs"),
            "--pretrained", "none", "--backbone", "resnet10t"]
    assert main(args) != 0
    assert main(args) != 0
    assert list((tmp_path / "runs" / "shared_gate").iterdir()) == []  # no train/, train2/ left behind
    assert "removed its run directory" in caplog.text
    (tmp_path / "runs" / "x" / "train").mkdir(parents=True)  # a leftover empty one is reused
    assert new_run_dir(tmp_path / "runs" / "x", "train") == tmp_path / "runs" / "x" / "train"


# bug 4 (a name conflict blaming the first party): test_third_party_reusing_a_first_party_name_is_the_broken_one
# bug 5 (a bad default config crashing build-dataset and run): test_bad_default_config_is_named_and_the_pipeline_still_runs


# ---------------------------------------------------------------- scaffold, docs, CLI


def test_scaffold_names_one_rule_and_a_test_that_survives_added_sources(tmp_path, shared, capsys):
    assert main(["new-stage", "is-texture", "--labels", "texture,Texture", "--dir", str(tmp_path / "x")]) == 2
    assert "differ only in case" in capsys.readouterr().err
    target = tmp_path / "gate"
    assert main(["new-stage", "is-texture", "--labels", "texture,object", "--dist", "hierarchy-texture-gate",
                 "--package", "texture_gate", "--dir", str(target)]) == 0
    assert 'name = "hierarchy-texture-gate"' in (target / "pyproject.toml").read_text()
    assert 'is-texture = "texture_gate.plugin"' in (target / "pyproject.toml").read_text()
    assert f'dependencies = ["{REQUIREMENT}"]' in (target / "pyproject.toml").read_text()
    plugin = target / "texture_gate" / "plugin.py"
    plugin.write_text(plugin.read_text().replace(
        'sources = (FolderSource(root="data/is-texture"),)',
        'sources = (FolderSource(root="data/is-texture"), FolderSource(name="extra", root="x", label="texture"))'))
    proc = run_pytest(target, site=None)
    assert "2 passed, 1 skipped" in proc.stdout, proc.stdout + proc.stderr
    snippet = re.search(r"```yaml\n(.*?)```", (target / "README.md").read_text(), re.S).group(1)
    fake_run(tmp_path / "runs" / "shared_gate" / "train", "shared_gate", ["texture", "object"])
    (tmp_path / "p.yaml").write_text(snippet.replace("is-texture", "shared_gate"))
    assert main(["validate", str(tmp_path / "p.yaml")]) == 0


def test_global_flags_after_the_subcommand(fake_stages, tmp_path, capsys):
    pipe = tmp_path / "p.yaml"
    pipe.write_text("name: p\nroot: c\nstages:\n  c: {stage: fake_color, routes: {default: stop}}\n")
    assert main(["validate", str(pipe), "-q"]) == 0 and main(["validate", "-v", str(pipe)]) == 0


def test_docs_reference_is_generated_and_current():
    from hierarchy.engine.reference import render, updated

    doc = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    assert render() in doc, "docs/plugins.md Reference is stale: python -m hierarchy.engine.reference docs/plugins.md"
    assert "| `val_fraction` | float | `0.2` |" in render() and "| `weights` |" in render()
    stale = doc.replace("| `val_fraction` | float | `0.2` |", "| `val_fraction` | float | `0.3` |")
    assert render() not in stale and updated(stale) == doc
