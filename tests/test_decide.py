"""Per-label decision thresholds (`decide:`): routing, YAML validation, the evaluator's mirror, tuning."""
from __future__ import annotations

import numpy as np
import pytest

from fakes import solid
from hierarchy.core.errors import ConfigError
from hierarchy.engine.pipeline import parse_pipeline
from hierarchy.engine.router import Router
from hierarchy.evaluate.runner import evaluate
from hierarchy.metrics.decisions import decide_labels, parse_recall_targets, tune_decide

LABELS = ["red", "other"]


def pipe(decide: str, threshold: str = "0.6"):
    return parse_pipeline(f"name: d\nroot: c\nstages:\n  c:\n    stage: fake_color\n    threshold: {threshold}\n"
                          f"    decide: {decide}\n    routes: {{default: stop}}\n")


def route(p, tmp_path, reds):
    router = Router.from_pipeline(p)
    return list(router.run([solid(tmp_path / f"{r}.png", (r, 0, 0)) for r in reds]))


def test_a_label_below_argmax_but_over_its_threshold_wins_and_is_not_abstained(fake_stages, tmp_path):
    # p(red) = red / 255: 100 -> 0.39 (argmax is other 0.61), 50 -> 0.20
    r100, r50 = route(pipe("{red: 0.3}"), tmp_path, [100, 50])
    assert (r100["status"], r100["label"]) == ("ok", "red")
    assert r100["confidence"] == pytest.approx(100 / 255) and r100["trace"][0]["decide"] == 0.3
    assert (r50["status"], r50["label"]) == ("ok", "other") and "decide" not in r50["trace"][0]


def test_two_labels_over_threshold_the_more_probable_wins_ties_to_the_first_label(fake_stages, tmp_path):
    r140, r100 = route(pipe("{red: 0.3, other: 0.3}"), tmp_path, [140, 100])
    assert r140["label"] == "red" and r100["label"] == "other"
    chosen, forced = decide_labels(np.array([[0.5, 0.5], [0.45, 0.55], [0.2, 0.8]]), LABELS, {"red": 0.4, "other": 0.4})
    assert chosen.tolist() == [0, 1, 1] and forced.tolist() == [True, True, True]
    chosen, forced = decide_labels(np.array([[0.5, 0.5], [0.1, 0.9]]), LABELS, {"red": 0.6})
    assert chosen.tolist() == [0, 1] and forced.tolist() == [False, False]  # no threshold reached: argmax


def test_abstain_still_applies_when_no_decision_threshold_fires(fake_stages, tmp_path):
    (r120,) = route(pipe("{red: 0.9}"), tmp_path, [120])  # p(other) 0.53 < threshold 0.6
    assert r120["status"] == "abstained" and r120["reason"] == "below_threshold"


@pytest.mark.parametrize("decide, message", [
    ("{blue: 0.3}", "stages.c.decide.blue: 'blue' is not a label of stage 'fake_color' (labels: red, other) (line 7)"),
    ("{red: 1.5}", "stages.c.decide.red: must be between 0 and 1 (got 1.5) (line 7)"),
    ("{red: -0.1}", "stages.c.decide.red: must be between 0 and 1 (got -0.1)"),
    ("{red: high}", "stages.c.decide"),
    ("sometimes", "stages.c.decide"),
])
def test_decide_yaml_validation(fake_stages, decide, message):
    with pytest.raises(ConfigError) as exc:
        pipe(decide)
    assert any(message in e for e in exc.value.errors), exc.value.errors


def test_evaluate_mirrors_the_router_and_reports_the_operating_point(fake_stages, tmp_path):
    rows = ["path,label"]
    for r, lab in ((100, "red"), (90, "red"), (30, "red"), (50, "other"), (20, "other"), (200, "red")):
        solid(tmp_path / f"{r}.png", (r, 0, 0))
        rows.append(f"{r}.png,{lab}")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    rep = evaluate(pipe("{red: 0.3}", threshold="0.85"), tmp_path / "t.csv", progress=False).report
    s = rep["stages"]["c"]
    assert s["per_class"]["red"]["recall"] == pytest.approx(3 / 4)  # 30/255 = 0.12 misses
    assert s["selective"]["coverage"] == rep["end_to_end"]["selective"]["coverage"] == pytest.approx(5 / 6)  # 50: other 0.80
    d = s["decide"]["red"]
    assert (d["threshold"], d["recall"], d["precision"]) == (0.3, pytest.approx(3 / 4), 1.0)
    curve = dict(zip(d["curve"]["thresholds"], d["curve"]["recall"]))
    assert curve[0.0] == 1.0 and curve[1.0] == pytest.approx(1 / 4)  # at 1.0 only argmax (200) is red


def test_tune_decide_meets_recall_targets():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    logits = rng.normal(size=(400, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for target in (0.8, 0.95, 1.0):
        out = tune_decide(p, y, ["a", "b", "c"], {"b": target})
        assert out["met"] and out["achieved"]["b"]["recall"] >= target
        t = out["thresholds"]["b"]
        looser = decide_labels(p, ["a", "b", "c"], {"b": t + 0.01})[0]  # the highest threshold that meets it
        assert ((looser == 1) & (y == 1)).sum() / (y == 1).sum() < target or t + 0.01 > 1
    two = tune_decide(p, y, ["a", "b", "c"], {"b": 0.9, "c": 0.9})
    assert two["achieved"]["c"]["recall"] >= 0.9 and set(two["thresholds"]) == {"b", "c"}
    with pytest.raises(ValueError, match="'x' is not a label"):
        parse_recall_targets(["x=0.9"], ["a", "b"])
    with pytest.raises(ValueError, match="expected LABEL=R"):
        parse_recall_targets(["a=2"], ["a", "b"])
