"""The shared dataset builder: sources -> group-wise stratified split -> balance -> ``manifest.csv``.

``build_dataset(stage.config.dataset, out, labels=stage.labels, stage=stage.name)`` builds a stage's
dataset; each source lists its own items (``Source.collect``). Output (all inside ``out``):

* ``manifest.csv`` -- ``path,label,split,source,group[,metadata...]``; paths relative to ``out`` where possible,
  rows sorted, so the same inputs always give the same bytes;
* ``dataset.json`` -- counts, balance report, problems, the resolved config and the manifest hash
  (no timestamps: a rerun with the same inputs is byte-identical);
* optionally ``<split>/<label>/<file>`` symlinks or copies (``materialize``).

Splits are made per group (a HAM10000 ``lesion_id``, a COCO image, a file), stratified by label,
deterministically from ``config.seed``; sources with a fixed ``split`` keep it.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from hierarchy.core.errors import DatasetError
from hierarchy.core.fsutil import atomic_write_json, atomic_write_text, atomic_write_with
from hierarchy.data.dataset_config import DatasetConfig
from hierarchy.data.sources import Item, Problems, Source, check_labels, dedupe, meta_columns, subsample, verify

FORMAT = "hierarchy.dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST_HEADER = ("path", "label", "split", "source", "group")
MATERIALIZE_MODES = ("none", "link", "copy")
PROBLEM_LIST_CAP = 1000

log = logging.getLogger(__name__)


def build_dataset(
    config: DatasetConfig,
    out: Path,
    *,
    labels: Sequence[str],
    stage: str,
    roots: Mapping[str, Path] | None = None,
    materialize: str | None = None,
    progress: bool = True,
) -> dict:
    """Build ``out/manifest.csv`` + ``out/dataset.json`` from ``config.sources``; return dataset.json's dict.

    ``roots`` maps a source key (its ``name``, else its ``type``) to a directory replacing its ``root``.
    ``materialize`` (none | link | copy) overrides ``config.materialize``.
    """
    out = Path(out)
    labels = list(labels)
    mode = materialize or config.materialize
    if mode not in MATERIALIZE_MODES:
        raise DatasetError(f"materialize must be one of {list(MATERIALIZE_MODES)}, got {mode!r}")
    if config.val_fraction + config.test_fraction >= 1.0:
        raise DatasetError(
            f"val_fraction + test_fraction must be < 1, got {config.val_fraction} + {config.test_fraction}"
        )
    resolved = _resolve_roots(config, roots)
    out_abs = os.path.abspath(out)
    problems = Problems()
    items, stats = _gather(resolved, config, labels, stage, problems, out_abs, progress)
    items = _assign_splits(items, config.seed, config.val_fraction, config.test_fraction)
    items, balance = _balance(items, config, labels)
    text = manifest_text(items, out_abs)
    info = _summary(config, resolved, labels, stage, mode, items, stats, balance, problems, text)
    previous_mode = _previous_materialize(out)
    if mode != "none" or previous_mode in ("link", "copy"):
        _check_materialize_target(out_abs, resolved, labels)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "manifest.csv", text)
    if mode != "none":
        materialize_tree(items, out, mode)
    elif previous_mode in ("link", "copy"):
        remove_stale(out, set())
    atomic_write_json(out / "dataset.json", info)
    _log_summary(info, out)
    return info


def _log_summary(info: dict[str, Any], out: Path) -> None:
    log.info("dataset for %s: %d images %s -> %s", info["stage"], info["num_items"], info["counts"]["by_split"], out)
    found = {k: v["count"] for k, v in info["problems"].items() if v["count"]}
    if found:
        log.warning("skipped problem files %s; details in %s", found, out / "dataset.json")
    if info["balance"]["labels_without_train_items"]:
        log.warning("labels without training images: %s", info["balance"]["labels_without_train_items"])


# --- sources --------------------------------------------------------------------------------


def _resolve_roots(config: DatasetConfig, roots: Mapping[str, Path] | None) -> list[tuple[Source, Path]]:
    if not config.sources:
        raise DatasetError("dataset config has no sources")
    keys = [s.key for s in config.sources]
    dups = sorted(k for k, n in Counter(keys).items() if n > 1)
    if dups:
        raise DatasetError(f"duplicate source key(s) {dups}: give each source a distinct `name`")
    roots = dict(roots or {})
    unknown = sorted(set(roots) - set(keys))
    if unknown:
        raise DatasetError(f"unknown source key(s) {unknown} for a root override; known sources: {keys}")
    return [(s, Path(os.path.expanduser(roots.get(s.key, s.root)))) for s in config.sources]


def _gather(resolved: list[tuple[Source, Path]], config: DatasetConfig, labels: list[str], stage: str,
            problems: Problems, out_abs: str, progress: bool) -> tuple[list[Item], dict[str, dict[str, Any]]]:
    """Every source's items (its own ``collect``), label-checked, capped, de-duplicated, verified."""
    items: list[Item] = []
    stats: dict[str, dict[str, Any]] = {}
    for source, root in resolved:
        check_labels(source.key, source.labels(), labels, stage)
        if not root.is_dir():
            raise DatasetError(f"source {source.key!r}: root {str(root)!r} is not a directory")
        root_abs = os.path.abspath(root)
        exclude = Path(out_abs) if out_abs.startswith(root_abs + os.sep) else None
        found = source.collect(root, problems, exclude=exclude)
        check_labels(source.key, {it.label for it in found}, labels, stage)
        chosen = subsample(found, source.max_images, config.seed, source.key)
        stats[source.key] = {"type": source.type, "root": root_abs, "found": len(found)}
        stats[source.key]["after_max_images"] = len(chosen)
        items.extend(chosen)
    items = dedupe(items, problems)
    if config.verify_images:
        items = verify(items, problems, progress=progress)
    kept = Counter(it.source for it in items)
    for key, rec in stats.items():
        rec["kept"] = kept.get(key, 0)
    return items, stats


# --- split ----------------------------------------------------------------------------------


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) groups out of ``n``: rounded fractions, at least one val group when n >= 2
    (and one test group when there is room), always at least one train group."""
    n_val, n_test = int(n * val_fraction + 0.5), int(n * test_fraction + 0.5)
    if val_fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    if test_fraction > 0 and n_test == 0 and n >= (3 if val_fraction > 0 else 2):
        n_test = 1
    while n_val + n_test > max(n - 1, 0):
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def _groups(items: Sequence[Item]) -> dict[tuple[str, str], list[Item]]:
    groups: dict[tuple[str, str], list[Item]] = defaultdict(list)
    for it in items:
        groups[(it.source, it.group)].append(it)
    return groups


def _assign_splits(items: list[Item], seed: int, val_fraction: float, test_fraction: float) -> list[Item]:
    """Group-wise, label-stratified, seeded split of the items without a fixed split."""
    groups = _groups([it for it in items if it.split is None])
    strata: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key, members in groups.items():
        counts = Counter(it.label for it in members)
        strata[min(counts, key=lambda lab: (-counts[lab], lab))].append(key)  # majority label of the group
    split_of: dict[tuple[str, str], str] = {}
    for label in sorted(strata):
        keys = sorted(strata[label])
        random.Random(f"{seed}:split:{label}").shuffle(keys)
        n_val, n_test = split_sizes(len(keys), val_fraction, test_fraction)
        for i, key in enumerate(keys):
            split_of[key] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return [it if it.split else dataclasses.replace(it, split=split_of[(it.source, it.group)]) for it in items]


# --- balance --------------------------------------------------------------------------------


def _pick(items: list[Item], cap: int, seed: int, tag: str) -> list[Item]:
    """``cap`` items, round-robin over seeded-shuffled groups (one image per lesion first)."""
    groups = _groups(items)
    order = sorted(groups)
    random.Random(f"{seed}:balance:{tag}").shuffle(order)
    members = [sorted(groups[k], key=lambda it: it.path) for k in order]
    kept: list[Item] = []
    for depth in range(max(len(m) for m in members)):
        for m in members:
            if depth < len(m) and len(kept) < cap:
                kept.append(m[depth])
    return kept


def count_table(items: Sequence[Item], labels: Sequence[str]) -> dict[str, dict[str, int]]:
    """{split: {label: n}} with every split and label present (zeros included)."""
    c = Counter((it.split, it.label) for it in items)
    return {s: {lab: c.get((s, lab), 0) for lab in labels} for s in SPLITS}


def _balance(items: list[Item], config: DatasetConfig, labels: list[str]) -> tuple[list[Item], dict[str, Any]]:
    before = count_table(items, labels)
    cells: dict[tuple[str, str], list[Item]] = defaultdict(list)
    for it in items:
        cells[(it.split or "", it.label)].append(it)
    if config.max_per_class is not None:
        for (split, label), cell in cells.items():
            if len(cell) > config.max_per_class:
                cells[(split, label)] = _pick(cell, config.max_per_class, config.seed, f"{split}:{label}")
    ratio_cap = None
    if config.max_ratio is not None:
        train = {lab: len(c) for (s, lab), c in cells.items() if s == "train" and c}
        if train:
            ratio_cap = int(config.max_ratio * min(train.values()))
            for label, n in train.items():
                if n > ratio_cap:
                    cells[("train", label)] = _pick(cells[("train", label)], ratio_cap, config.seed, f"ratio:{label}")
    kept = [it for key in sorted(cells) for it in cells[key]]
    after = count_table(kept, labels)
    report = {
        "max_per_class": config.max_per_class,
        "max_ratio": config.max_ratio,
        "ratio_cap": ratio_cap,
        "before": before,
        "after": after,
        "dropped": len(items) - len(kept),
        "train_class_counts": after["train"],
        "labels_without_train_items": [lab for lab in labels if after["train"][lab] == 0],
    }
    return kept, report


# --- manifest -------------------------------------------------------------------------------


def _relative(path: str, out_abs: str) -> str:
    try:
        rel = os.path.relpath(path, out_abs)
    except ValueError:  # another drive on Windows
        return path.replace(os.sep, "/")
    return rel.replace(os.sep, "/")


def _sort_key(it: Item) -> tuple:
    return (SPLITS.index(it.split or "train"), it.label, it.source, it.group, it.path)


def manifest_text(items: Sequence[Item], out_abs: str) -> str:
    """The manifest's CSV text: header (+ the sources' metadata columns, blank where an item has
    none) + rows sorted by split, label, source, group, path."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    extra = [c for c in meta_columns(items) if c not in MANIFEST_HEADER]
    writer.writerow(MANIFEST_HEADER + tuple(extra))
    for it in sorted(items, key=_sort_key):
        meta = dict(it.meta)
        writer.writerow((_relative(it.path, out_abs), it.label, it.split, it.source, it.group,
                         *(meta.get(c, "") for c in extra)))
    return buf.getvalue()


def _summary(
    config: DatasetConfig,
    resolved: list[tuple[Source, Path]],
    labels: list[str],
    stage: str,
    mode: str,
    items: list[Item],
    stats: dict[str, dict[str, Any]],
    balance: dict[str, Any],
    problems: Problems,
    text: str,
) -> dict[str, Any]:
    by_source: dict[str, dict[str, dict[str, int]]] = {}
    counts = Counter((it.source, it.label, it.split) for it in items)
    for src, label, split in sorted(counts, key=lambda k: (k[0], k[1], SPLITS.index(k[2] or "train"))):
        by_source.setdefault(src, {}).setdefault(label, {})[split] = counts[(src, label, split)]
    cfg = config.model_dump(mode="json")
    for rec, (_, root) in zip(cfg["sources"], resolved):
        rec["root"] = os.path.abspath(root)
    cfg["materialize"] = mode
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "labels": labels,
        "manifest": "manifest.csv",
        "manifest_sha256": hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest(),
        "num_items": len(items),
        "counts": {"total": len(items), "by_split": count_table(items, labels), "by_source": by_source},
        "train_class_counts": balance["train_class_counts"],
        "balance": balance,
        "sources": stats,
        "problems": problems.to_dict(PROBLEM_LIST_CAP),
        "materialize": mode,
        "config": cfg,
    }


# --- materialisation ------------------------------------------------------------------------


def _previous_materialize(out: Path) -> str | None:
    try:
        with open(out / "dataset.json", encoding="utf-8") as f:
            return json.load(f).get("materialize")
    except (OSError, ValueError, AttributeError):
        return None


def _check_materialize_target(out_abs: str, resolved: list[tuple[Source, Path]], labels: list[str]) -> None:
    for source, root in resolved:
        r = os.path.abspath(root)
        if r == out_abs or r.startswith(out_abs + os.sep):
            raise DatasetError(
                f"cannot materialise into {out_abs!r}: source {source.key!r} root {r!r} is inside it, and "
                f"stale entries under <out>/<split>/ are deleted; choose another output folder"
            )
    bad = [lab for lab in labels if not lab or lab in (".", "..") or "/" in lab or "\\" in lab]
    if bad:
        raise DatasetError(f"cannot materialise labels {bad}: they are not valid folder names")


def _dest_names(items: Sequence[Item]) -> list[tuple[str, Item]]:
    """(relative destination, item); a file name already taken in its folder gets a path hash suffix."""
    taken: set[str] = set()
    out = []
    for it in sorted(items, key=_sort_key):
        name = os.path.basename(it.path)
        rel = os.path.join(it.split or "train", it.label, name)
        if rel in taken:
            stem, ext = os.path.splitext(name)
            digest = hashlib.sha1(it.path.encode("utf-8", "surrogateescape")).hexdigest()[:10]
            rel = os.path.join(it.split or "train", it.label, f"{stem}__{digest}{ext}")
        taken.add(rel)
        out.append((rel, it))
    return out


def materialize_tree(items: Sequence[Item], out: Path, mode: str) -> None:
    """Create ``out/<split>/<label>/<file>`` (symlink or copy) for every item; remove stale entries."""
    wanted = _dest_names(items)
    for rel, it in wanted:
        dest = Path(out) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        (_place_link if mode == "link" else _place_copy)(it.path, dest)
    remove_stale(out, {rel for rel, _ in wanted})


def _refuse_dir(dest: Path) -> None:
    if dest.is_dir() and not dest.is_symlink():
        raise DatasetError(f"{dest}: a directory is in the way of a materialised file")


def _place_link(src: str, dest: Path) -> None:
    try:
        target = os.path.relpath(src, dest.parent)  # relative: the folder can move with its sources
    except ValueError:
        target = src
    if dest.is_symlink() and os.readlink(dest) == target:
        return
    _refuse_dir(dest)
    tmp = dest.with_name(f".{dest.name}.link.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, dest)


def _place_copy(src: str, dest: Path) -> None:
    if dest.is_file() and not dest.is_symlink():
        a, b = os.stat(src), os.stat(dest)
        if a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns:
            return
    _refuse_dir(dest)
    atomic_write_with(dest, lambda tmp: shutil.copy2(src, tmp))


def remove_stale(out: Path, wanted: set[str]) -> None:
    """Delete files/links under ``out/<split>/`` not in ``wanted`` (paths relative to ``out``), then empty dirs."""
    for split in SPLITS:
        top = Path(out) / split
        if not top.is_dir() or top.is_symlink():
            continue
        for dirpath, dirnames, filenames in os.walk(top, topdown=False):
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            for name in filenames + links:
                full = os.path.join(dirpath, name)
                if os.path.relpath(full, out) not in wanted:
                    os.unlink(full)
            if not os.listdir(dirpath):
                os.rmdir(dirpath)
