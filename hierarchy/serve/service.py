"""The pipeline behind ``hierarchy serve``: loaded and warmed up once, then shared by every request.

Uploads are decoded in a thread pool by the same loader as ``hierarchy run`` (same checks, same
typed errors, same pixels), routed through :class:`~hierarchy.serve.batcher.Batcher` (several
requests per router call) and, on request, explained stage by stage (:mod:`hierarchy.explain.cam`).
"""
from __future__ import annotations

import asyncio
import logging
import platform
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from hierarchy import __version__
from hierarchy.core.errors import ImageError
from hierarchy.data.batches import Decoded, default_workers, preset_key
from hierarchy.data.decode import DRAFT_MARGIN, pil_to_array
from hierarchy.data.imageio import decode_image_bytes
from hierarchy.engine.pipeline import load_pipeline
from hierarchy.engine.tune import router_batch_size
from hierarchy.explain import DEFAULT_METHOD
from hierarchy.serve.batcher import Batcher
from hierarchy.serve.limits import Limits
from hierarchy.serve.metrics import Metrics

if TYPE_CHECKING:
    from hierarchy.data.preset import Preset
    from hierarchy.engine.router import Router
    from hierarchy.explain.cam import Explainer

log = logging.getLogger("hierarchy.serve")

DISCLAIMER = ("This is a research tool, not a diagnosis. Its answers come from models trained on example images "
              "and can be wrong; a qualified person must make every clinical decision.")
VERSIONED = ("torch", "torchvision", "timm", "onnxruntime", "openvino", "fastapi", "uvicorn", "grad-cam")


@dataclass
class Upload:
    """One file of a request: its name and bytes (None when it was refused by size unread)."""

    name: str
    data: bytes | None
    size: int = 0


@dataclass
class ServeOptions:
    device: str = "auto"
    precision: str = "auto"
    engine: str = "auto"
    batch_size: int | None = None  # None: what tuning picked for the root stage, else 32
    workers: int | None = None
    explain_method: str = DEFAULT_METHOD
    explain_layers: Mapping[str, str] = field(default_factory=dict)


class Service:
    def __init__(self, pipeline_path: str | Path, options: ServeOptions | None = None, limits: Limits | None = None,
                 metrics: Metrics | None = None):
        self.pipeline = load_pipeline(pipeline_path)  # config errors now, before the server starts
        self.options = options or ServeOptions()
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.router: "Router | None" = None
        self.explainer: "Explainer | None" = None
        self.batcher: Batcher | None = None
        self.info: dict[str, Any] = {}
        self.error: str | None = None
        self._ready = threading.Event()
        self._pool = ThreadPoolExecutor(self.options.workers or default_workers(), thread_name_prefix="hierarchy-serve")

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    # ------------------------------------------------------------ start-up

    def load(self) -> None:
        """Load every stage, warm each up on one image, prepare the explainer; then ready.
        A failure is kept in :attr:`error` (``/ready`` shows it) and re-raised."""
        from hierarchy.engine.router import Router
        from hierarchy.explain.cam import Explainer

        o = self.options
        try:
            router = Router.from_pipeline(self.pipeline, device=o.device, precision=o.precision, engine=o.engine)
            warm_up(router)
            self.explainer = Explainer(router, o.explain_method, o.explain_layers, o.device).preload()
            self.info = pipeline_info(router)
            self.router = router
            batch = router_batch_size(router, o.batch_size)
            self.batcher = Batcher(lambda items: router.route(items, batch), batch,
                                   on_batch=self.metrics.batch.observe)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("loading the pipeline failed: %s", self.error)
            raise
        self._ready.set()
        log.info("pipeline %s ready: %s", self.pipeline.name, ", ".join(
            f"{s['id']} on {s['engine']}" for s in self.info["stages"]))

    def close(self) -> None:
        """Finish what is queued, then release the threads."""
        if self.batcher is not None:
            self.batcher.close()
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------ requests

    async def classify(self, uploads: list[Upload], explain: bool = False) -> list[dict[str, Any]]:
        """One record per upload, in order (what ``hierarchy run --format json`` prints)."""
        assert self.router is not None and self.batcher is not None, "classify() before load()"
        loop = asyncio.get_running_loop()
        presets = {st.predictor.preset for st in self.router.stages.values()}
        items = await asyncio.gather(*(loop.run_in_executor(self._pool, self.decode, u, presets) for u in uploads))
        records = await asyncio.wrap_future(self.batcher.submit(list(items)))
        if explain:
            records = await asyncio.gather(*(loop.run_in_executor(self._pool, self.explain, r, it)
                                             for r, it in zip(records, items)))
        self.metrics.records(records)
        return list(records)

    def decode(self, upload: Upload, presets: set["Preset"]) -> Decoded:
        """The upload decoded into every preset's array, or its typed error (named by the upload)."""
        return decode_upload(upload, presets, self.limits)

    def explain(self, record: dict[str, Any], item: Decoded) -> dict[str, Any]:
        if record["status"] == "error" or self.explainer is None:
            return record
        return {**record, "explanations": [e.to_dict(inline_image=True) for e in self.explainer.explain(record, item)]}


def decode_upload(upload: Upload, presets: set["Preset"], limits: Limits) -> Decoded:
    """:func:`hierarchy.data.imageio.decode_image_bytes` on the uploaded bytes: the checks, conversion
    rules and typed errors of every other input (a JPEG is drafted to >= 2x the largest size, as
    ``hierarchy run`` does for large ones)."""
    path = Path(upload.name)
    if upload.data is None:
        return Decoded(path, error=ImageError("too_large", upload.name, f"upload has {upload.size} bytes, more than "
                                              f"--max-upload-mb={limits.max_upload_mb:g}"))
    if not upload.data:
        return Decoded(path, error=ImageError("empty", upload.name, "upload is empty (0 bytes)"))
    try:
        img = decode_image_bytes(upload.name, upload.data, max_pixels=limits.max_pixels,
                                 draft_size=DRAFT_MARGIN * max(p.size for p in presets))
    except ImageError as exc:
        return Decoded(path, error=exc)
    return Decoded(path, arrays={preset_key(p): pil_to_array(img, p.size) for p in presets})


def warm_up(router: "Router") -> None:
    """One grey image through every stage: the first call's one-off costs are paid before ``/ready``."""
    from hierarchy.engine.router import make_batch

    for st in router.stages.values():
        size = st.predictor.preset.size
        st.predictor.predict(make_batch([np.full((3, size, size), 128, np.uint8)], st.predictor))


def pipeline_info(router: "Router") -> dict[str, Any]:
    """``GET /v1/pipeline``: the stages in route order with their labels, thresholds, OOD settings,
    engines and weights (sha256), plus the versions that serve them."""
    from hierarchy.registry import get_stage

    pipe = router.pipeline
    stages = [_stage_info(router, sid, get_stage(router.stages[sid].stage_name).description) for sid in router.order]
    intended = pipe.description or " ".join(dict.fromkeys(s["description"] for s in stages if s["description"]))
    return {"name": pipe.name, "description": pipe.description, "intended_use": intended or None,
            "disclaimer": DISCLAIMER, "root": pipe.root, "stages": stages, "versions": versions()}


def _stage_info(router: "Router", sid: str, description: str) -> dict[str, Any]:
    from hierarchy.engine.backends.base import Checkpoint
    from hierarchy.engine.predictor import Predictor

    st, node = router.stages[sid], router.pipeline.stages[sid]
    p = st.predictor
    weights = router.pipeline.weights_path(sid)
    ckpt = Checkpoint.open(weights) if isinstance(p, Predictor) and weights is not None else None
    return {"id": sid, "stage": st.stage_name, "description": description or None, "labels": list(p.labels),
            "threshold": st.threshold, "ood": {"setting": node.ood, "threshold": st.ood_threshold},
            "routes": dict(node.routes), "engine": getattr(p, "engine", "plugin"),
            "device": getattr(getattr(p, "backend", None), "device", None), "precision": getattr(p, "precision", None),
            "input_size": p.preset.size, "weights": None if ckpt is None else str(ckpt.weights),
            "weights_sha256": None if ckpt is None else ckpt.weights_sha256,
            "trained_with": None if ckpt is None else ckpt.meta.versions}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"hierarchy": __version__, "python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
