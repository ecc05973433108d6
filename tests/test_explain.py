"""Class-activation maps: target layers per architecture, a map that finds what the model keys on,
and ``hierarchy run --explain`` writing one PNG per visited stage."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hierarchy.config.stage import Stage
from hierarchy.core.errors import HierarchyError
from hierarchy.data.preset import Preset
from hierarchy.explain.layers import last_feature_map, target_layer
from hierarchy.models.backbones import create_model
from hierarchy.registry import hookimpl

SIZE = 64
PATCH = 16


class MarkStage(Stage):
    """'marked' images carry one bright square somewhere; 'plain' ones are noise."""

    name = "mark"
    labels = ("marked", "plain")


class MarkPlugin:
    @hookimpl
    def register_stages(self, register) -> None:
        register(MarkStage)


def marked(rng: np.random.Generator, corner: tuple[int, int] | None) -> np.ndarray:
    """(3, S, S) uint8 noise, with a PATCH-sized white square at ``corner`` (y, x) if given."""
    img = rng.integers(60, 120, size=(3, SIZE, SIZE)).astype(np.uint8)
    if corner is not None:
        y, x = corner
        img[:, y:y + PATCH, x:x + PATCH] = 250
    return img


def marker_model() -> torch.nn.Module:
    """A torchvision ResNet18 built by hand to answer 'marked' exactly when a bright square is present.

    Channel 0 of the stem detects bright pixels (mean normalised RGB above 1, i.e. ~> 200/255); every
    block passes channel 0 on (the downsampling ones as a sum over 2x2 cells, so no pixel is skipped or
    counted twice); every other weight is zero. 'marked' = mean of that map, 'plain' = 1. Deterministic
    and instant, unlike a model trained for the few dozen steps a test can afford on a CPU (tried: not
    reliable at that length)."""
    model = create_model("resnet18", 2)[0]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.zero_(), m.bias.zero_(), m.running_mean.zero_(), m.running_var.fill_(1.0)
                m.weight[0] = 1.0  # channel 0 passes through every BatchNorm unchanged
        model.conv1.weight[0, :, 3, 3] = 1 / 3
        model.bn1.bias[0] = -1.0
        for name in ("layer2", "layer3", "layer4"):
            block = getattr(model, name)[0]
            block.conv1.weight[0, 0, 1:, 1:] = 1.0  # stride 2, padding 1: the sum over each 2x2 cell
            block.conv2.weight[0, 0, 1, 1] = 1.0
        for name in ("layer1", "layer2", "layer3", "layer4"):  # the other blocks: identity (conv paths off)
            for block in getattr(model, name):
                if block.downsample is None:
                    block.bn1.weight[0] = block.bn2.weight[0] = 0.0
        model.fc.weight.zero_()
        model.fc.weight[0, 0] = 1.0
        model.fc.bias.copy_(torch.tensor([0.0, 1.0]))
    return model.eval()


def write_marker_run(run: Path) -> Path:
    from hierarchy.models.checkpoint import save_weights
    from hierarchy.models.metadata import CheckpointMetadata, write_metadata

    arch = {"backbone": "resnet18", "library": "torchvision", "num_classes": 2}
    save_weights(run / "best.safetensors", marker_model())
    write_metadata(run / "metadata.json", CheckpointMetadata(stage="mark", labels=list(MarkStage.labels), arch=arch,
                                                             preset=Preset(size=SIZE).to_dict(), created_by="test"))
    return run


@pytest.fixture(scope="module")
def marker_run(tmp_path_factory) -> Path:
    return write_marker_run(tmp_path_factory.mktemp("marker") / "run")


@pytest.fixture
def mark_stage(no_autoload):
    from hierarchy.registry import register_plugin

    register_plugin(MarkPlugin(), name="mark")


def write_pipeline(folder: Path, run: Path, engine_ood: str = "'off'") -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(f"name: marks\nroot: mark\nstages:\n  mark:\n    stage: mark\n    weights: {run}\n"
                    f"    ood: {engine_ood}\n    routes: {{default: stop}}\n")
    return path


# ---------------------------------------------------------------- target layers


@pytest.mark.parametrize("backbone,expected", [
    ("resnet18", "layer4"),
    ("mobilenet_v3_small", "features"),
    ("timm/resnet10t", "layer4"),
    ("timm/efficientnet_b0", "bn2"),
    ("timm/convnext_atto", "stages"),
])
def test_target_layer_is_the_last_feature_map(backbone: str, expected: str) -> None:
    model = create_model(backbone, 2)[0].eval()
    name, module = target_layer(model, SIZE)
    assert name == expected and module is model.get_submodule(expected)


def test_native_resnet_has_the_same_target_layer() -> None:
    from hierarchy.models import resnet as native

    arch = {"backbone": "resnet18", "library": "torchvision", "num_classes": 2}
    assert last_feature_map(native.build(arch).eval(), SIZE) == "layer4"


def test_target_layer_override_and_typo() -> None:
    model = create_model("resnet18", 2)[0].eval()
    assert target_layer(model, SIZE, "layer3.1")[1] is model.layer3[1]
    with pytest.raises(HierarchyError, match="layer9.*top-level modules: conv1"):
        target_layer(model, SIZE, "layer9")


def test_a_transformer_needs_a_named_layer() -> None:
    model = create_model("timm/vit_tiny_patch16_224", 2)[0].eval()
    with pytest.raises(HierarchyError, match="no convolutional feature map.*--explain-layer"):
        last_feature_map(model, 224)


# ---------------------------------------------------------------- the map finds the patch


def test_map_peaks_on_the_patch_the_model_keys_on(marker_run: Path, mark_stage) -> None:
    from hierarchy.data.batches import Decoded, preset_key
    from hierarchy.engine.pipeline import load_pipeline
    from hierarchy.engine.router import Router
    from hierarchy.explain.cam import Explainer

    router = Router.from_pipeline(load_pipeline(write_pipeline(marker_run.parent, marker_run)), device="cpu",
                                  precision="fp32", engine="torch")
    coarse = Explainer(router)  # layer4: a 2x2 map at 64 px, so the quadrant
    fine = Explainer(router, "gradcam", {"*": "layer3"})  # 4x4: within a cell of the patch
    rng = np.random.default_rng(7)
    corners = [(0, 0), (0, SIZE - PATCH), (SIZE - PATCH, 0), (SIZE - PATCH, SIZE - PATCH), (24, 8)]
    corners += [tuple(int(v) for v in rng.integers(0, SIZE - PATCH + 1, size=2)) for _ in range(5)]
    key = preset_key(Preset(size=SIZE))
    assert router.route([Decoded(Path("plain.png"), arrays={key: marked(rng, None)})])[0]["label"] == "plain"
    for corner in corners:
        item = Decoded(Path(f"{corner}.png"), arrays={key: marked(rng, corner)})
        record = router.route([item])[0]
        assert record["label"] == "marked", record
        for explainer, slack in ((coarse, SIZE // 4), (fine, SIZE // 8)):
            (exp,) = explainer.explain(record, item)
            y, x = (v * SIZE for v in exp.peak)
            cy, cx = corner[0] + PATCH / 2, corner[1] + PATCH / 2
            assert abs(y - cy) <= PATCH / 2 + slack and abs(x - cx) <= PATCH / 2 + slack, (corner, exp.peak)
            assert exp.available and exp.note is None and exp.overlay.shape == (224, 224, 3)
    assert coarse.model("mark").layer_name == "layer4" and fine.model("mark").layer_name == "layer3"


def test_a_stage_without_a_feature_map_is_reported_not_fatal(marker_run: Path, mark_stage,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from hierarchy.data.batches import Decoded, preset_key
    from hierarchy.engine.pipeline import load_pipeline
    from hierarchy.engine.router import Router
    from hierarchy.explain import layers
    from hierarchy.explain.cam import Explainer

    def no_map(model, size):
        raise HierarchyError("ViT has no convolutional feature map to explain")
    monkeypatch.setattr(layers, "last_feature_map", no_map)
    router = Router.from_pipeline(load_pipeline(write_pipeline(marker_run.parent, marker_run)), device="cpu")
    item = Decoded(Path("x.png"), arrays={preset_key(Preset(size=SIZE)): marked(np.random.default_rng(1), (0, 0))})
    (exp,) = Explainer(router).preload().explain(router.route([item])[0], item)
    assert not exp.available and exp.note == "explanation not available: ViT has no convolutional feature map to explain"
    with pytest.raises(HierarchyError, match="layer9"):  # a layer the user named must exist
        Explainer(router, layers={"mark": "layer9"}).preload()


def test_onnx_engine_falls_back_to_torch_for_the_map(marker_run: Path, mark_stage, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from hierarchy.data.batches import Decoded, preset_key
    from hierarchy.engine.export import export_run
    from hierarchy.engine.pipeline import load_pipeline
    from hierarchy.engine.router import Router
    from hierarchy.explain.cam import Explainer

    run = tmp_path / "run"
    shutil.copytree(marker_run, run)
    export_run(run)
    router = Router.from_pipeline(load_pipeline(write_pipeline(tmp_path, run)), device="cpu", engine="onnx")
    item = Decoded(Path("x.png"), arrays={preset_key(Preset(size=SIZE)): marked(np.random.default_rng(1), (0, 0))})
    record = router.route([item])[0]
    (exp,) = Explainer(router).explain(record, item)
    assert exp.available and "onnx engine has no gradients" in exp.note
    assert exp.to_dict(inline_image=True)["image"].startswith("data:image/png;base64,")


def test_plugin_predictor_has_no_explanation(fake_stages, tmp_path: Path) -> None:
    from fakes import solid
    from hierarchy.data.batches import Decoded
    from hierarchy.engine.pipeline import load_pipeline
    from hierarchy.engine.router import Router
    from hierarchy.explain.cam import Explainer

    pipe = tmp_path / "p.yaml"
    pipe.write_text("name: f\nroot: c\nstages:\n  c:\n    stage: fake_color\n    routes: {default: stop}\n")
    router = Router.from_pipeline(load_pipeline(pipe))
    item = router.decode(solid(tmp_path / "red.png", (250, 0, 0)))
    (exp,) = Explainer(router).explain(router.route([item])[0], item)
    assert not exp.available and "explanation not available" in exp.note and "FakePredictor" in exp.note
    assert exp.to_dict() == {"stage": "c", "label": "red", "available": False, "method": None, "layer": None,
                             "note": exp.note}
    with pytest.raises(HierarchyError, match="unknown stage"):
        Explainer(router, layers={"nope": "layer4"})
    with pytest.raises(HierarchyError, match="unknown CAM method"):
        Explainer(router, method="magic")


# ---------------------------------------------------------------- hierarchy run --explain


def test_run_explain_writes_one_png_per_visited_stage(marker_run: Path, mark_stage, tmp_path: Path) -> None:
    from hierarchy.commands.cli import main

    rng = np.random.default_rng(3)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, corner in (("a", (0, 0)), ("b", (40, 40))):
        Image.fromarray(marked(rng, corner).transpose(1, 2, 0)).save(inputs / f"{name}.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out, maps = tmp_path / "out.json", tmp_path / "maps"
    code = main(["run", str(write_pipeline(tmp_path, marker_run)), str(inputs), "--format", "json", "-o", str(out),
                 "--explain", str(maps), "--device", "cpu"])
    records = json.loads(out.read_text())
    assert code == 3 and [r["status"] for r in records] == ["ok", "ok", "error"]
    written = sorted(p.name for p in maps.iterdir())
    assert written == ["0001_a.mark.png", "0002_b.mark.png"]
    for rec in records[:2]:
        (entry,) = rec["explanations"]
        assert entry["stage"] == "mark" and entry["label"] == rec["label"] and Path(entry["file"]).is_file()
        assert Image.open(entry["file"]).size == (224, 224)
    assert "explanations" not in records[2]
