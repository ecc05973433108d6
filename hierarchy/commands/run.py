"""hierarchy run PIPELINE INPUT...: route images through a cascade and print one record per input."""
from __future__ import annotations

import argparse
import sys

from hierarchy.commands import add_inference_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="classify images with a pipeline",
                       description="Route every input through the pipeline. INPUT is any mix of files, "
                       "directories (recursive, image extensions) and globs. Exit 0 when every item got a "
                       "record without error (abstentions count as ok), 3 when some items errored, 2 on a "
                       "usage or config error.")
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, directories or globs")
    p.add_argument("--format", choices=("table", "json", "jsonl", "csv"), default="table")
    p.add_argument("-o", "--output", metavar="FILE", help="write results here (atomically) instead of stdout")
    add_inference_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hierarchy.data.inputs import expand_inputs
    from hierarchy.engine.output import open_output, write_records
    from hierarchy.engine.pipeline import load_pipeline
    from hierarchy.engine.router import Router

    pipe = load_pipeline(args.pipeline)
    router = Router.from_pipeline(pipe, device=args.device, precision=args.precision, engine=args.engine)
    counts = {"ok": 0, "abstained": 0, "rejected": 0, "error": 0}
    records = _counted(router.run(expand_inputs(args.inputs), args.batch_size, args.workers), counts)
    with open_output(args.output) as out:
        write_records(_progress(records), args.format, out)
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    print(f"{sum(counts.values())} item(s): {summary or 'none'}", file=sys.stderr)
    return 3 if counts["error"] else 0


def _counted(records, counts):
    for rec in records:
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
        yield rec


def _progress(records):
    if not sys.stderr.isatty():  # tqdm's disable=None hides the bar off a terminal: skip its import too
        yield from records
        return
    from tqdm import tqdm

    # total is unknown while inputs stream; tqdm still shows count and rate on stderr
    yield from tqdm(records, desc="run", unit="img", file=sys.stderr, disable=None, mininterval=0.5)
