"""hierarchy export RUN_DIR_OR_PIPELINE [--int8 --data DATASET]: write ONNX models for `hierarchy run --engine onnx`
(and the guarded int8 model for `--precision int8`)."""
from __future__ import annotations

import argparse

from hierarchy.commands import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's model to ONNX for `run --engine onnx`",
                       description="Export the fp32 model of a run directory (or of every stage of a pipeline YAML) "
                       "to ONNX: input = normalised float32 (N, 3, S, S), outputs logits and features, dynamic batch. "
                       "ONNX Runtime's outputs are checked against torch's before the file is written (atomically), "
                       "and metadata.json records the export with the SHA-256 of the file and of its weights. "
                       "Needs torch and the onnx extra (pip install 'hierarchy-cascade[onnx]'). See docs/performance.md.")
    p.add_argument("target", metavar="RUN_DIR_OR_PIPELINE",
                   help="training run directory (or its .safetensors / metadata.json), or a pipeline YAML")
    p.add_argument("--out", metavar="PATH", help="output file (default: beside the weights, best.onnx); run only")
    p.add_argument("--opset", type=positive_int, default=None, metavar="N", help="ONNX opset (default: 17)")
    p.add_argument("--checkpoint", choices=("best", "last"), default=None,
                   help="which weights of a run directory (default: best); run only")
    p.add_argument("--format", choices=("table", "json"), default="table")
    q = p.add_argument_group("int8", "post-training static quantisation of the export (see docs/int8.md)")
    q.add_argument("--int8", action="store_true",
                   help="also write best.int8.onnx for `--precision int8`: quantised on the stage's own training "
                   "images, kept only if its top-1 agrees with fp32 on the val split (run only; needs --data)")
    q.add_argument("--data", metavar="DATASET", help="the stage's labelled data with train/val splits "
                   "(build-dataset output, split tree or CSV)")
    q.add_argument("--calibration-images", type=positive_int, default=None, metavar="N",
                   help="training images to calibrate on (default: 256)")
    q.add_argument("--min-agreement", type=float, default=None, metavar="F",
                   help="least top-1 agreement with fp32 on val, a share (default: 0.995); below it the int8 "
                   "file is refused")
    p.set_defaults(func=run)


def int8_flags_problems(args: argparse.Namespace) -> list[str]:
    """Flags of the int8 group that make no sense together."""
    from pathlib import Path

    if not args.int8:
        given = [flag for flag, value in (("--data", args.data), ("--calibration-images", args.calibration_images),
                                          ("--min-agreement", args.min_agreement)) if value is not None]
        return [f"{flag} applies to --int8 only" for flag in given]
    problems = [] if args.data else ["--int8 needs --data DATASET (the stage's data with train and val splits)"]
    if Path(args.target).suffix.lower() in (".yaml", ".yml"):
        problems.append("--int8 applies to one run directory (each stage has its own data), not a pipeline")
    return problems


def export_int8(item: dict, args: argparse.Namespace) -> dict:
    """Quantise the checkpoint just exported, on the train split of --data, checked on its val split."""
    from pathlib import Path

    from hierarchy.engine.backends.base import Checkpoint
    from hierarchy.engine.quantize import DEFAULT_CALIBRATION_IMAGES, DEFAULT_MIN_AGREEMENT, quantize_checkpoint
    from hierarchy.evaluate.runner import select_samples

    ckpt = Checkpoint.open(item["weights"])
    labels = list(ckpt.meta.labels)
    train, _ = select_samples(Path(args.data), "train", labels=labels)
    val, _ = select_samples(Path(args.data), "val", labels=labels)
    minimum = DEFAULT_MIN_AGREEMENT if args.min_agreement is None else args.min_agreement
    return quantize_checkpoint(ckpt, train, val, min_agreement=minimum,
                               calibration_images=args.calibration_images or DEFAULT_CALIBRATION_IMAGES)


def run(args: argparse.Namespace) -> int:
    import json

    from hierarchy.core.errors import ConfigError
    from hierarchy.engine.export import DEFAULT_OPSET, export

    problems = int8_flags_problems(args)
    if problems:
        raise ConfigError("command line", problems)
    done = export(args.target, out=args.out, opset=args.opset or DEFAULT_OPSET, checkpoint=args.checkpoint)
    if args.int8:
        done = [{**item, "int8": export_int8(item, args)} for item in done]
    if args.format == "json":
        print(json.dumps(done, indent=2))
        return 0
    for item in done:
        stages = f" (stages: {', '.join(item['stages'])})" if item.get("stages") else ""
        print(f"{item['onnx']}: from {item['weights']}{stages}, opset {item['opset']}, {item['exporter']} exporter, "
              f"max |logit diff| vs torch {item['max_abs_logit_diff']:.2g}")
        if "int8" in item:
            print(render_int8(item["int8"]))
    return 0


def render_int8(entry: dict) -> str:
    from hierarchy.engine.quantize import guard_text, passing_engines

    passing = passing_engines(entry)
    per_engine = "; ".join(f"{name} {100 * m['agreement']:.2f}% ({'serves it' if name in passing else 'refused'})"
                           for name, m in entry["engines"].items())
    flips = entry.get("ood_decision_flips")
    return (f"{entry['file']}: int8 (QDQ) from {entry['calibration_images']} training images; {guard_text(entry)} "
            f"on {entry['val_images']} val images ({per_engine}); ECE fp32 {entry['ece_fp32']:.4f} -> int8 "
            f"{entry['ece_int8']:.4f}" + ("" if flips is None else f"; OOD decisions flipped {100 * flips:.2f}%"))
