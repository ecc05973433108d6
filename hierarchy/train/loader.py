"""Datasets and loaders for training: uint8 tensors from the shared preset, normalised on device."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from hierarchy.core.errors import DatasetError, ImageError
from hierarchy.core.perf import cpu_count
from hierarchy.data.batches import Decoded, decode_batches, decode_item, preset_key
from hierarchy.data.preset import Preset
from hierarchy.train import distributed
from hierarchy.train.augment import Augment

if TYPE_CHECKING:
    from hierarchy.data.cache import SplitCache
    from hierarchy.data.labelled import Sample
    from hierarchy.config.train import TrainConfig

log = logging.getLogger("hierarchy.train")


class ImageDataset(Dataset):
    """(uint8 (3,S,S), label index). Unreadable images yield None and are dropped by the collate."""

    def __init__(self, samples: Sequence["Sample"], labels: Sequence[str], preset: Preset, train: bool, hflip: bool,
                 cache: "SplitCache | None" = None, recipe: Augment | None = None):
        self.samples = list(samples)
        self.index = {lab: i for i, lab in enumerate(labels)}
        self.targets = [self.index[s.label] for s in self.samples]
        self.preset, self.train, self.hflip = preset, train, hflip
        self.recipe = recipe or Augment(hflip=hflip)  # applied to train samples only
        self.cache = cache  # decoded uint8 rows (hierarchy.data.cache); None: decode every time

    def __len__(self) -> int:
        return len(self.samples)

    def decode(self, i: int) -> Decoded:
        """Sample i's uint8 (3, S, S) (or its typed error): from the cache, else decoded now."""
        path = self.samples[i].path
        if self.cache is None:
            return decode_item(path, [self.preset])
        if not self.cache.ok[i]:  # logged once, when the cache was built
            return Decoded(path, error=ImageError("undecodable", path, "could not be decoded into the cache"))
        return Decoded(path, arrays={preset_key(self.preset): self.cache.array[i].copy()})

    def tensor(self, item: Decoded) -> torch.Tensor | None:
        """The decoded item's uint8 tensor, or None (logged, unless the cache logged it) when undecodable."""
        if item.error is None:
            return item.tensor(self.preset)
        if self.cache is None:
            log.warning("skipping %s", item.error)
        return None

    def load(self, i: int) -> torch.Tensor | None:
        return self.tensor(self.decode(i))

    def augment(self, x: torch.Tensor | None, i: int) -> tuple[torch.Tensor, int] | None:
        """The training recipe's augmentation (hierarchy.train.augment; by default a horizontal flip,
        one draw from torch's global RNG) on train samples; val samples pass unchanged."""
        if x is None:
            return None
        return (self.recipe(x) if self.train else x), self.targets[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        return self.augment(self.load(i), i)


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
    val: Loader  # under DDP: this rank's share of val
    generator: torch.Generator
    seed: int
    sampler: Any = None
    val_all: Loader | None = None  # under DDP: the whole val split (for rank 0's calibration and OOD fit)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 1000 + epoch)
        if hasattr(self.sampler, "set_epoch"):  # the distributed samplers draw from seed and epoch
            self.sampler.set_epoch(epoch)


def split_samples(data: Path, labels: Sequence[str]) -> tuple[list["Sample"], list["Sample"]]:
    from hierarchy.data.labelled import load_samples

    samples = load_samples(Path(data), labels=labels)
    train = [s for s in samples if s.split == "train"]
    val = [s for s in samples if s.split == "val"]
    if not train or not val:
        raise DatasetError(f"{data}: training needs both a train and a val split (found {len(train)} train, "
                           f"{len(val)} val). Use `hierarchy build-dataset` or a train/ + val/ ImageFolder tree.")
    return train, val


def default_workers(requested: int | str) -> int:
    """DataLoader worker processes: ``auto`` is 0 on <= 2 cores (the threaded loader is used
    instead, see :func:`loader_kind`), else one per core but one, at most 8."""
    if requested != "auto":
        return int(requested)
    cores = cpu_count()
    return 0 if cores <= 2 else min(8, cores - 1)


def loader_kind(requested: int | str) -> tuple[str, int]:
    """("threads", n): in-process decode threads (``auto`` on <= 2 cores, where worker processes
    cost more than they overlap); ("workers", n): persistent DataLoader worker processes;
    ("main", 0): the plain single-process DataLoader (``--workers 0``)."""
    if requested == "auto" and cpu_count() <= 2:
        return "threads", cpu_count()
    n = default_workers(requested)
    return ("workers", n) if n > 0 else ("main", 0)


class ThreadedLoader:
    """A DataLoader stand-in for few cores: indices come from the same sampler in the main thread,
    the next batch is decoded in a thread pool (:func:`hierarchy.data.batches.decode_batches`)
    while this one trains, and the flip is drawn in the main thread in index order, so a run is as
    deterministic as the single-process DataLoader."""

    def __init__(self, dataset: ImageDataset, batch_size: int, sampler: Any = None, threads: int = 2):
        self.dataset, self.batch_size, self.sampler = dataset, batch_size, sampler
        self.threads = max(1, threads)

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)
        return (n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds, n = self.dataset, self.batch_size
        order = [int(i) for i in (self.sampler if self.sampler is not None else range(len(ds)))]
        batches = decode_batches(order, ds.decode, n, self.threads, path_of=lambda i: ds.samples[i].path)
        for k, items in enumerate(batches):
            yield collate([ds.augment(ds.tensor(d), i) for d, i in zip(items, order[k * n:k * n + len(items)])])


def _caches(data: Path, train_s: list["Sample"], val_s: list["Sample"], size: int) -> tuple[Any, Any]:
    from hierarchy.data.cache import load_or_build

    threads = cpu_count()
    with distributed.rank_zero_first():  # built once, by rank 0; the other ranks then read it
        return (load_or_build(data, train_s, size, "train", threads=threads),
                load_or_build(data, val_s, size, "val", threads=threads))


def batch_loader(ds: ImageDataset, batch_size: int, sampler: Any = None, workers: int | str = "auto",
                 pin_memory: bool = False) -> "ThreadedLoader | DataLoader":
    """Batches of ``ds`` (in ``sampler`` order, else in order) decoded the way ``workers`` asks,
    see :func:`loader_kind`: uint8 (N, 3, S, S) and label indices, undecodable samples dropped."""
    kind, n = loader_kind(workers)
    if kind == "threads":
        return ThreadedLoader(ds, batch_size, sampler, threads=n)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=False, num_workers=n,
                      collate_fn=collate, pin_memory=pin_memory, persistent_workers=n > 0)


def make_loaders(data: Path, labels: Sequence[str], preset: Preset, cfg: "TrainConfig", device: torch.device) -> Loaders:
    """Train (class-weighted or shuffled, seeded) and val loaders; with ``cfg.cache`` both read the
    uint8 cache (built on first use, see hierarchy.data.cache) instead of decoding every epoch."""
    train_s, val_s = split_samples(data, labels)
    train_c, val_c = _caches(data, train_s, val_s, preset.size) if cfg.cache else (None, None)
    train_ds = ImageDataset(train_s, labels, preset, train=True, hflip=cfg.hflip, cache=train_c,
                            recipe=Augment(cfg.hflip, cfg.augment))
    val_ds = ImageDataset(val_s, labels, preset, train=False, hflip=False, cache=val_c)
    gen = torch.Generator().manual_seed(cfg.seed * 1000)
    sampler = train_sampler(train_ds, len(labels), cfg.sampler, gen, cfg.seed)
    pin, info = device.type == "cuda", distributed.current()
    batch = distributed.local_batch(cfg.batch_size) if info.enabled else cfg.batch_size
    train = batch_loader(train_ds, batch, sampler, cfg.workers, pin)
    val = batch_loader(val_ds, batch, distributed.ShardSampler(len(val_ds), info.rank, info.world)
                       if info.enabled else None, cfg.workers, pin)
    val_all = Loader(batch_loader(val_ds, cfg.batch_size, None, cfg.workers, pin), preset) if info.enabled else None
    return Loaders(Loader(train, preset), Loader(val, preset), gen, cfg.seed, sampler, val_all)


def train_sampler(ds: ImageDataset, n_labels: int, kind: str, gen: torch.Generator, seed: int) -> Any:
    """Class-weighted with replacement (``weighted``) or a shuffle, seeded per epoch; under DDP the
    distributed version of either (every rank one disjoint share of the same global draw)."""
    info = distributed.current()
    if kind == "weighted":
        counts = torch.bincount(torch.tensor(ds.targets), minlength=n_labels).clamp(min=1)
        weights = (1.0 / counts.double())[torch.tensor(ds.targets)]
        if info.enabled:
            return distributed.DistributedWeightedSampler(weights, len(ds), info.rank, info.world, seed)
        return WeightedRandomSampler(weights, num_samples=len(ds), replacement=True, generator=gen)
    if info.enabled:
        from torch.utils.data.distributed import DistributedSampler

        return DistributedSampler(ds, info.world, info.rank, shuffle=True, seed=seed)
    return RandomSampler(ds, generator=gen)
