"""skin_vs_nonskin: the gate in front of every dermatology stage.

Skin = HAM10000 dermoscopic images (split by lesion_id); non-skin = COCO everyday scenes.
Registered through the ``hierarchy.stages`` entry point, exactly like a third-party plugin.
"""
from __future__ import annotations

from typing import Callable

from hierarchy import CocoSource, Ham10000Source, Stage, hookimpl

HIERARCHY_PLUGIN_API = 1


class SkinVsNonskin(Stage):
    name = "skin_vs_nonskin"
    labels = ("skin", "non-skin")
    description = "Is this a skin (dermoscopic) image at all? HAM10000 vs COCO."
    sources = (Ham10000Source(label="skin"), CocoSource(label="non-skin"))


@hookimpl
def register_stages(register: Callable[[type[Stage]], None]) -> None:
    register(SkinVsNonskin)
