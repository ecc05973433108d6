"""Decode-and-batch: the one loop that turns a stream of inputs into chunks of decoded images.

:func:`decode_batches` cuts its inputs into chunks and decodes the items of each chunk in a thread
pool (libjpeg, PIL and the resize release the GIL) while the caller works on the previous chunk.
Inputs are taken lazily, a chunk at a time, so a generator of paths is never held whole; at most
two chunks are alive, the one yielded and the one decoding. Items come back in input order, and an
input that cannot be decoded is a :class:`Decoded` carrying its typed error, never an exception
that would lose the rest of its chunk. ``hierarchy run`` (the router), ``evaluate``, ``calibrate``
and training (the threaded loader, the training cache, the OOD fit) all decode through it.
"""
from __future__ import annotations

import itertools
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

import numpy as np

from hierarchy.core.errors import HierarchyError, ImageError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from hierarchy.data.preset import Preset

log = logging.getLogger("hierarchy.decode")

K = TypeVar("K")
MAX_DEFAULT_WORKERS = 8


@dataclass
class Decoded:
    """One input after decoding: its typed ``error``, or uint8 (3, S, S) arrays keyed by
    :func:`preset_key` (made at decode time, or on demand from ``image``)."""

    path: Path
    image: "Image.Image | None" = None
    error: HierarchyError | None = None
    arrays: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)

    def array(self, preset: "Preset") -> np.ndarray:
        """The (3, S, S) uint8 numpy array for ``preset``."""
        key = preset_key(preset)
        if key not in self.arrays:
            if self.image is None:
                raise HierarchyError(f"{self.path}: not decoded for size {preset.size}")
            self.arrays[key] = preset.to_array(self.image)
        return self.arrays[key]

    def tensor(self, preset: "Preset") -> "torch.Tensor":
        """The same pixels as a torch uint8 tensor (zero-copy; imports torch)."""
        import torch

        return torch.from_numpy(self.array(preset))


def preset_key(preset: "Preset") -> tuple[int, str]:
    """Presets that differ only in mean/std share their uint8 array (normalising comes later)."""
    return (preset.size, preset.resize)


def decode_item(path: Path, presets: Iterable["Preset"], draft: bool = True) -> Decoded:
    """``path`` decoded once (:func:`hierarchy.data.decode.decode_arrays`) into the array of every
    preset; a file that cannot be decoded gives a :class:`Decoded` with its :class:`ImageError`."""
    from hierarchy.data.decode import decode_arrays

    wanted = set(presets)
    try:
        by_size = decode_arrays(path, [p.size for p in wanted], draft=draft)
    except ImageError as exc:
        return Decoded(path, error=detached(exc))
    return Decoded(path, arrays={preset_key(p): by_size[p.size] for p in wanted})


def decode_batches(keys: Iterable[K], decode: Callable[[K], Decoded], chunk: int, workers: int | None = None,
                   path_of: Callable[[K], Path] = Path) -> Iterator[list[Decoded]]:
    """``decode(key)`` for every key, yielded as lists of ``chunk`` items (the last may be shorter)
    in input order; the next chunk decodes in ``workers`` threads (default :func:`default_workers`)
    while the caller works on this one. An exception from ``decode`` becomes that item's typed
    error (``path_of(key)`` names the file). Closing the iterator early cancels what is queued."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    inputs = iter(keys)
    pool = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="hierarchy-decode")
    try:
        pending = _submit(pool, decode, path_of, list(itertools.islice(inputs, chunk)))
        while pending:
            done = [f.result() for f in pending]
            pending = _submit(pool, decode, path_of, list(itertools.islice(inputs, chunk)))
            yield done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _submit(pool: ThreadPoolExecutor, decode: Callable[[K], Decoded], path_of: Callable[[K], Path],
            keys: list[K]) -> list[Future]:
    return [pool.submit(_decode_one, decode, path_of, key) for key in keys]


def _decode_one(decode: Callable[[K], Decoded], path_of: Callable[[K], Path], key: K) -> Decoded:
    try:
        return decode(key)
    except HierarchyError as exc:
        return Decoded(path_of(key), error=detached(exc))
    except Exception as exc:  # noqa: BLE001 - one bad input must not lose its chunk
        path = path_of(key)
        log.warning("decoding %s failed: %s: %s", path, type(exc).__name__, exc)
        return Decoded(path, error=ImageError("undecodable", path, f"decode failed: {type(exc).__name__}: {exc}"))


def detached(exc: HierarchyError) -> HierarchyError:
    """``exc`` without its traceback (nor those of its cause/context): a traceback's frames reach,
    through ``f_back``, the pool's work item and so the Future holding this very error, a cycle that
    only the cyclic GC frees; a long run of failing inputs would pile them up between collections."""
    seen: Exception | None = exc
    while seen is not None and seen.__traceback__ is not None:
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
    return exc


def default_workers() -> int:
    """Decode threads: one per CPU this process may use, at most :data:`MAX_DEFAULT_WORKERS`."""
    from hierarchy.core.perf import cpu_count

    return max(1, min(MAX_DEFAULT_WORKERS, cpu_count()))
