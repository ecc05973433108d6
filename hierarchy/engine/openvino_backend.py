"""The OpenVINO engine: ``hierarchy run --engine openvino`` compiles the model ``hierarchy export``
wrote beside the weights (``best.onnx``, the same verified file the ONNX engine runs) with
OpenVINO's CPU plugin, in bf16 on CPUs with native bf16 (AVX512-BF16/AMX) and fp32 elsewhere.

Like the ONNX engine it never imports torch, and its records are the torch engine's (temperature,
thresholds, OOD scores from the same metadata; see :mod:`hierarchy.engine.onnx_backend`, whose
predictor it reuses). Unlike it, it is the fastest engine measured here: ResNet18 bf16 at 224 px
ran 136-161 img/s against 109-117 for torch's bf16 (docs/performance.md).
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from hierarchy.core.errors import EngineError, ExportError
from hierarchy.models.metadata import check_stage, read_metadata, resolve_checkpoint
from hierarchy.engine.onnx_backend import INPUT_NAME, OnnxPredictor, import_runtime, onnx_path_for, read_verified_export
from hierarchy.ood.scores import load_numpy_scorer
from hierarchy.data.preset import Preset

if TYPE_CHECKING:
    from hierarchy.config.stage import Stage

log = logging.getLogger(__name__)

HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}  # our precision -> INFERENCE_PRECISION_HINT


def select_precision(capabilities: Any, requested: str) -> str:
    """``auto``: bf16 where the CPU plugin reports native BF16, else fp32. An explicit request the
    CPU cannot serve falls back to fp32 with a warning (as the torch engine does)."""
    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise EngineError(f"unknown precision '{requested}'; use one of auto, fp32, bf16, fp16")
    caps = {str(c).upper() for c in capabilities}
    if requested == "auto":
        return "bf16" if "BF16" in caps else "fp32"
    if requested != "fp32" and requested.upper() not in caps:
        log.warning("precision %s is not supported natively by OpenVINO on this CPU; using fp32", requested)
        return "fp32"
    return requested


class OpenVinoSession:
    """An OpenVINO compiled model behind the two calls :class:`OnnxPredictor` makes of an ONNX
    Runtime session (``get_inputs`` and ``run``), so the predictor is shared."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def get_inputs(self) -> list[Any]:
        return [SimpleNamespace(name=INPUT_NAME)]

    def run(self, names: list[str], feeds: dict[str, Any]) -> list[Any]:
        result = self.request.infer(feeds)
        return [result[self.compiled.output(name)] for name in names]


def check_device(device: str) -> None:
    if device not in ("auto", "cpu"):
        raise EngineError(f"device '{device}' is not supported by --engine openvino (its CPU plugin is used); "
                          "use auto or cpu, or --engine torch for CUDA and MPS")


def compile_model(core: Any, model: bytes, precision: str, onnx_path: Path) -> Any:
    try:
        return core.compile_model(core.read_model(model), "CPU", {"INFERENCE_PRECISION_HINT": HINTS[precision]})
    except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
        raise ExportError(onnx_path, f"OpenVINO cannot load this model ({type(e).__name__}: {e}); "
                          f"re-run `hierarchy export {onnx_path.parent}`") from e


def load_openvino_predictor(stage: "Stage", weights: Path, device: str = "auto",
                            precision: str = "auto") -> OnnxPredictor:
    """The exported model of a checkpoint, compiled by OpenVINO, after the export checks of
    :func:`hierarchy.engine.onnx_backend.read_verified_export` (missing, stale or replaced files)."""
    weights_path, meta_path = resolve_checkpoint(weights)
    meta = read_metadata(meta_path)
    check_stage(meta, stage.name, stage.labels, meta_path)
    check_device(device)
    model, _ = read_verified_export(weights_path, meta, meta_path.parent)
    core = import_runtime("openvino", "openvino", "openvino").Core()
    chosen = select_precision(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"), precision)
    compiled = compile_model(core, model, chosen, onnx_path_for(weights_path))
    predictor = OnnxPredictor(OpenVinoSession(compiled), stage.labels, Preset.from_dict(meta.preset),
                              meta.model_dump(mode="json"), temperature=meta.temperature,
                              ood_scorer=load_numpy_scorer(meta.ood, meta_path.parent))
    predictor.precision = chosen
    return predictor
