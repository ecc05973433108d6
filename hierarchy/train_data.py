"""Datasets and loaders for training: uint8 tensors from the shared preset, normalised on device."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from .errors import DatasetError, ImageError
from .preset import Preset

if TYPE_CHECKING:
    from .data import Sample
    from .train_config import TrainConfig

log = logging.getLogger("hierarchy.train")


class ImageDataset(Dataset):
    """(uint8 (3,S,S), label index). Unreadable images yield None and are dropped by the collate."""

    def __init__(self, samples: Sequence["Sample"], labels: Sequence[str], preset: Preset, train: bool, hflip: bool):
        self.samples = list(samples)
        self.index = {lab: i for i, lab in enumerate(labels)}
        self.targets = [self.index[s.label] for s in self.samples]
        self.preset, self.train, self.hflip = preset, train, hflip

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> torch.Tensor | None:
        from .imageio import load_image

        try:
            return self.preset.to_uint8(load_image(self.samples[i].path, draft_size=self.preset.size))
        except ImageError as exc:
            log.warning("skipping %s", exc)
            return None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        x = self.load(i)
        if x is None:
            return None
        if self.train and self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.targets[i]


def collate(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.long)


@dataclass
class Loader:
    """A DataLoader plus the preset that normalises its uint8 batches on the model's device."""

    loader: DataLoader
    preset: Preset

    @property
    def dataset(self) -> ImageDataset:
        return self.loader.dataset  # type: ignore[return-value]

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.preset.normalize(x)


@dataclass
class Loaders:
    train: Loader
    val: Loader
    generator: torch.Generator
    seed: int

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 1000 + epoch)


def split_samples(data: Path, labels: Sequence[str]) -> tuple[list["Sample"], list["Sample"]]:
    from .data import load_samples

    samples = load_samples(Path(data), labels=labels)
    train = [s for s in samples if s.split == "train"]
    val = [s for s in samples if s.split == "val"]
    if not train or not val:
        raise DatasetError(f"{data}: training needs both a train and a val split (found {len(train)} train, "
                           f"{len(val)} val). Use `hierarchy build-dataset` or a train/ + val/ ImageFolder tree.")
    return train, val


def default_workers(requested: int | str) -> int:
    if requested != "auto":
        return int(requested)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(8, cores - 1)


def make_loaders(data: Path, labels: Sequence[str], preset: Preset, cfg: "TrainConfig", device: torch.device) -> Loaders:
    train_s, val_s = split_samples(data, labels)
    train_ds = ImageDataset(train_s, labels, preset, train=True, hflip=cfg.hflip)
    val_ds = ImageDataset(val_s, labels, preset, train=False, hflip=False)
    gen = torch.Generator().manual_seed(cfg.seed * 1000)
    if cfg.sampler == "weighted":
        counts = torch.bincount(torch.tensor(train_ds.targets), minlength=len(labels)).clamp(min=1)
        weights = (1.0 / counts.double())[torch.tensor(train_ds.targets)]
        sampler = WeightedRandomSampler(weights, num_samples=len(train_ds), replacement=True, generator=gen)
    else:
        sampler = RandomSampler(train_ds, generator=gen)
    workers = default_workers(cfg.workers)
    common = {"num_workers": workers, "collate_fn": collate, "pin_memory": device.type == "cuda",
              "persistent_workers": workers > 0}
    train = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=False, **common)
    val = DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False, **common)
    return Loaders(Loader(train, preset), Loader(val, preset), gen, cfg.seed)
