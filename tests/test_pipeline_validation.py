"""Static pipeline checks: every problem is reported with its YAML path, before any weights load."""
from __future__ import annotations

import pytest

from hierarchy.core.errors import ConfigError
from hierarchy.engine.pipeline import load_pipeline, parse_pipeline

GOOD = """\
name: ok
root: color
stages:
  color:
    stage: fake_color
    weights: does/not/exist.safetensors
    threshold: 0.8
    routes: {red: bright, other: stop}
  bright:
    stage: fake_bright
    routes: {default: stop}
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_pipeline(text)
    return info.value.errors


def test_valid_pipeline_passes_without_loading_weights(fake_stages):
    pipe = parse_pipeline(GOOD)
    assert pipe.depth_order() == ["color", "bright"]
    assert fake_stages == {}  # no predictor was built


@pytest.mark.parametrize("old,new,expected", [
    ("threshold: 0.8", "treshold: 0.8", "stages.color.treshold: extra field not permitted (line 7)"),
    ("threshold: 0.8", "threshold: high", "stages.color.threshold: expected"),
    ("threshold: 0.8", "threshold: yes", "stages.color.threshold: expected"),
    ("threshold: 0.8", "threshold: 1.5", "stages.color.threshold: must be between 0 and 1"),
    ("name: ok", "name: [a, b]", "name: Input should be a valid string"),
    ("stage: fake_bright", "stage: nosuch", "stages.bright.stage: Unknown stage 'nosuch'; known: fake_blue (from package fakes), fake_bright"),
    ("routes: {red: bright, other: stop}", "routes: {red: missing, other: stop}", "stages.color.routes.red: route target 'missing' is not a stage id"),
    ("routes: {red: bright, other: stop}", "routes: {red: bright}", "stages.color.routes: no route for label(s) other"),
    ("routes: {red: bright, other: stop}", "routes: {red: bright, other: stop, blu: stop}", "stages.color.routes.blu: 'blu' is not a label of stage 'fake_color'"),
    ("root: color", "root: nope", "root: 'nope' is not a stage id"),
])
def test_invalid_pipeline_reports_yaml_path(fake_stages, old, new, expected):
    errs = errors_of(GOOD.replace(old, new))
    assert any(expected in e for e in errs), errs


def test_duplicate_yaml_keys_rejected(fake_stages):
    errs = errors_of(GOOD.replace("threshold: 0.8", "threshold: 0.8\n    threshold: 0.9"))
    assert "duplicate key 'threshold'" in errs[0] and "line 8" in errs[0]


def test_python_tag_rejected(fake_stages, tmp_path):
    canary = tmp_path / "canary"
    errs = errors_of(GOOD.replace("name: ok", f"name: !!python/object/apply:os.system ['touch {canary}']"))
    assert "tags are not allowed" in errs[0]
    assert not canary.exists()


def test_cycle_is_printed(fake_stages):
    text = GOOD.replace("routes: {default: stop}", "routes: {default: color}")
    errs = errors_of(text)
    assert any("routes form a cycle: color -> bright -> color" in e for e in errs), errs


def test_unreachable_stage_rejected(fake_stages):
    errs = errors_of(GOOD + "  orphan:\n    stage: fake_blue\n    routes: {default: stop}\n")
    assert any("stages.orphan: stage 'orphan' is not reachable from root 'color'" in e for e in errs), errs


def test_all_errors_reported_at_once(fake_stages):
    text = GOOD.replace("stage: fake_bright", "stage: nosuch").replace("red: bright", "red: bright, blu: stop")
    assert len(errors_of(text)) == 2


def test_load_pipeline_resolves_weights_next_to_yaml(fake_stages, tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"")
    p = tmp_path / "p.yaml"
    p.write_text(GOOD.replace("does/not/exist.safetensors", "w.safetensors"))
    pipe = load_pipeline(p)
    assert pipe.weights_path("color") == tmp_path / "w.safetensors"
