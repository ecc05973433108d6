"""The ``ham10000`` source: a metadata CSV (lesion_id, image_id, dx, ...) plus ``<image_id>.jpg``
files anywhere under the root. Group = ``lesion_id``, so a lesion's images share one split."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Literal, Optional

from hierarchy.core.errors import DatasetError
from hierarchy.data.sources.base import Source, scan_images
from hierarchy.data.sources.items import Item, Problems

META_COLUMNS = ("sex", "age", "localization", "dx_type")  # carried into the manifest for `evaluate --by`


class Ham10000Source(Source):
    """HAM10000: ``metadata`` CSV (lesion_id,image_id,dx,...) plus ``<image_id>.jpg`` anywhere under root."""

    type: Literal["ham10000"] = "ham10000"
    root: Path = Path("data/HAM10000")
    metadata: str = "HAM10000_metadata.csv"
    label: Optional[str] = None  # every image gets this label (e.g. the skin gate) ...
    label_map: Optional[dict[str, str]] = None  # ... or dx -> label; dx missing from the map are skipped

    def labels(self) -> list[str]:
        if self.label is None and not self.label_map:
            raise DatasetError(f"source {self.key!r}: ham10000 needs `label` or `label_map`")
        if self.label is not None and self.label_map:
            raise DatasetError(f"source {self.key!r}: ham10000 takes `label` or `label_map`, not both")
        return [self.label] if self.label is not None else sorted(set(self.label_map.values()))

    def collect(self, root: Path, problems: Problems, *, exclude: Path | None = None) -> list[Item]:
        rows = self._read_rows(root)
        index = self._index(root, problems, exclude)
        items: list[Item] = []
        seen: set[str] = set()
        for line, row in rows:
            item = self._item(line, row, index, seen, problems)
            if item is not None:
                items.append(item)
        for stem in sorted(set(index) - seen):
            problems.add("unlisted_files", source=self.key, path=index[stem])
        return items

    def _item(self, line: int, row: dict[str, str], index: dict[str, str], seen: set[str],
              problems: Problems) -> Item | None:
        image_id = (row.get("image_id") or "").strip()
        if not image_id:
            problems.add("missing_files", source=self.key, image_id="", line=line, reason="empty image_id")
            return None
        if image_id in seen:
            problems.add("duplicate_rows", source=self.key, image_id=image_id, line=line)
            return None
        seen.add(image_id)
        dx = (row.get("dx") or "").strip()
        label = self.label if self.label is not None else (self.label_map or {}).get(dx)
        if label is None:
            problems.add("skipped_rows", source=self.key, image_id=image_id, dx=dx)
            return None
        path = index.get(image_id)
        if path is None:
            problems.add("missing_files", source=self.key, image_id=image_id, line=line)
            return None
        group = (row.get("lesion_id") or "").strip() or image_id
        meta = tuple((c, (row.get(c) or "").strip()) for c in META_COLUMNS if c in row)
        return Item(path=path, label=label, source=self.key, group=group, meta=meta)

    def _read_rows(self, root: Path) -> list[tuple[int, dict[str, str]]]:
        meta = Path(self.metadata).expanduser()
        meta = meta if meta.is_absolute() else root / meta
        if not meta.is_file():
            raise DatasetError(f"source {self.key!r}: metadata file {str(meta)!r} not found")
        need = {"lesion_id", "image_id"} | ({"dx"} if self.label_map else set())
        with open(meta, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            missing = sorted(need - set(reader.fieldnames or []))
            if missing:
                raise DatasetError(f"{meta}: missing column(s) {missing}; found {reader.fieldnames}")
            return [(reader.line_num, row) for row in reader]

    def _index(self, root: Path, problems: Problems, exclude: Path | None) -> dict[str, str]:
        index: dict[str, str] = {}
        for path in scan_images(root, exclude):
            stem = os.path.splitext(os.path.basename(path))[0]
            if stem in index:
                problems.add("duplicate_files", source=self.key, image_id=stem, path=path, kept=index[stem])
                continue
            index[stem] = path
        return index
