"""hierarchy bundle PIPELINE -o FILE: one verified file with the pipeline, weights, exports and cards."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bundle", help="pack a pipeline and everything it loads into one verified file",
                       description="Write one zip file with the pipeline YAML (weights paths rewritten inside), every "
                       "stage's weights, metadata.json, OOD scorer, ONNX exports and model cards, plus a manifest of "
                       "sha256 hashes. `hierarchy run|evaluate|validate` accept the bundle wherever they accept a "
                       "pipeline; they verify every hash first and refuse a tampered bundle naming the member.")
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("-o", "--out", required=True, metavar="FILE", help="bundle to write (e.g. triage.hbundle)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hierarchy.engine.bundle import write_bundle

    manifest = write_bundle(args.pipeline, args.out)
    total = sum(m["size"] for m in manifest["members"].values())
    print(args.out)
    print(f"wrote {args.out}: {len(manifest['members'])} member(s), {total} bytes before compression", file=sys.stderr)
    return 0
