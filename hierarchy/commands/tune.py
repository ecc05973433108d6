"""hierarchy tune PIPELINE|RUN_DIR: measure the engines, precisions, memory formats and batch sizes
of each stage on this machine (or, with --train, the training step), cache the pick and print the table."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="measure which engine/precision/batch serves each stage fastest here",
                       description="Time every candidate (engine x precision x memory format, then batch sizes) "
                       "on the stage's own model and input size, ignoring and then overwriting the cache that "
                       "`run`, `evaluate`, `calibrate` and `serve` read for `--engine auto` / `--precision auto`. "
                       "With --train, time the training step (forward + backward + optimizer) in each precision "
                       "and memory format instead, as `hierarchy train` does for `precision: auto`. The machine "
                       "comes first in the output. HIERARCHY_TUNE=off makes the other commands skip measuring. "
                       "See docs/tuning.md.")
    p.add_argument("target", metavar="PIPELINE|RUN_DIR", help="pipeline YAML (every stage) or a run directory")
    p.add_argument("--train", action="store_true", help="time the training step instead of inference")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default: auto)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from hierarchy.core import machine
    from hierarchy.engine.tune import checkpoints_of, render_table, tune_checkpoint

    results = []
    for name, ckpt in checkpoints_of(args.target):
        if args.train:
            from hierarchy.train.tune import tune_run

            results.append((name, tune_run(ckpt, args.device)))
        else:
            results.append((name, tune_checkpoint(ckpt, args.device, refresh=True)[0]))
    if args.format == "json":
        print(json.dumps({"machine": machine.describe(), "stages": [
            {"stage": name, **r.to_dict(), "measured_at": r.measured_at, "cache": r.cache} for name, r in results]},
            indent=2))
    else:
        print(machine.header())
        print("\n\n".join(render_table(name, r) for name, r in results))
    return 0
