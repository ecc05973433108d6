"""hierarchy weights: list the pretrained-weights providers, what they offer and whether it is here."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="list pretrained-weights providers and what is available offline",
                       description="Weights providers registered through the register_weights hook: backbone, "
                       "tag (--pretrained), availability without a network, the preset and where the file is. "
                       "The torchvision and timm caches list only what is cached (any of their models with "
                       "weights can still be downloaded when the network answers).")
    p.add_argument("--backbone", help="only entries for this backbone (e.g. efficientnet_lite0)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def rows(backbone: str | None = None) -> list[dict[str, Any]]:
    """One row per (provider, backbone, tag), in resolution order."""
    from hierarchy.registry import get_registry

    out = []
    reg = get_registry()
    for provider in reg.weights_providers():
        for e in provider.listing():
            if backbone and backbone not in (e.backbone, e.backbone.partition("/")[2], e.model):
                continue
            out.append({"provider": provider.name, "backbone": e.backbone, "tag": e.tag, "loads_into":
                        f"{e.library}/{e.model}", "available": provider.available(e), "file": str(e.file),
                        "source": e.source, "extra": provider.extra, "preset": e.preset.to_dict(),
                        "hint": None if provider.available(e) else e.hint})
    return out


def run(args: argparse.Namespace) -> int:
    from hierarchy.registry import get_registry

    table = rows(args.backbone)
    if args.json:
        print(json.dumps({"weights": table, "broken": [f.to_dict() for f in get_registry().failures]}, indent=2))
    else:
        for r in table:
            state = "available" if r["available"] else f"missing ({r['extra'] and 'extra ' + r['extra'] or 'copy'})"
            mean = ",".join(f"{v:g}" for v in r["preset"]["mean"])
            print(f"{r['provider']:<18} {r['backbone']:<28} {r['tag']:<9} {state:<20} mean {mean} "
                  f"{r['preset']['size']}px  {r['source']}: {r['file']}")
        listed = {r["provider"] for r in table}
        for provider in get_registry().weights_providers():
            if provider.name not in listed and not args.backbone:
                more = " (downloads when the network answers)" if provider.downloads else ""
                print(f"{provider.name:<18} nothing cached{more}")
    for f in get_registry().failures:
        print(f"warning: broken {f}", file=sys.stderr)
    return 0
