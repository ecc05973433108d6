"""`hierarchy run --engine openvino`: OpenVINO compiles the file `hierarchy export` wrote. The records
at fp32 and the torch-free run are checked in test_onnx_engine.py (parametrised over both engines);
here: precision selection, bf16 against the torch engine, and the loud failures.

The model is test_onnx_engine's fixture: trained for 1 step at 32 px (plumbing, not accuracy).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_onnx_engine import SIZE, make_exported, make_images

from hierarchy.core.errors import EngineError
from hierarchy.core.errors import ConfigError
from hierarchy.core.precision import check_precision
from hierarchy.engine.backends.openvino_backend import select_precision
from hierarchy.engine.predictor import load_predictor


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_exported(tmp_path_factory.mktemp("openvino"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("openvino_imgs"))


def test_openvino_precision_follows_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    assert select_precision(["FP32", "BF16", "INT8"], "auto") == "bf16"
    assert select_precision(["FP32", "INT8"], "auto") == "fp32"
    with caplog.at_level(logging.WARNING):
        assert select_precision(["FP32"], "bf16") == "fp32"
    assert "not supported natively" in caplog.text
    assert select_precision(["FP32", "FP16"], "fp16") == "fp16"
    with pytest.raises(ConfigError, match="--precision: unknown precision 'int4'"):
        check_precision("int4")  # the one list of precisions, checked before any engine loads


def test_openvino_engine_agrees_with_torch_in_its_own_precision(exported: Path, images: list[Path]) -> None:
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin

    from hierarchy.data.decode import decode_arrays

    stage = SkinVsNonskin()
    ours = load_predictor(stage, exported, device="cpu", precision="auto", engine="openvino")
    theirs = load_predictor(stage, exported, device="cpu", precision=ours.precision, engine="torch")
    assert ours.batch_format == "numpy" and ours.precision in {"bf16", "fp32"}
    batch = np.stack([decode_arrays(p, [SIZE])[SIZE] for p in images if p.name != "bad.jpg"])
    got, want = ours.predict(batch), theirs.predict(torch.from_numpy(batch))
    tolerance = 1e-3 if ours.precision == "fp32" else 0.05  # bf16 kernels differ between the two engines
    np.testing.assert_allclose(got.probs, want.probs, atol=tolerance)
    np.testing.assert_allclose(got.ood, want.ood, rtol=0.1 if ours.precision == "bf16" else 1e-3, atol=1e-3)


def test_openvino_engine_failures_are_typed(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin

    with pytest.raises(EngineError, match="not supported by --engine openvino"):
        load_predictor(SkinVsNonskin(), exported, device="cuda", engine="openvino")
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(EngineError, match=r"pip install 'hierarchy-cascade\[openvino\]'"):
        load_predictor(SkinVsNonskin(), exported, engine="openvino")
