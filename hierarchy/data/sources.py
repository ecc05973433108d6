"""Dataset sources: turn a ``ham10000`` / ``coco`` / ``folder`` source into labelled items.

Per-file problems (metadata rows without a file, files without a row, unreadable images...) are
recorded in a :class:`Problems` and skipped; only configuration problems (missing root, missing
metadata, unknown category names, labels the stage does not know) raise :class:`DatasetError`.
"""
from __future__ import annotations

import contextlib
import csv
import os
import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from hierarchy.config.dataset import CocoSource, FolderSource, Ham10000Source, Source
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
    """One labelled image. ``path`` is absolute (``os.path.abspath``, symlinks kept)."""

    path: str
    label: str
    source: str
    group: str
    split: str | None = None


@dataclass
class Problems:
    """Problems found while building, by kind; each entry is a small JSON-able dict."""

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


def collect(source: Source, root: Path, problems: Problems, *, exclude: Path | None = None) -> list[Item]:
    """List the items of one source (before subsampling and verification)."""
    if not root.is_dir():
        raise DatasetError(f"source {source.key!r}: root {str(root)!r} is not a directory")
    if isinstance(source, Ham10000Source):
        return _collect_ham10000(source, root, problems, exclude)
    if isinstance(source, CocoSource):
        return _collect_coco(source, root, problems)
    if isinstance(source, FolderSource):
        return _collect_folder(source, root, problems, exclude)
    raise DatasetError(f"source {source.key!r}: unsupported source type {type(source).__name__}")


def source_labels(source: Source) -> list[str]:
    """Labels a source's configuration can produce (folder sub-folder labels are only known after a scan)."""
    if isinstance(source, Ham10000Source):
        if source.label is None and not source.label_map:
            raise DatasetError(f"source {source.key!r}: ham10000 needs `label` or `label_map`")
        if source.label is not None and source.label_map:
            raise DatasetError(f"source {source.key!r}: ham10000 takes `label` or `label_map`, not both")
        return [source.label] if source.label is not None else sorted(set(source.label_map.values()))
    label = getattr(source, "label", None)
    return [] if label is None else [label]


def check_labels(source_key: str, produced: Iterable[str], labels: Sequence[str], stage: str) -> None:
    bad = sorted(set(produced) - set(labels))
    if bad:
        raise DatasetError(
            f"source {source_key!r} produces label(s) {bad} that stage {stage!r} does not have; "
            f"valid labels: {list(labels)}"
        )


def _scan(root: Path, exclude: Path | None) -> list[str]:
    from hierarchy.data.imageio import iter_image_files

    skip = None if exclude is None else os.path.abspath(exclude) + os.sep
    files = (os.path.abspath(p) for p in iter_image_files(root))
    return [f for f in files if skip is None or not f.startswith(skip)]


# --- ham10000 -------------------------------------------------------------------------------


def _read_ham_rows(source: Ham10000Source, root: Path) -> tuple[Path, list[tuple[int, dict[str, str]]]]:
    meta = Path(source.metadata).expanduser()
    meta = meta if meta.is_absolute() else root / meta
    if not meta.is_file():
        raise DatasetError(f"source {source.key!r}: metadata file {str(meta)!r} not found")
    need = {"lesion_id", "image_id"} | ({"dx"} if source.label_map else set())
    with open(meta, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        missing = sorted(need - set(reader.fieldnames or []))
        if missing:
            raise DatasetError(f"{meta}: missing column(s) {missing}; found {reader.fieldnames}")
        return meta, [(reader.line_num, row) for row in reader]


def _ham_index(source: Ham10000Source, root: Path, problems: Problems, exclude: Path | None) -> dict[str, str]:
    index: dict[str, str] = {}
    for path in _scan(root, exclude):
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in index:
            problems.add("duplicate_files", source=source.key, image_id=stem, path=path, kept=index[stem])
            continue
        index[stem] = path
    return index


def _collect_ham10000(source: Ham10000Source, root: Path, problems: Problems, exclude: Path | None) -> list[Item]:
    meta, rows = _read_ham_rows(source, root)
    index = _ham_index(source, root, problems, exclude)
    items: list[Item] = []
    seen: set[str] = set()
    for line, row in rows:
        image_id = (row.get("image_id") or "").strip()
        if not image_id:
            problems.add("missing_files", source=source.key, image_id="", line=line, reason="empty image_id")
            continue
        if image_id in seen:
            problems.add("duplicate_rows", source=source.key, image_id=image_id, line=line)
            continue
        seen.add(image_id)
        dx = (row.get("dx") or "").strip()
        label = source.label if source.label is not None else (source.label_map or {}).get(dx)
        if label is None:
            problems.add("skipped_rows", source=source.key, image_id=image_id, dx=dx)
            continue
        path = index.get(image_id)
        if path is None:
            problems.add("missing_files", source=source.key, image_id=image_id, line=line)
            continue
        group = (row.get("lesion_id") or "").strip() or image_id
        items.append(Item(path=path, label=label, source=source.key, group=group))
    for stem in sorted(set(index) - seen):
        problems.add("unlisted_files", source=source.key, path=index[stem])
    return items


# --- coco -----------------------------------------------------------------------------------


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


def _collect_coco(source: CocoSource, root: Path, problems: Problems) -> list[Item]:
    cocos = []
    for name in source.sets:
        ann = root / "annotations" / f"instances_{name}.json"
        if not ann.is_file():
            raise DatasetError(f"source {source.key!r}: annotation file {str(ann)!r} not found")
        cocos.append((name, _load_coco(ann)))
    valid = sorted({c["name"] for _, coco in cocos for c in coco.loadCats(coco.getCatIds())})
    unknown = sorted(set(source.include_categories + source.exclude_categories) - set(valid))
    if unknown:
        raise DatasetError(f"source {source.key!r}: unknown COCO category name(s) {unknown}; valid names: {valid}")
    items: list[Item] = []
    for name, coco in cocos:
        items.extend(_coco_set_items(source, root, name, coco, problems))
    return items


def _coco_set_items(source: CocoSource, root: Path, name: str, coco: Any, problems: Problems) -> list[Item]:
    img_ids = set(coco.getImgIds())
    if source.include_categories:
        img_ids &= _images_with(coco, _cat_ids(coco, source.include_categories))
    img_ids -= _images_with(coco, _cat_ids(coco, source.exclude_categories))
    items = []
    for img in coco.loadImgs(sorted(img_ids)):
        path = os.path.abspath(root / name / img["file_name"])
        if not os.path.isfile(path):
            problems.add("missing_files", source=source.key, image_id=img["id"], path=path)
            continue
        items.append(Item(path=path, label=source.label, source=source.key, group=f"{name}/{img['file_name']}"))
    return items


# --- folder ---------------------------------------------------------------------------------


def _collect_folder(source: FolderSource, root: Path, problems: Problems, exclude: Path | None) -> list[Item]:
    base = os.path.abspath(root)
    items = []
    for path in _scan(root, exclude):
        rel = os.path.relpath(path, base).replace(os.sep, "/")
        label = source.label
        if label is None:
            parts = rel.split("/")
            if len(parts) < 2:
                problems.add("unlabeled_files", source=source.key, path=path)
                continue
            label = parts[0]
        items.append(Item(path=path, label=label, source=source.key, group=rel, split=source.split))
    return items


# --- subsampling and verification -----------------------------------------------------------


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
