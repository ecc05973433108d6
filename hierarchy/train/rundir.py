"""Run directories: ``runs/<stage>/<name>``, then ``<name>2``, ...; a failed run leaves none behind.

A run that fails before it saved anything (an empty dataset, pretrained weights that cannot be
fetched offline, a bad option) has its directory removed, and the log says so, so ``runs/<stage>/``
holds only runs with something in them; a directory that is still empty (a run killed before
cleanup could happen) is reused by the next run of that name instead of skipped.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Iterator

from hierarchy.core.errors import HierarchyError

log = logging.getLogger("hierarchy.train")
KEEP_SUFFIXES = (".safetensors", ".pt")  # weights or resumable train state: a run worth keeping


def new_run_dir(base: Path, name: str) -> Path:
    """runs/<stage>/<name>, then <name>2, <name>3... (never overwrite an earlier run; reuse an empty one)."""
    for i in range(1, 10_000):
        cand = base / (name if i == 1 else f"{name}{i}")
        if cand.is_dir() and not any(cand.iterdir()):
            return cand
        if not cand.exists():
            cand.mkdir(parents=True)
            return cand
    raise HierarchyError(f"too many runs named {name} under {base}")


def holds_a_checkpoint(run_dir: Path) -> bool:
    return any(p.suffix in KEEP_SUFFIXES for p in run_dir.iterdir()) if run_dir.is_dir() else False


@contextlib.contextmanager
def removed_on_failure(created: list[Path]) -> Iterator[None]:
    """Remove the run directories appended to ``created`` if the block raises before they hold a
    checkpoint; the exception still propagates."""
    try:
        yield
    except BaseException:
        for run_dir in created:
            if run_dir.is_dir() and not holds_a_checkpoint(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
                log.warning("training failed before saving a checkpoint: removed its run directory %s", run_dir)
        raise
