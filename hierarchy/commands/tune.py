"""hierarchy tune PIPELINE|RUN_DIR: measure the engines, precisions, memory formats and batch sizes
of each stage on this machine (or, with --train, the training step), cache the pick and print the table."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hierarchy.engine.tune import TuneResult


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
    from hierarchy.engine.tune import checkpoints_of, tune_checkpoint

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


def render_table(name: str, result: "TuneResult") -> str:
    """The candidates of one tuning as a text table, fastest first, then the batch sweep."""
    from hierarchy.engine.tune import display_path

    best = result.best_img_s
    lines = [f"{name}: picked {result.pick.label()} batch {result.batch} (cache {display_path(result.cache)})",
             f"  {'engine':<9} {'precision':<9} {'memory format':<14} {'batch':>5} {'img/s':>8} {'ratio':>6} "
             f"{'start s':>7}  picked"]
    for m in sorted(result.measurements, key=lambda m: -m.img_s):
        c = m.candidate
        mark = "*" if c == result.pick else ""
        lines.append(f"  {c.engine:<9} {c.precision:<9} {c.memory_format:<14} {m.batch:>5} {m.img_s:>8.1f} "
                     f"{m.img_s / best:>6.2f} {m.start_s:>7.2f}  {mark:<6}{m.note}".rstrip())
    if result.batches:
        sweep = ", ".join(f"{n}: {r:.1f}" for n, r in result.batches.items())
        lines.append(f"  batch sweep of {result.pick.label()} (img/s): {sweep}; decode threads {result.workers}")
    return "\n".join(lines)
