"""Pydantic model for training. Defaults reproduce the original skin-gate recipe:
torchvision ResNet18 from ImageNet, Adam lr 1e-3 (constant), cross-entropy, 5 epochs, batch 64,
224x224, hflip only. The robust-recipe knobs (``augment``, ``optimizer``, ``schedule``,
``warmup_epochs``, ``label_smoothing``, ``ema``, ``temperature_floor``, ``calibration_views``) are documented in
docs/training.md; configs/skin_vs_nonskin.yaml shows the recommended offline recipe."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from hierarchy.core.precision import INFERENCE_ONLY, TRAIN_PRECISIONS, TrainPrecision


class AugmentConfig(BaseModel):
    """Training-time augmentation of the uint8 (3, S, S) input, drawn per image and epoch.
    Every default is off, so the original recipe (hflip only, from ``TrainConfig.hflip``) is unchanged."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    crop_scale: Optional[Tuple[float, float]] = None  # random resized crop: area share range, e.g. [0.35, 1.0]
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)  # its aspect-ratio range
    rotate: float = Field(default=0.0, ge=0, le=180)  # random rotation in [-rotate, +rotate] degrees
    rot90: StrictBool = False  # a random multiple of 90 degrees (dermoscopy has no "up")
    vflip: StrictBool = False  # on for orientation-free images (dermoscopy), off where up matters
    color_jitter: float = Field(default=0.0, ge=0, lt=1)  # brightness/contrast/saturation factor range 1 +- x
    hue: float = Field(default=0.0, ge=0, le=0.5)  # hue shift range +- x
    jpeg_quality: Optional[Tuple[int, int]] = None  # re-encode as JPEG at a quality drawn from this range
    downscale: Optional[Tuple[float, float]] = None  # shrink by a factor in this range and back (blur/scale)
    p: float = Field(default=1.0, ge=0, le=1)  # chance that each enabled photometric/JPEG/downscale op runs
    aperture: float = Field(default=0.0, ge=0, le=1)  # chance of a dermatoscope's round field of view (dark outside)
    aperture_radius: Tuple[float, float] = (0.8, 1.3)  # its radius range, in half the short side (1: touches the edges)

    @field_validator("crop_scale", "downscale")
    @classmethod
    def _share(cls, v: Optional[Tuple[float, float]]) -> Optional[Tuple[float, float]]:
        if v is not None and not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"must be [low, high] with 0 < low <= high <= 1, got {list(v)}")
        return v

    @field_validator("crop_ratio", "aperture_radius")
    @classmethod
    def _ratio(cls, v: Tuple[float, float]) -> Tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"must be [low, high] with 0 < low <= high, got {list(v)}")
        return v

    @field_validator("jpeg_quality")
    @classmethod
    def _quality(cls, v: Optional[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
        if v is not None and not 1 <= v[0] <= v[1] <= 100:
            raise ValueError(f"must be [low, high] with 1 <= low <= high <= 100, got {list(v)}")
        return v

    def enabled(self) -> bool:
        return (self.crop_scale is not None or self.rotate > 0 or self.rot90 or self.vflip or self.color_jitter > 0
                or self.hue > 0 or self.jpeg_quality is not None or self.downscale is not None
                or self.aperture > 0)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    backbone: str = "resnet18"  # torchvision or timm name; prefix "timm/" or "torchvision/" to choose
    pretrained: str = "imagenet"  # imagenet | none | path to a local weights file
    epochs: int = Field(default=5, ge=1, strict=True)  # strict: `true` or "5" is an error, not 1 or 5
    batch_size: int = Field(default=64, ge=1, strict=True)
    # square input; null = the pretrained weights' own size (224 without a weights provider)
    img_size: Optional[int] = Field(default=None, ge=8, strict=True)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    optimizer: Literal["adam", "adamw"] = "adam"  # adamw: decoupled weight decay (set weight_decay, e.g. 0.05)
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: to 0 over all epochs' steps, after warmup
    warmup_epochs: float = Field(default=0.0, ge=0)  # linear warm-up from 0 to lr over this many epochs
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)  # cross-entropy label smoothing
    ema: Optional[float] = Field(default=None, gt=0, lt=1)  # EMA decay (e.g. 0.998): val/checkpoint use the EMA
    hflip: StrictBool = True  # strict: YAML `yes`/`no` are strings, never booleans
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    sampler: Literal["weighted", "shuffle"] = "weighted"  # weighted: class-balanced batches
    seed: StrictInt = 0
    patience: Optional[int] = Field(default=None, ge=1, strict=True)  # early stopping on val loss
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: TrainPrecision = "auto"  # int8 is inference-only (core.precision)
    workers: Union[Annotated[StrictInt, Field(ge=0)], Literal["auto"]] = "auto"
    cache: StrictBool = False  # decode+resize every image once into a uint8 cache (see docs)
    max_steps_per_epoch: Optional[int] = Field(default=None, ge=1, strict=True)  # for smoke tests
    calibrate: StrictBool = True  # fit temperature scaling on val after training
    # lowest temperature the fit may return: 1.0 never sharpens (a separable val split drives the fit
    # towards 0); 0.5 is the original clamp
    temperature_floor: float = Field(default=0.5, gt=0, le=1)
    # 0: fit the temperature on the val split as is. N: on N views of each val image through the
    # training augmentation (seeded), which a model that separates val perfectly still gets wrong
    # sometimes, so the fit no longer runs to the floor (docs/evaluation.md)
    calibration_views: int = Field(default=0, ge=0, le=32, strict=True)
    # abstention threshold tuned on val after training (stored for `threshold: auto`); null = skip.
    # Exactly one of target_precision (+ label), target_coverage, max_risk; see docs/evaluation.md
    threshold_target: Optional[dict] = Field(default_factory=lambda: {"max_risk": 0.01})
    ood: StrictBool = True  # fit an out-of-distribution score after training (train split; see docs/ood.md)
    ood_keep: float = Field(default=0.99, gt=0, le=1)  # OOD threshold keeps this share of val images
    ood_method: Literal["knn", "mahalanobis", "energy"] = "mahalanobis"  # = ood.scores.DEFAULT_METHOD (docs/ood.md)
    ood_tune: Literal["val", "shifted"] = "shifted"  # tune on val as is, or on colour/JPEG/resolution-shifted views
    ood_per_class: StrictBool = True  # keep ood_keep of each predicted class (class offsets), not of val as a whole
    ood_k: int = Field(default=5, ge=1, strict=True)  # neighbour rank for the knn score
    # also fit the OOD statistics on this share of train images seen through a round field of view
    # (augment.aperture_radius), so a dermatoscope's dark rim is not out of distribution by itself
    ood_fit_aperture: float = Field(default=0.0, ge=0, le=1)
    out: Path = Path("runs")  # run dir = out/<stage>/<name>
    name: str = "train"

    @field_validator("precision", mode="before")
    @classmethod
    def _trainable_precision(cls, v: object) -> object:
        if v in INFERENCE_ONLY:
            raise ValueError(f"{v} is an inference precision (the quantised model of `hierarchy export --int8`, run "
                             f"with --engine onnx/openvino); training computes in {', '.join(TRAIN_PRECISIONS)}")
        return v

    @field_validator("threshold_target")
    @classmethod
    def _one_target(cls, v: Optional[dict]) -> Optional[dict]:
        if v is not None:
            from hierarchy.metrics.thresholds import check_target

            check_target(v)  # the label is checked against the stage's labels when tuning
        return v
