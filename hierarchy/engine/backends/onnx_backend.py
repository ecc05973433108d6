"""The ONNX Runtime backend: runs the model ``hierarchy export`` wrote beside the weights, with
numpy and onnxruntime only (no torch import). The exported graph is fp32 (ONNX Runtime's CPU provider
has no fast bf16 path); ``--precision int8`` runs the quantised ``best.int8.onnx`` that
``hierarchy export --int8`` made and checked against it (:mod:`hierarchy.engine.quantize`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from hierarchy.core.errors import EngineError, ExportError
from hierarchy.core.phases import phase
from hierarchy.engine.backends.base import Checkpoint
from hierarchy.engine.exported import OUTPUT_NAMES, export_sha256, import_runtime, onnx_path_for, read_verified_export
from hierarchy.engine.quantize import int8_path_for, read_verified_int8

log = logging.getLogger(__name__)


class OnnxBackend:
    """Implements :class:`hierarchy.engine.backends.base.Backend` with an ONNX Runtime session."""

    name = "onnx"

    def __init__(self, session: Any, preset: Any, device: str = "cpu", precision: str = "fp32"):
        self.session, self.preset, self.device, self.precision = session, preset, device, precision
        self.input_name = session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.preset.normalize_array(batch)
        logits, features = self.session.run(list(OUTPUT_NAMES), {self.input_name: x})
        return logits.astype(np.float32), features.astype(np.float32)


def select_providers(ort: Any, device: str) -> list[Any]:
    """ONNX Runtime execution providers for ``--device``: auto = CUDA where this onnxruntime has it,
    else CPU; cpu; cuda / cuda:N (an error where the CUDA provider is missing)."""
    available = set(ort.get_available_providers())
    if device == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
            else ["CPUExecutionProvider"]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    kind, _, index = device.partition(":")
    if kind == "cuda" and (index == "" or index.isdigit()):
        if "CUDAExecutionProvider" not in available:
            raise EngineError(f"device '{device}' requested but this onnxruntime has no CUDAExecutionProvider "
                              f"(providers: {', '.join(sorted(available))}); install onnxruntime-gpu, "
                              "or use --device cpu")
        return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]
    raise EngineError(f"device '{device}' is not supported by --engine onnx; use auto, cpu, cuda or cuda:N")


def make_session(ort: Any, model: bytes, providers: list[Any], onnx_path: Path, sha256: str | None = None) -> Any:
    """A session of ``model``; given its verified ``sha256``, from the cached optimised graph (onnx_cache)."""
    from hierarchy.engine.backends import onnx_cache

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings are not for our users
    try:
        return onnx_cache.session(ort, model, sha256, providers, options)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportError(onnx_path, f"ONNX Runtime cannot load this model ({type(e).__name__}: {e}); "
                          f"re-run `hierarchy export {onnx_path.parent}`") from e


def check_signature(session: Any, ckpt: Checkpoint, onnx_path: Path) -> None:
    """Input (N, 3, S, S) float and outputs ``logits`` (N, C) and ``features`` (N, D), as exported."""
    size, n_labels = ckpt.preset.size, len(ckpt.meta.labels)
    inputs = session.get_inputs()
    outputs = {o.name: o.shape for o in session.get_outputs()}
    problems = []
    if len(inputs) != 1 or list(inputs[0].shape[1:]) != [3, size, size]:
        problems.append(f"input {[(i.name, i.shape) for i in inputs]} is not (N, 3, {size}, {size})")
    missing = [n for n in OUTPUT_NAMES if n not in outputs]
    if missing:
        problems.append(f"outputs {sorted(outputs)} lack {missing}")
    elif outputs["logits"][1:] != [n_labels]:
        problems.append(f"logits {outputs['logits']} do not have {n_labels} classes")
    if problems:
        raise ExportError(onnx_path, "exported model does not match metadata.json: " + "; ".join(problems)
                          + f"; re-run `hierarchy export {onnx_path.parent}`")


def load(ckpt: Checkpoint, device: str, precision: str) -> OnnxBackend:
    if precision in ("bf16", "fp16"):
        log.warning("--engine onnx runs the exported fp32 model; --precision %s is ignored", precision)
    int8 = precision == "int8"
    model = read_verified_int8(ckpt, "onnx") if int8 else read_verified_export(ckpt)
    ort = import_runtime("onnxruntime", "onnx", "onnx")
    providers = select_providers(ort, device)
    onnx_path = int8_path_for(ckpt.weights) if int8 else onnx_path_for(ckpt.weights)
    with phase("session creation"):
        session = make_session(ort, model, providers, onnx_path, None if int8 else export_sha256(ckpt))
    check_signature(session, ckpt, onnx_path)
    used = session.get_providers()[0] if hasattr(session, "get_providers") else "CPUExecutionProvider"
    return OnnxBackend(session, ckpt.preset, "cuda" if used.startswith("CUDA") else "cpu", "int8" if int8 else "fp32")
