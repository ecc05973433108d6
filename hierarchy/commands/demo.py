"""hierarchy demo: the end-to-end workflow on generated data, offline, in a few minutes on a CPU."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on generated data (no download, CPU ok)",
                       description="Generate HAM10000-style and COCO-style data (synthetic pixels, real formats), "
                       "build the skin_vs_nonskin dataset, train briefly from scratch, write a pipeline and run it "
                       "on held-back generated images.")
    p.add_argument("--out", default="hierarchy-demo", metavar="DIR", help="demo directory (recreated; default ./hierarchy-demo)")
    p.add_argument("--small", action="store_true", help="tiny sizes (used by the test suite)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hierarchy.commands._demo import FULL, SMALL, run_demo

    return run_demo(Path(args.out), SMALL if args.small else FULL, device=args.device)
