"""The Stage interface: what a plugin implements to add a classifier to a pipeline.

A stage is a class with a ``name``, ordered ``labels``, a ``description`` and the ``sources`` its
images and labels come from by default (or a ``Config`` subclass, for stages that add settings).
It is a pure declaration: the dataset builder (``hierarchy.data.builder.build_dataset``), the
trainer (``hierarchy.train.trainer.train_stage``) and the engine's shared predictor do the work;
``load_predictor`` is an optional override for stages that predict some other way.
"""
from __future__ import annotations

import keyword
import re
from abc import ABC
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, create_model

from hierarchy.config.train import TrainConfig
from hierarchy.data.dataset_config import DatasetConfig
from hierarchy.data.sources import Source

if TYPE_CHECKING:
    import numpy as np
    import torch

    from hierarchy.data.preset import Preset

PLUGIN_API_VERSION = 1
# the one naming rule for stages, shared by register() and `hierarchy new-stage`
STAGE_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")
STAGE_NAME_RULE = "a lower-case name: a-z first, then a-z, 0-9, _ or -"


def stage_name_problem(name: object) -> str | None:
    """None when ``name`` is a valid stage name, else why not."""
    if not isinstance(name, str) or not STAGE_NAME_RE.match(name) or keyword.iskeyword(name):
        return f"{name!r} is not {STAGE_NAME_RULE}"
    return None


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

    model_config = ConfigDict(extra="forbid", defer_build=True)

    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


class Stage(ABC):
    """One classifier in a cascade. Subclass and set ``name``, ``labels``, ``description`` and
    ``sources`` (the default ``config.dataset.sources``); set ``Config`` too only to add settings."""

    name: ClassVar[str]
    labels: ClassVar[tuple[str, ...]]
    description: ClassVar[str] = ""
    sources: ClassVar[tuple[Source, ...]] = ()
    Config: ClassVar[type[StageConfig]] = StageConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.sources and ("sources" in vars(cls) or "Config" in vars(cls)):
            cls.Config = _config_with_sources(cls.Config, tuple(cls.sources), cls)

    def __init__(self, config: StageConfig | None = None):
        self.config = config if config is not None else self.Config()

    def load_predictor(self, weights: Path | None, *, device: str = "auto", precision: str = "auto",
                       engine: str = "auto") -> "Predictor | None":
        """Override to load a predictor of your own (a non-neural model, a remote service, a test
        fake). The default returns None: the engine loads its shared predictor for ``weights`` on
        ``engine`` (see :func:`hierarchy.engine.predictor.load_predictor`)."""
        return None

    @classmethod
    def info(cls) -> dict[str, Any]:
        return {"name": cls.name, "labels": list(cls.labels), "description": cls.description}


def _config_with_sources(base: type[StageConfig], sources: tuple[Source, ...], stage: type) -> type[StageConfig]:
    """``base`` whose ``dataset`` default lists ``sources`` (fresh copies per config), named
    ``<Stage>.Config`` so that pickle finds it."""

    def dataset() -> DatasetConfig:
        default = base.model_fields["dataset"].get_default(call_default_factory=True)
        return type(default).model_validate({**dict(default), "sources": [s.model_copy(deep=True) for s in sources]})

    model = create_model(f"{stage.__name__}Config", __base__=base, __module__=stage.__module__,
                         dataset=(base.model_fields["dataset"].annotation, Field(default_factory=dataset)))
    model.__qualname__ = f"{stage.__qualname__}.Config"
    return model
