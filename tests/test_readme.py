"""README.md stays true: its test command is what CI runs, and its plugin example really works."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from plugin_dist import hierarchy_cli

REPO = Path(__file__).resolve().parents[1]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_test_command_is_what_ci_runs():
    command = next(b for b in blocks("bash") if "pytest" in b).strip()
    ci = (REPO / ".ci" / "run").read_text()
    steps = [s.strip() for s in command.split("&&")][3:]  # after venv creation + activation
    for step in steps:
        assert step in ci, step
    assert ci.rstrip().endswith(steps[-1])


def test_readme_plugin_example_installs_and_registers(tmp_path):
    import subprocess
    import sys

    pyproject = next(b for b in blocks("toml") if "hierarchy.stages" in b)
    plugin = next(b for b in blocks("python") if "register_stages" in b)
    src = tmp_path / "hierarchy-wounds"
    (src / "hierarchy_wounds").mkdir(parents=True)
    (src / "hierarchy_wounds" / "__init__.py").write_text("")
    (src / "hierarchy_wounds" / "plugin.py").write_text(plugin)
    (src / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools>=61"]\n'
                                        'build-backend = "setuptools.build_meta"\n\n' + pyproject)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(src)], check=True)
    proc = hierarchy_cli(["stages", "--json"], site=site)
    stages = {s["name"]: s for s in json.loads(proc.stdout)["stages"]}
    assert stages["wound_type"]["labels"] == ["burn", "ulcer", "laceration"]
    assert stages["wound_type"]["dist"] == "hierarchy-wounds"
    code = ("from hierarchy_wounds.plugin import WoundType; from hierarchy.config.load import load_stage_config; "
            "print(load_stage_config(WoundType).dataset.sources[0].root)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(site)}).stdout
    assert out.strip() == "data/wounds"  # the example's default config validates
