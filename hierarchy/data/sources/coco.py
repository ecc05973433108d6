"""The ``coco`` source: ``annotations/instances_<set>.json`` + ``<set>/`` images per entry of
``sets``, read with pycocotools, filtered by category name. Group = the image."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import Field

from hierarchy.core.errors import DatasetError
from hierarchy.data.sources.base import Source
from hierarchy.data.sources.items import Item, Problems


class CocoSource(Source):
    """COCO: ``annotations/instances_<set>.json`` + ``<set>/`` images per entry of ``sets``, read with pycocotools."""

    type: Literal["coco"] = "coco"
    root: Path = Path("data/coco")
    sets: list[str] = Field(default_factory=lambda: ["train2017", "val2017"])
    label: str
    include_categories: list[str] = Field(default_factory=list)  # keep images with any of these (empty: all)
    exclude_categories: list[str] = Field(default_factory=list)  # drop images with any of these

    def collect(self, root: Path, problems: Problems, *, exclude: Path | None = None) -> list[Item]:
        cocos = []
        for name in self.sets:
            ann = root / "annotations" / f"instances_{name}.json"
            if not ann.is_file():
                raise DatasetError(f"source {self.key!r}: annotation file {str(ann)!r} not found")
            cocos.append((name, _load_coco(ann)))
        valid = sorted({c["name"] for _, coco in cocos for c in coco.loadCats(coco.getCatIds())})
        unknown = sorted(set(self.include_categories + self.exclude_categories) - set(valid))
        if unknown:
            raise DatasetError(f"source {self.key!r}: unknown COCO category name(s) {unknown}; valid names: {valid}")
        items: list[Item] = []
        for name, coco in cocos:
            items.extend(self._set_items(root, name, coco, problems))
        return items

    def _set_items(self, root: Path, name: str, coco: Any, problems: Problems) -> list[Item]:
        img_ids = set(coco.getImgIds())
        if self.include_categories:
            img_ids &= _images_with(coco, _cat_ids(coco, self.include_categories))
        img_ids -= _images_with(coco, _cat_ids(coco, self.exclude_categories))
        items = []
        for img in coco.loadImgs(sorted(img_ids)):
            path = os.path.abspath(root / name / img["file_name"])
            if not os.path.isfile(path):
                problems.add("missing_files", source=self.key, image_id=img["id"], path=path)
                continue
            items.append(Item(path=path, label=self.label, source=self.key, group=f"{name}/{img['file_name']}"))
        return items


def _load_coco(path: Path) -> Any:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints progress to stdout
        try:
            return COCO(str(path))
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise DatasetError(f"{path}: not a valid COCO annotation file: {e}") from e


def _cat_ids(coco: Any, names: Sequence[str]) -> set[int]:
    by_name = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    return {by_name[n] for n in names if n in by_name}


def _images_with(coco: Any, cat_ids: set[int]) -> set[int]:
    ids: set[int] = set()
    for cid in cat_ids:  # getImgIds(catIds=[a, b]) is an intersection; we want the union
        ids.update(coco.getImgIds(catIds=[cid]))
    return ids
