"""The ``folder`` source: any folder of images, labelled by ``label`` or by sub-folder name."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from hierarchy.data.sources.base import Source, scan_images
from hierarchy.data.sources.items import Item, Problems


class FolderSource(Source):
    """Any folder of images. With ``label`` every image gets it; without, sub-folder names are labels.
    ``split`` pins the split (e.g. a seed-style ``datasets/train/skin`` tree); otherwise it is random."""

    type: Literal["folder"] = "folder"
    root: Path
    label: Optional[str] = None  # for every image; unset: the first sub-folder name (symlinks followed)
    split: Optional[Literal["train", "val", "test"]] = None  # pin every image to this split

    def collect(self, root: Path, problems: Problems, *, exclude: Path | None = None) -> list[Item]:
        base = os.path.abspath(root)
        items = []
        for path in scan_images(root, exclude):
            rel = os.path.relpath(path, base).replace(os.sep, "/")
            label = self.label
            if label is None:
                parts = rel.split("/")
                if len(parts) < 2:
                    problems.add("unlabeled_files", source=self.key, path=path)
                    continue
                label = parts[0]
            items.append(Item(path=path, label=label, source=self.key, group=rel, split=self.split))
        return items
