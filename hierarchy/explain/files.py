"""``hierarchy run --explain DIR``: one overlay PNG per visited stage, named in the record."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from hierarchy.core.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    from hierarchy.engine.router import Router
    from hierarchy.explain.cam import Explainer


def explain_to_dir(records: Iterable[dict[str, Any]], router: "Router", explainer: "Explainer",
                   out_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Pass ``records`` through, adding ``explanations`` (one entry per trace step, ``file`` naming
    ``DIR/NNNN_<stem>.<stage>.png``) to every record that is not an error. The image is decoded
    again for the map: records carry no pixels, and the map costs far more than the decode."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for n, rec in enumerate(records, 1):
        if rec["status"] == "error":
            yield rec
            continue
        item = router.decode(Path(rec["path"]), draft=False)
        entries = []
        for exp in explainer.explain(rec, item):
            entry = exp.to_dict()
            if exp.available:
                target = out / f"{n:04d}_{Path(rec['path']).stem}.{exp.stage}.png"
                atomic_write_bytes(target, exp.png())
                entry["file"] = str(target)
            entries.append(entry)
        yield {**rec, "explanations": entries}
