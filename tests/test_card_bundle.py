"""On the small demo (generated data, real builder and trainer): train writes a card, `calibrate
--target-recall` meets its target, `hierarchy card`, and the bundle's round trip and refusals."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from hierarchy.commands.cli import main
from hierarchy.core.errors import BundleError
from hierarchy.engine.bundle import MANIFEST, open_bundle, write_bundle
from hierarchy.engine.pipeline import load_pipeline


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from hierarchy.commands._demo import SMALL, run_demo
    from hierarchy.registry import reset_registry

    reset_registry()
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert run_demo(out, SMALL, device="cpu") == 0
    return out


def records(capsys, argv):
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_train_writes_a_first_card(demo):
    run = demo / "runs" / "skin_vs_nonskin" / "demo"
    md = (run / "MODEL_CARD.md").read_text()
    assert "NOT a diagnosis" in md and "## Training data" in md and "weights sha256" in md
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["card"]["training_data"]["manifest_sha256"] == meta["dataset"]["manifest_sha256"]
    assert set(meta["card"]["training_data"]["counts"]["train"]) == {"skin", "non-skin"}
    assert "| skin |" in md
    assert md.splitlines().count("## Evaluations") == 1  # once, among the run's sections (it was written twice)
    assert "- optimizer adam, schedule constant" in md and "- augment:" not in md  # the demo's recipe: no extras
    ood = meta["ood"]
    assert f"reject above {ood['threshold']:.3f} (fitted on the train split, tuned" in md
    assert f"it keeps {ood['tune']['kept']:.1%} of those" in md
    from hierarchy.engine.card_md import render_card

    card = meta["card"]
    card["recipe"]["train"] |= {"ema": 0.998, "augment": {"crop_scale": [0.35, 1.0], "rot90": True, "hue": 0.0, "p": 1.0}}
    card["ood"] |= {"keep": 0.99, "tune": {"views": "shifted", "kept": 0.984, "kept_plain_val": 0.992, "per_class": True}}
    md = render_card(card)
    assert ("tuned per predicted class to keep 99.0% of shifted views of val); "
            "it keeps 98.4% of those and 99.2% of val as it is") in md
    card["ood"]["tune"] |= {"views": "val", "per_class": False}
    md = render_card(card)
    assert "tuned to keep 99.0% of val); it keeps 98.4% of those\n" in md
    assert "schedule constant, ema 0.998" in md and "- augment: crop scale [0.35, 1.0], rot90 True\n" in md


def test_calibrate_target_recall_meets_it_and_decide_auto_uses_it(demo, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(demo / "runs" / "skin_vs_nonskin" / "demo", run)
    assert main(["calibrate", str(run), "--data", str(demo / "dataset"), "--split", "all",
                 "--target-recall", "non-skin=0.95", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)["decide"]
    assert d["met"] and d["achieved"]["non-skin"]["recall"] >= 0.95
    assert json.loads((run / "metadata.json").read_text())["decide"]["thresholds"] == d["thresholds"]
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"name: g\nroot: gate\nstages:\n  gate:\n    stage: skin_vs_nonskin\n    weights: {run}\n"
                    "    decide: auto\n    routes: {default: stop}\n")
    ev = tmp_path / "ev"
    assert main(["evaluate", str(pipe), str(demo / "dataset"), "--split", "all", "--out", str(ev)]) == 0
    op = json.loads((ev / "report.json").read_text())["stages"]["gate"]["decide"]["non-skin"]
    assert op["recall"] >= 0.95 and op["threshold"] == d["thresholds"]["non-skin"]
    assert "Decision threshold `non-skin`" in (ev / "report.md").read_text()
    assert main(["calibrate", str(run), "--data", str(demo / "dataset"), "--target-recall", "cat=0.9"]) == 2


def test_card_for_the_demo_pipeline_with_an_evaluation(demo, tmp_path, capsys):
    ev = tmp_path / "ev"
    assert main(["evaluate", str(demo / "pipeline.yaml"), str(demo / "dataset"), "--by", "sex",
                 "--n-resamples", "50", "--out", str(ev)]) == 0
    out = tmp_path / "card"
    out.mkdir()
    assert main(["card", str(demo / "pipeline.yaml"), "--report", str(ev), "--out", str(out),
                 "--intended-use", "Illustration only."]) == 0
    md = (out / "MODEL_CARD.md").read_text()
    assert "Illustration only." in md and "Subgroups by `sex`" in md and "## Stage `gate`" in md
    heads = md.splitlines()
    assert heads.count("## Evaluations") == 1 and heads.count("### Evaluations") == 1  # the pipeline's, the stage's
    card = json.loads((out / "MODEL_CARD.json").read_text())
    assert card["evaluations"][0]["subgroups"]["sex"]["groups"]


@pytest.fixture
def bundle(demo, tmp_path):
    path = tmp_path / "triage.hbundle"
    write_bundle(demo / "pipeline.yaml", path)
    return path


def test_bundle_round_trip_in_another_directory_gives_the_same_records(demo, bundle, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "t.hbundle"
    moved.parent.mkdir()
    shutil.move(bundle, moved)
    held = demo / "data" / "held_back"
    original = records(capsys, ["run", str(demo / "pipeline.yaml"), str(held), "--device", "cpu", "--format", "jsonl"])
    again = records(capsys, ["run", str(moved), str(held), "--device", "cpu", "--format", "jsonl"])
    assert original and [(r["path"], r["status"], r["label"], r["confidence"]) for r in again] == \
        [(r["path"], r["status"], r["label"], r["confidence"]) for r in original]
    assert main(["validate", str(moved)]) == 0
    names = zipfile.ZipFile(moved).namelist()
    assert {"pipeline.yaml", "stages/gate/best.safetensors", "stages/gate/metadata.json", MANIFEST} <= set(names)


def _rewrite(src: Path, dst: Path, change) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for name, payload, inf in change(info, data):
                zout.writestr(inf or name, payload)
    return dst


def _flip(info, data):
    if info.filename == "stages/gate/metadata.json":
        data = bytes([data[0] ^ 1]) + data[1:]
    yield info.filename, data, None


def _drop(info, data):
    if info.filename != "stages/gate/metadata.json":
        yield info.filename, data, None


def _add(info, data):
    yield info.filename, data, None
    if info.filename == MANIFEST:
        yield "extra.txt", b"hello", None


def _traverse(info, data):
    yield info.filename, data, None
    if info.filename == MANIFEST:
        yield "../x", b"escaped", None


def _symlink(info, data):
    yield info.filename, data, None
    if info.filename == MANIFEST:
        link = zipfile.ZipInfo("stages/gate/link")
        link.external_attr = (0o120777 << 16)
        yield link.filename, b"/etc/passwd", link


@pytest.mark.parametrize("change, member, why", [
    (_flip, "stages/gate/metadata.json", "sha256 mismatch"),
    (_drop, "stages/gate/metadata.json", "missing from the bundle"),
    (_add, "extra.txt", "not in the manifest"),
    (_traverse, "../x", "unsafe member name"),
    (_symlink, "stages/gate/link", "symbolic link"),
])
def test_tampered_bundles_are_refused_naming_the_member(bundle, tmp_path, change, member, why, capsys):
    bad = _rewrite(bundle, tmp_path / "bad.hbundle", change)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(BundleError, match=why) as exc:
        open_bundle(bad, into=work)
    assert exc.value.member == member
    assert list(work.iterdir()) == [] and not (tmp_path / "x").exists()  # temp dir removed, nothing escaped
    assert main(["run", str(bad), str(tmp_path)]) == 1 and member in capsys.readouterr().err


def test_zip_bomb_is_refused(bundle, tmp_path):
    bomb = tmp_path / "bomb.hbundle"
    with zipfile.ZipFile(bundle) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zout:
        manifest = json.loads(zin.read(MANIFEST))
        manifest["members"]["zeros.bin"] = {"sha256": "0" * 64, "size": 64 << 20}
        zout.writestr(MANIFEST, json.dumps(manifest))
        for info in zin.infolist():
            if info.filename != MANIFEST:
                zout.writestr(info.filename, zin.read(info))
        zout.writestr("zeros.bin", b"\0" * (64 << 20))  # ~64 KiB compressed
    with pytest.raises(BundleError, match="compression ratio") as exc:
        open_bundle(bomb, into=tmp_path)
    assert exc.value.member == "zeros.bin"


def test_load_pipeline_of_a_bundle_points_into_a_temporary_directory(bundle):
    pipe = load_pipeline(bundle)
    assert pipe.name == "demo-skin-gate" and pipe.weights_path("gate").is_file()
    assert "hierarchy-bundle-" in str(pipe.base_dir)
