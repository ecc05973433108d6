"""pip-install a local source tree into a throwaway ``--target`` and run its own tests there.

The tree is copied first, so the build's ``build/`` and ``*.egg-info`` never land in the source
(an egg-info beside the tests would otherwise register its entry points by itself)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

BUILD_LEFTOVERS = ("build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")


def pip_install_target(src: Path, site: Path, work: Path) -> Path:
    """``pip install --no-deps --no-build-isolation --no-index --target site`` a copy of ``src``."""
    copy = work / f"{src.name}-build"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(copy)], check=True, capture_output=True, text=True,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return site


def run_pytest(cwd: Path, site: Path | None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m pytest -q -rs`` in ``cwd`` (its own pytest config), with ``site`` on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIERARCHY_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave no __pycache__ in the tree under test
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)
