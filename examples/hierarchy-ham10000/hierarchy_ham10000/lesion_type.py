"""lesion_type: which of the 7 HAM10000 diagnoses (``dx``) a skin lesion shows.

Trained on all 7 classes, although a cascade only sends it lesions the previous stage called
malignant: a mistaken "malignant" can then still come out as e.g. ``nv`` instead of being forced
into a malignant class. The shared builder splits by ``lesion_id``; training, prediction and
preprocessing are the engine's.
"""
from __future__ import annotations

from typing import Callable

from pydantic import Field

from hierarchy.config.dataset import DatasetConfig, Ham10000Source
from hierarchy.config.stage import Stage, StageConfig
from registry import hookimpl

HIERARCHY_PLUGIN_API = 1

DX_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def default_dataset() -> DatasetConfig:
    """HAM10000 with each dx as its own label (grouped split by lesion_id)."""
    return DatasetConfig(sources=[Ham10000Source(type="ham10000", label_map={dx: dx for dx in DX_CLASSES})])


class LesionTypeConfig(StageConfig):
    dataset: DatasetConfig = Field(default_factory=default_dataset)


class LesionType(Stage):
    name = "lesion_type"
    labels = DX_CLASSES
    description = "HAM10000 diagnosis: akiec, bcc, bkl, df, mel, nv or vasc."
    Config = LesionTypeConfig


@hookimpl
def register_stages(register: Callable[[type[Stage]], None]) -> None:
    register(LesionType)
