"""ONNX Runtime's optimised graph of a verified export, kept in the user cache dir so that a start
skips the graph optimisation (about a third of session creation for a ResNet18 on CPU).

The first session of an export on this machine is made as before (``ORT_ENABLE_ALL``) and also
saves the optimised graph; later ones load that file with optimisation off. The file is signed and
checked as :mod:`.compiled_cache` says (export, onnxruntime version and CPU in its key: the
optimised graph uses its instruction set); anything else is ignored and the export is optimised
again. CPU provider only.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

from hierarchy.core import statcache
from hierarchy.engine.backends import compiled_cache

log = logging.getLogger(__name__)

SUBDIR = "onnx-optimized"
SUFFIX = ".onnx"
CPU_ONLY = ["CPUExecutionProvider"]


def session(ort: Any, model: bytes, source_sha256: str | None, providers: list[Any], options: Any) -> Any:
    """An ``InferenceSession`` of ``model`` (the verified export whose SHA-256 is ``source_sha256``):
    from the cached optimised graph when there is a valid one, else made as before, saving it."""
    if source_sha256 is None or providers != CPU_ONLY or not statcache.enabled():
        return ort.InferenceSession(model, options, providers=providers)
    key = compiled_cache.cache_key(source_sha256, ort.__version__)
    optimized = compiled_cache.load(SUBDIR, key, source_sha256, SUFFIX)
    if optimized is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(optimized, options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - a bad cached graph is ours to drop, not the user's error
            log.warning("ignoring the cached optimised graph %s (%s); optimising the export again",
                        compiled_cache.paths(SUBDIR, key, SUFFIX)[0], exc)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return save_optimized(ort, model, key, source_sha256, providers, options)


def save_optimized(ort: Any, model: bytes, key: str, source_sha256: str, providers: list[Any], options: Any) -> Any:
    """Make the session as before and keep its optimised graph, signed. Whatever goes wrong with the
    file (no cache dir, a graph too large to save), the session is made as before."""
    tmp = compiled_cache.temp_path(SUBDIR, key, SUFFIX)
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        options.optimized_model_filepath = str(tmp)
        made = ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; a broken model fails again below
        log.info("not caching the optimised graph (%s)", exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
        options.optimized_model_filepath = ""
        return ort.InferenceSession(model, options, providers=providers)
    compiled_cache.store(SUBDIR, key, source_sha256, tmp, SUFFIX)
    return made
