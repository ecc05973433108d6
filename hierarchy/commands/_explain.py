"""The explanation options shared by ``hierarchy run`` and ``hierarchy serve``."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from hierarchy.explain import DEFAULT_METHOD, METHODS

if TYPE_CHECKING:
    from hierarchy.engine.router import Router
    from hierarchy.explain.cam import Explainer


def add_explain_options(p: argparse.ArgumentParser, directory: bool = False) -> None:
    """--explain-method and --explain-layer (and, for ``run``, --explain DIR)."""
    if directory:
        p.add_argument("--explain", metavar="DIR", help="write a class-activation map (PNG) for every stage each "
                       "image visited, for the label it chose, into DIR; records name their files")
    p.add_argument("--explain-method", default=DEFAULT_METHOD, choices=tuple(METHODS),
                   help=f"CAM method of the grad-cam library (default: {DEFAULT_METHOD})")
    p.add_argument("--explain-layer", action="append", metavar="[STAGE=]MODULE",
                   help="explain this module (dotted name, e.g. layer3) instead of the backbone's last feature "
                   "map; STAGE= limits it to one stage id; repeatable")


def explainer_for(router: "Router", args: argparse.Namespace) -> "Explainer":
    from hierarchy.explain.cam import Explainer, parse_layers

    return Explainer(router, args.explain_method, parse_layers(args.explain_layer), args.device).preload()


def with_explanations(records: Iterable[dict[str, Any]], router: "Router",
                      args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """``records`` with their maps written to ``--explain DIR`` (unchanged without it)."""
    if not args.explain:
        return iter(records)
    from hierarchy.explain.files import explain_to_dir

    return explain_to_dir(records, router, explainer_for(router, args), args.explain)
