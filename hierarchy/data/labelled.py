"""Reading labelled data for the trainer and the evaluator.

:func:`load_samples` accepts four layouts:

* a dataset-builder output folder, or its ``manifest.csv`` (``path,label,split,source,group``);
* a seed-style tree ``data/train/<label>/...``, ``data/val/<label>/...`` (split from the top folder);
* a flat ImageFolder ``data/<label>/...`` (split ``None``);
* a CSV with a header ``path,label[,label_at_stage...]``: extra columns (besides ``split``,
  ``source``, ``group``) are multi-level truth and become ``Sample.extra_labels``.

Relative CSV paths are resolved against the CSV's folder.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hierarchy.core.errors import DatasetError

SPLITS = ("train", "val", "test")
_KNOWN_COLUMNS = ("path", "label", "split", "source", "group")

log = logging.getLogger(__name__)


@dataclass
class Sample:
    path: Path
    label: str
    split: str | None = None
    source: str = ""
    group: str = ""
    extra_labels: tuple[str, ...] = ()


def _manifest_file(path: Path) -> Path:
    path = Path(path)
    return path / "manifest.csv" if path.is_dir() else path


def manifest_sha256(path: Path) -> str:
    """SHA-256 of a manifest/CSV file (or of ``<dir>/manifest.csv``). For a split tree or flat
    ImageFolder without a manifest: SHA-256 of its canonical listing ``path,label,split`` (paths
    relative to the folder, sorted), so every supported layout has a stable fingerprint."""
    file = _manifest_file(path)
    h = hashlib.sha256()
    if file.is_file():
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if not Path(path).is_dir():
        raise DatasetError(f"{path}: no such file or directory")
    rows = sorted(
        (os.path.relpath(s.path, path).replace(os.sep, "/"), s.label, s.split or "") for s in load_samples(path)
    )
    h.update(json.dumps([["path", "label", "split"], *rows], ensure_ascii=True).encode("ascii"))
    return h.hexdigest()


def read_manifest(path: Path) -> list[Sample]:
    """Read a builder manifest or a labelled CSV. ``path`` is the CSV or a folder holding ``manifest.csv``."""
    file = _manifest_file(path)
    if not file.is_file():
        raise DatasetError(f"{file}: manifest not found")
    base = file.parent
    with open(file, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        columns = _columns(file, header)
        return [_row(file, reader.line_num, row, columns, base) for row in reader if any(c.strip() for c in row)]


def _columns(file: Path, header: list[str] | None) -> dict[str, int]:
    if not header:
        raise DatasetError(f"{file}: empty file; expected a header 'path,label[,...]'")
    names = [h.strip() for h in header]
    if "path" not in names:
        raise DatasetError(f"{file}:1: header {names} has no 'path' column; expected 'path,label[,...]'")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DatasetError(f"{file}:1: duplicate column(s) {dup}")
    columns = {n: i for i, n in enumerate(names)}
    if "label" not in columns:
        others = [n for n in names if n not in _KNOWN_COLUMNS]
        if not others:
            raise DatasetError(f"{file}:1: header {names} has no label column")
        columns["label"] = columns.pop(others[0])  # `path,<stage>` : the first other column is the label
    return columns


def _row(file: Path, line: int, row: list[str], columns: dict[str, int], base: Path) -> Sample:
    width = max(columns.values()) + 1
    if len(row) != width:
        raise DatasetError(f"{file}:{line}: expected {width} columns, got {len(row)}")
    get = {name: row[i].strip() for name, i in columns.items()}
    if not get["path"]:
        raise DatasetError(f"{file}:{line}: empty path")
    if not get["label"]:
        raise DatasetError(f"{file}:{line}: empty label for {get['path']!r}")
    split = get.get("split") or None
    if split is not None and split not in SPLITS:
        raise DatasetError(f"{file}:{line}: split {split!r} is not one of {list(SPLITS)}")
    p = Path(row[columns["path"]])
    path = p if p.is_absolute() else Path(os.path.normpath(base / p))
    known = {columns[n] for n in _KNOWN_COLUMNS if n in columns}
    extra = tuple(row[i].strip() for i in sorted(set(columns.values()) - known))
    return Sample(path, get["label"], split, get.get("source", ""), get.get("group", ""), extra)


def _is_dir(p: Path) -> bool:
    return p.is_dir() and not p.name.startswith(".")


def _label_dirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if _is_dir(d)), key=lambda d: d.name)


def _read_label_tree(folder: Path, split: str | None) -> list[Sample]:
    from hierarchy.data.imageio import iter_image_files

    samples = []
    for d in _label_dirs(folder):
        for f in iter_image_files(d):
            group = os.path.relpath(f, folder).replace(os.sep, "/")
            samples.append(Sample(Path(f), d.name, split, "folder", group))
    stray = [e.name for e in folder.iterdir() if e.is_file() and not e.name.startswith(".")]
    if stray:
        log.warning("%s: %d file(s) outside a label folder ignored (e.g. %s)", folder, len(stray), sorted(stray)[0])
    return samples


def _read_tree(data: Path) -> tuple[list[Sample], bool]:
    """(samples, has_splits) for a seed-style split tree or a flat ImageFolder."""
    split_dirs = [data / s for s in SPLITS if (data / s).is_dir()]
    if not split_dirs:
        return _read_label_tree(data, None), False
    others = [d.name for d in _label_dirs(data) if d.name not in SPLITS]
    if others:
        log.warning("%s: folders %s are not train/val/test and were ignored", data, others)
    return [s for d in split_dirs for s in _read_label_tree(d, d.name)], True


def load_samples(data: Path, split: str | None = None, labels: Sequence[str] | None = None) -> list[Sample]:
    """Labelled samples from any supported layout, optionally one ``split`` and checked against ``labels``."""
    data = Path(data)
    if split is not None and split not in SPLITS:
        raise DatasetError(f"split must be one of {list(SPLITS)} or None, got {split!r}")
    if data.is_file() or (data.is_dir() and (data / "manifest.csv").is_file()):
        samples = read_manifest(data)
        has_splits = any(s.split is not None for s in samples)
    elif data.is_dir():
        samples, has_splits = _read_tree(data)
    else:
        raise DatasetError(f"{data}: no such file or directory")
    if split is not None:
        if not has_splits and samples:
            raise DatasetError(
                f"{data}: has no train/val/test split (flat folder or CSV without a split column); "
                f"load it with split=None or build a dataset first"
            )
        samples = [s for s in samples if s.split == split]
    if labels is not None:
        _check_labels(data, samples, labels)
    return samples


def _check_labels(data: Path, samples: Sequence[Sample], labels: Sequence[str]) -> None:
    unknown = sorted({s.label for s in samples} - set(labels))
    if unknown:
        raise DatasetError(f"{data}: unknown label(s) {unknown}; expected labels: {list(labels)}")
