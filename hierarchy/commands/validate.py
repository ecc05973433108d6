"""hierarchy validate PIPELINE: static checks only, no weights are loaded."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a pipeline YAML without loading weights",
                       description="Static checks: schema, registered stages, routes, label coverage, cycles, "
                       "reachability. Prints 'ok' or every error (exit 2).")
    p.add_argument("pipeline", help="pipeline YAML file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hierarchy.engine.pipeline import load_pipeline

    pipe = load_pipeline(args.pipeline)
    print(f"ok: pipeline '{pipe.name}' with {len(pipe.stages)} stage(s): {' -> '.join(pipe.depth_order())}")
    return 0
