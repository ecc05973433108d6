"""torchvision's ResNet family, rebuilt with torch alone for inference start-up.

``import torchvision`` costs as much again as ``import torch`` (it pulls in torch._dynamo through
torchvision.ops), so ``hierarchy run`` builds the common backbones here: same module names, same
state_dict keys, same forward as ``torchvision.models.resnet`` (v1.5: stride on the 3x3 conv).
``tests/test_fast_path.py`` checks the outputs are identical to torchvision's for the same weights.
BatchNorm pairs are known statically, so folding them needs no ``torch.fx`` trace either.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

LAYERS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=k // 2, bias=False)


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, width, 3, stride), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv(width, width, 3), nn.BatchNorm2d(width)
        self.downsample = _downsample(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, width, 3, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv(width, width * 4, 1), nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, width * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, block: str, layers: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        cls = BasicBlock if block == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(cls(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * cls.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def supports(arch: Mapping[str, Any]) -> bool:
    return arch.get("library") == "torchvision" and arch.get("backbone") in LAYERS


def build(arch: Mapping[str, Any]) -> ResNet:
    """The torchvision-compatible ResNet an ``arch`` dict names (see :func:`supports`)."""
    block, layers = LAYERS[str(arch["backbone"])]
    return ResNet(block, layers, int(arch["num_classes"]))


def batchnorm_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    """(conv, bn) module names to fold for this module's own ResNet, or None for another model."""
    if not isinstance(model, ResNet):
        return None
    pairs = [("conv1", "bn1")]
    for name, m in model.named_modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            pairs += [(f"{name}.conv{k}", f"{name}.bn{k}") for k in (1, 2, 3) if hasattr(m, f"bn{k}")]
            if m.downsample is not None:
                pairs.append((f"{name}.downsample.0", f"{name}.downsample.1"))
    return pairs
