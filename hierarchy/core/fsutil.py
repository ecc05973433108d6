"""Atomic file writes: write to a temp file in the same directory, fsync, then ``os.replace``.

A reader (or a process resumed after SIGKILL) therefore sees either the old file or the new one,
never a half-written file.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator


@functools.lru_cache(maxsize=1)
def _file_mode() -> int:
    mask = os.umask(0o022)  # read once: os.umask can only be read by setting it
    os.umask(mask)
    return 0o666 & ~mask


def _publish(tmp: str, path: Path) -> None:
    os.chmod(tmp, _file_mode())  # mkstemp makes 0600 files; use what a plain open() would have made
    os.replace(tmp, path)


def _target(path: str | os.PathLike) -> tuple[Path, bool]:
    """The path and whether it may be replaced: a device or fifo (``-o /dev/null``, ``-o /dev/stdout``,
    followed through links) is written in place, never replaced by a regular file."""
    path = Path(path)
    try:
        special = not stat.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        special = False
    return path, not special


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temp file next to ``path``; on clean exit it atomically replaces ``path``."""
    path, replaceable = _target(path)
    if not replaceable:
        with open(path, mode, **kwargs) as f:
            yield f
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_write_with(path: str | os.PathLike, writer: Callable[[str], None]) -> None:
    """Atomically produce ``path`` with a library writer that only takes a filename
    (``safetensors.torch.save_file``, ``torch.save``, ``matplotlib savefig``)."""
    path, replaceable = _target(path)
    if not replaceable:
        writer(str(path))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# mkstemp(prefix=".<name>.", suffix=".tmp") names: 8 random characters from this alphabet.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def temp_target(name: str) -> str | None:
    """The file a temp file of this module would have replaced (``.best.safetensors.k3j2_x9a.tmp``
    -> ``best.safetensors``), or None when ``name`` is not such a temp file."""
    match = _TEMP_NAME.match(name)
    return match.group("name") if match else None


def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files that a process killed mid-write left in ``directory`` (never a real file:
    they were not yet renamed into place); return what was removed."""
    removed = []
    for entry in os.scandir(directory):
        if temp_target(entry.name) is not None and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed
