"""hierarchy stages: list registered stage plugins (and broken ones)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stages", help="list installed stage plugins",
                       description="Stages registered through the 'hierarchy.stages' entry point: name, labels, "
                       "distribution, description, module file and whether the install is editable. Broken "
                       "plugins are listed as warnings on stderr.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--strict", action="store_true", help="exit 1 when any plugin is broken (for plugin CI)")
    p.set_defaults(func=run)


def stage_rows() -> list[dict[str, Any]]:
    """One dict per registered stage: its info plus where it comes from."""
    from hierarchy.registry import get_registry

    rows = []
    for _, entry in sorted(get_registry().stages.items()):
        module = sys.modules.get(entry.cls.__module__)
        rows.append({**entry.cls.info(), "dist": entry.plugin.dist, "version": entry.plugin.version,
                     "plugin": entry.plugin.name, "module": entry.cls.__module__,
                     "file": getattr(module, "__file__", None), "editable": entry.plugin.editable})
    return rows


def run(args: argparse.Namespace) -> int:
    from hierarchy.registry import get_registry

    reg = get_registry()
    rows = stage_rows()
    if args.json:
        print(json.dumps({"stages": rows, "broken": [f.to_dict() for f in reg.failures]}, indent=2))
    else:
        for r in rows:
            origin = f"{r['dist'] or '-'} {r['version'] or ''}".strip()
            if r["editable"]:
                origin += f" (editable: {r['editable']})"
            print(f"{r['name']:<24} {','.join(r['labels']):<40} {origin}")
            if r["description"]:
                print(f"    {r['description']}")
            print(f"    {r['file'] or r['module']}")
        if not rows:
            print("no stages installed", file=sys.stderr)
    for f in reg.failures:
        print(f"warning: broken {f}", file=sys.stderr)
    return 1 if args.strict and reg.failures else 0
