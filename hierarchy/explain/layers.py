"""The layer a class-activation map is computed on: the last convolutional feature map of the backbone.

Found per architecture by one probe forward pass instead of a table of names: the last top-level
child of the model whose output is a spatial (N, C, H, W) map, skipping pooling layers and
identities. That is ``layer4`` for torchvision's and timm's ResNets (and the native rebuild in
:mod:`hierarchy.models.resnet`), ``features`` for torchvision's VGG, DenseNet, MobileNet and
EfficientNet, ``stages`` for timm's ConvNeXt and RegNet, ``bn2`` (after ``conv_head``) for timm's
EfficientNet and MobileNet. A dotted module name overrides it (``--explain-layer layer3``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hierarchy.core.errors import HierarchyError

POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Identity)


def target_layer(model: nn.Module, size: int, override: str | None = None) -> tuple[str, nn.Module]:
    """(dotted name, module) of the layer to explain in ``model`` for ``size`` x ``size`` inputs."""
    if override:
        return override, named_submodule(model, override)
    name = last_feature_map(model, size)
    return name, model.get_submodule(name)


def named_submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``, or a :class:`HierarchyError` listing the top-level names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = ", ".join(n for n, _ in model.named_children())
        raise HierarchyError(f"explain layer '{name}' is not a module of {type(model).__name__} "
                             f"(top-level modules: {names}; use a dotted name such as layer4.1)") from None


def last_feature_map(model: nn.Module, size: int) -> str:
    """Name of the last top-level child that outputs a spatial feature map (see the module doc)."""
    seen: list[str] = []
    hooks = [child.register_forward_hook(_recorder(name, seen)) for name, child in model.named_children()
             if not isinstance(child, POOLING)]
    try:
        with torch.no_grad():
            param = next(model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise HierarchyError(f"{type(model).__name__} has no convolutional feature map to explain at {size}px "
                             "(a transformer?); name a layer with --explain-layer")
    return seen[-1]


def _recorder(name: str, seen: list[str]) -> Any:
    def hook(_module: nn.Module, args: tuple, output: Any) -> None:
        if (isinstance(output, torch.Tensor) and output.ndim == 4 and min(output.shape[2:]) > 1
                and not (args and output is args[0])):
            if name in seen:
                seen.remove(name)
            seen.append(name)
    return hook
