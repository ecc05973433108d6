"""The exported model of a checkpoint: where ``hierarchy export`` writes it (``best.safetensors`` ->
``best.onnx``), how metadata.json records it, and the checks that it is the file exported from
these very weights. Shared by the exporter and by every engine that runs the export."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hierarchy.core.errors import EngineError, ExportError
from hierarchy.core.phases import phase
from hierarchy.core.statcache import read_bytes_sha256

if TYPE_CHECKING:
    from hierarchy.engine.backends.base import Checkpoint
    from hierarchy.models.metadata import CheckpointMetadata

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


def export_entries(meta: "CheckpointMetadata") -> dict[str, Any]:
    """Metadata's ``export`` map (empty when nothing was exported)."""
    entries = (meta.model_extra or {}).get(EXPORT_KEY)
    return dict(entries) if isinstance(entries, dict) else {}


def import_runtime(module: str, engine: str, extra: str) -> Any:
    """Import an engine's runtime (``onnxruntime``, ``openvino``), or a typed error that says how to
    install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EngineError(f"--engine {engine} needs {module}, which is not installed ({e}); "
                          f"install it with: pip install 'hierarchy-cascade[{extra}]'") from e


def runtime_installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (``--engine auto`` asks this)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def export_problem(ckpt: "Checkpoint") -> str | None:
    """Why the checkpoint's export cannot be run (missing, not recorded, stale), or None when it is
    up to date. Hashes the weights once per checkpoint (``ckpt.weights_sha256``)."""
    onnx_path = onnx_path_for(ckpt.weights)
    again = f"re-run `hierarchy export {ckpt.run_dir}`"
    if not onnx_path.is_file():
        return f"exported model not found; create it with `hierarchy export {ckpt.run_dir}` (needs torch, once)"
    entry = export_entries(ckpt.meta).get(export_key(onnx_path, ckpt.run_dir))
    if not isinstance(entry, dict) or not entry.get("source_sha256") or not entry.get("sha256"):
        return (f"{ckpt.meta_path} has no export entry for {onnx_path.name} (not made by `hierarchy export`, "
                f"or the metadata was replaced); {again}")
    with phase("sha256 of the weights"):
        weights_sha256 = ckpt.weights_sha256
    if weights_sha256 != entry["source_sha256"]:
        return (f"stale export: {ckpt.weights.name} changed since {onnx_path.name} was exported (SHA-256 "
                f"differs from the one recorded in metadata.json); {again}")
    return None


def export_sha256(ckpt: "Checkpoint") -> str:
    """The SHA-256 metadata.json records for the checkpoint's export: what :func:`read_verified_export`
    checked its bytes against (call it after that)."""
    return str(export_entries(ckpt.meta)[export_key(onnx_path_for(ckpt.weights), ckpt.run_dir)]["sha256"])


def read_verified_export(ckpt: "Checkpoint") -> bytes:
    """The bytes of the checkpoint's exported model, after :func:`export_problem` and a check that
    the file is the one recorded. The bytes that were hashed are the bytes the runtime loads (no
    check-then-reopen race)."""
    onnx_path = onnx_path_for(ckpt.weights)
    problem = export_problem(ckpt)
    if problem:
        raise ExportError(onnx_path, problem)
    entry = export_entries(ckpt.meta)[export_key(onnx_path, ckpt.run_dir)]
    with phase("read + sha256 of the export"):
        data, digest = read_bytes_sha256(onnx_path)  # hashed once per file version (signed stat cache)
    if digest != entry["sha256"]:
        raise ExportError(onnx_path, f"{onnx_path.name} is not the file recorded in metadata.json "
                          f"(SHA-256 differs: replaced or corrupt); re-run `hierarchy export {ckpt.run_dir}`")
    return data
