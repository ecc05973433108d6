"""hierarchy export RUN_DIR_OR_PIPELINE: write ONNX models for `hierarchy run --engine onnx`."""
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from hierarchy.engine.export import DEFAULT_OPSET, export

    done = export(args.target, out=args.out, opset=args.opset or DEFAULT_OPSET, checkpoint=args.checkpoint)
    if args.format == "json":
        print(json.dumps(done, indent=2))
        return 0
    for item in done:
        stages = f" (stages: {', '.join(item['stages'])})" if item.get("stages") else ""
        print(f"{item['onnx']}: from {item['weights']}{stages}, opset {item['opset']}, {item['exporter']} exporter, "
              f"max |logit diff| vs torch {item['max_abs_logit_diff']:.2g}")
    return 0
