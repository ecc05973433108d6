"""Pydantic model for training. Defaults reproduce the original skin-gate recipe:
torchvision ResNet18 from ImageNet, Adam lr 1e-3, cross-entropy, 5 epochs, batch 64, 224x224, hflip."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: str = "resnet18"  # torchvision or timm name; prefix "timm/" or "torchvision/" to choose
    pretrained: str = "imagenet"  # imagenet | none | path to a local weights file
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=64, ge=1)
    img_size: int = Field(default=224, ge=8)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    hflip: bool = True
    sampler: Literal["weighted", "shuffle"] = "weighted"  # weighted: class-balanced batches
    seed: int = 0
    patience: Optional[int] = Field(default=None, ge=1)  # early stopping on val loss
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    workers: Union[int, Literal["auto"]] = "auto"
    cache: bool = False  # decode+resize every image once into a uint8 cache (see docs)
    max_steps_per_epoch: Optional[int] = Field(default=None, ge=1)  # for smoke tests
    calibrate: bool = True  # fit temperature scaling on val after training
    out: Path = Path("runs")  # run dir = out/<stage>/<name>
    name: str = "train"
