"""Fixtures: the two stages registered by hand (entry-point autoload off), generated HAM10000 data."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest


@pytest.fixture
def ham_stages(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A registry holding only this distribution's stages, whatever else is installed."""
    from hierarchy_ham10000 import benign_vs_malignant, lesion_type
    from hierarchy.registry import register_plugin, reset_registry

    monkeypatch.setenv("HIERARCHY_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("HIERARCHY_PLUGINS", raising=False)
    reset_registry()
    register_plugin(benign_vs_malignant, name="benign_vs_malignant")
    register_plugin(lesion_type, name="lesion_type")
    yield
    reset_registry()


@pytest.fixture(scope="session")
def ham_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HAM10000-format metadata + JPEGs (synthetic pixels), several lesions of every dx."""
    from hierarchy.data.synth import DX_STYLE, make_ham10000

    root = tmp_path_factory.mktemp("ham") / "HAM10000"
    return make_ham10000(root, n_lesions=42, max_images_per_lesion=3, size=(32, 24), seed=3,
                         dx_weights={dx: 1.0 for dx in DX_STYLE})
