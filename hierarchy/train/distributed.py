"""Native DDP under ``torchrun``: process group, the distributed weighted sampler, gathered
validation, rank-0-only writes.

``torchrun --nproc-per-node N -m hierarchy train ...`` starts N processes with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` set; :func:`setup` joins them (NCCL on CUDA, one device per
process, gloo on CPU). ``train.batch_size`` stays the *global* batch: each rank takes
``batch_size / N`` samples of every global batch, so gradients (averaged by DDP) and the learning
rate schedule match a one-process run, and ``--resume`` may use a different process count.
Without ``WORLD_SIZE`` > 1 every function here is a no-op and training runs in one process.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger("hierarchy.train")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes the run directory, logs progress and fits calibration/OOD."""
        return self.rank == 0


def env_info() -> DistInfo:
    """The ranks torchrun put in the environment (one process: rank 0 of 1)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("WORLD_SIZE", 1)))


def current() -> DistInfo:
    """The ranks of the initialised process group, else one process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())
    return DistInfo()


def setup(device: str | None) -> tuple[DistInfo, str | None]:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; returns the ranks and the device this
    process trains on (``cuda:LOCAL_RANK`` with NCCL when CUDA is there and ``device`` allows it, else
    ``cpu`` with gloo). One process: ``device`` unchanged."""
    info = env_info()
    if not info.enabled:
        return info, device
    use_cuda = torch.cuda.is_available() and str(device or "auto").split(":")[0] in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    log.info("DDP rank %d/%d (%s)", info.rank, info.world, dist.get_backend())
    return info, f"cuda:{info.local_rank}" if use_cuda else "cpu"


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().enabled:
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block (e.g. builds the training cache) before the other ranks do (and find it built)."""
    info = current()
    if info.enabled and not info.main:
        dist.barrier()
    yield
    if info.enabled and info.main:
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the run directory it created, ...)."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module | None:
    """``model`` in DistributedDataParallel (gradients all-reduced in backward); None in one process."""
    if not current().enabled:
        return None
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def local_batch(batch_size: int) -> int:
    """This rank's share of the global batch."""
    world = current().world
    if batch_size % world:
        log.warning("batch size %d is not a multiple of %d processes; each takes %d", batch_size, world,
                    max(1, batch_size // world))
    return max(1, batch_size // world)


class DistributedWeightedSampler(torch.utils.data.Sampler[int]):
    """Weighted sampling with replacement, split across ranks. Every rank draws the same global
    sequence (``torch.multinomial`` seeded by ``seed * 1000 + epoch``, exactly what a one-process
    WeightedRandomSampler with that generator draws), padded to a multiple of ``world`` by wrapping,
    and keeps positions ``rank, rank + world, ...``: the ranks' shares are disjoint, together they are
    the global draw, and each global batch of ``b * world`` is split ``b`` per rank."""

    def __init__(self, weights: Sequence[float] | torch.Tensor, num_samples: int, rank: int = 0, world: int = 1,
                 seed: int = 0, replacement: bool = True):
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples, self.rank, self.world = num_samples, rank, world
        self.seed, self.replacement, self.epoch = seed, replacement, 0
        self.per_rank = -(-num_samples // world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.multinomial(self.weights, self.num_samples, self.replacement, generator=gen).tolist()
        pad = self.per_rank * self.world - len(order)
        return order + order[:pad]

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_order()[self.rank::self.world])

    def __len__(self) -> int:
        return self.per_rank


class ShardSampler(torch.utils.data.Sampler[int]):
    """Positions ``rank, rank + world, ...`` of ``order`` (in order, no padding): each validation
    sample is scored once, by one rank."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def gather_arrays(*arrays: Any) -> list[Any]:
    """Each array concatenated over the ranks (rank order); unchanged in one process."""
    if not current().enabled:
        return list(arrays)
    import numpy as np

    parts: list[Any] = [None] * current().world
    dist.all_gather_object(parts, arrays)
    return [np.concatenate([p[i] for p in parts]) for i in range(len(arrays))]


def all_ranks_sum(values: Sequence[float]) -> list[float]:
    """Sum of ``values`` over the ranks (all-reduce); unchanged in one process."""
    if not current().enabled:
        return list(values)
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(list(values), dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return t.cpu().tolist()
