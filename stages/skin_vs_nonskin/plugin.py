"""skin_vs_nonskin: the gate in front of every dermatology stage.

Skin = HAM10000 dermoscopic images (split by lesion_id); non-skin = COCO everyday scenes.
Registered through the ``hierarchy.stages`` entry point, exactly like a third-party plugin.
"""
from __future__ import annotations

from pydantic import Field

from hierarchy.config.dataset import CocoSource, DatasetConfig, Ham10000Source
from hierarchy.config.stage import Stage, StageConfig
from registry import hookimpl

HIERARCHY_PLUGIN_API = 1


def default_dataset() -> DatasetConfig:
    return DatasetConfig(sources=[
        Ham10000Source(type="ham10000", label="skin"),
        CocoSource(type="coco", label="non-skin"),
    ])


class SkinVsNonskinConfig(StageConfig):
    dataset: DatasetConfig = Field(default_factory=default_dataset)


class SkinVsNonskin(Stage):
    name = "skin_vs_nonskin"
    labels = ("skin", "non-skin")
    description = "Is this a skin (dermoscopic) image at all? HAM10000 vs COCO."
    Config = SkinVsNonskinConfig


@hookimpl
def register_stages(register) -> None:
    register(SkinVsNonskin)
