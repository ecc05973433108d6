"""Fake stages for engine tests: predictions come from image colour, no weights, no training.

Each fake predictor records the size of every batch it is called with, so tests can check that
the router calls a stage once per batch group instead of once per image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from hierarchy.data.preset import Preset
from hierarchy.config.stage import Prediction, Stage
from hierarchy.registry import hookimpl

CALLS: dict[str, list[int]] = {}

# A two-stage pipeline of the fake stages: red images go on to the brightness stage.
COLOR_BRIGHT_PIPE = """\
name: fakes
root: color
stages:
  color:
    stage: fake_color
    threshold: 0.6
    routes: {red: bright, other: stop}
  bright:
    stage: fake_bright
    routes: {default: stop}
"""


class FakePredictor:
    def __init__(self, name: str, labels: tuple[str, ...], score: Callable[[np.ndarray], np.ndarray], size: int = 16):
        self.name, self.labels, self.score = name, labels, score
        self.preset = Preset(size=size)
        self.metadata: dict[str, Any] = {}

    def predict(self, batch: torch.Tensor) -> Prediction:
        CALLS.setdefault(self.name, []).append(len(batch))
        means = batch.float().mean(dim=(2, 3)).numpy() / 255.0  # (N, 3) mean RGB in [0, 1]
        return Prediction(probs=self.score(means))


def _two(p_first: np.ndarray) -> np.ndarray:
    return np.stack([p_first, 1.0 - p_first], axis=1)


class ColorStage(Stage):
    """red vs other: probability of 'red' is the red channel mean."""

    name = "fake_color"
    labels = ("red", "other")

    def load_predictor(self, weights: Path | None, **options: str) -> FakePredictor:
        return FakePredictor(self.name, self.labels, lambda m: _two(m[:, 0]))


class BrightStage(Stage):
    """light vs dark: probability of 'light' is the green channel mean."""

    name = "fake_bright"
    labels = ("light", "dark")

    def load_predictor(self, weights: Path | None, **options: str) -> FakePredictor:
        return FakePredictor(self.name, self.labels, lambda m: _two(m[:, 1]))


class BlueStage(Stage):
    """blue vs none: probability of 'blue' is the blue channel mean."""

    name = "fake_blue"
    labels = ("blue", "none")

    def load_predictor(self, weights: Path | None, **options: str) -> FakePredictor:
        return FakePredictor(self.name, self.labels, lambda m: _two(m[:, 2]))


class FakePlugin:
    """A plugin object registered in fixtures (no entry point)."""

    @hookimpl
    def register_stages(self, register) -> None:
        for cls in (ColorStage, BrightStage, BlueStage):
            register(cls)


def solid(path: Path, rgb: tuple[int, int, int], size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)
    return path
