"""Expand CLI inputs (files, directories, globs) into a stream of paths, one per future record."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable, Iterator

from hierarchy.data.imageio import iter_image_files

_GLOB_CHARS = set("*?[")


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Files pass through (even non-images: they get a typed error record); directories are walked
    recursively for image extensions; globs expand sorted. A path or glob that matches nothing is
    yielded as-is so it produces a ``not_found`` record instead of vanishing."""
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            yield from iter_image_files(p)
        elif p.exists() or p.is_symlink() or not (_GLOB_CHARS & set(str(raw))):
            yield p
        else:
            matches = sorted(glob.iglob(str(raw), recursive=True))
            if not matches:
                yield p
            for m in matches:
                mp = Path(m)
                yield from (iter_image_files(mp) if mp.is_dir() else [mp])
