"""Pydantic models for dataset building: a list of sources plus split/balance settings.

Kept free of heavy imports so ``hierarchy validate`` and ``--help`` stay fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = None  # defaults to the source type; `--source NAME=DIR` overrides `root`
    max_images: Optional[int] = Field(default=None, ge=1, strict=True)

    @property
    def key(self) -> str:
        return self.name or self.type  # type: ignore[attr-defined]


class Ham10000Source(_Source):
    """HAM10000: ``metadata`` CSV (lesion_id,image_id,dx,...) plus ``<image_id>.jpg`` anywhere under root."""

    type: Literal["ham10000"]
    root: Path = Path("data/HAM10000")
    metadata: str = "HAM10000_metadata.csv"
    label: Optional[str] = None  # every image gets this label (e.g. the skin gate) ...
    label_map: Optional[dict[str, str]] = None  # ... or dx -> label; dx missing from the map are skipped


class CocoSource(_Source):
    """COCO: ``annotations/instances_<set>.json`` + ``<set>/`` images per entry of ``sets``, read with pycocotools."""

    type: Literal["coco"]
    root: Path = Path("data/coco")
    sets: list[str] = Field(default_factory=lambda: ["train2017", "val2017"])
    label: str
    include_categories: list[str] = Field(default_factory=list)  # keep images with any of these (empty: all)
    exclude_categories: list[str] = Field(default_factory=list)  # drop images with any of these


class FolderSource(_Source):
    """Any folder of images. With ``label`` every image gets it; without, sub-folder names are labels.
    ``split`` pins the split (e.g. a seed-style ``datasets/train/skin`` tree); otherwise it is random."""

    type: Literal["folder"]
    root: Path
    label: Optional[str] = None
    split: Optional[Literal["train", "val", "test"]] = None


Source = Annotated[Union[Ham10000Source, CocoSource, FolderSource], Field(discriminator="type")]


class DatasetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[Source] = Field(default_factory=list)
    seed: StrictInt = 0  # strict: YAML `true` or "3" is an error, not 1 or 3
    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    max_per_class: Optional[int] = Field(default=None, ge=1, strict=True)  # cap per label and split (before weighting)
    max_ratio: Optional[float] = Field(default=None, ge=1.0)  # cap majority/minority ratio in train
    verify_images: StrictBool = True  # fully decode every image once; unreadable ones are listed and skipped
    materialize: Literal["none", "link", "copy"] = "none"
