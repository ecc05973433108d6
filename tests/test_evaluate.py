"""`hierarchy evaluate`: truth derivation, per-stage and end-to-end metrics, report files, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import solid

from hierarchy.commands.cli import main
from hierarchy.core.errors import DatasetError
from hierarchy.evaluate.runner import Hierarchy, evaluate
from hierarchy.evaluate.report import unique_dir
from hierarchy.engine.pipeline import parse_pipeline

# color: red -> bright, other -> stop; bright: light -> blue, dark -> stop; blue: leaf.
# Fake scores: p(red) = mean R, p(light) = mean G, p(blue) = mean B (of 0..255 / 255).
PIPE3 = """\
name: three
root: color
stages:
  color: {stage: fake_color, threshold: 0.6, routes: {red: bright, other: stop}}
  bright: {stage: fake_bright, routes: {light: blue, dark: stop}}
  blue: {stage: fake_blue, routes: {default: stop}}
"""
LABELS = {"color": ["red", "other"], "bright": ["light", "dark"], "blue": ["blue", "none"]}

# name: (rgb, deepest true label) -> what the cascade does
ITEMS = {
    "a": ((250, 250, 250), "blue"),  # red > light > blue: right
    "b": ((250, 250, 5), "blue"),  # red > light > none: wrong at blue
    "c": ((250, 5, 5), "blue"),  # red > dark: wrong at bright
    "d": ((5, 5, 5), "dark"),  # other: wrong at color
    "e": ((5, 128, 128), "other"),  # other: right
    "f": ((120, 120, 120), "other"),  # other at 0.53 < 0.6: abstains at color
}


def hierarchy(text: str = PIPE3, labels: dict = LABELS) -> Hierarchy:
    return Hierarchy.from_pipeline(parse_pipeline(text, check_stages=False), labels)


def test_truth_is_derived_by_walking_routes_backwards():
    h = hierarchy()
    t = h.derive("blue", {})
    assert t.stages == {"blue": "blue", "bright": "light", "color": "red"}
    assert t.path == [("color", "red"), ("bright", "light"), ("blue", "blue")]
    assert h.derive("dark", {}).path == [("color", "red"), ("bright", "dark")]
    assert h.derive("other", {}).stages == {"color": "other"}


def test_explicit_columns_override_and_blank_means_not_applicable():
    h = hierarchy()
    t = h.derive("blue", {"bright": "dark"})
    assert t.stages == {"color": "red", "bright": "dark", "blue": "blue"}
    assert t.path == [("color", "red"), ("bright", "dark")]  # dark routes to stop
    t = h.derive("blue", {"blue": ""})
    assert t.stages == {"color": "red", "bright": "light"} and len(t.path) == 2


def test_ambiguous_labels_need_a_column():
    text = PIPE3.replace("dark: stop", "dark: blue2") + "  blue2: {stage: fake_blue, routes: {default: stop}}\n"
    h = hierarchy(text, {**LABELS, "blue2": ["blue", "none"]})
    with pytest.raises(ValueError, match="belongs to stages"):
        h.derive("blue", {})
    assert h.derive("blue", {"blue2": "blue"}).path == [("color", "red"), ("bright", "dark"), ("blue2", "blue")]
    with pytest.raises(ValueError, match="not a label of any stage"):
        h.derive("purple", {})


def test_two_routes_into_one_stage_stop_the_derivation_with_a_warning():
    h = hierarchy(PIPE3.replace("light: blue, dark: stop", "default: blue"))
    warnings: set[str] = set()
    t = h.derive("blue", {}, warnings)
    assert t.stages == {"blue": "blue"} and t.path == []
    assert any("ambiguous" in w for w in warnings)


@pytest.fixture
def three(fake_stages, tmp_path):
    pipe = tmp_path / "three.yaml"
    pipe.write_text(PIPE3)
    rows = ["path,label"] + [f"{n}.png,{lab}" for n, (_, lab) in ITEMS.items()] + ["broken.png,other"]
    for n, (rgb, _) in ITEMS.items():
        solid(tmp_path / f"{n}.png", rgb)
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "truth.csv").write_text("\n".join(rows) + "\n")
    return pipe, tmp_path / "truth.csv"


def test_three_level_metrics_hand_checked(three):
    pipe, csv = three
    r = evaluate(parse_pipeline(pipe.read_text()), csv, progress=False).report
    assert r["decode_errors"]["count"] == 1 and r["decode_errors"]["items"][0]["path"].endswith("broken.png")
    assert r["data"]["n_evaluated"] == 6 and r["truth"]["per_stage"] == {"color": 7, "bright": 4, "blue": 3}
    assert r["stages"]["color"]["n"] == 6  # truth counts samples; metrics count decoded items
    color, bright, blue = (r["stages"][s] for s in ("color", "bright", "blue"))
    assert color["accuracy"] == pytest.approx(5 / 6)  # d is red (derived from dark) but looks other
    assert color["roc_auc"] == pytest.approx(6.5 / 8)  # d ties e at p(red) = 5/255
    assert color["selective"]["coverage"] == pytest.approx(5 / 6)
    assert color["selective"]["accuracy_accepted"] == pytest.approx(4 / 5)
    assert bright["n"] == 4 and bright["accuracy"] == pytest.approx(3 / 4)  # every item true to it, routed or not
    assert bright["in_pipeline"] == {"n_reached": 3, "n_with_truth": 3, "accuracy": pytest.approx(2 / 3),
                                     "n_accepted": 3, "n_abstained": 0, "n_rejected": 0}
    assert blue["accuracy"] == pytest.approx(1 / 3)
    e = r["end_to_end"]
    assert e["statuses"] == {"ok": 5, "abstained": 1, "rejected": 0, "error": 0}
    assert e["accuracy"] == pytest.approx(2 / 6)
    assert e["selective"]["coverage"] == pytest.approx(5 / 6)
    assert e["selective"]["accuracy_accepted"] == pytest.approx(2 / 5)
    # |T ∩ P| = 3+2+1+0+1+0, |P| = 3+3+2+1+1+0, |T| = 3+3+3+2+1+1
    hp, hr = 7 / 10, 7 / 13
    assert e["hierarchical"] == pytest.approx({"precision": hp, "recall": hr, "f1": 2 * hp * hr / (hp + hr)})
    att = e["error_attribution"]
    assert att["counts"] == {"blue": 1, "bright": 1, "color": 2}
    assert att["by_kind"]["color"] == {"wrong": 1, "abstained": 1}
    blamed = {Path(it["path"]).stem: (it["stage_id"], it["kind"]) for it in att["items"]}
    assert blamed == {"b": ("blue", "wrong"), "c": ("bright", "wrong"), "d": ("color", "wrong"),
                      "f": ("color", "abstained")}
    assert e["labels"] == ["other", "dark", "blue", "none", "(abstained)"]
    assert e["confusion"]["counts"][0] == [1, 0, 0, 0, 1]  # e right, f abstained
    assert e["per_class"]["other"]["recall"] == pytest.approx(1 / 2)  # an abstention is a miss


def test_unknown_label_is_a_clear_error(three, tmp_path):
    pipe, csv = three
    csv.write_text("path,label\na.png,purple\n")
    with pytest.raises(DatasetError, match="'purple' is not a label of any stage"):
        evaluate(parse_pipeline(pipe.read_text()), csv, progress=False)


def test_cli_writes_report_into_a_new_directory(three, tmp_path, capsys):
    pipe, csv = three
    out = tmp_path / "ev"
    assert main(["evaluate", str(pipe), str(csv), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "end-to-end" in table and "color" in table and "hierarchical P/R/F1 0.700/0.538" in table
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "records.jsonl", "risk_coverage.png", "confusion_end_to_end.png",
            "confusion_color.png", "reliability_blue.png"} <= names
    md = (out / "report.md").read_text()
    assert "![risk-coverage](risk_coverage.png)" in md and "broken.png" in md
    assert len((out / "records.jsonl").read_text().splitlines()) == 6
    assert unique_dir(out) == tmp_path / "ev2" and unique_dir(out) == tmp_path / "ev3"  # each call claims one
    (tmp_path / "empty").mkdir()
    assert unique_dir(tmp_path / "empty") == tmp_path / "empty"


def test_image_folder_default_out_and_split_flag(fake_stages, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipe = tmp_path / "one.yaml"
    pipe.write_text("name: one\nroot: color\nstages:\n  color: {stage: fake_color, routes: {default: stop}}\n")
    solid(tmp_path / "data" / "red" / "r.png", (250, 5, 5))
    solid(tmp_path / "data" / "other" / "o.png", (5, 250, 5))
    assert main(["evaluate", str(pipe), str(tmp_path / "data"), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(Path("runs") / "evaluate" / "one") and Path(report["out"], "report.json").is_file()
    assert report["data"]["layout"] == "image_folder" and report["data"]["split"] == "all"
    assert report["stages"]["color"]["accuracy"] == 1.0 and report["end_to_end"]["accuracy"] == 1.0
    assert main(["evaluate", str(pipe), str(tmp_path / "data"), "--split", "val"]) == 1
    assert "has no train/val/test split" in capsys.readouterr().err


# ---------------------------------------------------------------- a real (tiny) trained model


REPORT_FIELDS = {"format", "schema_version", "created_by", "created_at", "pipeline", "data", "truth",
                 "decode_errors", "stages", "end_to_end", "settings", "seconds", "files"}
STAGE_FIELDS = {"stage", "labels", "n", "accuracy", "per_class", "macro", "weighted", "confusion", "roc_auc",
                "roc_auc_positive", "threshold", "calibration", "selective", "risk_coverage", "in_pipeline"}
E2E_FIELDS = {"n", "statuses", "n_without_root_truth", "labels", "accuracy", "n", "per_class", "macro", "weighted",
              "selective", "confusion", "hierarchical", "error_attribution", "accuracy_without_thresholds",
              "risk_coverage"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Generated HAM10000/COCO data, the real builder, and a model trained for 2 steps: enough for
    plumbing (files, fields, thresholds), not for accuracy. OOD fitting is off (not under test here)."""
    from hierarchy.data import synth

    root = tmp_path_factory.mktemp("trained")
    synth.make_ham10000(root / "ham", n_lesions=16, seed=0)
    synth.make_coco(root / "coco", n_images=10, seed=0)
    assert main(["build-dataset", "skin_vs_nonskin", "--ham10000", str(root / "ham"), "--coco", str(root / "coco"),
                 "--out", str(root / "ds")]) == 0
    (root / "cfg.yaml").write_text("train: {ood: false}\n")
    assert main(["train", "skin_vs_nonskin", "--config", str(root / "cfg.yaml"), "--data", str(root / "ds"),
                 "--pretrained", "none", "--img-size", "32",
                 "--epochs", "1", "--max-steps", "2", "--batch-size", "16", "--out", str(root / "runs")]) == 0
    return root, root / "runs" / "skin_vs_nonskin" / "train"


def gate_pipeline(path: Path, run: Path, threshold: str) -> Path:
    path.write_text(f"name: gate\nroot: gate\nstages:\n  gate:\n    stage: skin_vs_nonskin\n    weights: {run}\n"
                    f"    threshold: {threshold}\n    routes: {{skin: stop, non-skin: stop}}\n")
    return path


def test_train_evaluate_calibrate_end_to_end(trained, capsys):
    root, run = trained
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["threshold"]["target"] == {"max_risk": 0.01} and meta["threshold"]["split"] == "val"
    assert {"ece_before", "ece_after", "nll_before", "nll_after"} <= set(meta["calibration"])
    capsys.readouterr()
    assert main(["calibrate", str(run), "--data", str(root / "ds"), "--target-coverage", "0.5"]) == 0
    assert "threshold" in capsys.readouterr().out
    stored = json.loads((run / "metadata.json").read_text())["threshold"]
    assert stored["target"] == {"target_coverage": 0.5} and 0 < stored["achieved"]["n_accepted"] < stored["n"]
    pipe = gate_pipeline(root / "auto.yaml", run, "auto")
    assert main(["evaluate", str(pipe), str(root / "ds"), "--out", str(root / "ev"), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert REPORT_FIELDS <= set(report) and STAGE_FIELDS <= set(report["stages"]["gate"])
    assert E2E_FIELDS <= set(report["end_to_end"])
    gate = report["stages"]["gate"]
    cal = gate["calibration"]
    assert cal["before_from"] == "logits" and cal["temperature"] == pytest.approx(meta["temperature"], rel=0.5)
    assert None not in (cal["ece_before"], cal["ece_after"], gate["roc_auc"])
    assert gate["threshold"]["value"] == stored["threshold"] and gate["threshold"]["setting"] == "auto"
    records = [json.loads(line) for line in (root / "ev" / "records.jsonl").read_text().splitlines()]
    assert len(records) == stored["n"]
    for rec in records:  # `threshold: auto` abstains exactly below the stored threshold
        assert (rec["status"] == "abstained") == (rec["trace"][0]["confidence"] < stored["threshold"])
    assert sum(r["status"] == "ok" for r in records) == stored["achieved"]["n_accepted"]
    for name in ("report.md", "confusion_gate.png", "reliability_gate.png", "risk_coverage.png"):
        assert (root / "ev" / name).stat().st_size > 1000
    from hierarchy.engine.pipeline import load_pipeline
    from hierarchy.engine.router import Router

    fixed = Router.from_pipeline(load_pipeline(gate_pipeline(root / "fixed.yaml", run, "0.42")), device="cpu")
    assert fixed.stages["gate"].threshold == 0.42  # a number overrides the stored threshold
