"""hierarchy build-dataset STAGE: build a stage's manifest.csv + dataset.json from its sources."""
from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-dataset", help="build a stage's dataset manifest from its sources",
                       description="Scan the stage's sources (HAM10000, COCO, folders, types from plugins), "
                       "split without leaks (HAM10000 by lesion_id), balance, and write manifest.csv + dataset.json "
                       "into --out.")
    p.add_argument("stage", help="stage name (see `hierarchy stages`)")
    p.add_argument("--config", metavar="FILE", help="stage config YAML (dataset: and train: sections)")
    p.add_argument("--ham10000", metavar="DIR", help="root of the HAM10000 source")
    p.add_argument("--coco", metavar="DIR", help="root of the COCO source")
    p.add_argument("--source", action="append", metavar="NAME=DIR", help="root of any named source (repeatable)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: datasets/<stage>)")
    p.add_argument("--seed", type=int, help="split seed")
    p.add_argument("--materialize", choices=("none", "link", "copy"),
                   help="also write <out>/<split>/<label>/ trees by symlink or copy")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hierarchy.registry import get_stage

    from hierarchy.config.load import load_stage_config, parse_source_roots
    from hierarchy.data.builder import build_dataset

    cls = get_stage(args.stage)
    config = load_stage_config(cls, args.config, dataset={"seed": args.seed, "materialize": args.materialize})
    roots = parse_source_roots(args.source, ham10000=args.ham10000, coco=args.coco)
    out = Path(args.out or Path("datasets") / cls.name)
    summary = build_dataset(config.dataset, out, labels=cls.labels, stage=cls.name, roots=roots)
    print(json.dumps({"out": str(out), "counts": summary.get("counts"), "problems": _problem_counts(summary)}, indent=2))
    if summary.get("num_items") == 0:
        from hierarchy.core.errors import ConfigError

        where = [f"dataset.sources.{i} ({s.key}): root {Path(roots.get(s.key) or s.root).absolute()}"
                 for i, s in enumerate(config.dataset.sources)]
        raise ConfigError(f"hierarchy build-dataset {cls.name}", [
            "no images found; relative roots are resolved against the working directory", *where])
    return 0


def _problem_counts(summary: dict) -> dict:
    problems = summary.get("problems") or {}
    return {k: (v.get("count", v) if isinstance(v, dict) else v) for k, v in problems.items()}
