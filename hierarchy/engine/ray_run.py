"""``hierarchy run --ray [ADDRESS]``: the same records as the plain run, computed on Ray Data.

The paths go into a Ray Dataset (written to a temporary list file and read back with
``ray.data.read_text``, one JSON-quoted path per line, so the driver never holds a list of millions
and odd names survive). :class:`RouteActor` is a stateful ``map_batches`` actor: it loads the
pipeline's :class:`~hierarchy.engine.router.Router` once and routes each batch through
:meth:`Router.run`, which decodes with the project's own loader
(:mod:`hierarchy.data.batches`, typed per-file errors), never ``ray.data.read_images``. Records come
back in input order (``preserve_order``). Without an ADDRESS a local Ray cluster is started on this
machine's cores.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from hierarchy.core.errors import EngineError

log = logging.getLogger("hierarchy.ray")
LOCAL = "local"


class RouteActor:
    """One per core group or GPU: the pipeline loaded once, then batches of paths -> records."""

    def __init__(self, pipeline: str, batch_size: int, device: str, precision: str, engine: str, workers: int):
        from hierarchy.engine.pipeline import load_pipeline
        from hierarchy.engine.router import Router

        self.router = Router.from_pipeline(load_pipeline(pipeline), device=device, precision=precision, engine=engine)
        self.batch_size, self.workers = batch_size, workers

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        paths = [Path(json.loads(text)) for text in batch["text"]]
        records = self.router.run(paths, self.batch_size, self.workers)
        return {"record": [json.dumps(rec) for rec in records]}


def ray_records(pipeline: str, paths: Iterable[Path], address: str | None = LOCAL, batch_size: int = 32,
                device: str = "auto", precision: str = "auto", engine: str = "auto",
                actors: int | None = None) -> Iterator[dict[str, Any]]:
    """Records for ``paths`` (in order), routed by ``actors`` :class:`RouteActor` on Ray."""
    ray = _import_ray()
    with tempfile.TemporaryDirectory(prefix="hierarchy-ray-") as tmp:
        listing = Path(tmp) / "paths.txt"
        n = _write_listing(listing, paths)
        if n == 0:
            return
        _init(ray, address)
        gpus, actors, cpus = _placement(ray, device, actors)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # records in input order, as the plain run writes them
        ds = ray.data.read_text(str(listing)).map_batches(
            RouteActor, batch_size=batch_size * 4, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus, num_gpus=1 if gpus else 0,
            fn_constructor_kwargs={"pipeline": str(pipeline), "batch_size": batch_size, "device": device,
                                   "precision": precision, "engine": engine, "workers": max(1, cpus)})
        log.info("ray: %d inputs over %d actor(s) (%s each)", n, actors, "1 GPU" if gpus else f"{cpus} CPU")
        for row in ds.iter_rows():
            yield json.loads(row["record"])


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is a separate extra of ray
    except ImportError as exc:
        raise EngineError("--ray needs Ray Data: pip install 'hierarchy-cascade[ray]' (ray[data])") from exc
    return ray


def _write_listing(listing: Path, paths: Iterable[Path]) -> int:
    """One JSON string per line (newlines and non-UTF-8 names escaped); returns the count."""
    n = 0
    with listing.open("w", encoding="utf-8") as f:
        for p in paths:
            f.write(json.dumps(os.fspath(p)) + "\n")
            n += 1
    return n


def _init(ray: Any, address: str | None) -> None:
    if ray.is_initialized():
        return
    if address in (None, LOCAL):
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)


def _placement(ray: Any, device: str, actors: int | None) -> tuple[int, int, int]:
    """(GPUs, actors, CPUs per actor): one actor per GPU, else one per group of 2 cores (1 on <= 3
    cores), always leaving a core for the read tasks (an actor holding every CPU starves them)."""
    free = ray.available_resources()
    gpus = int(free.get("GPU", 0)) if device.split(":")[0] in ("auto", "cuda") else 0
    total = max(1, int(free.get("CPU", 1)))
    if gpus:
        return gpus, actors or gpus, 0
    per = 1 if total <= 3 else 2
    actors = actors or max(1, (total - 1) // per)
    return 0, actors, max(1, min(per, (total - 1) // actors))
