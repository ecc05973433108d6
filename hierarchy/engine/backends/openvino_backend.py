"""The OpenVINO backend: compiles the model ``hierarchy export`` wrote beside the weights (the same
verified ``best.onnx`` the ONNX engine runs) with OpenVINO's CPU plugin, in bf16 on CPUs with native
bf16 (AVX512-BF16/AMX) and fp32 elsewhere; ``--precision int8`` compiles the quantised (QDQ)
``best.int8.onnx`` of ``hierarchy export --int8``, which OpenVINO runs in int8. No torch import.

Reading the ONNX file into OpenVINO and compiling it cost about 0.5 s per start for a ResNet18, so
the compiled model is kept (signed, :mod:`.compiled_cache`, keyed by the export, OpenVINO version,
CPU and precision) and later starts import it instead."""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from hierarchy.core import statcache
from hierarchy.core.errors import EngineError, ExportError
from hierarchy.core.phases import phase
from hierarchy.engine.backends import compiled_cache
from hierarchy.engine.backends.base import Checkpoint
from hierarchy.engine.exported import OUTPUT_NAMES, export_sha256, import_runtime, onnx_path_for, read_verified_export
from hierarchy.engine.quantize import int8_entry, int8_path_for, read_verified_int8

log = logging.getLogger(__name__)

# our precision -> INFERENCE_PRECISION_HINT; int8: the QDQ graph says what is int8, the rest stays f32
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
SUBDIR = "openvino-compiled"
SUFFIX = ".blob"


class OpenVinoBackend:
    """Implements :class:`hierarchy.engine.backends.base.Backend` with an OpenVINO compiled model."""

    name = "openvino"
    device = "cpu"

    def __init__(self, compiled: Any, preset: Any, precision: str):
        self.compiled, self.preset, self.precision = compiled, preset, precision
        self.request = compiled.create_infer_request()
        self.outputs = [compiled.output(n) for n in OUTPUT_NAMES]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self.request.infer([self.preset.normalize_array(batch)])
        logits, features = (result[o] for o in self.outputs)
        return np.asarray(logits, dtype=np.float32), np.asarray(features, dtype=np.float32)


def select_precision(capabilities: Any, requested: str) -> str:
    """``auto``: bf16 where the CPU plugin reports native BF16, else fp32. An explicit request the
    CPU cannot serve falls back to fp32 with a warning (as the torch engine does)."""
    caps = {str(c).upper() for c in capabilities}
    if requested == "int8":
        return requested  # the graph is quantised; OpenVINO runs QDQ int8 on any x86 CPU
    if requested == "auto":
        return "bf16" if "BF16" in caps else "fp32"
    if requested != "fp32" and requested.upper() not in caps:
        log.warning("precision %s is not supported natively by OpenVINO on this CPU; using fp32", requested)
        return "fp32"
    return requested


def compile_model(core: Any, model: bytes, precision: str, onnx_path: Path) -> Any:
    try:
        return core.compile_model(core.read_model(model), "CPU", config(precision))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
        raise ExportError(onnx_path, f"OpenVINO cannot load this model ({type(e).__name__}: {e}); "
                          f"re-run `hierarchy export {onnx_path.parent}`") from e


def config(precision: str) -> dict[str, str]:
    return {"INFERENCE_PRECISION_HINT": HINTS[precision]}


def cached_compile(core: Any, model: bytes, precision: str, onnx_path: Path, sha256: str) -> Any:
    """:func:`compile_model` of the verified ``model`` (SHA-256 ``sha256``), imported from the cached
    compiled model when there is a valid one, else compiled and saved."""
    if not statcache.enabled():
        return compile_model(core, model, precision, onnx_path)
    key = compiled_cache.cache_key(sha256, core.get_versions("CPU")["CPU"].build_number, HINTS[precision])
    cached = compiled_cache.load(SUBDIR, key, sha256, SUFFIX)
    if cached is not None:
        try:
            return core.import_model(io.BytesIO(cached), "CPU", config(precision))  # else its default hint
        except Exception as exc:  # noqa: BLE001 - a stale or bad blob is ours to drop, not the user's error
            log.warning("ignoring the cached compiled model %s (%s); compiling the export again",
                        compiled_cache.paths(SUBDIR, key, SUFFIX)[0], exc)
    compiled = compile_model(core, model, precision, onnx_path)
    save_compiled(compiled, key, sha256)
    return compiled


def save_compiled(compiled: Any, key: str, sha256: str) -> None:
    """Keep ``compiled`` (signed) for the next start; a failure only costs the saving."""
    try:
        blob = compiled.export_model().getvalue()
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types
        log.info("not caching the compiled model (%s)", exc)
        return
    compiled_cache.store_bytes(SUBDIR, key, sha256, blob, SUFFIX)


def load(ckpt: Checkpoint, device: str, precision: str) -> OpenVinoBackend:
    if device not in ("auto", "cpu"):
        raise EngineError(f"device '{device}' is not supported by --engine openvino (its CPU plugin is used); "
                          "use auto or cpu, or --engine torch for CUDA and MPS")
    int8 = precision == "int8"
    model = read_verified_int8(ckpt, "openvino") if int8 else read_verified_export(ckpt)
    core = import_runtime("openvino", "openvino", "openvino").Core()
    chosen = select_precision(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"), precision)
    path = int8_path_for(ckpt.weights) if int8 else onnx_path_for(ckpt.weights)
    sha256 = str(int8_entry(ckpt)["sha256"]) if int8 else export_sha256(ckpt)  # type: ignore[index]
    with phase("compile or import (OpenVINO)"):
        compiled = cached_compile(core, model, chosen, path, sha256)
    return OpenVinoBackend(compiled, ckpt.preset, chosen)
