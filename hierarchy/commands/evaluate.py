"""hierarchy evaluate PIPELINE DATA: per-stage and end-to-end metrics, plots and a report."""
from __future__ import annotations

import argparse
import sys

from hierarchy.commands import add_inference_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="measure a pipeline on labelled data (report + plots)",
                       description="Run the pipeline over labelled DATA (a build-dataset output or its manifest.csv, "
                       "an ImageFolder tree DATA/<label>/..., a train/ val/ tree, or a CSV path,label[,<stage id>...]) "
                       "and report, per stage and end to end: accuracy, per-class P/R/F1, confusion, ROC-AUC, "
                       "ECE before/after temperature, coverage/abstention, risk-coverage, hierarchical P/R/F1 and "
                       "error attribution. `label` is the deepest true label; per-stage truth is derived from the "
                       "routes, and CSV columns named after stage ids override it (blank = not applicable). "
                       "See docs/evaluation.md.")
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("data", help="labelled data (see above)")
    p.add_argument("--out", metavar="DIR", help="report directory (default runs/evaluate/<pipeline name>; "
                   "never overwritten: DIR2, DIR3... when taken)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="stdout: summary table or report JSON")
    p.add_argument("--split", choices=("train", "val", "test", "all"),
                   help="which split (default: val when the data has splits, else all)")
    add_inference_options(p)
    p.add_argument("--ood", metavar="DIR", help="folder of known out-of-distribution images: report AUROC, FPR at "
                   "95%% TPR and share rejected per stage, score histograms, risk-coverage with them (docs/ood.md)")
    p.add_argument("--by", action="append", default=[], metavar="COL[,COL...]",
                   help="per-subgroup results of every stage and end to end, with bootstrap 95%% intervals, for "
                   "each metadata column of DATA (a CSV column or a builder manifest's, e.g. sex, localization); "
                   "bucket a numeric one: age:0-30,30-60,60- ; repeatable")
    p.add_argument("--n-resamples", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from hierarchy.evaluate.runner import evaluate
    from hierarchy.evaluate.report import safe_name, summary_table, write_evaluation
    from hierarchy.engine.pipeline import load_pipeline

    pipe = load_pipeline(args.pipeline)
    ev = evaluate(pipe, Path(args.data), split=args.split, batch_size=args.batch_size, device=args.device,
                  precision=args.precision, engine=args.engine, workers=args.workers,
                  ood=Path(args.ood) if args.ood else None, by=args.by, n_resamples=args.n_resamples,
                  seed=args.seed)
    ev.report["pipeline"]["file"] = str(args.pipeline)
    out = write_evaluation(ev, Path(args.out) if args.out else Path("runs") / "evaluate" / safe_name(pipe.name))
    if args.format == "json":
        print(json.dumps({**ev.report, "out": str(out)}, indent=2, default=str))
    else:
        print(summary_table(ev.report, out))
        if ev.report.get("ood"):
            from hierarchy.evaluate.ood import ood_summary_line

            print(ood_summary_line(ev.report))
    print(f"wrote {out}", file=sys.stderr)
    return 0
