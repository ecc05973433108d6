"""The INT8 export of a checkpoint: ``hierarchy export RUN --int8 --data DATASET`` quantises the
exported fp32 ONNX model (post-training static quantisation, ONNX Runtime's quantiser: QDQ, per-channel
weights) on the stage's own training images, and keeps it only if it agrees with fp32 on the val split.

``best.safetensors`` -> ``best.int8.onnx``; metadata.json records every attempt under ``int8`` (keyed
like ``export``): the file's SHA-256, the SHA-256 of the weights it came from, the calibration and val
image counts, top-1 agreement, ECE of both, OOD decision flips, the minimum and whether it ``passed``,
per int8 engine (ONNX Runtime, OpenVINO): each engine serves the file only where it passed.
:func:`int8_problem` (cheap: no onnxruntime import) says why a run has no usable int8 export.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from hierarchy.core.errors import ConfigError, DatasetError, EngineError, ExportError
from hierarchy.core.fsutil import atomic_write_bytes
from hierarchy.core.statcache import file_sha256, read_bytes_sha256
from hierarchy.engine.exported import INPUT_NAME, export_key, import_runtime, read_verified_export

if TYPE_CHECKING:
    from hierarchy.data.labelled import Sample
    from hierarchy.engine.backends.base import Checkpoint
    from hierarchy.models.metadata import CheckpointMetadata

INT8_KEY = "int8"  # metadata.json: {"int8": {"best.int8.onnx": {...}}}
INT8_SUFFIX = ".int8.onnx"
DEFAULT_MIN_AGREEMENT = 0.995  # top-1 agreement int8 vs fp32 on the val split
DEFAULT_CALIBRATION_IMAGES = 256
log = logging.getLogger(__name__)


def int8_path_for(weights: Path) -> Path:
    """Where the int8 export of a weights file lives: ``best.safetensors`` -> ``best.int8.onnx``."""
    weights = Path(weights)
    return weights.with_name(weights.stem + INT8_SUFFIX)


def int8_entries(meta: "CheckpointMetadata") -> dict[str, Any]:
    """Metadata's ``int8`` map (empty when nothing was quantised)."""
    entries = (meta.model_extra or {}).get(INT8_KEY)
    return dict(entries) if isinstance(entries, dict) else {}


def int8_entry(ckpt: "Checkpoint") -> dict[str, Any] | None:
    entry = int8_entries(ckpt.meta).get(export_key(int8_path_for(ckpt.weights), ckpt.run_dir))
    return entry if isinstance(entry, dict) else None


def make_hint(ckpt: "Checkpoint") -> str:
    return f"run `hierarchy export {ckpt.run_dir} --int8 --data DATASET`"


def guard_text(entry: dict[str, Any]) -> str:
    """``agreement 97.12% < 99.50%`` (or ``>=``) from a recorded attempt (two decimals: 99.47% is not 99.5%)."""
    agreement, minimum = entry.get("agreement"), entry.get("min_agreement")
    if not isinstance(agreement, (int, float)) or not isinstance(minimum, (int, float)):
        return "no agreement recorded"
    return f"agreement {100 * agreement:.2f}% {'>=' if agreement >= minimum else '<'} {100 * minimum:.2f}%"


def passing_engines(entry: dict[str, Any]) -> list[str]:
    """The int8 engines on which a recorded attempt met its agreement minimum (each engine computes
    its own int8 kernels, so one file can pass on OpenVINO and fail on ONNX Runtime)."""
    minimum, engines = entry.get("min_agreement"), entry.get("engines")
    if not isinstance(minimum, (int, float)) or not isinstance(engines, dict):
        return []
    return [name for name, m in engines.items()
            if isinstance(m, dict) and isinstance(m.get("agreement"), (int, float)) and m["agreement"] >= minimum]


def int8_problem(ckpt: "Checkpoint", engine: str | None = None, hash_file: bool = True) -> str | None:
    """None when the checkpoint has an int8 export made from its current weights, whose file is the
    one recorded and whose agreement guard passed on ``engine`` (None: on any engine); else a
    one-line reason with the fix. Hashes the int8 file unless ``hash_file`` is False (the loader
    hashes the bytes it reads instead), and the weights once per checkpoint; imports no runtime."""
    path = int8_path_for(ckpt.weights)
    entry = int8_entry(ckpt)
    if entry is None or not entry.get("sha256") or not entry.get("source_sha256"):
        return f"no int8 export: {make_hint(ckpt)}"
    passing = passing_engines(entry)
    if not passing:
        return (f"int8 export failed its guard: {guard_text(entry)}{failure_detail(entry)}; not usable "
                f"(the fp32 export stays; after retraining or with more calibration images {make_hint(ckpt)})")
    if engine is not None and engine not in passing:
        return engine_refusal(entry, engine, passing, ckpt)
    if ckpt.weights_sha256 != entry["source_sha256"]:
        return (f"stale int8 export: {ckpt.weights.name} changed since {path.name} was made "
                f"(SHA-256 differs from metadata.json); {make_hint(ckpt)}")
    if not path.is_file():
        return f"int8 export {path.name} recorded in metadata.json but not found; {make_hint(ckpt)}"
    if hash_file and file_sha256(path) != entry["sha256"]:  # once per file version (signed stat cache)
        return f"{path.name} is not the file recorded in metadata.json (replaced or corrupt); {make_hint(ckpt)}"
    return None


def engine_refusal(entry: dict[str, Any], engine: str, passing: list[str], ckpt: "Checkpoint") -> str:
    """Why the int8 export may not run on ``engine`` although it passed on ``passing``."""
    elsewhere = f"it passed on {', '.join(passing)} (--engine {passing[0]} --precision int8)"
    measured = (entry.get("engines") or {}).get(engine)
    if not isinstance(measured, dict):
        return (f"int8 export was not checked on {engine} (not installed when it was made); {elsewhere}, "
                f"or {make_hint(ckpt)} with {engine} installed")
    text = guard_text({**measured, "min_agreement": entry["min_agreement"]})
    return f"int8 export failed its guard on {engine}: {text}; {elsewhere}"


def failure_detail(entry: dict[str, Any]) -> str:
    reason = entry.get("reason")
    return f" ({reason})" if reason else ""


def read_verified_int8(ckpt: "Checkpoint", engine: str) -> bytes:
    """The bytes of the checkpoint's int8 model for ``engine`` after :func:`int8_problem`; the bytes
    hashed are the bytes the runtime loads (no check-then-reopen race)."""
    path = int8_path_for(ckpt.weights)
    problem = int8_problem(ckpt, engine, hash_file=False)
    if problem:
        raise ExportError(path, f"--precision int8 for {ckpt.run_dir}: {problem}")
    data, digest = read_bytes_sha256(path)  # hashed once per file version (signed stat cache)
    if digest != int8_entry(ckpt)["sha256"]:  # type: ignore[index]
        raise ExportError(path, f"{path.name} is not the file recorded in metadata.json (replaced or corrupt); "
                          f"{make_hint(ckpt)}")
    return data


def int8_refusal(ckpt: "Checkpoint", engine: str) -> EngineError:
    """The typed error for ``--precision int8`` on an engine that cannot run it (torch)."""
    entry = int8_entry(ckpt)
    ready = int8_problem(ckpt)
    fix = ready or f"its int8 export is ready: add --engine {' or '.join(passing_engines(entry or {}))}"
    return EngineError(f"{ckpt.run_dir}: --precision int8 runs the quantised export on --engine onnx or openvino, "
                       f"not {engine} (which computes in fp32, bf16 or fp16); {fix}")


# ---------------------------------------------------------------- making the int8 export


def quantize_checkpoint(ckpt: "Checkpoint", train: Sequence["Sample"], val: Sequence["Sample"], *,
                        calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
                        min_agreement: float = DEFAULT_MIN_AGREEMENT, batch_size: int = 32,
                        workers: int | None = None, seed: int = 0,
                        calibration_transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
    """Quantise the checkpoint's verified fp32 export on ``calibration_images`` of ``train`` (decoded
    through the run's preset; ``calibration_transform``, applied to each normalised batch, exists to
    test the guard), check it against fp32 on ``val`` with every installed int8 engine, record the
    attempt in metadata.json and publish ``best.int8.onnx`` only if it passed on at least one engine
    (the others refuse to serve it, :func:`int8_problem`); else raise."""
    if not 0 < min_agreement <= 1:
        raise ConfigError("command line", [f"--min-agreement: expected a share in (0, 1], got {min_agreement}"])
    for name, samples in (("training", train), ("val", val)):
        if not samples:
            raise DatasetError(f"{ckpt.run_dir}: no {name} images to {'calibrate' if name == 'training' else 'check'} "
                               "the int8 export on")
    fp32 = read_verified_export(ckpt)
    chosen = pick(train, calibration_images, seed)
    calibration = calibration_batches(ckpt, chosen, batch_size, workers, calibration_transform)
    int8 = quantize_bytes(fp32, calibration, int8_path_for(ckpt.weights))
    outputs, y, n_bad = run_guard_engines(ckpt, fp32, int8, val, batch_size, workers)
    entry = make_entry(ckpt, int8, outputs, y, min_agreement, {
        "calibration_images": sum(len(b) for b in calibration), "calibration_seed": seed,
        "val_images": int(len(y)), "val_decode_errors": n_bad})
    publish(ckpt, entry, int8)
    passing = passing_engines(entry)
    for name in (n for n in entry["engines"] if passing and n not in passing):
        log.warning("int8 export kept for %s only: %s", ", ".join(passing), engine_refusal(entry, name, passing, ckpt))
    if not entry["passed"]:
        raise ExportError(int8_path_for(ckpt.weights), f"int8 export refused: {guard_text(entry)}"
                          f"{failure_detail(entry)} on {len(y)} val images; not written (the fp32 export stays; "
                          "the attempt is recorded in metadata.json)")
    return entry


def pick(samples: Sequence["Sample"], n: int, seed: int) -> list["Sample"]:
    """``n`` samples chosen with a seeded shuffle (all of them when there are fewer)."""
    order = np.random.default_rng(seed).permutation(len(samples))[:n]
    return [samples[i] for i in sorted(order)]


def decoded(samples: Sequence["Sample"], preset: Any, batch_size: int,
            workers: int | None) -> Iterator[tuple[list["Sample"], np.ndarray]]:
    """(the decodable samples, their (N, 3, S, S) uint8 batch), chunk by chunk."""
    from hierarchy.data.batches import decode_batches, decode_item

    chunks = decode_batches([s.path for s in samples], lambda p: decode_item(p, [preset]), batch_size, workers)
    for k, items in enumerate(chunks):
        good = [(s, d) for s, d in zip(samples[k * batch_size:(k + 1) * batch_size], items) if d.error is None]
        if good:
            yield [s for s, _ in good], np.stack([d.array(preset) for _, d in good])
        else:
            yield [], np.zeros((0, 3, preset.size, preset.size), np.uint8)


def calibration_batches(ckpt: "Checkpoint", samples: Sequence["Sample"], batch_size: int, workers: int | None,
                        transform: Callable[[np.ndarray], np.ndarray] | None) -> list[np.ndarray]:
    preset = ckpt.preset
    out = []
    for _, batch in decoded(samples, preset, batch_size, workers):
        if len(batch):
            x = preset.normalize_array(batch)
            out.append(np.ascontiguousarray(transform(x) if transform else x, dtype=np.float32))
    if not out:
        raise DatasetError(f"{ckpt.run_dir}: none of the {len(samples)} calibration image(s) could be decoded")
    return out


class BatchReader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over a list of input batches."""

    def __init__(self, batches: Sequence[np.ndarray]):
        self.batches, self.position = list(batches), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {INPUT_NAME: self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


def quantize_bytes(fp32: bytes, calibration: Sequence[np.ndarray], out_path: Path) -> bytes:
    """ONNX Runtime's static quantisation of ``fp32``: pre-processed first (shape inference, and
    BatchNorm folded into the convolutions, without which no Conv is fused with its QDQ pair and the
    int8 model runs at half the fp32 speed), then QDQ, per-channel int8 weights, uint8 activations (the
    VNNI kernels' u8s8 layout), MinMax ranges from ``calibration``."""
    import logging
    import tempfile

    quantization = import_runtime("onnxruntime.quantization", "onnx", "onnx")
    with tempfile.TemporaryDirectory(prefix="hierarchy-int8-") as tmp:
        src, pre, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        atomic_write_bytes(src, fp32)
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the quantiser logs advice on the root logger
        try:
            quantization.quant_pre_process(str(src), str(pre))
            quantization.quantize_static(
                pre, dst, BatchReader(calibration), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
                calibrate_method=quantization.CalibrationMethod.MinMax)  # per-batch ReduceMin/Max: small
        except Exception as e:  # noqa: BLE001 - the quantiser raises many types
            raise ExportError(out_path, f"ONNX Runtime's quantiser failed ({type(e).__name__}: {e})") from e
        finally:
            quiet.setLevel(level)
        return dst.read_bytes()


def guard_backends(ckpt: "Checkpoint", fp32: bytes, int8: bytes) -> dict[str, Any]:
    """The fp32 reference (ONNX Runtime on the verified export) and the int8 model on every installed
    int8 engine, as :class:`~hierarchy.engine.backends.base.Backend` objects."""
    from hierarchy.engine.backends import onnx_backend, openvino_backend
    from hierarchy.engine.exported import runtime_installed

    ort = import_runtime("onnxruntime", "onnx", "onnx")
    path = int8_path_for(ckpt.weights)
    cpu = ["CPUExecutionProvider"]
    out: dict[str, Any] = {
        "fp32": onnx_backend.OnnxBackend(onnx_backend.make_session(ort, fp32, cpu, path), ckpt.preset),
        "onnx": onnx_backend.OnnxBackend(onnx_backend.make_session(ort, int8, cpu, path), ckpt.preset, "cpu", "int8")}
    if runtime_installed("openvino"):
        core = import_runtime("openvino", "openvino", "openvino").Core()
        out["openvino"] = openvino_backend.OpenVinoBackend(
            openvino_backend.compile_model(core, int8, "int8", path), ckpt.preset, "int8")
    return out


def run_guard_engines(ckpt: "Checkpoint", fp32: bytes, int8: bytes, val: Sequence["Sample"], batch_size: int,
                      workers: int | None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray, int]:
    """(logits, features) of every guard backend on the decodable val images, their labels, and the
    number that could not be decoded."""
    backends = guard_backends(ckpt, fp32, int8)
    index = {lab: i for i, lab in enumerate(ckpt.meta.labels)}
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in backends}
    ys: list[int] = []
    for good, batch in decoded(val, ckpt.preset, batch_size, workers):
        if len(batch):
            ys += [index[s.label] for s in good]
            for name, backend in backends.items():
                parts[name].append(backend.run(batch))
    if not ys:
        raise DatasetError(f"{ckpt.run_dir}: none of the {len(val)} val image(s) could be decoded")
    outputs = {name: (np.concatenate([p[0] for p in got]), np.concatenate([p[1] for p in got]))
               for name, got in parts.items()}
    return outputs, np.asarray(ys, np.int64), len(val) - len(ys)


def make_entry(ckpt: "Checkpoint", int8: bytes, outputs: dict[str, tuple[np.ndarray, np.ndarray]], y: np.ndarray,
               min_agreement: float, counts: dict[str, Any]) -> dict[str, Any]:
    """The ``int8`` metadata entry: the guard's numbers for the worst int8 engine at the top level,
    every engine's under ``engines``."""
    import datetime

    from hierarchy import __version__
    from hierarchy.engine.int8_guard import drift_warnings, guard_metrics
    from hierarchy.ood.scores import load_scorer

    scorer = load_scorer(ckpt.meta.ood, ckpt.run_dir)
    engines = {name: guard_metrics(outputs["fp32"], got, y, ckpt.meta.temperature, scorer)
               for name, got in outputs.items() if name != "fp32"}
    worst = min(engines, key=lambda name: engines[name]["agreement"])
    failed = [name for name, m in engines.items() if m["agreement"] < min_agreement]
    for name, m in engines.items():
        for warning in drift_warnings(m):
            log.warning("int8 on %s: %s", name, warning)
    path = int8_path_for(ckpt.weights)
    return {"file": path.name, "sha256": hashlib.sha256(int8).hexdigest(), "source": ckpt.weights.name,
            "source_sha256": ckpt.weights_sha256, "quantizer": "onnxruntime.quantization.quantize_static",
            "format": "QDQ", "weights": "int8 per-channel", "activations": "uint8 per-tensor",
            "calibration": "minmax", **counts, **engines[worst], "guard_engine": worst,
            "engines": engines, "min_agreement": min_agreement,
            "passed": len(failed) < len(engines),  # usable on the engines that passed (passing_engines)
            "reason": f"failed on {', '.join(failed)}" if failed else None,
            "onnxruntime": import_runtime("onnxruntime", "onnx", "onnx").__version__, "hierarchy": __version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def publish(ckpt: "Checkpoint", entry: dict[str, Any], int8: bytes) -> None:
    """Write the int8 file (atomically) if it passed, remove any older one if not, and record ``entry``."""
    from hierarchy.models.metadata import read_metadata, update_metadata

    path = int8_path_for(ckpt.weights)
    if entry["passed"]:
        atomic_write_bytes(path, int8)
    else:
        path.unlink(missing_ok=True)
    fresh = read_metadata(ckpt.meta_path)  # re-read so a concurrent change is not lost
    update_metadata(ckpt.meta_path, **{INT8_KEY: {**int8_entries(fresh), export_key(path, ckpt.run_dir): entry}})
