"""Plugin discovery through real, pip-installed distributions and their entry points."""
from __future__ import annotations

import json

import pytest
from fakes import solid
from plugin_dist import COLOR_PLUGIN, hierarchy_cli, install_dist

BROKEN = {
    "bad_import": "raise ImportError('this plugin is broken on purpose')\n",
    "bad_hook": """
        from hierarchy.registry import hookimpl

        @hookimpl
        def register_stages(register):
            raise RuntimeError('hook exploded')
        """,
    "bad_stage": """
        from hierarchy.registry import hookimpl

        @hookimpl
        def register_stages(register):
            register(object)
        """,
    "future_api": """
        from hierarchy.registry import hookimpl
        HIERARCHY_PLUGIN_API = 99

        @hookimpl
        def register_stages(register):
            pass
        """,
}


@pytest.fixture(scope="module")
def good_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    site = root / "site"
    install_dist(root, site, "hierarchy-plugcolor", "1.2.3", "plugcolor", {"plugin": COLOR_PLUGIN},
                 {"plug_color": "plugcolor.plugin"})
    return site


@pytest.fixture(scope="module")
def bad_site(tmp_path_factory, good_site):
    root = tmp_path_factory.mktemp("bad")
    site = root / "site"
    modules = {**BROKEN, "dupe": COLOR_PLUGIN}
    eps = {name: f"brokenplug.{name}" for name in modules}
    install_dist(root, site, "hierarchy-brokenplug", "0.0.1", "brokenplug", modules, eps)
    return site


def stages_json(site, env=None) -> tuple[dict, str]:
    proc = hierarchy_cli(["stages", "--json"], site=site, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_installed_plugin_appears_in_stages(good_site):
    data, _ = stages_json(good_site)
    by_name = {s["name"]: s for s in data["stages"]}
    assert by_name["plug_color"]["dist"] == "hierarchy-plugcolor"
    assert by_name["plug_color"]["version"] == "1.2.3"
    assert by_name["plug_color"]["module"] == "plugcolor.plugin"
    assert by_name["skin_vs_nonskin"]["dist"] == "hierarchy-cascade"


def test_installed_plugin_runs_end_to_end(good_site, tmp_path):
    pipe = tmp_path / "p.yaml"
    pipe.write_text("name: plug\nroot: c\nstages:\n  c: {stage: plug_color, routes: {default: stop}}\n")
    imgs = [solid(tmp_path / "img" / "a.png", (250, 0, 0)), solid(tmp_path / "img" / "b.png", (0, 250, 0))]
    proc = hierarchy_cli(["run", str(pipe), str(tmp_path / "img"), "--format", "jsonl"], site=good_site)
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in recs] == [str(p) for p in imgs]
    assert [r["label"] for r in recs] == ["red", "other"]


def test_broken_plugins_are_named_and_others_still_work(good_site, bad_site):
    data, stderr = stages_json(f"{bad_site}:{good_site}")
    names = {s["name"] for s in data["stages"]}
    assert "skin_vs_nonskin" in names
    broken = {b["plugin"]: b for b in data["broken"]}
    assert broken["bad_import"]["phase"] == "import" and "broken on purpose" in broken["bad_import"]["error"]
    assert broken["bad_import"]["dist"] == "hierarchy-brokenplug" and broken["bad_import"]["version"] == "0.0.1"
    assert broken["bad_hook"]["phase"] == "hook" and "hook exploded" in broken["bad_hook"]["error"]
    assert broken["bad_stage"]["phase"] == "register"
    assert broken["future_api"]["phase"] == "api" and "99" in broken["future_api"]["error"]
    assert "plugin 'bad_import' (hierarchy-brokenplug 0.0.1)" in stderr


def test_duplicate_stage_names_both_distributions(good_site, bad_site, tmp_path):
    data, _ = stages_json(f"{bad_site}:{good_site}")
    assert "plug_color" not in {s["name"] for s in data["stages"]}
    conflict = [b for b in data["broken"] if b["phase"] == "conflict"]
    assert conflict and "hierarchy-plugcolor 1.2.3" in conflict[0]["error"]
    assert "hierarchy-brokenplug 0.0.1" in conflict[0]["error"]
    pipe = tmp_path / "p.yaml"
    pipe.write_text("name: plug\nroot: c\nstages:\n  c: {stage: plug_color, routes: {default: stop}}\n")
    proc = hierarchy_cli(["validate", str(pipe)], site=f"{bad_site}:{good_site}")
    assert proc.returncode == 2
    assert "hierarchy-plugcolor" in proc.stderr and "hierarchy-brokenplug" in proc.stderr


def test_plugins_env_selects_plugins(good_site, bad_site):
    data, _ = stages_json(f"{bad_site}:{good_site}", env={"HIERARCHY_PLUGINS": "plug_color"})
    assert [s["name"] for s in data["stages"]] == ["plug_color", "skin_vs_nonskin"]  # first party stays
    assert data["broken"] == []
    data, _ = stages_json(f"{bad_site}:{good_site}", env={"HIERARCHY_PLUGINS": "plug_color,no:skin_vs_nonskin"})
    assert [s["name"] for s in data["stages"]] == ["plug_color"]


def test_disable_autoload_env(good_site):
    data, _ = stages_json(good_site, env={"HIERARCHY_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert data["stages"] == []


def test_load_plugins_is_idempotent(no_autoload):
    from fakes import FakePlugin

    from hierarchy.registry import get_registry, load_plugins, register_plugin

    register_plugin(FakePlugin(), name="fakes")
    first = dict(load_plugins().stages)
    assert load_plugins() is get_registry() and dict(load_plugins().stages) == first
    assert get_registry().failures == []


def test_unknown_stage_message_lists_known(fake_stages):
    from hierarchy.core.errors import UnknownStageError
    from hierarchy.registry import get_stage

    with pytest.raises(UnknownStageError, match=r"Unknown stage 'x'; known: fake_blue \(from package fakes\)"):
        get_stage("x")
