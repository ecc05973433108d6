"""The one predictor: any backend's (logits, features) -> calibrated probabilities and OOD scores.

Preset, temperature and the OOD scorer live here, once for every engine; a backend
(:mod:`hierarchy.engine.backends`) only maps a uint8 batch to logits and features.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hierarchy.config.stage import Prediction
from hierarchy.core.errors import HierarchyError
from hierarchy.core.precision import check_precision
from hierarchy.data.preset import Preset
from hierarchy.engine.backends import AUTO
from hierarchy.engine.backends.base import Backend, Checkpoint
from hierarchy.engine.tune import TuneResult, load_backend
from hierarchy.metrics.classification import softmax
from hierarchy.models.metadata import check_stage
from hierarchy.ood.scores import OODScorer, load_scorer

if TYPE_CHECKING:
    from torch import nn

    from hierarchy.config.stage import Stage

log = logging.getLogger("hierarchy.engine")


class Predictor:
    """Implements :class:`hierarchy.config.stage.Predictor` over a :class:`Backend`. Takes (N, 3, S, S)
    uint8 batches as numpy arrays (``batch_format = "numpy"``; CPU torch tensors work too)."""

    batch_format = "numpy"

    def __init__(self, backend: Backend, labels: Sequence[str], preset: Preset, metadata: dict[str, Any] | None = None,
                 temperature: float = 1.0, ood_scorer: OODScorer | None = None):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.backend = backend
        self.labels = list(labels)
        self.preset = preset
        self.metadata = dict(metadata or {})
        self.temperature = float(temperature)
        self.ood_scorer = ood_scorer
        self.tuned: TuneResult | None = None  # the measurement the engine was picked from, if any

    @classmethod
    def from_torch(cls, model: "nn.Module", labels: Sequence[str], preset: Preset, *, device: Any = "auto",
                   precision: str = "auto", copy_model: bool = True, **kwargs: Any) -> "Predictor":
        """A predictor for a torch model in memory (training, tests)."""
        from hierarchy.engine.backends.torch_backend import TorchBackend

        return cls(TorchBackend(model, preset, device, precision, copy_model), labels, preset, **kwargs)

    @property
    def engine(self) -> str:
        return self.backend.name

    @property
    def precision(self) -> str:
        return self.backend.precision

    def _check_batch(self, batch: Any) -> np.ndarray:
        x = np.asarray(batch)
        size = self.preset.size
        if x.dtype != np.uint8:
            raise ValueError(f"expected a uint8 batch, got {x.dtype}")
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise ValueError(f"expected a batch of shape (N, 3, {size}, {size}), got {tuple(x.shape)}")
        return x

    def predict(self, batch: Any, return_logits: bool = False, return_features: bool = False) -> Prediction:
        """(N, 3, S, S) uint8 -> probabilities softmax(logits / temperature), (N, C) float32."""
        logits, features = self.backend.run(self._check_batch(batch))
        if logits.shape[1] != len(self.labels):
            raise HierarchyError(f"model outputs {logits.shape[1]} classes but the stage has {len(self.labels)} labels")
        ood = None if self.ood_scorer is None else self.ood_scorer.score(features, logits)
        return Prediction(probs=calibrated(logits, self.temperature), ood=ood,
                          logits=logits if return_logits else None, features=features if return_features else None)


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) as float32: what every engine reports and calibration tunes on."""
    return softmax(logits, temperature).astype(np.float32)


def load_predictor(stage: "Stage", weights: str | Path, device: str = "auto", precision: str = "auto",
                   engine: str = AUTO, inputs: int | None = None) -> Predictor:
    """Load a checkpoint (run directory, ``.safetensors`` or ``metadata.json``) for ``stage`` on
    ``engine``, refusing it before any weights load if its stage or labels do not match. ``auto``
    engine or precision: measured on this machine (:func:`hierarchy.engine.tune.load_backend`; with
    ``HIERARCHY_TUNE=off`` the rule of :func:`hierarchy.engine.backends.choose_engine`); ``inputs``,
    when the caller knows it will run only that many images, lets a cheaper start win over throughput."""
    check_precision(precision)
    ckpt = Checkpoint.open(weights)
    check_stage(ckpt.meta, stage.name, stage.labels, ckpt.meta_path)
    backend, why, tuned = load_backend(ckpt, device, precision, engine, stage.name, inputs)
    log.info("stage %s: engine %s on %s, %s (%s)", stage.name, backend.name, backend.device, backend.precision, why)
    predictor = Predictor(backend, stage.labels, ckpt.preset, ckpt.meta.model_dump(mode="json"),
                          temperature=ckpt.meta.temperature, ood_scorer=load_scorer(ckpt.meta.ood, ckpt.run_dir))
    predictor.tuned = tuned
    return predictor
