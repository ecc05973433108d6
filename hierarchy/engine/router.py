"""The router: sends a batch of images through the cascade, level by level.

Images sitting at the same stage are grouped and that stage's predictor is called once per group
(chunked by batch size), never image by image. Every input yields exactly one record, in input order.
"""
from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from hierarchy.core.errors import ConfigError, HierarchyError
from hierarchy.data.batches import Decoded, decode_batches, decode_item
from hierarchy.engine.backends import AUTO, get_engine
from hierarchy.engine.pipeline import STOP, Pipeline
from hierarchy.metrics.decisions import decide_labels

if TYPE_CHECKING:
    from hierarchy.config.stage import Predictor, Stage

log = logging.getLogger("hierarchy.router")



@dataclass
class LoadedStage:
    id: str
    stage_name: str
    predictor: "Predictor"
    threshold: float | None = None
    ood_threshold: float | None = None
    decide: dict[str, float] = field(default_factory=dict)  # label -> its decision threshold



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
    def from_pipeline(cls, pipeline: Pipeline, device: str = "auto", precision: str = "auto",
                      engine: str = AUTO, inputs: int | None = None) -> "Router":
        """Load every stage's predictor (on ``engine``; ``auto`` picks per stage, see
        :func:`hierarchy.engine.backends.choose_engine`; ``inputs``: a known, small number of images
        to run, for which the tuner weighs start-up) and resolve ``auto`` thresholds from checkpoint
        metadata."""
        from hierarchy.registry import get_stage

        if engine != AUTO:
            get_engine(engine)  # an unknown name fails before any stage loads
        loaded = {}
        for sid in pipeline.depth_order():
            node = pipeline.stages[sid]
            predictor = load_stage_predictor(sid, get_stage(node.stage)(), pipeline.weights_path(sid),
                                             device, precision, engine, inputs)
            loaded[sid] = LoadedStage(sid, node.stage, predictor, resolve_threshold(sid, node.threshold, predictor),
                                      resolve_ood(node.ood, predictor), resolve_decide(sid, node.decide, predictor))
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
        st = self.stages[sid]
        try:
            batch = make_batch([items[i].array(st.predictor.preset) for i in chunk], st.predictor)
            pred = st.predictor.predict(batch)
        except Exception as exc:  # noqa: BLE001 - one failing stage call must not lose the batch
            log.warning("stage %s failed on a batch of %d: %s", sid, len(chunk), exc)
            for i in chunk:
                err = HierarchyError(f"stage '{sid}' failed: {type(exc).__name__}: {exc}")
                records[i] = {**error_record(items[i].path, err), "trace": traces[i],
                              "error": {"type": "stage_failed", "message": str(err)}}
            return
        labels = list(st.predictor.labels)
        chosen, forced = decide_labels(pred.probs, labels, st.decide)
        for row, i in enumerate(chunk):
            probs = [float(p) for p in pred.probs[row]]
            top = int(chosen[row])
            entry = {"stage": sid, "label": labels[top], "confidence": probs[top],
                     "probs": dict(zip(labels, probs))}
            if forced[row]:
                entry["decide"] = st.decide[labels[top]]
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
        """OOD reject, then abstain below ``threshold`` unless a ``decide:`` threshold chose the label."""
        if st.ood_threshold is not None and ood is not None:
            entry["ood"] = {"score": ood, "threshold": st.ood_threshold}
            if ood > st.ood_threshold:
                entry["decision"] = "rejected"
                return "rejected"
        if st.threshold is not None and "decide" not in entry and entry["confidence"] < st.threshold:
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
        """Decode ``path`` into the uint8 array of every preset in the cascade (run in worker
        threads, off the routing thread). Only (3, S, S) arrays are kept, never the full image,
        so memory per item is small and fixed. ``draft=False`` never uses a reduced JPEG decode."""
        return decode_item(path, {self.stages[sid].predictor.preset for sid in self.order}, draft)

    def run(self, paths: Iterable[Path], batch_size: int = 32, workers: int | None = None,
            draft: bool = True) -> Iterator[dict[str, Any]]:
        """Stream records for ``paths``: decode batch k+1 in a thread pool while batch k is routed
        (:func:`hierarchy.data.batches.decode_batches`). Memory is bounded by two batches, whatever
        the number of inputs."""
        torch_engine = any(runs_on_torch(st.predictor) for st in self.stages.values())
        paths, importing = _maybe_fast_jpeg(iter(paths), torch_engine)
        batches = decode_batches(paths, functools.partial(self.decode, draft=draft), batch_size, workers)
        try:
            for items in batches:
                yield from self.route(items, batch_size)
        finally:
            batches.close()
            if importing is not None:  # never leave an import running into interpreter shutdown
                importing.join()


LONG_RUN = 512  # inputs from which importing torchvision's JPEG decoder (~1 s of CPU) pays for itself
# ... when no stage runs on torch, which must then be imported too: measured on 2 cores with OpenVINO,
# 2,048 inputs ran 6% slower with it, 4,096 4% faster (21.3 vs 22.2 s; 1.0 vs 1.9 ms per decode)
EXPORTED_LONG_RUN = 4096


def _maybe_fast_jpeg(paths: Iterator[Path], torch_engine: bool = True) -> tuple[Iterator[Path], Any]:
    """Look ahead up to LONG_RUN paths (EXPORTED_LONG_RUN for a pipeline without a torch predictor);
    for a long run import torchvision's JPEG decoder in a background thread (~1 ms/image cheaper,
    same output within 0.001/255) while PIL decodes the first batches. Short runs keep PIL and start
    fast; ONNX and OpenVINO runs shorter than EXPORTED_LONG_RUN never import torch. Returns the paths
    and the thread (or None)."""
    long_run = LONG_RUN if torch_engine else EXPORTED_LONG_RUN
    head = list(itertools.islice(paths, long_run))
    thread = None
    if len(head) == long_run:
        from hierarchy.data.decode import enable_torchvision_decoder

        thread = enable_torchvision_decoder(background=True)
    return itertools.chain(head, paths), thread


def batch_format(predictor: "Predictor") -> str:
    """``"torch"`` (a uint8 torch tensor, the default for every predictor) or ``"numpy"``: what a
    predictor's ``batch_format`` attribute asks ``predict`` to be given."""
    return getattr(predictor, "batch_format", "torch")


def runs_on_torch(predictor: "Predictor") -> bool:
    """Whether ``predictor`` imports torch anyway (the torch engine, or a plugin predictor that takes
    torch batches); the shared Predictor takes numpy batches whatever its engine, so ask its engine."""
    return batch_format(predictor) == "torch" or getattr(predictor, "engine", None) == "torch"


def make_batch(arrays: Sequence[np.ndarray], predictor: "Predictor") -> Any:
    """Stack (3, S, S) uint8 arrays into the (N, 3, S, S) batch type ``predictor`` takes."""
    stacked = np.stack(arrays)
    if batch_format(predictor) == "numpy":
        return stacked
    import torch

    return torch.from_numpy(stacked)


def load_stage_predictor(sid: str, stage: "Stage", weights: Path | None, device: str = "auto",
                         precision: str = "auto", engine: str = AUTO, inputs: int | None = None) -> "Predictor":
    """The stage's own predictor when it loads one (``Stage.load_predictor`` returns non-None), else
    the shared :class:`~hierarchy.engine.predictor.Predictor` for ``weights``."""
    custom = stage.load_predictor(weights, device=device, precision=precision, engine=engine)
    if custom is not None:
        return custom
    if weights is None:
        raise ConfigError("pipeline", [f"stages.{sid}.weights: field required to run the pipeline"])
    from hierarchy.engine.predictor import load_predictor

    return load_predictor(stage, weights, device=device, precision=precision, engine=engine, inputs=inputs)


def resolve_threshold(sid: str, value: float | str | None, predictor: "Predictor") -> float | None:
    if value != "auto":
        return None if value is None else float(value)
    stored = (predictor.metadata or {}).get("threshold") or {}
    if "threshold" not in stored:
        raise ConfigError("pipeline", [f"stages.{sid}.threshold: 'auto' but the checkpoint has no tuned threshold; "
                                       "run `hierarchy calibrate RUN_DIR --data DATA` or give a number"])
    return float(stored["threshold"])


def resolve_decide(sid: str, value: dict[str, float] | str, predictor: "Predictor") -> dict[str, float]:
    """The stage's ``decide:`` thresholds; ``auto`` = those ``hierarchy calibrate --target-recall`` stored."""
    if value != "auto":
        return {lab: float(t) for lab, t in dict(value).items()}
    stored = ((predictor.metadata or {}).get("decide") or {}).get("thresholds")
    if not stored:
        raise ConfigError("pipeline", [f"stages.{sid}.decide: 'auto' but the checkpoint has no tuned decision "
                                       "thresholds; run `hierarchy calibrate RUN_DIR --data DATA --target-recall "
                                       "LABEL=R` or give them"])
    return {lab: float(t) for lab, t in stored.items()}


def resolve_ood(value: float | str, predictor: "Predictor") -> float | None:
    if value == "off":
        return None
    if value != "auto":
        return float(value)
    stored = (predictor.metadata or {}).get("ood") or {}
    return float(stored["threshold"]) if stored.get("threshold") is not None else None
