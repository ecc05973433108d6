"""Compiled forms of a verified export, kept in the user cache dir so that a start skips the
runtime's own preparation: ONNX Runtime's optimised graph (:mod:`.onnx_cache`) and OpenVINO's
compiled model (:mod:`.openvino_backend`).

A file is only used when its signed record (HMAC with the stat cache's per-user key,
:mod:`hierarchy.core.statcache`) names its cache key, the SHA-256 of the export it came from (which
the caller has verified) and the file's own SHA-256, and that SHA-256 matches the bytes read. The
key covers whatever makes the compiled form differ (runtime version, CPU model and flags,
architecture, precision). A missing, unsigned, foreign or changed file is ignored (with a warning
when it exists) and the caller compiles again; an unwritable cache dir only costs the saving.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
from pathlib import Path

from hierarchy.core import statcache
from hierarchy.core.fsutil import atomic_write_bytes, atomic_write_text
from hierarchy.core.machine import cpu_model, speed_flags, user_cache_dir

log = logging.getLogger(__name__)


def cache_key(source_sha256: str, runtime_version: str, *extra: str) -> str:
    """Equal only for the same export, runtime version, CPU (model, flags, architecture) and ``extra``."""
    facts = [source_sha256, runtime_version, cpu_model(), list(speed_flags()), platform.machine(), *extra]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:32]


def paths(kind: str, key: str, suffix: str) -> tuple[Path, Path]:
    """(the compiled file, its signed record) for ``kind`` (the cache subfolder)."""
    folder = user_cache_dir() / kind
    return folder / f"{key}{suffix}", folder / f"{key}.json"


def temp_path(kind: str, key: str, suffix: str) -> Path:
    """Where a runtime writes a new compiled file before :func:`store` signs and moves it in."""
    graph, _ = paths(kind, key, suffix)
    return graph.with_name(f".{graph.name}.{os.getpid()}.tmp")


def load(kind: str, key: str, source_sha256: str, suffix: str) -> bytes | None:
    """The cached file's bytes, or None when missing, unsigned, foreign or changed."""
    graph, record = paths(kind, key, suffix)
    try:
        entry = json.loads(record.read_text(encoding="utf-8"))
        data, digest = statcache.read_bytes_sha256(graph)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the cached %s file %s (%s)", kind, graph, exc)
        return None
    if not isinstance(entry, dict) or not statcache.verify(_payload(kind, key, source_sha256, digest), entry.get("mac")):
        log.warning("ignoring the cached %s file %s (its record is not signed for this export and file)", kind, graph)
        return None
    return data


def store(kind: str, key: str, source_sha256: str, tmp: Path, suffix: str) -> None:
    """Sign the compiled file the runtime wrote at ``tmp`` and move it into place; never raises."""
    graph, _ = paths(kind, key, suffix)
    try:
        mac = statcache.sign(_payload(kind, key, source_sha256, statcache.sha256_file(tmp)))
        if mac is not None:
            os.replace(tmp, graph)
            _write_record(kind, key, source_sha256, mac, suffix)
    except OSError as exc:
        log.info("not caching the %s file (%s)", kind, exc)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def store_bytes(kind: str, key: str, source_sha256: str, data: bytes, suffix: str) -> None:
    """Write the compiled file ``data`` atomically and sign it; never raises."""
    graph, _ = paths(kind, key, suffix)
    try:
        mac = statcache.sign(_payload(kind, key, source_sha256, statcache.sha256_bytes(data)))
        if mac is not None:
            graph.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(graph, data)
            _write_record(kind, key, source_sha256, mac, suffix)
    except OSError as exc:
        log.info("not caching the %s file (%s)", kind, exc)


def _write_record(kind: str, key: str, source_sha256: str, mac: str, suffix: str) -> None:
    atomic_write_text(paths(kind, key, suffix)[1], json.dumps({"key": key, "source_sha256": source_sha256,
                                                               "mac": mac}) + "\n")


def _payload(kind: str, key: str, source_sha256: str, file_sha256: str) -> str:
    return json.dumps([kind, 1, key, source_sha256, file_sha256])
