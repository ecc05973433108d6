"""hierarchy run PIPELINE INPUT...: route images through a cascade and print one record per input."""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Iterator

from hierarchy.commands import add_inference_options
from hierarchy.core.errors import ConfigError
from hierarchy.core.phases import phase
from hierarchy.commands._explain import add_explain_options, with_explanations


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="classify images with a pipeline",
                       description="Route every input through the pipeline. INPUT is any mix of files, "
                       "directories (recursive, image extensions) and globs. Exit 0 when every item got a "
                       "record without error (abstentions count as ok), 3 when some items errored, 2 on a "
                       "usage or config error, 4 when -o FILE cannot be written (docs/scaling.md).")
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, directories or globs")
    p.add_argument("--format", choices=("table", "json", "jsonl", "csv"), default="table")
    p.add_argument("-o", "--output", metavar="FILE", help="write results here instead of stdout: jsonl is appended "
                   "record by record (flushed), table/json/csv are written atomically at the end")
    p.add_argument("--resume", action="store_true", help="with --format jsonl -o FILE: skip inputs FILE already "
                   "has a record for and append the rest (a torn last line is redone)")
    p.add_argument("--files-from", metavar="FILE", help="also read input paths from FILE, one per line (- = stdin)")
    p.add_argument("-0", "--null", action="store_true", help="--files-from entries are NUL-separated (find -print0)")
    p.add_argument("--shard", type=shard_arg, metavar="K/N", help="take only shard K of N (1 <= K <= N): a stable "
                   "split by path, so N machines or array tasks cover the input once with no coordination")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help="run on Ray Data (pip install "
                   "'hierarchy-cascade[ray]'): a cluster ADDRESS (ray://host:10001, auto), or a local cluster")
    add_inference_options(p)
    add_explain_options(p, directory=True)
    p.set_defaults(func=run, batch_size=None)  # no --batch-size: the tuned one (hierarchy.engine.tune)


def run(args: argparse.Namespace) -> int:
    with phase("import output, pipeline"):
        from hierarchy.engine.output import check_output, recorded_paths, write_stream
        from hierarchy.engine.pipeline import load_pipeline
    from hierarchy.engine.tune import DEFAULT_BATCH, router_batch_size

    if not args.inputs and not args.files_from:
        raise ConfigError("hierarchy run", ["INPUT: give at least one input or --files-from FILE"])
    if args.resume and (args.format != "jsonl" or args.output in (None, "-")):
        raise ConfigError("hierarchy run", ["--resume: needs --format jsonl -o FILE (only jsonl output streams)"])
    if args.ray and getattr(args, "explain", None):
        raise ConfigError("hierarchy run", ["--explain: not available with --ray"])
    check_output(args.output, args.resume)  # before any model loads or image decodes
    with phase("load pipeline"):
        pipe = load_pipeline(args.pipeline)
    done = recorded_paths(args.output) if args.resume else set()
    paths, few = _look_ahead(_inputs(args, done))
    counts = {"ok": 0, "abstained": 0, "rejected": 0, "error": 0}
    if args.ray:
        from hierarchy.engine.ray_run import ray_records

        records = ray_records(args.pipeline, paths, args.ray, batch_size=args.batch_size or DEFAULT_BATCH,
                              device=args.device, precision=args.precision, engine=args.engine)
    else:
        with phase("load stages (engine, hashes, session)"):
            from hierarchy.engine.router import Router

            router = Router.from_pipeline(pipe, device=args.device, precision=args.precision, engine=args.engine,
                                          inputs=few)
        batch_size = router_batch_size(router, args.batch_size)
        records = with_explanations(router.run(paths, batch_size, args.workers), router, args)
    with phase("decode, infer, write records"):
        write_stream(_progress(_counted(records, counts)), args.format, args.output, append=args.resume)
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    resumed = f" ({len(done)} already recorded)" if args.resume else ""
    print(f"{sum(counts.values())} item(s): {summary or 'none'}{resumed}", file=sys.stderr)
    return 3 if counts["error"] else 0


def shard_arg(text: str) -> tuple[int, int]:
    from hierarchy.data.inputs import parse_shard

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _inputs(args: argparse.Namespace, done: set[str]) -> Iterator[Path]:
    """INPUTs, then --files-from entries, expanded lazily; only --shard K/N of them; minus ``done``."""
    from hierarchy.data.inputs import expand_inputs, read_path_list, select_shard

    raw = itertools.chain(args.inputs, read_path_list(args.files_from, args.null) if args.files_from else ())
    paths = expand_inputs(raw)
    if args.shard:
        paths = select_shard(paths, *args.shard)
    return (p for p in paths if str(p) not in done) if done else paths


# Runs of fewer inputs are counted first, and the tuner weighs each engine's start-up against n / rate:
# on 2 cores `import torch` (2-3 s) outweighs a 7% faster torch step up to ~8,000 images (docs/tuning.md).
# Paths only (the router looks as far ahead for its decoder); beyond it a run keeps the fastest engine.
COUNT_AHEAD = 4096


def _look_ahead(paths: Iterator[Path]) -> tuple[Iterator[Path], int | None]:
    """The inputs, and their number when it is below COUNT_AHEAD (None: a long run)."""
    head = list(itertools.islice(paths, COUNT_AHEAD))
    return itertools.chain(head, paths), len(head) if len(head) < COUNT_AHEAD else None


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
