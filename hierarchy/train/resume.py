"""Recovery when ``hierarchy train --resume`` picks up a run that was killed.

Per epoch the trainer writes, each file atomically (temp file + ``os.replace``, see fsutil):
``train_state.pt`` (the commit point), then the files derived from it: ``best.safetensors`` (when
the epoch improved), ``last.safetensors``, ``metadata.json``, ``metrics.csv``. A kill can land
between any two of them, or inside one (leaving a ``.<name>.XXXXXXXX.tmp`` that was never renamed).
On resume the temp files are deleted and any derived file that lags behind the committed state is
rewritten from it; a run that was not interrupted after a commit is left byte-for-byte as it is.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from hierarchy.train.trainer import RunState, TrainContext

log = logging.getLogger("hierarchy.train")


def recover_run(ctx: "TrainContext", state: "RunState", weights: "dict[str, torch.Tensor]") -> None:
    """Delete leftover temp files, then complete the writes that follow the last commit."""
    from hierarchy.core.fsutil import remove_temp_files

    for tmp in remove_temp_files(ctx.run_dir):
        log.info("removed %s (left by an interrupted write)", tmp.name)
    best_stale = state.best_epoch == state.epoch and saved_epoch(ctx.run_dir / "best.safetensors") != state.epoch
    last_stale = saved_epoch(ctx.run_dir / "last.safetensors") != state.epoch
    if best_stale or last_stale or not records_current(ctx.run_dir, len(state.history)):
        log.info("run %s: completing the writes of epoch %d that a kill interrupted", ctx.run_dir, state.epoch)
        ctx.publish(weights, state, best=best_stale)


def saved_epoch(path: Path) -> int | None:
    """The epoch the trainer tagged a weights file with; None when absent or unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {}).get("epoch", ""))
    except (OSError, ValueError, SafetensorError):
        return None


def records_current(run_dir: Path, n_epochs: int) -> bool:
    """metadata.json and metrics.csv both describe ``n_epochs`` epochs."""
    try:
        meta = json.loads((run_dir / "metadata.json").read_text(encoding="utf-8"))
        rows = (run_dir / "metrics.csv").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and len(meta.get("epochs") or []) == n_epochs and len(rows) == n_epochs + 1
