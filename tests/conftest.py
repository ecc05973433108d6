from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def no_autoload(monkeypatch):
    """A registry with entry-point autoload disabled: only what the test registers exists."""
    from hierarchy.registry import reset_registry

    monkeypatch.setenv("HIERARCHY_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("HIERARCHY_PLUGINS", raising=False)
    reset_registry()
    yield
    reset_registry()


@pytest.fixture
def real_stages(monkeypatch):
    """The installed stages (skin_vs_nonskin, ...), loaded through their entry points."""
    from hierarchy.registry import reset_registry

    monkeypatch.delenv("HIERARCHY_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("HIERARCHY_PLUGINS", raising=False)
    reset_registry()
    yield
    reset_registry()


@pytest.fixture
def fake_stages(no_autoload):
    """Registers the colour-based fake stages from tests/fakes.py."""
    from fakes import CALLS, FakePlugin
    from hierarchy.registry import register_plugin

    CALLS.clear()
    register_plugin(FakePlugin(), name="fakes")
    return CALLS


@pytest.fixture
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private user cache dir (stat cache, compiled models, tuner), no racy-window wait."""
    from hierarchy.core import statcache

    folder = tmp_path / "cache"
    monkeypatch.setenv("HIERARCHY_CACHE_DIR", str(folder))
    monkeypatch.delenv(statcache.ENV, raising=False)
    monkeypatch.setattr(statcache, "RACY_SECONDS", 0.0)
    return folder


@pytest.fixture
def real_data() -> Path:
    if not (SHARED_DATA / "ham10000" / "HAM10000_metadata.csv").is_file():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


def pytest_configure(config):
    os.environ.setdefault("TQDM_DISABLE", "1")
    # no test (nor module fixture, nor CLI subprocess) measures engines or training steps unless it opts in
    # with monkeypatch.setenv("HIERARCHY_TUNE", "on") (tests/test_tune.py): the conservative rule, no cache
    os.environ["HIERARCHY_TUNE"] = "off"
