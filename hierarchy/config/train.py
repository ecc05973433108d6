"""Pydantic model for training. Defaults reproduce the original skin-gate recipe:
torchvision ResNet18 from ImageNet, Adam lr 1e-3, cross-entropy, 5 epochs, batch 64, 224x224, hflip."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: str = "resnet18"  # torchvision or timm name; prefix "timm/" or "torchvision/" to choose
    pretrained: str = "imagenet"  # imagenet | none | path to a local weights file
    epochs: int = Field(default=5, ge=1, strict=True)  # strict: `true` or "5" is an error, not 1 or 5
    batch_size: int = Field(default=64, ge=1, strict=True)
    img_size: int = Field(default=224, ge=8, strict=True)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    hflip: StrictBool = True  # strict: YAML `yes`/`no` are strings, never booleans
    sampler: Literal["weighted", "shuffle"] = "weighted"  # weighted: class-balanced batches
    seed: StrictInt = 0
    patience: Optional[int] = Field(default=None, ge=1, strict=True)  # early stopping on val loss
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    workers: Union[Annotated[StrictInt, Field(ge=0)], Literal["auto"]] = "auto"
    cache: StrictBool = False  # decode+resize every image once into a uint8 cache (see docs)
    max_steps_per_epoch: Optional[int] = Field(default=None, ge=1, strict=True)  # for smoke tests
    calibrate: StrictBool = True  # fit temperature scaling on val after training
    # abstention threshold tuned on val after training (stored for `threshold: auto`); null = skip.
    # Exactly one of target_precision (+ label), target_coverage, max_risk; see docs/evaluation.md
    threshold_target: Optional[dict] = Field(default_factory=lambda: {"max_risk": 0.01})
    ood: StrictBool = True  # fit an out-of-distribution score after training (train split; see docs/ood.md)
    ood_keep: float = Field(default=0.99, gt=0, le=1)  # OOD threshold keeps this share of val images
    ood_method: Literal["knn", "mahalanobis", "energy"] = "knn"
    ood_k: int = Field(default=5, ge=1, strict=True)  # neighbour rank for the knn score
    out: Path = Path("runs")  # run dir = out/<stage>/<name>
    name: str = "train"

    @field_validator("threshold_target")
    @classmethod
    def _one_target(cls, v: Optional[dict]) -> Optional[dict]:
        if v is not None:
            from hierarchy.metrics.thresholds import check_target

            check_target(v)  # the label is checked against the stage's labels when tuning
        return v
