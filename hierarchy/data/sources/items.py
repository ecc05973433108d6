"""What sources produce and how the builder narrows it: :class:`Item`, :class:`Problems`, label
checks, subsampling, verification and de-duplication.

Per-file problems (metadata rows without a file, files without a row, unreadable images...) are
recorded in a :class:`Problems` and skipped; only configuration problems (missing root, missing
metadata, unknown category names, labels the stage does not know) raise :class:`DatasetError`.
"""
from __future__ import annotations

import os
import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from hierarchy.core.errors import DatasetError, ImageError

PROBLEM_KINDS = (
    "missing_files",  # a metadata row / COCO image entry whose file is not on disk
    "unlisted_files",  # an image under a ham10000 root that no metadata row names
    "unreadable",  # load_image failed (entry has the ImageError type)
    "skipped_rows",  # ham10000 rows whose dx is not in label_map
    "duplicate_rows",  # a ham10000 image_id listed twice (first row wins)
    "duplicate_files",  # two files under a ham10000 root share an image_id (first in sorted order wins)
    "unlabeled_files",  # folder source without `label`: images directly in root have no label folder
    "duplicate_paths",  # the same file listed by two sources (the first source wins)
)


@dataclass(frozen=True)
class Item:
    """One labelled image. ``path`` is absolute (``os.path.abspath``, symlinks kept); ``group``
    keeps related images (a lesion's photos) in one split; ``split`` pins a split when not None;
    ``meta`` holds the source's metadata columns (HAM10000: sex, age, ...) as (column, value) pairs,
    written as extra manifest columns (``hierarchy evaluate --by`` reads them)."""

    path: str
    label: str
    source: str
    group: str
    split: str | None = None
    meta: tuple[tuple[str, str], ...] = ()


def meta_columns(items: Iterable[Item]) -> list[str]:
    """Every metadata column the items carry, in first-seen order."""
    return list(dict.fromkeys(col for it in items for col, _ in it.meta))


@dataclass
class Problems:
    """Problems found while building, by kind; each entry is a small JSON-able dict. A source may
    add kinds of its own (``problems.add("my_kind", source=..., path=...)``)."""

    entries: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {k: [] for k in PROBLEM_KINDS})

    def add(self, kind: str, **entry: Any) -> None:
        self.entries.setdefault(kind, []).append(entry)

    def count(self, kind: str) -> int:
        return len(self.entries.get(kind, []))

    def to_dict(self, cap: int = 1000) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind, items in self.entries.items():
            rec: dict[str, Any] = {"count": len(items), "items": items[:cap], "truncated": len(items) > cap}
            if kind == "unreadable":
                rec["by_type"] = dict(sorted(Counter(e["type"] for e in items).items()))
            if kind == "skipped_rows":
                rec["by_dx"] = dict(sorted(Counter(e["dx"] for e in items).items()))
            out[kind] = rec
        return out


def check_labels(source_key: str, produced: Iterable[str], labels: Sequence[str], stage: str) -> None:
    bad = sorted(set(produced) - set(labels))
    if bad:
        raise DatasetError(
            f"source {source_key!r} produces label(s) {bad} that stage {stage!r} does not have; "
            f"valid labels: {list(labels)}"
        )


def subsample(items: list[Item], max_images: int | None, seed: int, key: str) -> list[Item]:
    """Keep at most ``max_images`` items, whole groups at a time, chosen by ``seed``."""
    if max_images is None or len(items) <= max_images:
        return items
    groups: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        groups[it.group].append(it)
    order = sorted(groups)
    random.Random(f"{seed}:max_images:{key}").shuffle(order)
    kept: list[Item] = []
    for g in order:
        if len(kept) + len(groups[g]) <= max_images:
            kept.extend(groups[g])
        if len(kept) == max_images:
            break
    return kept


def verify(items: list[Item], problems: Problems, *, progress: bool = True, workers: int | None = None) -> list[Item]:
    """Fully decode every image once (threads); unreadable ones are recorded and dropped."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from hierarchy.data.imageio import load_image

    def check(path: str) -> ImageError | None:
        try:
            load_image(Path(path))
        except ImageError as e:
            return e
        return None

    paths = sorted({it.path for it in items})
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            tqdm(pool.map(check, paths), total=len(paths), desc="verifying images", unit="img",
                 file=sys.stderr, disable=not progress or not paths)
        )
    bad = {p: e for p, e in zip(paths, results) if e is not None}
    source_of = {it.path: it.source for it in items if it.path in bad}
    for p in sorted(bad):
        problems.add("unreadable", source=source_of[p], path=p, type=bad[p].type, message=bad[p].message)
    return [it for it in items if it.path not in bad]


def dedupe(items: list[Item], problems: Problems) -> list[Item]:
    """Drop items whose file another (earlier) source already listed."""
    seen: dict[str, str] = {}
    kept = []
    for it in items:
        if it.path in seen:
            problems.add("duplicate_paths", source=it.source, path=it.path, kept_from=seen[it.path])
            continue
        seen[it.path] = it.source
        kept.append(it)
    return kept
