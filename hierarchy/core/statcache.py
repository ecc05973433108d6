"""SHA-256 of large files (weights, exported models) hashed once, not on every start.

A signed stat cache in :func:`hierarchy.core.machine.user_cache_dir` maps a file's identity (real
path, size, mtime_ns, ctime_ns, inode, device) to the SHA-256 of its bytes. Each entry carries an
HMAC-SHA256 made with a per-user random key (``stat-cache.key``, created 0600), so an entry that was
edited, or copied from another user or machine, fails its check: it is ignored with a warning and the
file is hashed again. Any change to the file changes its ctime (which no one but the kernel sets), so
a changed file never matches its old entry; an entry is only written for a file whose times are older
than :data:`RACY_SECONDS` (a write in the same clock tick could otherwise keep every stat field).

A corrupt cache file is ignored (with a warning) and rewritten; an unwritable cache directory only
costs the hashing. ``HIERARCHY_STAT_CACHE=off`` hashes every time.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from hierarchy.core.fsutil import atomic_write_text, sha256_file
from hierarchy.core.machine import user_cache_dir

log = logging.getLogger(__name__)

ENV = "HIERARCHY_STAT_CACHE"
CACHE_NAME = "sha256-stat.json"
KEY_NAME = "stat-cache.key"
VERSION = 1
MAX_ENTRIES = 512
RACY_SECONDS = 2.0  # a file changed more recently than this is hashed but not recorded
_STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino", "dev")


def enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("off", "0", "false", "no")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes, from the signed cache when its stat matches a valid entry."""
    st = os.stat(path)
    digest = lookup(path, st)
    if digest is not None:
        return digest
    digest = sha256_file(path)
    if _stat_key(os.stat(path)) == _stat_key(st):  # unchanged while we read it
        record(path, st, digest)
    return digest


def read_bytes_sha256(path: str | os.PathLike) -> tuple[bytes, str]:
    """The file's bytes and their SHA-256. On a cache hit the digest is the signed entry's, and the
    file's stat before and after the read both match that entry, so the bytes returned are the bytes
    that were hashed when the entry was made (no check-then-reopen race)."""
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        data = f.read()
        after = os.fstat(f.fileno())
    if _stat_key(before) != _stat_key(after):  # written to while we read: hash what we got, record nothing
        return data, sha256_bytes(data)
    digest = lookup(path, before)
    if digest is None:
        digest = sha256_bytes(data)
        record(path, before, digest)
    return data, digest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lookup(path: str | os.PathLike, st: os.stat_result) -> str | None:
    """The recorded SHA-256 for ``path`` in the state ``st``, or None (no entry, stale, unsigned)."""
    if not enabled():
        return None
    key = _key(create=False)
    if key is None:
        return None
    name = _real(path)
    entry = _load_entries().get(name)
    if not isinstance(entry, dict):
        return None
    if not hmac.compare_digest(str(entry.get("mac", "")), _mac(key, name, entry)):
        log.warning("stat cache: ignoring the entry for %s (its signature does not match: edited, or made "
                    "with another key); hashing the file again", name)
        return None
    if [entry.get(k) for k in _STAT_FIELDS] != list(_stat_key(st)):
        return None  # the file changed since it was hashed
    return str(entry["sha256"])


def record(path: str | os.PathLike, st: os.stat_result, digest: str) -> bool:
    """Sign and store ``digest`` for ``path`` in the state ``st``; False when not stored (racy file,
    cache disabled or not writable)."""
    if not enabled() or time.time() - max(st.st_mtime, st.st_ctime) < RACY_SECONDS:
        return False
    try:
        key = _key(create=True)
        if key is None:
            return False
        name = _real(path)
        entries = _load_entries()
        entries.pop(name, None)
        entry: dict[str, Any] = dict(zip(_STAT_FIELDS, _stat_key(st)), sha256=digest)
        entries[name] = {**entry, "mac": _mac(key, name, entry)}
        _write_entries(dict(list(entries.items())[-MAX_ENTRIES:]))
        return True
    except OSError as exc:
        log.info("stat cache: not recorded (%s); the file will be hashed again next time", exc)
        return False


def sign(payload: str) -> str | None:
    """HMAC of ``payload`` with this user's key (made when missing), for other caches of derived files
    (e.g. ONNX Runtime's optimised graph); None when there is no usable key."""
    try:
        key = _key(create=True)
    except OSError:
        return None
    return None if key is None else hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


def verify(payload: str, mac: object) -> bool:
    """Whether ``mac`` is :func:`sign`'s HMAC of ``payload`` under this user's key."""
    key = _key(create=False)
    return key is not None and isinstance(mac, str) and hmac.compare_digest(
        mac, hmac.new(key, payload.encode(), hashlib.sha256).hexdigest())


def cache_path() -> Path:
    return user_cache_dir() / CACHE_NAME


def key_path() -> Path:
    return user_cache_dir() / KEY_NAME


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(path)


def _mac(key: bytes, name: str, entry: dict[str, Any]) -> str:
    blob = json.dumps([VERSION, name, *[entry.get(k) for k in _STAT_FIELDS], entry.get("sha256")])
    return hmac.new(key, blob.encode(), hashlib.sha256).hexdigest()


def _key(create: bool) -> bytes | None:
    """The per-user key; made (0600) when ``create`` and missing. None when there is none, or when the
    file is not private to this user (then it is never trusted)."""
    path = key_path()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return _new_key(path) if create else None
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        key = f.read()
    if st.st_mode & 0o077 or (hasattr(os, "geteuid") and st.st_uid != os.geteuid()) or len(key) < 32:
        log.warning("stat cache: %s is not a private key file of this user (mode %o); not trusting the cache",
                    path, st.st_mode & 0o777)
        return None
    return key


def _new_key(path: Path) -> bytes | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return _key(create=False)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def _load_entries() -> dict[str, Any]:
    path = cache_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("stat cache: ignoring %s (%s); it will be rewritten", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("entries"), dict):
        log.warning("stat cache: ignoring %s (not a version %d stat cache); it will be rewritten", path, VERSION)
        return {}
    return data["entries"]


def _write_entries(entries: dict[str, Any]) -> None:
    atomic_write_text(cache_path(), json.dumps({"version": VERSION, "entries": entries}) + "\n")
