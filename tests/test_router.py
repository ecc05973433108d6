"""Router behaviour with colour-based fake stages (tests/fakes.py): no weights, no training."""
from __future__ import annotations

from pathlib import Path

import pytest
from fakes import solid

from hierarchy.engine.pipeline import parse_pipeline
from hierarchy.engine.router import Router

RED, GREEN, BLUE = (250, 10, 10), (10, 250, 10), (10, 10, 250)
YELLOW = (250, 250, 10)  # red and light


def make_router(yaml_text: str) -> Router:
    return Router.from_pipeline(parse_pipeline(yaml_text))


def run(router: Router, paths: list[Path], batch_size: int = 32) -> list[dict]:
    return list(router.run(paths, batch_size=batch_size, workers=2))


TWO_LEVEL = """
name: two
root: color
stages:
  color:
    stage: fake_color
    routes: {red: bright, other: stop}
  bright:
    stage: fake_bright
    routes: {default: stop}
"""


def test_router_routes_by_label_and_stops(fake_stages, tmp_path):
    recs = run(make_router(TWO_LEVEL), [solid(tmp_path / "r.png", RED), solid(tmp_path / "g.png", GREEN)])
    assert [r["status"] for r in recs] == ["ok", "ok"]
    assert [t["stage"] for t in recs[0]["trace"]] == ["color", "bright"]
    assert recs[0]["label"] == "dark"
    assert [t["stage"] for t in recs[1]["trace"]] == ["color"]
    assert recs[1]["label"] == "other"
    assert set(recs[0]["trace"][0]["probs"]) == {"red", "other"}


def test_router_default_route_is_used_for_unlisted_labels(fake_stages, tmp_path):
    text = TWO_LEVEL.replace("routes: {red: bright, other: stop}", "routes: {red: stop, default: bright}")
    recs = run(make_router(text), [solid(tmp_path / "g.png", GREEN)])
    assert [t["stage"] for t in recs[0]["trace"]] == ["color", "bright"]
    assert recs[0]["label"] == "light"


def test_router_abstains_below_threshold(fake_stages, tmp_path):
    text = TWO_LEVEL.replace("stage: fake_color\n", "stage: fake_color\n    threshold: 0.9\n")
    grey = solid(tmp_path / "grey.png", (128, 128, 128))  # red prob ~0.5 -> below 0.9
    red = solid(tmp_path / "red.png", RED)
    recs = run(make_router(text), [grey, red])
    assert recs[0]["status"] == "abstained"
    assert recs[0]["label"] is None and recs[0]["stage"] == "color"
    assert recs[0]["trace"][0]["decision"] == "abstained" and recs[0]["trace"][0]["threshold"] == 0.9
    assert recs[1]["status"] == "ok" and len(recs[1]["trace"]) == 2


def test_router_abstention_at_second_level_keeps_first_label(fake_stages, tmp_path):
    text = TWO_LEVEL.replace("stage: fake_bright\n", "stage: fake_bright\n    threshold: 0.9\n")
    recs = run(make_router(text), [solid(tmp_path / "o.png", (250, 128, 10))])  # light ~0.5
    assert recs[0]["status"] == "abstained"
    assert recs[0]["label"] == "red" and recs[0]["stage"] == "bright"


THREE_LEVEL = """
name: three
root: color
stages:
  color: {stage: fake_color, routes: {red: bright, other: blue}}
  bright: {stage: fake_bright, routes: {light: blue, dark: stop}}
  blue: {stage: fake_blue, routes: {default: stop}}
"""


def test_router_three_level_chain(fake_stages, tmp_path):
    recs = run(make_router(THREE_LEVEL), [solid(tmp_path / "y.png", YELLOW)])
    assert [t["stage"] for t in recs[0]["trace"]] == ["color", "bright", "blue"]
    assert recs[0]["label"] == "none"


def test_router_mixed_batch_calls_each_stage_once_per_group(fake_stages, tmp_path):
    colours = [RED, GREEN, YELLOW, BLUE, RED, YELLOW, GREEN]
    paths = [solid(tmp_path / f"{i}.png", c) for i, c in enumerate(colours)]
    recs = run(make_router(THREE_LEVEL), paths, batch_size=32)
    depth = [len(r["trace"]) for r in recs]
    assert depth == [2, 2, 3, 2, 2, 3, 2]  # red->bright(dark) stop; others->blue; yellow->bright->blue
    assert fake_stages["fake_color"] == [7]
    assert fake_stages["fake_bright"] == [4]  # the four red-ish images, in one call
    assert fake_stages["fake_blue"] == [5]  # 3 'other' + 2 'light'


def test_router_batches_groups_by_batch_size(fake_stages, tmp_path):
    paths = [solid(tmp_path / f"{i}.png", RED) for i in range(5)]
    run(make_router(THREE_LEVEL), paths, batch_size=2)
    assert fake_stages["fake_color"] == [2, 2, 1]


def test_router_keeps_input_order(fake_stages, tmp_path):
    colours = [RED, GREEN, BLUE, YELLOW] * 10
    paths = [solid(tmp_path / f"{i:02d}.png", c) for i, c in enumerate(colours)]
    recs = run(make_router(THREE_LEVEL), paths, batch_size=3)
    assert [r["path"] for r in recs] == [str(p) for p in paths]


def test_router_corrupt_file_among_good_ones(fake_stages, tmp_path):
    good1, good2 = solid(tmp_path / "a.png", RED), solid(tmp_path / "c.png", GREEN)
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    missing = tmp_path / "nope.png"
    recs = run(make_router(THREE_LEVEL), [good1, bad, missing, good2])
    assert [r["status"] for r in recs] == ["ok", "error", "error", "ok"]
    assert recs[1]["error"]["type"] in {"undecodable", "truncated"}
    assert recs[2]["error"]["type"] == "not_found"
    assert fake_stages["fake_color"] == [2]


def test_router_stage_failure_becomes_error_records(fake_stages, tmp_path, monkeypatch):
    router = make_router(TWO_LEVEL)
    monkeypatch.setattr(router.stages["bright"].predictor, "predict", lambda b: 1 / 0)
    recs = run(router, [solid(tmp_path / "r.png", RED), solid(tmp_path / "g.png", GREEN)])
    assert recs[0]["status"] == "error" and recs[0]["error"]["type"] == "stage_failed"
    assert [t["stage"] for t in recs[0]["trace"]] == ["color"]
    assert recs[1]["status"] == "ok"


def test_threshold_auto_without_stored_value_is_config_error(fake_stages):
    from hierarchy.core.errors import ConfigError

    with pytest.raises(ConfigError, match="stages.color.threshold"):
        make_router(TWO_LEVEL.replace("stage: fake_color\n", "stage: fake_color\n    threshold: auto\n"))
