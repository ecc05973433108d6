"""ONNX Runtime's optimised graph of a verified export, kept in the user cache dir so that a start
skips the graph optimisation (about a third of session creation for a ResNet18 on CPU).

The first session of an export on this machine is made as before (``ORT_ENABLE_ALL``) and also
saves the optimised graph; later ones load that file with optimisation off. The file is only used
when its signed record (HMAC with the stat cache's per-user key, :mod:`hierarchy.core.statcache`)
names the SHA-256 of the export it came from (which the caller has verified), this onnxruntime
version and this CPU (the optimised graph uses its instruction set), and the file's own SHA-256
matches the record; anything else is ignored and the export is optimised again. CPU provider only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

from hierarchy.core import statcache
from hierarchy.core.fsutil import atomic_write_text
from hierarchy.core.machine import cpu_model, speed_flags, user_cache_dir

log = logging.getLogger(__name__)

SUBDIR = "onnx-optimized"
CPU_ONLY = ["CPUExecutionProvider"]


def cache_key(ort: Any, source_sha256: str) -> str:
    """Equal only for the same export, onnxruntime version and CPU (model, flags, architecture)."""
    facts = [source_sha256, ort.__version__, cpu_model(), list(speed_flags()), platform.machine()]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:32]


def paths(key: str) -> tuple[Path, Path]:
    folder = user_cache_dir() / SUBDIR
    return folder / f"{key}.onnx", folder / f"{key}.json"


def session(ort: Any, model: bytes, source_sha256: str | None, providers: list[Any], options: Any) -> Any:
    """An ``InferenceSession`` of ``model`` (the verified export whose SHA-256 is ``source_sha256``):
    from the cached optimised graph when there is a valid one, else made as before, saving it."""
    if source_sha256 is None or providers != CPU_ONLY or not statcache.enabled():
        return ort.InferenceSession(model, options, providers=providers)
    key = cache_key(ort, source_sha256)
    optimized = load_optimized(key, source_sha256)
    if optimized is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(optimized, options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - a bad cached graph is ours to drop, not the user's error
            log.warning("ignoring the cached optimised graph %s (%s); optimising the export again", paths(key)[0], exc)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return save_optimized(ort, model, key, source_sha256, providers, options)


def load_optimized(key: str, source_sha256: str) -> bytes | None:
    """The cached optimised graph's bytes, or None when missing, unsigned, foreign or changed."""
    graph, record = paths(key)
    try:
        entry = json.loads(record.read_text(encoding="utf-8"))
        data, digest = statcache.read_bytes_sha256(graph)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the cached optimised graph %s (%s)", graph, exc)
        return None
    if not isinstance(entry, dict) or not statcache.verify(_payload(key, source_sha256, digest), entry.get("mac")):
        log.warning("ignoring the cached optimised graph %s (its record is not signed for this export and file)",
                    graph)
        return None
    return data


def save_optimized(ort: Any, model: bytes, key: str, source_sha256: str, providers: list[Any], options: Any) -> Any:
    """Make the session as before and keep its optimised graph, signed. Whatever goes wrong with the
    file (no cache dir, a graph too large to save), the session is made as before."""
    graph, record = paths(key)
    tmp = graph.with_name(f".{graph.name}.{os.getpid()}.tmp")
    try:
        graph.parent.mkdir(parents=True, exist_ok=True)
        options.optimized_model_filepath = str(tmp)
        made = ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; a broken model fails again below
        log.info("not caching the optimised graph (%s)", exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
        options.optimized_model_filepath = ""
        return ort.InferenceSession(model, options, providers=providers)
    try:
        mac = statcache.sign(_payload(key, source_sha256, statcache.sha256_file(tmp)))
        if mac is not None:
            os.replace(tmp, graph)
            atomic_write_text(record, json.dumps({"key": key, "source_sha256": source_sha256, "mac": mac}) + "\n")
    except OSError as exc:
        log.info("not caching the optimised graph (%s)", exc)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return made


def _payload(key: str, source_sha256: str, graph_sha256: str) -> str:
    return json.dumps(["onnx-optimized", 1, key, source_sha256, graph_sha256])
