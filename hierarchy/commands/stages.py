"""hierarchy stages: list registered stage plugins (and broken ones)."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stages", help="list installed stage plugins",
                       description="Stages registered through the 'hierarchy.stages' entry point.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hierarchy.registry import get_registry

    reg = get_registry()
    rows = [{**entry.cls.info(), "dist": entry.plugin.dist, "version": entry.plugin.version,
             "plugin": entry.plugin.name, "module": entry.cls.__module__}
            for _, entry in sorted(reg.stages.items())]
    broken = [f.to_dict() for f in reg.failures]
    if args.json:
        print(json.dumps({"stages": rows, "broken": broken}, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<24} {','.join(r['labels']):<40} {r['dist'] or '-'} {r['version'] or ''}  ({r['module']})")
        if not rows:
            print("no stages installed", file=sys.stderr)
    for f in reg.failures:
        print(f"warning: broken {f}", file=sys.stderr)
    return 0
