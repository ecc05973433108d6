"""What every inference backend is: a loaded model that maps a uint8 batch to (logits, features).

Everything else a stage's prediction needs (preset, temperature, thresholds, OOD scores) belongs to
the one :class:`hierarchy.engine.predictor.Predictor`, so a backend stays this small.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from hierarchy.data.preset import Preset
from hierarchy.models.metadata import CheckpointMetadata, read_metadata, resolve_checkpoint


class Backend(Protocol):
    """A loaded model on one engine."""

    name: str  # the engine, e.g. "torch"
    device: str  # where it runs, e.g. "cpu", "cuda:0"
    precision: str  # what it computes in: fp32, bf16 or fp16

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, S, S) uint8 -> (logits (N, C), penultimate features (N, D)), float32 numpy."""
        ...


@dataclass
class Checkpoint:
    """A trained stage on disk: its weights, metadata.json and the preset the weights expect."""

    weights: Path
    meta_path: Path
    meta: CheckpointMetadata

    @classmethod
    def open(cls, weights: str | Path) -> "Checkpoint":
        """A run directory, a ``.safetensors`` file or a ``metadata.json``; typed errors otherwise."""
        weights_path, meta_path = resolve_checkpoint(weights)
        return cls(weights_path, meta_path, read_metadata(meta_path))

    @property
    def run_dir(self) -> Path:
        return self.meta_path.parent

    @property
    def preset(self) -> Preset:
        return Preset.from_dict(self.meta.preset)

    @functools.cached_property
    def weights_sha256(self) -> str:
        from hierarchy.core.statcache import file_sha256

        return file_sha256(self.weights)  # hashed once per file version (signed stat cache)
