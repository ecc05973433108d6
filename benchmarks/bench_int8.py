"""INT8 vs fp32, model only: ONNX Runtime and OpenVINO on the exported model and its int8 (QDQ) version.

    python benchmarks/bench_int8.py                         # untrained ResNet18 at 224: speed only
    python benchmarks/bench_int8.py --run RUN --data DATA   # a trained run: `export --int8` guard + speed

Without ``--run`` the model is an untrained ResNet18 written by the benchmark, quantised on generated
600x450 JPEGs without the agreement guard (an untrained model's near-equal logits make top-1
agreement meaningless), so only its speed counts. With ``--run RUN --data DATA`` the run is exported
and quantised as ``hierarchy export RUN --int8 --data DATA`` does (calibrated on the train split,
guarded on the val split) and the guard's numbers are printed per engine. Throughput: pre-decoded uint8
batches through each engine's backend (normalisation included, decode excluded), rounds interleaved
so every row sees the same load; the median of the rounds is reported.
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import export_for_onnx, load, make_jpegs, median, table, write_checkpoint


def backends(ckpt: Any, fp32: bytes, int8: bytes) -> dict[str, Any]:
    """(engine, precision) -> a Backend on the given model bytes."""
    from hierarchy.engine.backends import onnx_backend, openvino_backend
    from hierarchy.engine.exported import import_runtime

    ort = import_runtime("onnxruntime", "onnx", "onnx")
    cpu = ["CPUExecutionProvider"]
    session = lambda model: onnx_backend.make_session(ort, model, cpu, ckpt.weights)  # noqa: E731
    out = {("onnx", "fp32"): onnx_backend.OnnxBackend(session(fp32), ckpt.preset),
           ("onnx", "int8"): onnx_backend.OnnxBackend(session(int8), ckpt.preset, "cpu", "int8")}
    if importlib.util.find_spec("openvino") is not None:
        core = import_runtime("openvino", "openvino", "openvino").Core()
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        for precision, model in (("fp32", fp32), ("auto", fp32), ("int8", int8)):
            chosen = openvino_backend.select_precision(caps, precision)
            compiled = openvino_backend.compile_model(core, model, chosen, ckpt.weights)
            out[("openvino", f"{precision} ({chosen})" if precision == "auto" else precision)] = \
                openvino_backend.OpenVinoBackend(compiled, ckpt.preset, chosen)
    return out


def throughput(backend: Any, batches: list[np.ndarray]) -> float:
    t = time.perf_counter()
    for b in batches:
        backend.run(b)
    return sum(len(b) for b in batches) / (time.perf_counter() - t)


def speed_rows(ckpt: Any, fp32: bytes, int8: bytes, batches: list[np.ndarray], repeats: int) -> list[list[str]]:
    found = backends(ckpt, fp32, int8)
    for backend in found.values():  # warm-up: first-call allocations and kernel selection
        backend.run(batches[0])
    rates: dict[Any, list[float]] = {key: [] for key in found}
    for _ in range(repeats):
        for key, backend in found.items():
            rates[key].append(throughput(backend, batches))
    rows = []
    for (engine, precision), got in rates.items():
        base = median(rates[(engine, "fp32")])
        rows.append([engine, precision, f"{median(got):.1f}", f"{median(got) / base:.2f}x"])
    return rows


def trained(run: Path, data: Path, args: argparse.Namespace) -> tuple[Any, bytes | None]:
    """Export and quantise a trained run like `hierarchy export --int8` does; print its guard. The
    int8 bytes are None when the guard refused the export (its numbers are printed all the same)."""
    from hierarchy.core.errors import ExportError
    from hierarchy.engine.backends.base import Checkpoint
    from hierarchy.engine.quantize import int8_entry, int8_path_for, passing_engines, quantize_checkpoint
    from hierarchy.evaluate.runner import select_samples

    export_for_onnx(run)
    ckpt = Checkpoint.open(run)
    train, _ = select_samples(data, "train", labels=ckpt.meta.labels)
    val, _ = select_samples(data, "val", labels=ckpt.meta.labels)
    t = time.perf_counter()
    refused = None
    try:
        quantize_checkpoint(ckpt, train, val, calibration_images=args.calibration_images,
                            batch_size=args.batch, min_agreement=args.min_agreement)
    except ExportError as exc:  # the guard said no: still a result
        refused = str(exc)
    ckpt = Checkpoint.open(run)  # metadata.json now holds the attempt
    entry = int8_entry(ckpt) or {}
    print(f"quantised and guarded in {time.perf_counter() - t:.1f} s on {entry.get('calibration_images')} training "
          f"and {entry.get('val_images')} val images")
    print(table(["int8 engine", "top-1 agreement", "acc fp32", "acc int8", "AUROC fp32", "AUROC int8", "ECE fp32",
                 "ECE int8", "OOD flips", "OOD corr", "serves int8"],
                [[name, pct(m["agreement"]), *(num(m.get(k)) for k in ("accuracy_fp32", "accuracy_int8", "auroc_fp32",
                                                                     "auroc_int8", "ece_fp32", "ece_int8")),
                  pct(m["ood_decision_flips"]), num(m["ood_score_correlation"]),
                  "yes" if name in passing_engines(entry) else "no (guard)"]
                 for name, m in entry.get("engines", {}).items()]))
    if refused:
        print(f"refused: {refused}")
        return ckpt, None
    return ckpt, int8_path_for(ckpt.weights).read_bytes()


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def untrained(folder: Path, images: list[Path], batch: int) -> tuple[Any, bytes]:
    from hierarchy.data.labelled import Sample
    from hierarchy.engine.backends.base import Checkpoint
    from hierarchy.engine.exported import read_verified_export
    from hierarchy.engine.quantize import calibration_batches, int8_path_for, quantize_bytes

    run = write_checkpoint(folder / "run")
    export_for_onnx(run)
    ckpt = Checkpoint.open(run)
    calibration = calibration_batches(ckpt, [Sample(p, "skin") for p in images], batch, None, None)
    return ckpt, quantize_bytes(read_verified_export(ckpt), calibration, int8_path_for(ckpt.weights))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="images per timed round")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calibration-images", type=int, default=256)
    ap.add_argument("--min-agreement", type=float, default=0.995)
    ap.add_argument("--run", type=Path, help="a trained run directory (with --data)")
    ap.add_argument("--data", type=Path, help="its dataset (train/val splits)")
    ap.add_argument("--images", type=Path, help="folder for the generated JPEGs (default: a temp dir)")
    args = ap.parse_args()
    if (args.run is None) != (args.data is None):
        ap.error("--run and --data go together")
    from hierarchy.core.machine import header

    print(header())
    print(load(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        images = make_jpegs(args.images or Path(tmp) / "imgs", min(args.n, 64))
        ckpt, int8 = trained(args.run, args.data, args) if args.run else untrained(Path(tmp), images, args.batch)
        if int8 is None:
            return  # refused by its guard: there is no int8 model to time
        from hierarchy.data.batches import decode_item
        from hierarchy.engine.exported import read_verified_export

        arrays = [decode_item(p, [ckpt.preset]).array(ckpt.preset) for p in images]
        pool = np.stack([arrays[i % len(arrays)] for i in range(args.n)])
        batches = [pool[i:i + args.batch] for i in range(0, args.n, args.batch)]
        rows = speed_rows(ckpt, read_verified_export(ckpt), int8, batches, args.repeats)
    model = f"{ckpt.meta.arch['backbone']} at {ckpt.preset.size}" + ("" if args.run else " (untrained)")
    print(f"\nmodel only, {model}, batch {args.batch}, {args.n} images x {args.repeats} interleaved rounds; {load()}")
    print(table(["engine", "precision", "img/s", "vs fp32 (same engine)"], rows))


if __name__ == "__main__":
    main()
