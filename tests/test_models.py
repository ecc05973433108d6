"""Backbone creation, pretrained weights (offline behaviour, local files) and feature extraction."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from hierarchy.models import backbones as models
from hierarchy.models.weights import fetch
from hierarchy.models.checkpoint import save_weights
from hierarchy.core.errors import CheckpointError, PretrainedWeightsError, UnknownBackboneError
from hierarchy.models.backbones import (
    classifier_module,
    create_model,
    features_and_logits,
    head_name,
    model_from_arch,
    resolve_backbone,
)

RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1 file name


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if code tries to reach the network for weights that should come from a cache."""

    def refuse(url: str, timeout: float = 0) -> bool:
        raise AssertionError(f"unexpected network probe for {url}")

    monkeypatch.setattr(fetch, "probe", refuse)


def _backbone_equal(a: torch.nn.Module, b: torch.nn.Module, head: str) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(head + "."))


# ---------------------------------------------------------------- names


def test_name_resolution() -> None:
    assert resolve_backbone("resnet18") == ("torchvision", "resnet18")  # the original recipe
    assert resolve_backbone("timm/resnet18") == ("timm", "resnet18")
    assert resolve_backbone("torchvision/resnet18") == ("torchvision", "resnet18")
    assert resolve_backbone("resnet10t") == ("timm", "resnet10t")  # not in torchvision


def test_unknown_backbone_suggests_names() -> None:
    with pytest.raises(ValueError, match="Unknown backbone 'resnt18'; try resnet18") as info:
        create_model("resnt18", 2)
    assert isinstance(info.value, UnknownBackboneError)
    with pytest.raises(UnknownBackboneError, match="timm/"):
        create_model("torchvision/resnet10t", 2)


@pytest.mark.parametrize("backbone", ["resnet18", "timm/resnet10t", "mobilenet_v3_small"])
def test_head_replaced_and_features(backbone: str) -> None:
    model, arch = create_model(backbone, 3)
    assert arch["num_classes"] == 3 and arch["library"] == ("timm" if backbone.startswith("timm/") else "torchvision")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = features_and_logits(model, x)
        expected = model(x)
    assert torch.allclose(logits, expected, atol=1e-6)
    head = classifier_module(model)
    assert logits.shape == (2, 3) and feats.shape == (2, head.in_features)


def test_timm_backbone_pretrained_none() -> None:
    model, arch = create_model("timm/resnet10t", 4, pretrained="none")
    assert arch == {"backbone": "resnet10t", "library": "timm", "num_classes": 4}
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_model_from_arch_round_trip() -> None:
    model, arch = create_model("resnet18", 5)
    rebuilt = model_from_arch(arch)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- --pretrained imagenet


def test_imagenet_offline_names_cache_file_and_alternatives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    if fetch.probe("https://download.pytorch.org/models/"):
        pytest.skip("network reachable: this test is about the offline path")
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError) as info:
        create_model("resnet18", 2, pretrained="imagenet")
    assert time.monotonic() - start < 20, "the offline failure must be fast"
    msg = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / RESNET18_FILE) in msg
    assert "https://download.pytorch.org/models/" + RESNET18_FILE in msg
    assert "--pretrained none" in msg and "--pretrained PATH" in msg and "Copy the file there" in msg


def test_imagenet_unreachable_timm_names_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(fetch, "probe", lambda url, timeout=0: False)  # simulate no network, even online
    with pytest.raises(PretrainedWeightsError) as info:
        create_model("timm/resnet10t", 2, pretrained="imagenet")
    msg = str(info.value)
    assert str(tmp_path / "hf" / "models--timm--resnet10t.c3_in1k") in msg
    assert "timm/resnet10t.c3_in1k" in msg and "--pretrained none" in msg


def test_imagenet_from_torch_hub_cache_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source, _ = create_model("resnet18", 1000)
    cached = tmp_path / "hub" / "checkpoints" / RESNET18_FILE
    cached.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cached)
    model, arch = create_model("resnet18", 3, pretrained="imagenet")
    assert arch["num_classes"] == 3 and model.fc.out_features == 3
    assert _backbone_equal(model, source, "fc")


def test_imagenet_from_hf_cache_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    source, _ = create_model("timm/resnet10t", 1000)
    repo = cache / "models--timm--resnet10t.c3_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    save_weights(repo / "snapshots" / ("0" * 40) / "model.safetensors", source)
    model, _ = create_model("timm/resnet10t", 2, pretrained="imagenet")
    assert model.fc.out_features == 2 and _backbone_equal(model, source, "fc")


# ---------------------------------------------------------------- --pretrained PATH


@pytest.mark.parametrize("form", ["safetensors", "pth", "pth-wrapped", "pth-ddp"])
def test_local_pretrained_round_trip(tmp_path: Path, form: str) -> None:
    source, _ = create_model("resnet18", 1000)
    state = source.state_dict()
    if form == "safetensors":
        path = tmp_path / "w.safetensors"
        save_weights(path, state)
    else:
        path = tmp_path / "w.pth"
        if form == "pth-wrapped":
            state = {"state_dict": state, "epoch": 3}
        elif form == "pth-ddp":
            state = {"module." + k: v for k, v in state.items()}
        torch.save(state, path)
    model, arch = create_model("resnet18", 3, pretrained=str(path))
    assert arch["num_classes"] == 3 and model.fc.weight.shape == (3, 512)
    assert _backbone_equal(model, source, "fc")
    assert head_name(model) == "fc"


def test_local_pretrained_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match="nope.pth: pretrained weights file not found"):
        create_model("resnet18", 2, pretrained=str(tmp_path / "nope.pth"))


def test_local_pretrained_other_architecture_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "r34.safetensors"
    save_weights(path, create_model("resnet34", 2)[0])
    with pytest.raises(PretrainedWeightsError, match=r"r34.safetensors: weights do not fit ResNet: unexpected \d+: layer1.2"):
        create_model("resnet18", 2, pretrained=str(path))


def test_local_pretrained_pickle_payload_refused(tmp_path: Path) -> None:
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):  # runs on unpickling
            return (exec, (f"__import__('pathlib').Path({str(canary)!r}).write_text('pwned')",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.pth: refused"):
        create_model("resnet18", 2, pretrained=str(path))
    assert not canary.exists()
