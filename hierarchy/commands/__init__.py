"""One module per CLI command, each with ``add_parser(subparsers)``; shared option groups live here."""
from __future__ import annotations

import argparse
from typing import Callable


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type for counts: a usage error (exit 2) unless a whole number in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be >= {low}" + (f" and <= {high}" if high is not None else "")
                                             + f", got {value}")
        return value

    return parse


positive_int = whole_number(1)


def add_inference_options(p: argparse.ArgumentParser, workers: bool = True) -> None:
    """--batch-size, --device, --precision, --engine (and --workers): the options of every command
    that predicts. Engine names are checked by the engine registry, the one place that knows them."""
    from hierarchy.core.precision import PRECISIONS
    from hierarchy.engine.backends import ENGINES, engine_names

    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="default: the batch size tuning picked for the root stage (hierarchy tune), else 32")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default: auto)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto (default): the fastest one measured on this machine (docs/tuning.md); "
                   "with HIERARCHY_TUNE=off bf16 on CPUs with AMX and on CUDA, else fp32")
    engines = "; ".join(f"{name}: {spec.summary}" for name, spec in ENGINES.items())
    p.add_argument("--engine", default="auto", metavar="|".join(engine_names()),
                   help=f"auto (default): an exported engine whose runtime is installed and whose export is "
                   f"up to date, else torch (the log says which and why); {engines}")
    if workers:
        p.add_argument("--workers", type=positive_int, default=None, metavar="N", help="decode threads (default: cores)")
