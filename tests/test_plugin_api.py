"""The plugin API version check (HIERARCHY_PLUGIN_API), in process: what an author of an
incompatible plugin sees, and that every plugin hierarchy ships or generates declares the current version."""
from __future__ import annotations

import ast
import types
from pathlib import Path

import pytest
from fakes import FakePlugin

REPO = Path(__file__).resolve().parents[1]
PIPE = "name: p\nroot: a\nstages:\n  a: {stage: fake_blue, routes: {default: stop}}\n"


def plugin_module(api: object | None) -> types.ModuleType:
    """A module-like plugin registering the fake stages, declaring ``api`` (None: not declared)."""
    module = types.ModuleType("wound_plugin")
    module.register_stages = FakePlugin().register_stages
    if api is not None:
        module.HIERARCHY_PLUGIN_API = api
    return module


def test_incompatible_api_is_refused_with_a_clear_error(no_autoload, tmp_path):
    from hierarchy.core.errors import ConfigError, UnknownStageError
    from hierarchy.engine.pipeline import load_pipeline
    from hierarchy.config.stage import PLUGIN_API_VERSION
    from hierarchy.registry import get_registry, get_stage, register_plugin

    register_plugin(plugin_module(PLUGIN_API_VERSION + 1), name="wounds")
    [failure] = get_registry().failures
    assert failure.phase == "api" and get_registry().stages == {}
    assert str(failure) == (f"plugin 'wounds' (not from a distribution): api failed: declares HIERARCHY_PLUGIN_API "
                            f"= {PLUGIN_API_VERSION + 1} but this hierarchy supports {PLUGIN_API_VERSION}; install "
                            "a plugin release built for this hierarchy version, or upgrade hierarchy")
    with pytest.raises(UnknownStageError, match="api failed: declares HIERARCHY_PLUGIN_API"):
        get_stage("fake_blue")
    (tmp_path / "p.yaml").write_text(PIPE)
    with pytest.raises(ConfigError, match=r"\(plugins\) plugin 'wounds'.*api failed"):
        load_pipeline(tmp_path / "p.yaml")


@pytest.mark.parametrize("api", ["1", 1.5, 0])
def test_only_the_exact_version_is_accepted(no_autoload, api):
    from hierarchy.registry import get_registry, register_plugin

    register_plugin(plugin_module(api), name="wounds")
    assert [f.phase for f in get_registry().failures] == ["api"]


@pytest.mark.parametrize("api", [None, "current"])
def test_current_or_undeclared_version_registers(no_autoload, api):
    from hierarchy.config.stage import PLUGIN_API_VERSION
    from hierarchy.registry import get_registry, get_stage, register_plugin

    register_plugin(plugin_module(PLUGIN_API_VERSION if api else None), name="wounds")
    assert get_registry().failures == [] and get_stage("fake_blue").name == "fake_blue"


def declared_api(source: str) -> object:
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == [
                "HIERARCHY_PLUGIN_API"]:
            return ast.literal_eval(node.value)
    return None


def test_shipped_and_generated_plugins_declare_the_current_version(tmp_path):
    from hierarchy.commands._scaffold import render, validate
    from hierarchy.config.stage import PLUGIN_API_VERSION

    modules = [REPO / "stages" / "skin_vs_nonskin" / "plugin.py",
               *(REPO / "examples" / "hierarchy-ham10000" / "hierarchy_ham10000").glob("[!_]*.py")]
    assert len(modules) == 3
    for path in modules:
        assert declared_api(path.read_text()) == PLUGIN_API_VERSION, path
    generated = render(validate("acne_type", ("a", "b")))["hierarchy_acne_type/plugin.py"]
    assert declared_api(generated) == PLUGIN_API_VERSION


def test_stage_overriding_removed_hooks_is_a_named_failure(no_autoload):
    """Plugin API 1 stages could override build_dataset/train; the engine no longer calls them, so an
    override is refused loudly instead of being silently ignored."""
    from hierarchy import Stage
    from hierarchy.registry import get_registry, register_plugin

    class OldStyle(Stage):
        name = "old_style"
        labels = ("a", "b")

        def train(self, data, out=None):  # type: ignore[no-untyped-def]
            return out

    module = types.ModuleType("old_plugin")
    module.register_stages = lambda register: register(OldStyle)
    module.register_stages = __import__("hierarchy.registry", fromlist=["hookimpl"]).hookimpl(module.register_stages)
    register_plugin(module, name="old")
    [failure] = get_registry().failures
    assert failure.phase == "register" and "old_style" not in get_registry().stages
    assert "overrides train, which stages no longer have" in failure.error
