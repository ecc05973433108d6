"""The Stage interface: what a plugin implements to add a classifier to a pipeline.

A stage is a class with a ``name``, ordered ``labels`` and a nested pydantic ``Config`` whose
``dataset.sources`` default says where its images and labels come from. Building the dataset,
training and prediction come from the engine's shared builder, trainer and predictor; a stage
overrides a method only when it needs something else (tests do, with fake predictors).
"""
from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field

from hierarchy.config.dataset import DatasetConfig
from hierarchy.config.train import TrainConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

    from hierarchy.data.preset import Preset

PLUGIN_API_VERSION = 1


@dataclass
class Prediction:
    """A predictor's answer for one batch: ``probs`` is (N, len(labels)); ``ood`` is an optional
    (N,) out-of-distribution score (higher = less like the training data). ``logits`` (N, C; raw,
    before temperature) and ``features`` (N, D; penultimate) are filled only when asked for."""

    probs: "np.ndarray"
    ood: "np.ndarray | None" = None
    logits: "np.ndarray | None" = None
    features: "np.ndarray | None" = None


class Predictor(Protocol):
    """Loaded model for one stage. The engine decodes images once and hands it uint8 batches
    (N, 3, size, size) produced with ``preset``; it returns per-label probabilities.

    The batch is a torch tensor unless the predictor has ``batch_format = "numpy"`` (then a numpy
    array; the ONNX engine's predictor does this, so a run needs no torch)."""

    labels: Sequence[str]
    preset: "Preset"
    metadata: dict

    def predict(self, batch: "torch.Tensor") -> Prediction: ...


class StageConfig(BaseModel):
    """Base for a stage's nested ``Config``: how to build its dataset and how to train it."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


class Stage(ABC):
    """One classifier in a cascade. Subclass, set ``name``/``labels``, write ``build_dataset``."""

    name: ClassVar[str]
    labels: ClassVar[tuple[str, ...]]
    description: ClassVar[str] = ""
    Config: ClassVar[type[StageConfig]] = StageConfig

    def __init__(self, config: StageConfig | None = None):
        self.config = config if config is not None else self.Config()

    def build_dataset(self, out: Path, *, roots: "dict[str, Path] | None" = None,
                      materialize: str | None = None, progress: bool = True) -> dict[str, Any]:
        """Write ``manifest.csv`` + ``dataset.json`` into ``out`` from ``config.dataset.sources``."""
        from hierarchy.data.builder import build_dataset

        return build_dataset(self.config.dataset, Path(out), labels=self.labels, stage=self.name, roots=roots,
                             materialize=materialize, progress=progress)

    def train(self, data: Path | None, out: Path | None = None, *, resume: Path | None = None,
              progress: bool = True) -> Path:
        """Train on a manifest or ImageFolder tree (``config.train``); return the run directory."""
        from hierarchy.train.trainer import train_stage

        return train_stage(self, data, out, resume=resume, progress=progress)

    def load_predictor(self, weights: Path, device: str = "auto", precision: str = "auto",
                       engine: str = "torch") -> Predictor:
        """Load a trained checkpoint (file or run directory) for inference. ``engine="onnx"`` loads
        the model ``hierarchy export`` wrote beside the weights and runs it with ONNX Runtime,
        ``engine="openvino"`` compiles the same file with OpenVINO (bf16 where the CPU has it); neither
        imports torch. An override without an ``engine`` parameter keeps working with the torch engine."""
        if engine == "onnx":
            from hierarchy.engine.onnx_backend import load_onnx_predictor

            return load_onnx_predictor(self, weights, device=device, precision=precision)
        if engine == "openvino":
            from hierarchy.engine.openvino_backend import load_openvino_predictor

            return load_openvino_predictor(self, weights, device=device, precision=precision)
        if engine != "torch":
            from hierarchy.core.errors import ConfigError

            raise ConfigError("command line", [f"--engine: unknown engine {engine!r}; use torch, onnx or openvino"])
        from hierarchy.engine.torch_backend import load_predictor

        return load_predictor(self, weights, device=device, precision=precision)

    @classmethod
    def info(cls) -> dict[str, Any]:
        return {"name": cls.name, "labels": list(cls.labels), "description": cls.description}
