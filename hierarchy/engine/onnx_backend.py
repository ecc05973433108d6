"""The ONNX Runtime engine: ``hierarchy run --engine onnx`` runs the model that ``hierarchy export``
wrote beside the weights (``best.safetensors`` -> ``best.onnx``), with numpy and onnxruntime only.

Nothing here imports torch: metadata comes from :mod:`hierarchy.models.metadata`, OOD statistics from
:mod:`hierarchy.ood.scores`. Records are those of the torch engine: probabilities are
``softmax(logits / temperature)`` and OOD scores use the same statistics and formulas, so
``threshold: auto`` and ``ood: auto`` mean the same. The exported model is fp32 (ONNX Runtime's CPU
provider has no fast bf16 path): this engine is for a fast, torch-free start, not throughput.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hierarchy.core.errors import EngineError, ExportError, HierarchyError
from hierarchy.models.metadata import CheckpointMetadata, check_stage, read_metadata, resolve_checkpoint
from hierarchy.ood.scores import NumpyOODScorer, load_numpy_scorer
from hierarchy.data.preset import Preset
from hierarchy.config.stage import Prediction

if TYPE_CHECKING:
    from hierarchy.config.stage import Stage

log = logging.getLogger(__name__)

EXPORT_KEY = "export"  # metadata.json: {"export": {"best.onnx": {...}, "last.onnx": {...}}}
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "features")


def onnx_path_for(weights: Path) -> Path:
    """Where ``hierarchy export`` writes the model of a weights file: ``best.safetensors`` -> ``best.onnx``."""
    return Path(weights).with_suffix(".onnx")


def export_key(onnx_path: Path, run_dir: Path) -> str:
    """The key of an exported file in metadata's ``export`` map: its name inside the run directory,
    else its absolute path."""
    onnx_path = Path(onnx_path).resolve()
    return onnx_path.name if onnx_path.parent == Path(run_dir).resolve() else str(onnx_path)


def export_entries(meta: CheckpointMetadata) -> dict[str, Any]:
    """Metadata's ``export`` map (empty when nothing was exported)."""
    entries = (meta.model_extra or {}).get(EXPORT_KEY)
    return dict(entries) if isinstance(entries, dict) else {}


def import_runtime(module: str, engine: str, extra: str) -> Any:
    """Import an engine's runtime (``onnxruntime``, ``openvino``), or a typed error that says how to
    install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EngineError(f"--engine {engine} needs {module}, which is not installed ({e}); "
                          f"install it with: pip install 'hierarchy[{extra}]'") from e


def import_onnxruntime() -> Any:
    return import_runtime("onnxruntime", "onnx", "onnx")


def read_verified_export(weights: Path, meta: CheckpointMetadata, run_dir: Path) -> tuple[bytes, dict[str, Any]]:
    """The bytes of the exported model of ``weights`` and its metadata entry, after checking that
    the file exists, was made by ``hierarchy export`` from these very weights, and is unchanged.
    The bytes that were hashed are the bytes the session loads (no check-then-reopen race)."""
    from hierarchy.core.fsutil import sha256_file

    onnx_path = onnx_path_for(weights)
    again = f"re-run `hierarchy export {run_dir}`"
    if not onnx_path.is_file():
        raise ExportError(onnx_path, f"exported model not found; create it with `hierarchy export {run_dir}` "
                          f"(needs torch, once), then run with --engine onnx")
    entry = export_entries(meta).get(export_key(onnx_path, run_dir))
    if not isinstance(entry, dict) or not entry.get("source_sha256") or not entry.get("sha256"):
        raise ExportError(onnx_path, f"{run_dir / 'metadata.json'} has no export entry for {onnx_path.name} "
                          f"(not made by `hierarchy export`, or the metadata was replaced); {again}")
    if sha256_file(weights) != entry["source_sha256"]:
        raise ExportError(onnx_path, f"stale export: {weights.name} changed since {onnx_path.name} was exported "
                          f"(SHA-256 differs from the one recorded in metadata.json); {again}")
    data = onnx_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ExportError(onnx_path, f"{onnx_path.name} is not the file recorded in metadata.json "
                          f"(SHA-256 differs: replaced or corrupt); {again}")
    return data, entry


# ---------------------------------------------------------------- device and session


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


def check_precision(precision: str) -> None:
    """The exported model is fp32; another explicit request is served in fp32 with a warning."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise EngineError(f"unknown precision '{precision}'; use one of auto, fp32, bf16, fp16")
    if precision in ("bf16", "fp16"):
        log.warning("--engine onnx runs the exported fp32 model; --precision %s is ignored", precision)


def make_session(ort: Any, model: bytes, providers: list[Any], onnx_path: Path) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings are not for our users
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportError(onnx_path, f"ONNX Runtime cannot load this model ({type(e).__name__}: {e}); "
                          f"re-run `hierarchy export {onnx_path.parent}`") from e


def check_signature(session: Any, preset: Preset, n_labels: int, onnx_path: Path) -> None:
    """Input (N, 3, S, S) float and outputs ``logits`` (N, C) and ``features`` (N, D), as exported."""
    inputs = session.get_inputs()
    outputs = {o.name: o.shape for o in session.get_outputs()}
    problems = []
    if len(inputs) != 1 or list(inputs[0].shape[1:]) != [3, preset.size, preset.size]:
        problems.append(f"input {[(i.name, i.shape) for i in inputs]} is not (N, 3, {preset.size}, {preset.size})")
    missing = [n for n in OUTPUT_NAMES if n not in outputs]
    if missing:
        problems.append(f"outputs {sorted(outputs)} lack {missing}")
    elif outputs["logits"][1:] != [n_labels]:
        problems.append(f"logits {outputs['logits']} do not have {n_labels} classes")
    if problems:
        raise ExportError(onnx_path, "exported model does not match metadata.json: " + "; ".join(problems)
                          + f"; re-run `hierarchy export {onnx_path.parent}`")


# ---------------------------------------------------------------- predictor


class OnnxPredictor:
    """Implements :class:`hierarchy.config.stage.Predictor` with an ONNX Runtime session; takes numpy
    uint8 batches (``batch_format = "numpy"``; CPU torch tensors are accepted too)."""

    batch_format = "numpy"
    precision = "fp32"  # the exported graph's; the OpenVINO engine sets what it compiled for

    def __init__(self, session: Any, labels: Sequence[str], preset: Preset, metadata: dict[str, Any] | None = None,
                 temperature: float = 1.0, ood_scorer: NumpyOODScorer | None = None):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.labels = list(labels)
        self.preset = preset
        self.metadata = dict(metadata or {})
        self.temperature = float(temperature)
        self.ood_scorer = ood_scorer

    def _check_batch(self, batch: Any) -> np.ndarray:
        x = np.asarray(batch)
        size = self.preset.size
        if x.dtype != np.uint8:
            raise ValueError(f"expected a uint8 batch, got {x.dtype}")
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise ValueError(f"expected a batch of shape (N, 3, {size}, {size}), got {tuple(x.shape)}")
        return x

    def predict(self, batch: Any, return_logits: bool = False, return_features: bool = False) -> Prediction:
        """(N, 3, S, S) uint8 -> probabilities softmax(logits / temperature), (N, C) float32."""
        x = self.preset.normalize_array(self._check_batch(batch))
        logits, features = self.session.run(list(OUTPUT_NAMES), {self.input_name: x})
        logits, features = logits.astype(np.float32), features.astype(np.float32)
        if logits.shape[1] != len(self.labels):
            raise HierarchyError(f"model outputs {logits.shape[1]} classes but the stage has {len(self.labels)} labels")
        ood = None if self.ood_scorer is None else self.ood_scorer.score(features, logits).astype(np.float32)
        return Prediction(probs=softmax(logits / np.float32(self.temperature)), ood=ood,
                          logits=logits if return_logits else None, features=features if return_features else None)


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def load_onnx_predictor(stage: "Stage", weights: Path, device: str = "auto", precision: str = "auto") -> OnnxPredictor:
    """The exported model of a checkpoint (run directory, ``.safetensors`` or ``metadata.json``) for
    ``stage``, after the checks of :func:`read_verified_export`; raises typed errors."""
    weights_path, meta_path = resolve_checkpoint(weights)
    meta = read_metadata(meta_path)
    check_stage(meta, stage.name, stage.labels, meta_path)
    check_precision(precision)
    model, _ = read_verified_export(weights_path, meta, meta_path.parent)
    ort = import_onnxruntime()
    onnx_path = onnx_path_for(weights_path)
    session = make_session(ort, model, select_providers(ort, device), onnx_path)
    preset = Preset.from_dict(meta.preset)
    check_signature(session, preset, len(stage.labels), onnx_path)
    return OnnxPredictor(session, stage.labels, preset, meta.model_dump(mode="json"), temperature=meta.temperature,
                         ood_scorer=load_numpy_scorer(meta.ood, meta_path.parent))
