"""`hierarchy export` and `hierarchy run --engine onnx`: same records as the torch engine, no torch
import, and loud, typed failures for missing, stale or unverifiable exports.

The model is a fixture model trained for 1 step at 32 px on generated images (plumbing, not accuracy),
with a tuned threshold and kNN OOD statistics so `threshold: auto` and `ood: auto` are exercised.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hierarchy.ood import scores
from hierarchy.commands.cli import main
from hierarchy.core.errors import EngineError, ExportError
from hierarchy.data.preset import Preset
from hierarchy.engine.predictor import load_predictor
from hierarchy.train.trainer import train_stage

LABELS = ["skin", "non-skin"]
SIZE = 32
PIPE = """\
name: onnx
root: gate
stages:
  gate: {{stage: skin_vs_nonskin, weights: {run}, threshold: auto, ood: auto, routes: {{default: stop}}}}
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_exported(tmp_path_factory.mktemp("onnx"))


def make_exported(root: Path) -> Path:
    """A 1-step run dir (temperature, threshold, knn OOD) exported with `hierarchy export`."""
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin

    from hierarchy.data.synth import make_image_folder

    make_image_folder(root / "data" / "train", LABELS, n_per_label=8, size=(40, 30), seed=0)
    make_image_folder(root / "data" / "val", LABELS, n_per_label=6, size=(40, 30), seed=1)
    cfg = SkinVsNonskin.Config(train={
        "pretrained": "none", "epochs": 1, "max_steps_per_epoch": 1, "batch_size": 8, "img_size": SIZE,
        "device": "cpu", "workers": 0, "threshold_target": {"target_coverage": 0.5}, "out": str(root / "runs")})
    run = train_stage(SkinVsNonskin(cfg), root / "data", progress=False)
    assert main(["export", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("onnx_imgs"))


def make_images(root: Path) -> list[Path]:
    """Generated photos and OOD textures (not the val images the thresholds were tuned on), plus a bad file."""
    from hierarchy.data.synth import make_image_folder, make_ood

    photos = sorted(make_image_folder(root / "photos", LABELS, n_per_label=3, size=(40, 30), seed=5).rglob("*.jpg"))
    textures = sorted(make_ood(root / "textures", n=3, size=(40, 30), seed=9).glob("*.jpg"))
    bad = root / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + os.urandom(200) + b"\xff\xd9")
    return [*photos, bad, *textures]


def pipeline(folder: Path, run: Path) -> Path:
    path = folder / "pipe.yaml"
    path.write_text(PIPE.format(run=run))
    return path


def run_records(pipe: Path, inputs: list[Path], out: Path, *extra: str) -> tuple[int, list[dict]]:
    rc = main(["-q", "run", str(pipe), *map(str, inputs), "--format", "jsonl", "-o", str(out), *extra])
    return rc, [json.loads(line) for line in out.read_text().splitlines()]


def assert_same_records(torch_recs: list[dict], onnx_recs: list[dict]) -> None:
    """Same paths, statuses, labels, errors; probabilities and OOD scores within 1e-3. A decision is
    only compared where the value is not within 1e-5 of its threshold (fp32 rounding may tip those)."""
    assert [r["path"] for r in onnx_recs] == [r["path"] for r in torch_recs]
    for t, o in zip(torch_recs, onnx_recs):
        assert o["error"] == t["error"] and len(o["trace"]) == len(t["trace"])
        for tt, ot in zip(t["trace"], o["trace"]):
            assert ot["label"] == tt["label"]
            assert all(abs(ot["probs"][k] - p) <= 1e-3 for k, p in tt["probs"].items())
            assert ("ood" in ot) == ("ood" in tt)
            if "ood" in tt:
                assert ot["ood"]["threshold"] == tt["ood"]["threshold"]
                assert ot["ood"]["score"] == pytest.approx(tt["ood"]["score"], rel=1e-3, abs=1e-4)
            near = [abs(tt["confidence"] - tt.get("threshold", 2.0)),
                    abs(tt.get("ood", {}).get("score", 9.0) - tt.get("ood", {}).get("threshold", 0.0))]
            if min(near) > 1e-5:
                assert ot["decision"] == tt["decision"] and o["status"] == t["status"] and o["label"] == t["label"]


# ---------------------------------------------------------------- numpy scores and preprocessing


def test_scorer_refuses_missing_foreign_or_pickled_statistics(tmp_path: Path) -> None:
    from hierarchy.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="missing"):
        scores.load_scorer({"method": "knn", "file": scores.OOD_FILE}, tmp_path)
    (tmp_path / scores.OOD_FILE).write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(CheckpointError, match="SHA-256"):
        scores.load_scorer({"method": "knn", "file": scores.OOD_FILE, "sha256": "0" * 64}, tmp_path)
    with pytest.raises(CheckpointError, match="pickle"):
        scores.load_scorer({"method": "knn", "file": scores.OOD_FILE}, tmp_path)


def test_numpy_normalisation_equals_the_torch_one() -> None:
    batch = np.random.default_rng(1).integers(0, 256, size=(2, 3, 8, 8), dtype=np.uint8)
    preset = Preset(size=8)
    np.testing.assert_array_equal(preset.normalize_array(batch), preset.normalize(torch.from_numpy(batch)).numpy())


# ---------------------------------------------------------------- export


def test_export_writes_a_verified_onnx_file_and_records_it(exported: Path) -> None:
    from hierarchy.core.fsutil import sha256_file

    entry = json.loads((exported / "metadata.json").read_text())["export"]["best.onnx"]
    assert entry["sha256"] == sha256_file(exported / "best.onnx")
    assert entry["source"] == "best.safetensors"
    assert entry["source_sha256"] == sha256_file(exported / "best.safetensors")
    assert entry["opset"] == 17 and entry["torch"] == torch.__version__ and entry["outputs"] == ["logits", "features"]
    assert 0 <= entry["max_abs_logit_diff"] <= 1e-3 and entry["max_abs_feature_diff"] <= 1e-3
    assert not [p for p in exported.iterdir() if p.name.endswith(".tmp")]


def test_export_that_fails_verification_writes_nothing(exported: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from hierarchy.engine import export

    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # any difference, even 0, fails
    before = (exported / "metadata.json").read_text()
    with pytest.raises(ExportError, match="differ from torch's"):
        export.export_run(exported, out=tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == [] and (exported / "metadata.json").read_text() == before


def test_export_of_the_last_checkpoint_is_what_a_pipeline_on_last_runs(exported: Path, images: list[Path],
                                                                        tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(exported, run)
    assert main(["export", str(run), "--checkpoint", "last", "--format", "json"]) == 0
    entries = json.loads((run / "metadata.json").read_text())["export"]
    assert set(entries) == {"best.onnx", "last.onnx"} and entries["last.onnx"]["source"] == "last.safetensors"
    rc, recs = run_records(pipeline(tmp_path, run / "last.safetensors"), images[:2], tmp_path / "o.jsonl",
                           "--engine", "onnx")
    assert rc == 0 and len(recs) == 2


def test_export_usage_errors_exit_2(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pipe = pipeline(tmp_path, exported)
    assert main(["export", str(pipe), "--out", str(tmp_path / "x.onnx")]) == 2
    assert main(["export", str(exported), "--out", str(tmp_path / "x.bin")]) == 2
    assert main(["export", str(tmp_path / "nowhere")]) == 2  # a checkpoint error: exit 2 like every config error
    err = capsys.readouterr().err
    assert "--out applies to one run directory" in err and "must end in .onnx" in err and "nowhere" in err


# ---------------------------------------------------------------- same records as the torch engine


@pytest.mark.parametrize("engine", [["onnx"], ["openvino", "--precision", "fp32"]], ids=["onnx", "openvino"])
def test_onnx_engine_matches_torch_labels(exported: Path, images: list[Path], tmp_path: Path, engine: list[str]) -> None:
    pipe = pipeline(tmp_path, exported)
    rc_t, torch_recs = run_records(pipe, images, tmp_path / "t.jsonl", "--device", "cpu", "--precision", "fp32")
    rc_o, onnx_recs = run_records(pipe, images, tmp_path / "o.jsonl", "--engine", *engine)
    assert rc_t == rc_o == 3  # the bad image errors under both engines
    assert_same_records(torch_recs, onnx_recs)
    bad = [r for r in onnx_recs if r["status"] == "error"]
    assert len(bad) == 1 and bad[0]["error"]["type"] in {"undecodable", "truncated"}
    assert all("ood" in r["trace"][0] for r in onnx_recs if r["status"] != "error")


def test_onnx_engine_matches_torch_through_the_api(exported: Path, images: list[Path]) -> None:
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin

    from hierarchy.data.decode import decode_arrays
    from hierarchy.engine.pipeline import parse_pipeline
    from hierarchy.engine.router import Router

    stage = SkinVsNonskin()
    theirs = load_predictor(stage, exported, device="cpu", precision="fp32", engine="torch")
    ours = load_predictor(stage, exported, engine="onnx")
    assert ours.batch_format == "numpy" and ours.metadata["threshold"] == theirs.metadata["threshold"]
    batch = np.stack([decode_arrays(p, [SIZE])[SIZE] for p in images if p.name != "bad.jpg"])
    want = theirs.predict(torch.from_numpy(batch), return_logits=True, return_features=True)
    got = ours.predict(batch, return_logits=True, return_features=True)
    np.testing.assert_array_equal(got.probs.argmax(1), want.probs.argmax(1))
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-3)
    np.testing.assert_allclose(got.ood, want.ood, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got.features, want.features, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ours.predict(torch.from_numpy(batch)).probs, got.probs)  # torch batches work too
    pipe = parse_pipeline(PIPE.format(run=exported))
    routed = {e: list(Router.from_pipeline(pipe, device="cpu", precision="fp32", engine=e).run(images, workers=1))
              for e in ("torch", "onnx")}
    assert_same_records(routed["torch"], routed["onnx"])


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_run_engine_onnx_never_imports_torch(exported: Path, images: list[Path], tmp_path: Path, engine: str) -> None:
    script = tmp_path / "blocked.py"
    script.write_text(
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision', 'timm'):\n"
        "            sys.stderr.write(f'BLOCKED {name}\\n')\n"
        "            raise ImportError(f'{name} is blocked by this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from hierarchy.core import perf\n"
        "from hierarchy.commands.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "sys.stderr.write(f\"MALLOC {perf._applied.get('malloc')}\\n\")\n"
        "sys.exit(rc)\n")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop("HIERARCHY_MALLOC", None)
    proc = subprocess.run([sys.executable, str(script), "-q", "run", str(pipeline(tmp_path, exported)),
                           *map(str, images), "--engine", engine, "--format", "jsonl"],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300)
    assert "BLOCKED" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 3, proc.stderr  # one bad image among good ones, as with torch
    recs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(recs) == len(images) and sum(r["status"] == "error" for r in recs) == 1
    if sys.platform.startswith("linux") and os.path.exists("/lib/x86_64-linux-gnu/libc.so.6"):
        assert "MALLOC True" in proc.stderr  # the allocator settings still apply


# ---------------------------------------------------------------- loud failures


def test_stale_missing_or_replaced_exports_are_refused(exported: Path, images: list[Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import load_file

    from hierarchy.models.checkpoint import save_weights

    run = tmp_path / "run"
    shutil.copytree(exported, run, ignore=shutil.ignore_patterns("best.onnx"))
    pipe = pipeline(tmp_path, run)
    one = [str(images[0]), "--format", "jsonl", "--engine", "onnx"]
    assert main(["-q", "run", str(pipe), *one]) == 2
    assert "best.onnx: exported model not found; create it with `hierarchy export" in capsys.readouterr().err
    assert main(["export", str(pipe)]) == 0  # a pipeline: every stage's run dir
    assert "stages: gate" in capsys.readouterr().out
    assert main(["-q", "run", str(pipe), *one]) == 0
    state = load_file(str(run / "best.safetensors"))
    state["fc.bias"] += 1.0
    save_weights(run / "best.safetensors", state)
    assert main(["-q", "run", str(pipe), *one]) == 2
    err = capsys.readouterr().err
    assert "stale export" in err and f"re-run `hierarchy export {run}`" in err
    assert main(["export", str(run)]) == 0 and main(["-q", "run", str(pipe), *one]) == 0
    (run / "best.onnx").write_bytes((exported / "best.onnx").read_bytes()[:-10] + b"0123456789")
    assert main(["-q", "run", str(pipe), *one]) == 2
    assert "not the file recorded in metadata.json" in capsys.readouterr().err


def test_missing_onnxruntime_says_how_to_install(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(EngineError, match=r"pip install 'hierarchy-cascade\[onnx\]'"):
        load_predictor(SkinVsNonskin(), exported, engine="onnx")


def test_onnx_engine_device_and_precision(exported: Path, caplog: pytest.LogCaptureFixture) -> None:
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin

    with pytest.raises(EngineError, match="not supported by --engine onnx"):
        load_predictor(SkinVsNonskin(), exported, device="mps", engine="onnx")
    with caplog.at_level("WARNING"):
        load_predictor(SkinVsNonskin(), exported, device="cpu", precision="bf16", engine="onnx")
    assert "fp32 model; --precision bf16 is ignored" in caplog.text


def test_router_hands_numpy_batches_to_numpy_predictors(fake_stages, tmp_path: Path) -> None:
    from fakes import FakePredictor, solid

    from hierarchy.engine.pipeline import parse_pipeline
    from hierarchy.engine.router import LoadedStage, Router

    seen: list[type] = []

    class NumpyPredictor(FakePredictor):
        batch_format = "numpy"

        def predict(self, batch):  # type: ignore[override]
            seen.append(type(batch))
            return super().predict(torch.from_numpy(batch))

    pipe = parse_pipeline("name: n\nroot: c\nstages:\n  c: {stage: fake_color, routes: {default: stop}}\n")
    pred = NumpyPredictor("c", ("red", "other"), lambda m: np.stack([m[:, 0], 1 - m[:, 0]], axis=1))
    recs = list(Router(pipe, {"c": LoadedStage("c", "fake_color", pred)}).run([solid(tmp_path / "r.png", (250, 0, 0))]))
    assert seen == [np.ndarray] and recs[0]["label"] == "red"
