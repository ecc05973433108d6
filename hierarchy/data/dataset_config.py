"""``DatasetConfig``: a stage's dataset as a list of sources plus split/balance settings.

Each entry of ``sources`` is validated by its ``type`` against the registered source types
(built-in plus plugins; :mod:`hierarchy.data.sources`). Kept free of heavy imports so
``hierarchy validate`` and ``--help`` stay fast.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, SerializeAsAny, StrictBool, StrictInt

from hierarchy.data.sources import Source, parse_source

SourceEntry = SerializeAsAny[Annotated[Source, PlainValidator(parse_source)]]


class DatasetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    sources: list[SourceEntry] = Field(default_factory=list)  # each validated by its `type` (built-in or plugin)
    seed: StrictInt = 0  # strict: YAML `true` or "3" is an error, not 1 or 3
    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)  # share of groups in val (group-wise, label-stratified)
    test_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)  # share of groups in test
    max_per_class: Optional[int] = Field(default=None, ge=1, strict=True)  # cap per label and split (before weighting)
    max_ratio: Optional[float] = Field(default=None, ge=1.0)  # cap majority/minority ratio in train
    verify_images: StrictBool = True  # fully decode every image once; unreadable ones are listed and skipped
    materialize: Literal["none", "link", "copy"] = "none"  # also write out/<split>/<label>/ trees by symlink or copy
