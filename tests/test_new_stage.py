"""`hierarchy new-stage`: validation, atomic writes, templates as package data, and the generated
package pip-installed, listed by `hierarchy stages` and passing its own generated test."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from local_dist import pip_install_target, run_pytest
from plugin_dist import hierarchy_cli

from hierarchy.commands.cli import main

REPO = Path(__file__).resolve().parents[1]
GENERATED = ["README.md", "hierarchy_acne_type/__init__.py", "hierarchy_acne_type/plugin.py", "pyproject.toml",
             "tests/test_plugin.py"]


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_writes_the_package_files(tmp_path, capsys):
    target = tmp_path / "pkg"
    assert main(["new-stage", "acne_type", "--dir", str(target), "--labels", "comedonal, inflammatory,cystic"]) == 0
    assert files_under(target) == GENERATED
    plugin = (target / "hierarchy_acne_type" / "plugin.py").read_text()
    assert 'LABELS = ("comedonal", "inflammatory", "cystic")' in plugin
    assert "FolderSource" in plugin and "class AcneType(Stage):" in plugin
    assert 'acne_type = "hierarchy_acne_type.plugin"' in (target / "pyproject.toml").read_text()
    assert "pip install -e" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]  # no temporary folders left


def test_default_dir_and_labels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["new-stage", "mole_check"]) == 0
    assert 'LABELS = ("positive", "negative")' in (tmp_path / "hierarchy-mole-check" / "hierarchy_mole_check"
                                                   / "plugin.py").read_text()


@pytest.mark.parametrize("args, message", [
    (["Acne"], "'Acne' is not a lower-case name"),
    (["acne type"], "'acne type' is not a lower-case name"),  # hyphens are fine, as in register()
    (["1acne"], "is not a lower-case name"),
    (["acne", "--labels", "a,A"], "may not differ only in case"),
    (["acne", "--dist", "bad name"], "--dist: 'bad name' is not a distribution name"),
    (["acne", "--package", "bad-pkg"], "--package: 'bad-pkg' is not a lower-case Python package name"),
    (["acne", "--labels", "a"], "at least 2 labels"),
    (["acne", "--labels", "a,b,a"], "duplicate label(s) ['a']"),
    (["acne", "--labels", "a,,b"], "'' is not usable as a label"),
    (["acne", "--labels", "a,default"], "'default' is not usable"),
    (["acne", "--labels", "a,x/y"], "'x/y' is not usable"),
])
def test_invalid_name_or_labels_exit_2(tmp_path, capsys, args, message):
    assert main(["new-stage", *args, "--dir", str(tmp_path / "pkg")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "pkg").exists()


def test_existing_dir_is_kept_unless_force(tmp_path, capsys):
    target = tmp_path / "pkg"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    assert main(["new-stage", "acne_type", "--dir", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err and (target / "mine.txt").read_text() == "keep me"
    assert main(["new-stage", "acne_type", "--dir", str(target), "--force"]) == 0
    assert files_under(target) == GENERATED
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


def test_a_failed_write_leaves_the_old_tree(tmp_path, monkeypatch):
    from hierarchy.commands import _scaffold as scaffold

    target = tmp_path / "pkg"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    real_write = Path.write_text

    def failing_write(self: Path, *args, **kwargs):
        if self.name == "plugin.py":
            raise OSError("disk full")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing_write)
    with pytest.raises(OSError, match="disk full"):
        scaffold.write_package(scaffold.validate("acne_type", ("a", "b")), target, force=True)
    monkeypatch.undo()
    assert files_under(target) == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


def test_templates_ship_in_a_regular_install(tmp_path):
    """A wheel (not the editable install) carries the templates, and new-stage works from it."""
    src = tmp_path / "src"
    for name in ("hierarchy", "registry", "stages"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy(REPO / name, src)
    readme = REPO / "README.md"
    (src / "README.md").write_text(readme.read_text() if readme.is_file() else "hierarchy\n")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("hierarchy_cascade-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {n for n in names if n.startswith("hierarchy/commands/templates/new_stage/")}
    assert {t.rsplit("/", 1)[-1] for t in templates} == {
        "README.md.tmpl", "pyproject.toml.tmpl", "__init__.py.tmpl", "plugin.py.tmpl", "test_plugin.py.tmpl"}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True, capture_output=True)
    code = ("import hierarchy, sys; print(hierarchy.__file__); "
            "from hierarchy.commands.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "new-stage", "acne_type", "--dir", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path,  # not the repo: its hierarchy/ would shadow
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(str(tmp_path / "site"))
    assert files_under(tmp_path / "out") == GENERATED


def test_generated_package_installs_lists_and_passes_its_test(tmp_path):
    src = tmp_path / "acne"
    proc = hierarchy_cli(["new-stage", "acne_type", "--dir", str(src), "--labels", "comedonal,inflammatory,cystic"])
    assert proc.returncode == 0, proc.stderr
    site = pip_install_target(src, tmp_path / "site", tmp_path)
    proc = hierarchy_cli(["stages", "--json"], site=site)
    assert proc.returncode == 0, proc.stderr
    stage = {s["name"]: s for s in json.loads(proc.stdout)["stages"]}["acne_type"]
    assert (stage["dist"], stage["version"]) == ("hierarchy-acne-type", "0.1.0")
    assert stage["labels"] == ["comedonal", "inflammatory", "cystic"]
    assert stage["module"] == "hierarchy_acne_type.plugin"
    result = run_pytest(src, site)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout and "skipped" not in result.stdout, result.stdout  # entry point test ran
