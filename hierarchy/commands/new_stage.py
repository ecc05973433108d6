"""hierarchy new-stage NAME: scaffold a pip-installable stage plugin package."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("new-stage", help="scaffold a new stage plugin package",
                       description="Write a plugin distribution for a new stage: pyproject.toml with the "
                       "'hierarchy.stages' entry point, a plugin module (labels + a folder-based dataset whose "
                       "sub-folder names are the labels), a test that uses it through the registry, and a README. "
                       "Then: pip install -e DIR && hierarchy stages.")
    p.add_argument("name", metavar="NAME", help="stage name: a-z first, then a-z, 0-9, _ or - (e.g. acne_type); "
                   "the rule `register()` applies")
    p.add_argument("--dist", metavar="NAME", help="distribution name (default: hierarchy-NAME, _ as -)")
    p.add_argument("--package", metavar="NAME", help="import package name (default: hierarchy_NAME, - as _)")
    p.add_argument("--dir", metavar="DIR", help="output directory (default: ./DIST)")
    p.add_argument("--labels", metavar="A,B,...",
                   help="comma-separated labels, at least 2 (default: positive,negative)")
    p.add_argument("--force", action="store_true", help="replace DIR if it already exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hierarchy.commands._scaffold import parse_labels, validate, write_package

    spec = validate(args.name, parse_labels(args.labels), dist=args.dist, package=args.package)
    target = Path(args.dir) if args.dir else Path(spec.dist)
    written = write_package(spec, target, force=args.force)
    for path in written:
        print(path)
    print(f"created {spec.dist} (stage '{spec.name}', labels {', '.join(spec.labels)}) in {target}. Next:\n"
          f"  pip install -e {target}\n  hierarchy stages\n  cd {target} && python -m pytest", file=sys.stderr)
    return 0
