"""The training cache: every image of a split decoded and squash-resized once to uint8 (3, S, S).

Layout: ``<data>/.hierarchy-cache/<key>.npy`` (an (N, 3, S, S) uint8 array, memory-mapped when read)
and ``<key>.json`` beside it (which rows failed to decode, and what the key was made from). ``data`` is
the dataset folder (or the folder of a manifest CSV); when it is not writable the cache goes to
``<user cache dir>/<sha of the data path>/`` (:func:`hierarchy.core.machine.user_cache_dir`) instead.

``key`` = SHA-256 of the manifest SHA-256 (``data.manifest_sha256``), the split, the image size and
resize mode, the file list with each file's size and mtime, and :data:`CACHE_VERSION`. Changing the
manifest, the ``--img-size`` or any image file therefore selects a new file; stale ones are kept
until removed (``rm -r <data>/.hierarchy-cache``). Both files are written atomically (temp file in
the same folder, fsync, rename; the ``.json`` last, so it is the commit point), by one process at a
time (an ``flock`` on ``<key>.lock``); under DDP rank 0 builds and the other ranks read.

The recipe's augmentation is squash-resize + horizontal flip, so caching at exactly S x S loses
nothing: the flip is applied to the cached tensor each epoch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from hierarchy.core.fsutil import atomic_write_json

if TYPE_CHECKING:
    import numpy as np

    from hierarchy.data.labelled import Sample

log = logging.getLogger("hierarchy.cache")

CACHE_DIR = ".hierarchy-cache"
CACHE_VERSION = 1
FILL_CHUNK = 64  # images decoded per chunk while the cache is built


@dataclass
class SplitCache:
    """Decoded images of one split: ``array[i]`` is sample i's uint8 (3, S, S); ``ok[i]`` is False
    where the image could not be decoded (the loader then skips it, as the uncached path does)."""

    array: "np.ndarray"
    ok: "np.ndarray"
    path: Path


def cache_key(data: Path, samples: Sequence["Sample"], size: int, split: str, resize: str = "squash") -> str:
    from hierarchy.data.labelled import manifest_sha256

    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "manifest": manifest_sha256(data), "size": size, "split": split,
                         "resize": resize}, sort_keys=True).encode())
    for s in samples:
        h.update(f"{s.path}\0{_stat_tag(s.path)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def _stat_tag(path: Path) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def cache_dir(data: Path) -> Path:
    """``<data>/.hierarchy-cache`` when writable, else a per-dataset folder in the user cache."""
    root = Path(data) if Path(data).is_dir() else Path(data).parent
    local = root / CACHE_DIR
    if _writable(local):
        return local
    from hierarchy.core.machine import user_cache_dir

    return user_cache_dir() / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def load_or_build(data: Path, samples: Sequence["Sample"], size: int, split: str,
                  threads: int = 2, progress: bool = False) -> SplitCache:
    """The cache for ``samples`` at ``size``: read it when its key matches, else build it now."""
    folder = cache_dir(data)
    key = cache_key(data, samples, size, split)
    npy, meta = folder / f"{key}.npy", folder / f"{key}.json"
    cached = _load(npy, meta, len(samples), size)
    if cached is None:
        with _build_lock(folder / f"{key}.lock"):  # one builder; DDP ranks or jobs arriving later wait, then read
            cached = _load(npy, meta, len(samples), size)
            if cached is None:
                _build_split(data, npy, meta, key, samples, size, split, threads, progress)
    else:
        log.info("training cache hit: %s (%d images)", npy, len(samples))
        return cached
    loaded = cached or _load(npy, meta, len(samples), size)
    if loaded is None:
        raise OSError(f"the training cache {npy} could not be read back")
    return loaded


def _build_split(data: Path, npy: Path, meta: Path, key: str, samples: Sequence["Sample"], size: int, split: str,
                 threads: int, progress: bool) -> None:
    log.info("building the training cache %s (%d %s images at %d px)", npy, len(samples), split, size)
    bad = _build(npy, samples, size, threads, progress)
    atomic_write_json(meta, {"version": CACHE_VERSION, "key": key, "split": split, "size": size,
                             "n": len(samples), "bad": bad, "data": str(data)})


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (advisory, released when the process dies, so a killed
    builder never blocks the next run); a filesystem without locks builds unlocked, still atomically."""
    try:
        import fcntl

        f = open(path, "a")
    except (ImportError, OSError):
        yield
        return
    with f:
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _load(npy: Path, meta: Path, n: int, size: int) -> SplitCache | None:
    import numpy as np

    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        array = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if array.shape != (n, 3, size, size) or array.dtype != np.uint8 or info.get("n") != n:
        return None
    ok = np.ones(n, dtype=bool)
    ok[[int(i) for i in info.get("bad", [])]] = False
    return SplitCache(array, ok, npy)


def _build(npy: Path, samples: Sequence["Sample"], size: int, threads: int, progress: bool) -> list[int]:
    """Decode into a memory-mapped ``.npy`` written atomically; returns the undecodable rows."""
    import numpy as np

    from hierarchy.core.fsutil import atomic_write_with

    bad: list[int] = []

    def write(tmp: str) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(samples), 3, size, size))
        bad.extend(_fill(out, samples, size, threads, progress))
        out.flush()
        del out

    atomic_write_with(npy, write)
    return bad


def _fill(out: Any, samples: Sequence["Sample"], size: int, threads: int, progress: bool) -> list[int]:
    """Decode every sample into its row of ``out``; returns the rows that could not be decoded."""
    from tqdm import tqdm

    from hierarchy.data.batches import decode_batches, decode_item
    from hierarchy.data.preset import Preset

    preset, bad, row = Preset(size=size), [], 0
    batches = decode_batches((s.path for s in samples), lambda p: decode_item(p, [preset]), FILL_CHUNK, max(1, threads))
    with tqdm(total=len(samples), desc="cache", unit="img", disable=not progress or None, leave=False) as bar:
        for items in batches:
            for item in items:
                if item.error is None:
                    out[row] = item.array(preset)
                else:
                    log.warning("cache: skipping %s", item.error)
                    bad.append(row)
                row += 1
            bar.update(len(items))
    return bad
