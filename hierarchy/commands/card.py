"""hierarchy card RUN_DIR|PIPELINE: write MODEL_CARD.md (intended use, data, recipe, metrics, subgroups, OOD)."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("card", help="write a model card (MODEL_CARD.md) for a run or a pipeline",
                       description="Write MODEL_CARD.md for a training run (and the same fields under `card` in its "
                       "metadata.json) or for a pipeline (and MODEL_CARD.json beside it): intended and out-of-scope "
                       "use (default: not a diagnosis; editable with the flags below and kept on regeneration), "
                       "training data (sources, counts per label and split, manifest sha256), recipe, validation "
                       "metrics, every evaluation report found under the run or given with --report (subgroup "
                       "results included), OOD behaviour, limitations, versions and hashes.")
    p.add_argument("target", metavar="RUN_DIR|PIPELINE", help="training run directory or pipeline YAML")
    p.add_argument("--report", action="append", default=[], metavar="DIR",
                   help="an evaluation directory (or its report.json) to include; repeatable")
    p.add_argument("--intended-use", metavar="TEXT", help="replace the intended-use statement")
    p.add_argument("--out-of-scope", metavar="TEXT", help="replace the out-of-scope statement")
    p.add_argument("--limitation", action="append", default=[], metavar="TEXT",
                   help="the limitations (repeatable; replaces the list)")
    p.add_argument("--out", metavar="DIR", help="pipeline cards: write here instead of beside the YAML")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hierarchy.engine.card import write_pipeline_card, write_run_card
    from hierarchy.engine.pipeline import load_pipeline

    edits = {"intended_use": args.intended_use, "out_of_scope": args.out_of_scope, "limitations": args.limitation}
    target = Path(args.target)
    reports = [Path(r) for r in args.report]
    if target.is_file() and target.suffix in (".yaml", ".yml"):
        path = write_pipeline_card(load_pipeline(target), target, Path(args.out) if args.out else None,
                                   reports=reports, edits=edits)
    else:
        path = write_run_card(target, reports=reports, edits=edits)
    print(path)
    print(f"wrote {path}", file=sys.stderr)
    return 0
