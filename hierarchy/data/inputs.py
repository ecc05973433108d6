"""CLI inputs as a stream of paths, one per future record: files, directories and globs
(:func:`expand_inputs`), list files (:func:`read_path_list`, ``--files-from``) and a stable share
of them (:func:`select_shard`, ``--shard K/N``)."""
from __future__ import annotations

import glob
import hashlib
import os
import sys
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from hierarchy.core.errors import ConfigError
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


READ_CHUNK = 1 << 16


def read_path_list(source: str | os.PathLike, nul: bool = False) -> Iterator[str]:
    """Paths from a list file (``-`` = stdin), one per line, or NUL-separated with ``nul``; read a
    chunk at a time, so a list of millions is never held whole. Bytes are decoded like the OS does
    (surrogate escapes for non-UTF-8 names); empty entries are skipped, a trailing ``\\r`` is not
    stripped (it can be part of a name). The list is opened now: one that cannot be read is a
    :class:`ConfigError` before any work (and before ``-o`` is touched)."""
    sep = b"\0" if nul else b"\n"
    if str(source) == "-":
        return _split(sys.stdin.buffer, sep)
    try:
        f = open(source, "rb")
    except OSError as exc:
        raise ConfigError("--files-from", [f"{source}: {exc.strerror or exc}"]) from exc
    return _closing(f, sep)


def _closing(f: BinaryIO, sep: bytes) -> Iterator[str]:
    with f:
        yield from _split(f, sep)


def _split(stream: BinaryIO, sep: bytes) -> Iterator[str]:
    rest = b""
    while chunk := stream.read(READ_CHUNK):
        *parts, rest = (rest + chunk).split(sep)
        yield from (os.fsdecode(p) for p in parts if p)
    if rest:
        yield os.fsdecode(rest)


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N`` (1 <= K <= N) -> (K, N); anything else is a ValueError naming the form."""
    k, sep, n = text.partition("/")
    try:
        shard = (int(k), int(n)) if sep else None
    except ValueError:
        shard = None
    if shard is None or not 1 <= shard[0] <= shard[1]:
        raise ValueError(f"expected K/N with 1 <= K <= N (e.g. 2/8), got {text!r}")
    return shard


def in_shard(path: str | os.PathLike, k: int, n: int) -> bool:
    """Whether ``path`` belongs to shard ``k`` of ``n``: a stable hash of the path string (BLAKE2b,
    not Python's per-process ``hash``), so every machine agrees without coordination, the shards
    are disjoint and their union is the whole input."""
    digest = hashlib.blake2b(os.fsencode(os.fspath(path)), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n == k - 1


def select_shard(paths: Iterable[Path], k: int, n: int) -> Iterator[Path]:
    return (p for p in paths if in_shard(p, k, n))
