"""evaluate --by: bootstrap intervals (hand-checked and against scipy), --by parsing and bucketing,
the worst group on generated data, manifests carrying metadata columns, and the real-data table."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fakes import solid
from hierarchy.commands.cli import main
from hierarchy.core.errors import ConfigError, DatasetError
from hierarchy.engine.pipeline import parse_pipeline
from hierarchy.evaluate.runner import evaluate
from hierarchy.evaluate.subgroups import GroupBy, parse_by
from hierarchy.metrics.bootstrap import bootstrap_cis, percentile_interval, resample_indices


# ---------------------------------------------------------------- bootstrap


def test_interval_of_a_constant_and_a_hand_checked_percentile():
    x = np.ones(12)
    assert bootstrap_cis(12, {"mean": lambda i: x[i].mean()}, n_resamples=50)["mean"] == {
        "value": 1.0, "ci": [1.0, 1.0], "n_valid": 50}
    # percentiles 2.5 / 97.5 of 0..40 (41 values, linear): 1.0 and 39.0
    assert percentile_interval(np.arange(41.0)) == pytest.approx((1.0, 39.0))
    assert percentile_interval(np.array([np.nan, 2.0, 2.0])) == (2.0, 2.0)  # undefined resamples skipped
    assert percentile_interval(np.array([np.nan])) is None


def test_hand_checked_resamples_of_two_values():
    # on 0/1 data each resample's mean is (#ones drawn)/2; with the indices drawn the interval follows
    x = np.array([0.0, 1.0])
    idx = resample_indices(2, 400, seed=3)
    means = x[idx].mean(axis=1)
    assert set(means) <= {0.0, 0.5, 1.0} and 0.2 < (means == 0.5).mean() < 0.8
    got = bootstrap_cis(2, {"m": lambda i: x[i].mean()}, n_resamples=400, seed=3)["m"]
    assert got["ci"] == [0.0, 1.0] and got["value"] == 0.5


def test_intervals_equal_scipy_on_the_same_resamples():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    correct = rng.random(57) < 0.7
    y, score = rng.integers(0, 2, 57), rng.random(57)
    for seed in (0, 7):
        ours = bootstrap_cis(57, {"acc": lambda i: correct[i].mean(),
                                  "gap": lambda i: score[i][y[i] == 1].mean() - score[i][y[i] == 0].mean()},
                             n_resamples=300, seed=seed)
        ref = scipy_stats.bootstrap((correct.astype(float),), np.mean, n_resamples=300, method="percentile",
                                    vectorized=False, rng=np.random.default_rng(seed))
        assert ours["acc"]["ci"] == pytest.approx(list(ref.confidence_interval), abs=1e-12)
        paired = scipy_stats.bootstrap((y, score), lambda a, b: b[a == 1].mean() - b[a == 0].mean(), paired=True,
                                       n_resamples=300, method="percentile", vectorized=False,
                                       rng=np.random.default_rng(seed))
        assert ours["gap"]["ci"] == pytest.approx(list(paired.confidence_interval), abs=1e-12)


# ---------------------------------------------------------------- --by


def test_parse_by_with_buckets():
    by = parse_by(["sex,age:0-30,30-60,60-", "localization"])
    assert [g.column for g in by] == ["sex", "age", "localization"]
    age = by[1]
    assert [age.group(v) for v in ("5", "30", "59.9", "85", "", "n/a")] == [
        "0-30", "30-60", "30-60", "60-", "(missing)", "(missing)"]
    assert GroupBy("age", ((0.0, 10.0),)).group("20") == "(other)"
    assert by[0].group(" male ") == "male" and by[0].group("") == "(missing)"
    for bad in (["age:x"], ["age:30-10"], [""], [":0-3"]):
        with pytest.raises(ConfigError):
            parse_by(bad)


PIPE = "name: red\nroot: color\nstages:\n  color: {stage: fake_color, routes: {default: stop}}\n"


@pytest.fixture
def grouped(fake_stages, tmp_path):
    """site a (n 40): easy and right; site b (n 40): reds too dark, mostly wrong; site c (n 8): small."""
    rows = ["path,label,site,age"]
    for i in range(40):
        red = i % 2 == 0
        solid(tmp_path / f"a{i}.png", (240, 0, 0) if red else (10, 200, 200))
        rows.append(f"a{i}.png,{'red' if red else 'other'},a,{20 + i}")
    for i in range(40):
        red = i % 4 != 0  # 30 dark reds (predicted other) + 10 true others
        solid(tmp_path / f"b{i}.png", (60, 0, 0) if red else (10, 200, 200))
        rows.append(f"b{i}.png,{'red' if red else 'other'},b,{70 + i % 10}")
    for i in range(8):
        solid(tmp_path / f"c{i}.png", (240, 0, 0))
        rows.append(f"c{i}.png,red,c,")
    (tmp_path / "truth.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "truth.csv"


def test_worst_group_is_the_bad_one_with_an_interval_below_the_others(grouped):
    r = evaluate(parse_pipeline(PIPE), grouped, progress=False, by=["site", "age:0-40,40-60,60-"],
                 n_resamples=200).report
    sg = r["subgroups"]
    for table in (sg["columns"]["site"]["stages"]["color"], sg["columns"]["site"]["end_to_end"]):
        g = table["groups"]
        assert (g["a"]["n"], g["b"]["n"], g["c"]["n"]) == (40, 40, 8)
        assert g["a"]["metrics"]["accuracy"]["value"] == 1.0
        assert g["b"]["metrics"]["accuracy"]["value"] == pytest.approx(10 / 40)
        assert g["c"]["small_n"] and not g["a"]["small_n"]
        w = table["worst"]["accuracy"]
        assert w["group"] == "b" and w["ci_below_others"]
        assert w["ci"][1] < w["others"] == pytest.approx(48 / 48)
        assert g["b"]["metrics"]["recall/red"]["value"] == 0.0
        assert table["worst"]["recall/red"]["group"] == "b"
    assert any("site=c: n=8 < 30" in w for w in sg["warnings"])
    ages = sg["columns"]["age"]["end_to_end"]["groups"]
    assert set(ages) == {"0-40", "40-60", "60-", "(missing)"} and ages["(missing)"]["n"] == 8


def test_cli_by_writes_tables_and_plots(grouped, tmp_path, capsys):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(PIPE)
    out = tmp_path / "ev"
    assert main(["evaluate", str(pipe), str(grouped), "--by", "site", "--n-resamples", "50", "--out", str(out)]) == 0
    assert "by site: end to end worst group (accuracy): b" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "## Subgroups" in md and "| c * | 8 |" in md
    report = json.loads((out / "report.json").read_text())
    for name in report["files"]["subgroup_plots"].values():
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert main(["evaluate", str(pipe), str(grouped), "--by", "colour", "--out", str(tmp_path / "x")]) == 1
    assert "'colour'" in capsys.readouterr().err


def test_unknown_by_column_is_a_dataset_error(grouped):
    with pytest.raises(DatasetError, match=r"\['sex'\] not in the data; its extra columns are: site, age"):
        evaluate(parse_pipeline(PIPE), grouped, progress=False, by=["sex"])


def test_builder_manifest_carries_ham10000_metadata(tmp_path):
    from hierarchy.data import synth
    from hierarchy.data.labelled import load_samples

    synth.make_ham10000(tmp_path / "ham", n_lesions=6, seed=0)
    synth.make_coco(tmp_path / "coco", n_images=4, seed=0)
    assert main(["build-dataset", "skin_vs_nonskin", "--ham10000", str(tmp_path / "ham"), "--coco",
                 str(tmp_path / "coco"), "--out", str(tmp_path / "ds")]) == 0
    header = (tmp_path / "ds" / "manifest.csv").read_text().splitlines()[0]
    assert header == "path,label,split,source,group,sex,age,localization,dx_type"
    samples = load_samples(tmp_path / "ds")  # readers keep working with the extra columns
    skin = [s for s in samples if s.label == "skin"]
    assert skin and all(len(s.extra_labels) == 4 and s.extra_labels[0] for s in skin)
    assert all(s.extra_labels == ("", "", "", "") for s in samples if s.label == "non-skin")


# ---------------------------------------------------------------- real data


@pytest.mark.real_data
def test_ham10000_by_sex_and_localization(real_data, fake_stages, tmp_path):
    """The real HAM10000 metadata through the builder, evaluated per sex and body site. The classifier
    is the colour fake (p(red) = mean red): the point is the per-group table and its intervals."""
    from hierarchy.data.builder import build_dataset
    from hierarchy.data.dataset_config import DatasetConfig

    cfg = DatasetConfig.model_validate({"sources": [{"type": "ham10000", "label_map": {
        "mel": "red", "bcc": "red", "akiec": "red", "nv": "other", "bkl": "other", "df": "other", "vasc": "other"}}]})
    build_dataset(cfg, tmp_path / "ds", labels=["red", "other"], stage="fake_color",
                  roots={"ham10000": real_data / "ham10000"})
    r = evaluate(parse_pipeline(PIPE), tmp_path / "ds", split="val", progress=False, by=["sex,localization"],
                 n_resamples=200).report
    sex = r["subgroups"]["columns"]["sex"]["end_to_end"]["groups"]
    assert {"male", "female"} <= set(sex) and sum(g["n"] for g in sex.values()) == r["end_to_end"]["n"]
    rec = sex["male"]["metrics"]["recall/red"]
    assert rec["ci"][0] <= rec["value"] <= rec["ci"][1]
    from hierarchy.evaluate.subgroup_files import render_subgroups_markdown

    print(render_subgroups_markdown({**r, "files": {}}))
