"""The shared predictor: device/precision selection and uint8 batch -> probabilities."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hierarchy.models import device as predict
from hierarchy.models.checkpoint import save_weights
from hierarchy.models.metadata import CheckpointMetadata, update_metadata, write_metadata
from hierarchy.core.errors import HierarchyError
from hierarchy.models.backbones import create_model
from hierarchy.engine.predictor import Predictor, load_predictor
from hierarchy.models.device import select_device, select_precision
from hierarchy.data.preset import Preset
from hierarchy.config.stage import Stage

LABELS = ("skin", "not_skin", "unsure")
SIZE = 32


class TriStage(Stage):
    name = "tri"
    labels = LABELS


def images(n: int = 4, seed: int = 0) -> list[Image.Image]:
    """Smooth random RGB images of assorted sizes (so the resize path is exercised)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        small = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((40 + 7 * i, 48 + 3 * i), Image.BICUBIC))
    return out


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet18", len(LABELS))[0].eval()


@pytest.fixture
def batch() -> torch.Tensor:
    preset = Preset(size=SIZE)
    return torch.stack([preset.to_uint8(img) for img in images()])


def predictor(model: torch.nn.Module, precision: str = "fp32", temperature: float = 1.0) -> Predictor:
    return Predictor.from_torch(model, LABELS, Preset(size=SIZE), device="cpu", precision=precision,
                                temperature=temperature)


# ---------------------------------------------------------------- device and precision


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(HierarchyError, match="invalid device 'gpu0'"):
        select_device("gpu0")


@pytest.mark.parametrize(("cuda", "mps", "expected"),
                         [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_select_device_auto_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool,
                                                  expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert select_device("auto") == torch.device(expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable_is_a_clear_error() -> None:
    with pytest.raises(HierarchyError, match="device 'cuda' requested but CUDA is not available.*--device cpu"):
        select_device("cuda")


def test_bf16_falls_back_to_fp32_on_unsupported_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(predict, "cpu_supports_bf16", lambda: False)
    assert select_precision(cpu, "bf16") == "fp32"
    assert select_precision(cpu, "auto") == "fp32"
    monkeypatch.setattr(predict, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr("hierarchy.core.machine.has_amx", lambda: True)  # auto picks bf16 only with AMX
    assert select_precision(cpu, "auto") == "bf16"
    assert select_precision(cpu, "fp32") == "fp32"
    assert select_precision(cpu, "fp16") == "fp32"
    with pytest.raises(HierarchyError, match="unknown precision 'int4'"):
        select_precision(cpu, "int4")
    with pytest.raises(HierarchyError, match="int8 runs on an exported engine"):
        select_precision(cpu, "int8")


def test_predictor_uses_the_fallback(monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module) -> None:
    monkeypatch.setattr(predict, "cpu_supports_bf16", lambda: False)
    assert predictor(model, precision="bf16").precision == "fp32"


# ---------------------------------------------------------------- predictions


def test_probabilities_sum_to_one(model: torch.nn.Module, batch: torch.Tensor) -> None:
    pred = predictor(model).predict(batch)
    assert pred.probs.dtype == np.float32 and pred.probs.shape == (len(batch), len(LABELS))
    np.testing.assert_allclose(pred.probs.sum(axis=1), 1.0, atol=1e-5)
    assert pred.logits is None and pred.features is None and pred.ood is None


def test_temperature_changes_probs_not_argmax(model: torch.nn.Module, batch: torch.Tensor) -> None:
    p1 = predictor(model, temperature=1.0).predict(batch).probs
    p3 = predictor(model, temperature=3.0).predict(batch).probs
    assert not np.allclose(p1, p3)
    assert (p1.argmax(1) == p3.argmax(1)).all()
    assert (p3.max(1) < p1.max(1)).all()  # a higher temperature softens


def test_logits_and_features_from_one_pass(model: torch.nn.Module, batch: torch.Tensor) -> None:
    pred = predictor(model, temperature=2.0).predict(batch, return_logits=True, return_features=True)
    assert pred.features.shape == (len(batch), 512) and pred.logits.shape == (len(batch), len(LABELS))
    expected = torch.softmax(torch.from_numpy(pred.logits) / 2.0, dim=1).numpy()
    np.testing.assert_allclose(pred.probs, expected, atol=1e-6)


def test_uint8_pipeline_matches_reference(model: torch.nn.Module) -> None:
    preset, imgs = Preset(size=SIZE), images(5, seed=1)
    with torch.no_grad():
        reference = model(torch.stack([preset.reference(img) for img in imgs]))
    pred = predictor(model).predict(torch.stack([preset.to_uint8(img) for img in imgs]), return_logits=True)
    np.testing.assert_array_equal(pred.probs.argmax(1), reference.argmax(1).numpy())
    np.testing.assert_allclose(pred.logits, reference.numpy(), atol=1e-3)


def test_bf16_predictions_are_float32_probabilities(monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module,
                                                    batch: torch.Tensor) -> None:
    monkeypatch.setattr(predict, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr("hierarchy.core.machine.has_amx", lambda: True)  # auto picks bf16 only with AMX
    p = predictor(model, precision="bf16")
    assert p.precision == "bf16"
    probs = p.predict(batch).probs
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, SIZE, SIZE), torch.zeros(2, 3, 16, 16, dtype=torch.uint8)])
def test_bad_batch_rejected(model: torch.nn.Module, bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="expected a"):
        predictor(model).predict(bad)


# ---------------------------------------------------------------- load_predictor


def test_load_predictor_from_run_dir(tmp_path: Path, model: torch.nn.Module, batch: torch.Tensor) -> None:
    run = tmp_path / "run"
    save_weights(run / "best.safetensors", model)
    arch = {"backbone": "resnet18", "library": "torchvision", "num_classes": len(LABELS)}
    meta = CheckpointMetadata(stage="tri", labels=list(LABELS), arch=arch, preset=Preset(size=SIZE).to_dict(),
                              created_by="test")
    write_metadata(run / "metadata.json", meta)
    update_metadata(run, temperature=1.5)

    loaded = load_predictor(TriStage(), run, device="cpu", precision="fp32", engine="torch")
    assert loaded.labels == list(LABELS) and loaded.temperature == 1.5 and loaded.preset == Preset(size=SIZE)
    assert loaded.metadata["stage"] == "tri" and not loaded.backend.model.training
    expected = predictor(model, temperature=1.5).predict(batch).probs
    np.testing.assert_allclose(loaded.predict(batch).probs, expected, atol=1e-5)
    via_file = load_predictor(TriStage(), run / "best.safetensors", device="cpu", precision="fp32")
    np.testing.assert_allclose(via_file.predict(batch).probs, expected, atol=1e-5)
