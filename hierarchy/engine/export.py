"""``hierarchy export``: write a run's model as ONNX for ``hierarchy run --engine onnx``.

The graph is the fp32 model as trained (no BatchNorm folding: ONNX Runtime fuses it), from the
normalised float32 input ``input`` (N, 3, S, S) to ``logits`` (N, C, before temperature) and
``features`` (N, D, the penultimate activations the OOD scores need), with a dynamic batch axis.
Before the file is published (temp file + ``os.replace``) ONNX Runtime runs it on random inputs
and its outputs must match torch's; the result is recorded in ``metadata.json`` under ``export``
with the SHA-256 of the file and of the weights it came from, so a later run can refuse a stale export.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from hierarchy.core.errors import ConfigError, ExportError
from hierarchy.core.fsutil import atomic_write_with, sha256_file
from hierarchy.models.metadata import read_metadata, resolve_checkpoint, update_metadata
from hierarchy.engine.exported import EXPORT_KEY, INPUT_NAME, OUTPUT_NAMES, export_entries, export_key, \
    import_runtime, onnx_path_for

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hierarchy.models.metadata import CheckpointMetadata

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17  # ONNX Runtime >= 1.12 runs it; the torchscript exporter's best-tested range
CHECKPOINTS = ("best", "last")
TOLERANCE = 1e-3  # max |onnx - torch| relative to max(1, max |torch|), for logits and features
VERIFY_BATCHES = (1, 3)  # batch sizes run at export time (the graph is traced at batch 2)
PIPELINE_SUFFIXES = (".yaml", ".yml")


def export(target: str | os.PathLike, out: str | os.PathLike | None = None, opset: int = DEFAULT_OPSET,
           checkpoint: str | None = None) -> list[dict[str, Any]]:
    """Export a run directory (or weights file) or every stage of a pipeline YAML; one summary each."""
    target = Path(target)
    if target.is_file() and target.suffix.lower() in PIPELINE_SUFFIXES:
        problems = [f"{flag} applies to one run directory, not a pipeline" for flag, value in
                    (("--out", out), ("--checkpoint", checkpoint)) if value is not None]
        if problems:
            raise ConfigError("command line", problems)
        return export_pipeline(target, opset=opset)
    return [export_run(target, out=out, opset=opset, checkpoint=checkpoint or "best")]


def export_pipeline(path: Path, opset: int = DEFAULT_OPSET) -> list[dict[str, Any]]:
    """Export the checkpoint of every stage with ``weights`` (each checkpoint once)."""
    from hierarchy.engine.pipeline import load_pipeline

    pipe = load_pipeline(path)
    done: dict[Path, dict[str, Any]] = {}
    for sid in pipe.depth_order():
        weights = pipe.weights_path(sid)
        if weights is None:
            log.warning("stage %s has no weights (its plugin loads its own predictor): nothing to export", sid)
            continue
        weights_path, _ = resolve_checkpoint(weights)
        if weights_path.resolve() not in done:
            done[weights_path.resolve()] = export_run(weights_path, opset=opset) | {"stages": []}
        done[weights_path.resolve()]["stages"].append(sid)
    if not done:
        raise ConfigError(str(path), ["no stage has weights: nothing to export"])
    return list(done.values())


def export_run(run: str | os.PathLike, out: str | os.PathLike | None = None, opset: int = DEFAULT_OPSET,
               checkpoint: str = "best") -> dict[str, Any]:
    """Export one checkpoint (run directory + ``checkpoint``, a ``.safetensors`` file, or ``metadata.json``)
    to ``out`` (default: beside the weights, ``best.onnx``), verify it and record it in the metadata."""
    if checkpoint not in CHECKPOINTS:
        raise ConfigError("command line", [f"--checkpoint: expected one of {', '.join(CHECKPOINTS)}, "
                                           f"got {checkpoint!r}"])
    run = Path(run)
    weights_path, meta_path = resolve_checkpoint(run / f"{checkpoint}.safetensors" if run.is_dir() else run)
    meta = read_metadata(meta_path)
    out_path = Path(out) if out is not None else onnx_path_for(weights_path)
    if out_path.suffix.lower() != ".onnx":
        raise ConfigError("command line", [f"--out: {out_path} must end in .onnx"])
    source_sha256 = sha256_file(weights_path)
    module = _build(meta, weights_path)
    facts: dict[str, Any] = {}
    atomic_write_with(out_path, lambda tmp: facts.update(_export_and_verify(module, meta, Path(tmp), opset, out_path)))
    entry = _entry(out_path, weights_path, source_sha256, opset, facts)
    fresh = read_metadata(meta_path)  # what the export took; re-read so a concurrent change is not lost
    update_metadata(meta_path, **{EXPORT_KEY: {**export_entries(fresh), export_key(out_path, meta_path.parent): entry}})
    return {"onnx": str(out_path), "weights": str(weights_path), "metadata": str(meta_path), **entry}


def _entry(out_path: Path, weights: Path, source_sha256: str, opset: int, facts: dict[str, Any]) -> dict[str, Any]:
    import torch

    from hierarchy import __version__

    return {"file": out_path.name, "sha256": sha256_file(out_path), "source": weights.name,
            "source_sha256": source_sha256, "opset": opset, "exporter": facts["exporter"], "dtype": "float32",
            "input": INPUT_NAME, "outputs": list(OUTPUT_NAMES), "torch": torch.__version__,
            "onnxruntime": facts["onnxruntime"], "hierarchy": __version__,
            "max_abs_logit_diff": facts["max_abs_logit_diff"],
            "max_abs_feature_diff": facts["max_abs_feature_diff"], "verified_batches": list(VERIFY_BATCHES)}


# ---------------------------------------------------------------- model


def _build(meta: "CheckpointMetadata", weights: Path) -> "nn.Module":
    """The checkpoint's fp32 model in eval mode, wrapped to return (logits, features)."""
    from hierarchy.engine.backends.torch_backend import build_model

    return _with_features(build_model(meta, weights).float().eval())


def _with_features(model: "nn.Module") -> "nn.Module":
    import torch

    from hierarchy.models.backbones import features_and_logits

    class LogitsAndFeatures(torch.nn.Module):
        def __init__(self, inner: "nn.Module"):
            super().__init__()
            self.model = inner

        def forward(self, x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
            features, logits = features_and_logits(self.model, x)
            return logits, features

    return LogitsAndFeatures(model).eval()


# ---------------------------------------------------------------- export and verification


def _export_and_verify(module: "nn.Module", meta: "CheckpointMetadata", tmp: Path, opset: int,
                       out_path: Path) -> dict[str, Any]:
    import torch

    size = int(meta.preset["size"])
    example = torch.zeros(2, 3, size, size)
    exporter = _export_graph(module, example, tmp, opset, out_path)
    _check_model(tmp, out_path)
    return {"exporter": exporter, **_verify(module, tmp, size, out_path)}


def _torchscript(module: "nn.Module", example: "torch.Tensor", path: Path, opset: int) -> None:
    import torch

    axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torchscript exporter's deprecation notice: our choice, not the user's
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True)


def _dynamo(module: "nn.Module", example: "torch.Tensor", path: Path, opset: int) -> None:
    import torch

    shapes = ({0: torch.export.Dim("batch")},)
    torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=[INPUT_NAME],
                      output_names=list(OUTPUT_NAMES), dynamic_shapes=shapes, opset_version=opset,
                      external_data=False, verbose=False)


EXPORTERS: dict[str, Callable[..., None]] = {"torchscript": _torchscript, "dynamo": _dynamo}


def _export_graph(module: "nn.Module", example: "torch.Tensor", tmp: Path, opset: int, out_path: Path) -> str:
    """Export with the torchscript exporter (fast, needs ``onnx``), else the dynamo exporter (needs
    ``onnxscript``; ~6x slower here). Either way the result is verified numerically afterwards."""
    failures = []
    for name, fn in EXPORTERS.items():
        try:
            fn(module, example, tmp, opset)
            return name
        except Exception as e:  # noqa: BLE001 - exporters raise many types; the next one may work
            log.info("the %s ONNX exporter failed (%s: %s)", name, type(e).__name__, e)
            failures.append(f"{name}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    hint = " (is the 'onnx' package installed? pip install 'hierarchy-cascade[onnx]')" \
        if any("onnx" in f and "not installed" in f for f in failures) else ""
    raise ExportError(out_path, "torch.onnx.export failed: " + "; ".join(failures) + hint)


def _check_model(tmp: Path, out_path: Path) -> None:
    try:
        import onnx
    except ImportError as e:
        raise ExportError(out_path, f"the 'onnx' package is needed to export ({e}); "
                          "install it with: pip install 'hierarchy-cascade[onnx]'") from e
    try:
        onnx.checker.check_model(str(tmp))
    except onnx.checker.ValidationError as e:
        raise ExportError(out_path, f"the exported graph is not valid ONNX: {e}") from e


def _verify(module: "nn.Module", tmp: Path, size: int, out_path: Path) -> dict[str, Any]:
    """Run torch and ONNX Runtime on random normalised inputs; refuse a difference > TOLERANCE."""
    import torch

    ort = import_runtime("onnxruntime", "onnx", "onnx")
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = {"logits": 0.0, "features": 0.0}
    for n in VERIFY_BATCHES:
        x = rng.standard_normal((n, 3, size, size)).astype(np.float32)
        got = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})))
        with torch.inference_mode():
            want = dict(zip(OUTPUT_NAMES, (t.numpy() for t in module(torch.from_numpy(x)))))
        for name in OUTPUT_NAMES:
            if got[name].shape != want[name].shape:
                raise ExportError(out_path, f"ONNX Runtime gives {name} of shape {got[name].shape} for a batch of "
                                  f"{n}, torch {want[name].shape}")
            diff = float(np.abs(got[name] - want[name]).max())
            worst[name] = max(worst[name], diff)
            if diff > TOLERANCE * max(1.0, float(np.abs(want[name]).max())):
                raise ExportError(out_path, f"ONNX Runtime's {name} differ from torch's by {diff:.3g} (tolerance "
                                  f"{TOLERANCE} relative) on a random batch of {n}; not written")
    return {"max_abs_logit_diff": worst["logits"], "max_abs_feature_diff": worst["features"],
            "onnxruntime": ort.__version__}
