"""The router: sends a batch of images through the cascade, level by level.

Images sitting at the same stage are grouped and that stage's predictor is called once per group
(chunked by batch size), never image by image. Every input yields exactly one record, in input order.
"""
from __future__ import annotations

import itertools
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from .errors import ConfigError, HierarchyError, ImageError
from .pipeline import STOP, Pipeline

if TYPE_CHECKING:
    from PIL import Image

    from .preset import Preset
    from .stage import Predictor

log = logging.getLogger("hierarchy.router")


@dataclass
class LoadedStage:
    id: str
    stage_name: str
    predictor: "Predictor"
    threshold: float | None = None
    ood_threshold: float | None = None


@dataclass
class Decoded:
    """One input after decoding: the image (or the error) plus uint8 tensors cached per preset."""

    path: Path
    image: "Image.Image | None" = None
    error: HierarchyError | None = None
    tensors: dict | None = None

    def tensor(self, preset: "Preset") -> Any:
        self.tensors = self.tensors or {}
        if preset not in self.tensors:
            self.tensors[preset] = preset.to_uint8(self.image)
        return self.tensors[preset]


def error_record(path: Path | str, err: HierarchyError) -> dict[str, Any]:
    etype = getattr(err, "type", type(err).__name__)
    message = getattr(err, "message", str(err))
    return {"path": str(path), "status": "error", "label": None, "confidence": None, "stage": None,
            "trace": [], "error": {"type": etype, "message": message}}


class Router:
    def __init__(self, pipeline: Pipeline, stages: dict[str, LoadedStage]):
        self.pipeline = pipeline
        self.stages = stages
        self.order = pipeline.depth_order()

    @classmethod
    def from_pipeline(cls, pipeline: Pipeline, device: str = "auto", precision: str = "auto") -> "Router":
        """Load every stage's predictor and resolve ``auto`` thresholds from checkpoint metadata."""
        from registry import get_stage

        from .stage import Stage

        loaded = {}
        for sid in pipeline.depth_order():
            node = pipeline.stages[sid]
            weights = pipeline.weights_path(sid)
            stage = get_stage(node.stage)()
            if weights is None and type(stage).load_predictor is Stage.load_predictor:
                raise ConfigError("pipeline", [f"stages.{sid}.weights: field required to run the pipeline"])
            predictor = stage.load_predictor(weights, device=device, precision=precision)
            loaded[sid] = LoadedStage(sid, node.stage, predictor, resolve_threshold(sid, node.threshold, predictor),
                                      resolve_ood(node.ood, predictor))
        return cls(pipeline, loaded)

    def route(self, items: Sequence[Decoded], batch_size: int = 32) -> list[dict[str, Any]]:
        """Route decoded items through the cascade; one record per item, in order."""
        records: list[dict[str, Any] | None] = [None] * len(items)
        traces: list[list[dict]] = [[] for _ in items]
        waiting: dict[str, list[int]] = {sid: [] for sid in self.order}
        for i, it in enumerate(items):
            if it.error is not None:
                records[i] = error_record(it.path, it.error)
            else:
                waiting[self.pipeline.root].append(i)
        for sid in self.order:
            idxs = waiting[sid]
            for start in range(0, len(idxs), batch_size):
                chunk = idxs[start:start + batch_size]
                self._run_stage(sid, chunk, items, traces, records, waiting)
        return records  # type: ignore[return-value]

    def _run_stage(self, sid: str, chunk: list[int], items: Sequence[Decoded], traces: list[list[dict]],
                   records: list[dict | None], waiting: dict[str, list[int]]) -> None:
        import torch

        st = self.stages[sid]
        try:
            batch = torch.stack([items[i].tensor(st.predictor.preset) for i in chunk])
            pred = st.predictor.predict(batch)
        except Exception as exc:  # noqa: BLE001 - one failing stage call must not lose the batch
            log.warning("stage %s failed on a batch of %d: %s", sid, len(chunk), exc)
            for i in chunk:
                err = HierarchyError(f"stage '{sid}' failed: {type(exc).__name__}: {exc}")
                records[i] = {**error_record(items[i].path, err), "trace": traces[i],
                              "error": {"type": "stage_failed", "message": str(err)}}
            return
        labels = list(st.predictor.labels)
        for row, i in enumerate(chunk):
            probs = [float(p) for p in pred.probs[row]]
            top = max(range(len(probs)), key=probs.__getitem__)
            entry = {"stage": sid, "label": labels[top], "confidence": probs[top],
                     "probs": dict(zip(labels, probs))}
            status = self._decide(st, entry, None if pred.ood is None else float(pred.ood[row]))
            traces[i].append(entry)
            if status is None:
                target = self.pipeline.route(sid, labels[top])
                if target != STOP:
                    waiting[target].append(i)
                    continue
                status = "ok"
            records[i] = self._record(items[i].path, status, traces[i])

    @staticmethod
    def _decide(st: LoadedStage, entry: dict, ood: float | None) -> str | None:
        if st.ood_threshold is not None and ood is not None:
            entry["ood"] = {"score": ood, "threshold": st.ood_threshold}
            if ood > st.ood_threshold:
                entry["decision"] = "rejected"
                return "rejected"
        if st.threshold is not None and entry["confidence"] < st.threshold:
            entry["threshold"] = st.threshold
            entry["decision"] = "abstained"
            return "abstained"
        entry["decision"] = "accepted"
        return None

    @staticmethod
    def _record(path: Path, status: str, trace: list[dict]) -> dict[str, Any]:
        accepted = [t for t in trace if t["decision"] == "accepted"]
        last = trace[-1]
        rec = {"path": str(path), "status": status,
               "label": accepted[-1]["label"] if accepted else None,
               "confidence": accepted[-1]["confidence"] if accepted else None,
               "stage": last["stage"], "trace": trace, "error": None}
        if status == "rejected":
            rec["reason"] = "out_of_distribution"
        elif status == "abstained":
            rec["reason"] = "below_threshold"
        return rec

    def decode(self, path: Path, draft: bool = True) -> Decoded:
        from .imageio import load_image

        presets = {self.stages[sid].predictor.preset for sid in self.order}
        size = max(p.size for p in presets)
        try:
            img = load_image(path, draft_size=size if draft else None)
        except ImageError as exc:
            return Decoded(path, error=exc)
        item = Decoded(path, image=img)
        # the root's tensor is made here, in the worker thread, off the main thread's critical path
        item.tensor(self.stages[self.pipeline.root].predictor.preset)
        return item

    def run(self, paths: Iterable[Path], batch_size: int = 32, workers: int | None = None,
            draft: bool = True) -> Iterator[dict[str, Any]]:
        """Stream records for ``paths``: decode batch k+1 in a thread pool while batch k is routed.
        Memory is bounded by two batches, whatever the number of inputs."""
        chunks = _chunked(paths, batch_size)
        with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
            pending: list[Future] | None = self._submit(pool, next(chunks, None), draft)
            while pending is not None:
                items = [f.result() for f in pending]
                pending = self._submit(pool, next(chunks, None), draft)
                yield from self.route(items, batch_size)

    def _submit(self, pool: ThreadPoolExecutor, chunk: list[Path] | None, draft: bool) -> list[Future] | None:
        return None if chunk is None else [pool.submit(self.decode, p, draft) for p in chunk]


def _chunked(it: Iterable[Path], n: int) -> Iterator[list[Path]]:
    iterator = iter(it)
    while chunk := list(itertools.islice(iterator, n)):
        yield chunk


def default_workers() -> int:
    import os

    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def resolve_threshold(sid: str, value: float | str | None, predictor: "Predictor") -> float | None:
    if value != "auto":
        return None if value is None else float(value)
    stored = (predictor.metadata or {}).get("threshold") or {}
    if "threshold" not in stored:
        raise ConfigError("pipeline", [f"stages.{sid}.threshold: 'auto' but the checkpoint has no tuned threshold; "
                                       "run `hierarchy calibrate RUN_DIR --data DATA` or give a number"])
    return float(stored["threshold"])


def resolve_ood(value: float | str, predictor: "Predictor") -> float | None:
    if value == "off":
        return None
    if value != "auto":
        return float(value)
    stored = (predictor.metadata or {}).get("ood") or {}
    return float(stored["threshold"]) if stored.get("threshold") is not None else None
