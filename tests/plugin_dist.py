"""Build and pip-install throwaway plugin *distributions* (own pyproject + entry points) into a
target directory, so tests exercise real entry-point discovery instead of monkeypatching it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "{version}"
dependencies = []

[project.entry-points."hierarchy.stages"]
{entry_points}

[tool.setuptools]
packages = ["{package}"]
"""


def install_dist(root: Path, target: Path, dist: str, version: str, package: str,
                 modules: dict[str, str], entry_points: dict[str, str]) -> None:
    """Write a source tree for ``dist`` under ``root`` and ``pip install --target`` it."""
    src = root / dist
    pkg = src / package
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name, code in modules.items():
        (pkg / f"{name}.py").write_text(textwrap.dedent(code))
    eps = "\n".join(f'{k} = "{v}"' for k, v in entry_points.items())
    (src / "pyproject.toml").write_text(PYPROJECT.format(dist=dist, version=version, package=package, entry_points=eps))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def hierarchy_cli(args: list[str], site: Path | None = None, cwd: Path | None = None,
                  env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m hierarchy ARGS`` in a subprocess with ``site`` on PYTHONPATH."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HIERARCHY_") or k == "HIERARCHY_TUNE"}
    full_env.update(env or {})
    if site is not None:
        full_env["PYTHONPATH"] = os.pathsep.join([str(site), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "hierarchy", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)


COLOR_PLUGIN = '''
import numpy as np
from hierarchy import Prediction, Stage, hookimpl
from hierarchy.data.preset import Preset

HIERARCHY_PLUGIN_API = 1


class RedPredictor:
    labels = ("red", "other")
    preset = Preset(size=8)
    metadata = {}

    def predict(self, batch):
        red = batch.float().mean(dim=(2, 3))[:, 0].numpy() / 255.0
        return Prediction(probs=np.stack([red, 1 - red], axis=1))


class PlugColor(Stage):
    name = "plug_color"
    labels = ("red", "other")
    description = "red or not, from a pip-installed plugin"

    def load_predictor(self, weights, **options):
        return RedPredictor()


@hookimpl
def register_stages(register):
    register(PlugColor)
'''
