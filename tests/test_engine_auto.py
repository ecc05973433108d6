"""`--engine auto` (the default): an exported engine whose runtime is installed and whose export is
up to date, else torch; the log says which engine each stage got and why. Also: evaluate and
calibrate take --engine and run the same predictor.

The model is the fixture model of test_onnx_engine (1 training step at 32 px: plumbing, not accuracy).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from test_onnx_engine import PIPE, make_exported, make_images

import hierarchy.engine.backends as backends
import hierarchy.engine.exported as exported_mod
from hierarchy.commands.cli import main
from hierarchy.engine.predictor import load_predictor


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_exported(tmp_path_factory.mktemp("auto"))


@pytest.fixture
def gate():
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin

    return SkinVsNonskin()


def without(monkeypatch: pytest.MonkeyPatch, *missing: str) -> None:
    """Pretend the runtimes named are not installed."""
    real = exported_mod.runtime_installed
    monkeypatch.setattr(exported_mod, "runtime_installed", lambda m: m not in missing and real(m))


def pick(gate, run: Path, caplog: pytest.LogCaptureFixture, **kw) -> tuple[str, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hierarchy.engine"):
        predictor = load_predictor(gate, run, **kw)
    return predictor.engine, caplog.text


def test_auto_picks_openvino_when_installed_and_exported(run: Path, gate, caplog) -> None:
    engine, log = pick(gate, run, caplog, device="cpu")
    assert engine == "openvino"
    assert "stage skin_vs_nonskin: engine openvino" in log and "best.onnx up to date" in log


def test_auto_falls_back_to_onnx_then_torch_when_runtimes_are_missing(run: Path, gate, caplog, monkeypatch) -> None:
    without(monkeypatch, "openvino")
    engine, log = pick(gate, run, caplog)
    assert engine == "onnx" and "engine onnx" in log
    without(monkeypatch, "openvino", "onnxruntime")
    engine, log = pick(gate, run, caplog)
    assert engine == "torch"
    assert "not openvino: openvino is not installed (pip install 'hierarchy-cascade[openvino]')" in log
    assert "not onnx: onnxruntime is not installed (pip install 'hierarchy-cascade[onnx]')" in log


def test_auto_falls_back_to_torch_without_an_export(run: Path, gate, caplog, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("*.onnx"))
    engine, log = pick(gate, bare, caplog)
    assert engine == "torch" and "exported model not found; create it with `hierarchy export" in log


def test_auto_falls_back_to_torch_when_the_export_is_stale(run: Path, gate, caplog, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from hierarchy.models.checkpoint import save_weights

    stale = tmp_path / "stale"
    shutil.copytree(run, stale)
    state = load_file(stale / "best.safetensors")
    state["fc.bias"] = state["fc.bias"] + 1.0
    save_weights(stale / "best.safetensors", state)
    engine, log = pick(gate, stale, caplog)
    assert engine == "torch" and "stale export" in log
    with pytest.raises(Exception, match="stale export"):
        load_predictor(gate, stale, engine="onnx")  # asked for by name, it is an error, not a fallback


def test_auto_skips_engines_that_cannot_serve_the_request(run: Path, gate, caplog, monkeypatch) -> None:
    without(monkeypatch, "openvino")
    engine, log = pick(gate, run, caplog, precision="bf16")
    assert engine == "torch" and "not onnx: it cannot compute in bf16" in log
    monkeypatch.setattr(backends, "_gpu_present", lambda: True)
    engine, log = pick(gate, run, caplog)
    assert engine == "onnx"  # onnx can use CUDA; openvino is missing here anyway
    from hierarchy.engine.backends.base import Checkpoint

    spec, why = backends.choose_engine("auto", Checkpoint.open(run), "mps", "auto")
    assert spec.name == "torch" and "not openvino: it cannot run on mps (serves cpu)" in why


def test_explicit_engine_wins_and_unknown_engine_is_exit_2(run: Path, gate, tmp_path: Path, capsys) -> None:
    assert load_predictor(gate, run, engine="torch").engine == "torch"
    pipe = tmp_path / "p.yaml"
    pipe.write_text(PIPE.format(run=run))
    img = make_images(tmp_path / "img")[0]
    assert main(["run", str(pipe), str(img), "--engine", "tensorrt"]) == 2
    assert "--engine: unknown engine 'tensorrt'; use one of auto, torch, onnx, openvino" in capsys.readouterr().err


def test_run_log_says_which_engine_and_why(run: Path, tmp_path: Path) -> None:
    from plugin_dist import hierarchy_cli

    pipe = tmp_path / "p.yaml"
    pipe.write_text(PIPE.format(run=run))
    img = make_images(tmp_path / "img")[0]
    proc = hierarchy_cli(["run", str(pipe), str(img), "--format", "jsonl"])
    assert proc.returncode == 0, proc.stderr
    assert "stage skin_vs_nonskin: engine openvino on cpu" in proc.stderr and "(auto: openvino installed" in proc.stderr
    assert json.loads(proc.stdout)["path"] == str(img)  # records on stdout, the log on stderr


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_evaluate_and_calibrate_take_engine(run: Path, tmp_path: Path, engine: str, capsys) -> None:
    pipe = tmp_path / "p.yaml"
    pipe.write_text(PIPE.format(run=run))
    data = run.parent.parent.parent / "data"
    out = tmp_path / "eval"
    assert main(["-q", "evaluate", str(pipe), str(data), "--split", "all", "--engine", engine, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["engines"] == {"gate": engine}
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    capsys.readouterr()  # the evaluate summary
    assert main(["-q", "calibrate", str(copy), "--data", str(data), "--split", "all", "--engine", engine,
                 "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == report["data"]["n_samples"] > 0
    assert json.loads((copy / "metadata.json").read_text())["threshold"]["data"] == str(data)
