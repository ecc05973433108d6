"""Measured ``auto`` for training: which precision and memory format run the actual training step
(forward + backward + optimizer) fastest for this model, input size and batch on this machine.

Candidates are fp32 and, where the device has it natively, bf16 (CPU) or bf16/fp16 (CUDA), each in
channels_last and contiguous; an explicit ``precision:`` in the config keeps only that precision
(memory format has no setting, it is always measured). Each candidate trains a copy of the model on a
random batch: one warm-up step, then :data:`STEPS` timed ones, stopped early when behind. The pick
is cached per machine like inference's (:mod:`hierarchy.core.tunecache`); ``HIERARCHY_TUNE=off`` uses
:func:`hierarchy.models.device.select_precision` and channels_last. Under torchrun rank 0 measures
and every rank uses its pick. See docs/tuning.md.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hierarchy.core.errors import HierarchyError
from hierarchy.core.tunecache import tune_mode, write_cache
from hierarchy.engine.tune import WARM_STOP, Candidate, Measurement, TuneResult, cached_result
from hierarchy.models.device import autocast, choose_memory_format, cpu_supports_bf16, grad_scaler, select_precision
from hierarchy.train import distributed
from hierarchy.train.recipe import make_optimizer

if TYPE_CHECKING:
    from hierarchy.config.train import TrainConfig
    from hierarchy.engine.backends.base import Checkpoint

log = logging.getLogger("hierarchy.train")

STEPS = 2  # timed steps per candidate, after one warm-up step
MAX_BATCH = 32  # larger training batches are timed at this size (the ranking holds, the cost does not grow)
STEP_STOP = 0.85  # a step costs seconds: a candidate below this share of the best after one timed step stops
FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def tune_training(cfg: "TrainConfig", model: nn.Module, arch: dict[str, Any], device: torch.device,
                  size: int) -> str:
    """The precision training computes in (measured when there is a choice); the memory format that
    goes with it is applied to ``model`` and recorded for the trainer (``device.memory_format``)."""
    cands = train_candidates(device, cfg.precision)
    result = None
    if tune_mode() != "off" and len(cands) > 1:
        main = distributed.current().main
        result = distributed.broadcast(training_result(cfg, model, arch, device, size, cands) if main else None)
    pick = result.pick if result is not None else cands[0]
    fmt = FORMATS[pick.memory_format]
    choose_memory_format(device, pick.precision, fmt)
    model.to(memory_format=fmt)
    return pick.precision


def train_candidates(device: torch.device, requested: str) -> list[Candidate]:
    """The conservative choice first (:func:`select_precision`, channels_last), then the others."""
    first = select_precision(device, requested)
    if requested != "auto":
        precisions = [first]
    elif device.type == "cuda":
        precisions = ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    elif device.type == "cpu":
        precisions = ["fp32"] + (["bf16"] if cpu_supports_bf16() else [])
    else:
        precisions = ["fp32"]
    ordered = [first, *(p for p in precisions if p != first)]
    return [Candidate("torch", p, f) for p in ordered for f in FORMATS]


def training_result(cfg: "TrainConfig", model: nn.Module, arch: dict[str, Any], device: torch.device, size: int,
                    cands: list[Candidate], refresh: bool | None = None) -> TuneResult:
    """The cached tuning of this training step, else a new measurement (always with ``refresh``)."""
    batch = min(MAX_BATCH, max(1, cfg.batch_size // distributed.current().world))
    parts = {"kind": "train", "model": {"arch": arch, "optimizer": cfg.optimizer}, "size": size,
             "device": str(device), "batch": batch, "candidates": [c.label() for c in cands]}
    refresh = tune_mode() == "refresh" if refresh is None else refresh
    result = None if refresh else cached_result(parts)
    if result is None:
        with torch.random.fork_rng(devices=[]):  # the run's own randomness does not see the tuning
            rows = measure_steps(cfg, model, device, (batch, size, int(arch["num_classes"])), cands)
        timed = [m for m in rows if m.img_s > 0]
        if not timed:
            raise HierarchyError("tune: every training candidate failed: " + "; ".join(m.note for m in rows))
        result = TuneResult(max(timed, key=lambda m: m.img_s).candidate, batch, rows)
        record = write_cache(parts, result.to_dict())
        result.measured_at, result.cache = record["measured_at"], record["path"]
    log.info("%s", result.summary(f"training {arch.get('backbone', 'model')} at {size} px"))
    return result


def measure_steps(cfg: "TrainConfig", model: nn.Module, device: torch.device, shape: tuple[int, int, int],
                  cands: list[Candidate]) -> list[Measurement]:
    """Every candidate's training img/s on one random batch of ``shape`` (batch, size, classes)."""
    batch, size, n_classes = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, n_classes, (batch,), generator=gen).to(device)
    rows, best = [], 0.0
    for cand in cands:
        try:
            rate, note = time_steps(cfg, model, device, cand, x, y, best)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot train here is never picked
            log.warning("tune: training in %s failed (%s: %s); not a candidate", cand.label(), type(exc).__name__, exc)
            rows.append(Measurement(cand, batch, 0.0, f"failed: {type(exc).__name__}"))
            continue
        rows.append(Measurement(cand, batch, rate, note))
        best = max(best, rate)
    return rows


def time_steps(cfg: "TrainConfig", model: nn.Module, device: torch.device, cand: Candidate, x: torch.Tensor,
               y: torch.Tensor, beat: float) -> tuple[float, str]:
    """img/s of training steps on a copy of ``model`` (its weights and statistics stay untouched)."""
    fmt = FORMATS[cand.memory_format]
    trial = copy.deepcopy(model).to(memory_format=fmt).train()
    opt, scaler = make_optimizer(cfg, trial, device), grad_scaler(device, cand.precision)
    x = x.contiguous(memory_format=fmt)

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(device, cand.precision):
            loss = nn.functional.cross_entropy(trial(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    warm = len(x) / step()
    if beat and warm < beat * WARM_STOP:
        return warm, "stopped after warm-up"
    elapsed = 0.0
    for i in range(1, STEPS + 1):
        elapsed += step()
        if beat and i < STEPS and i * len(x) / elapsed < beat * STEP_STOP:
            return i * len(x) / elapsed, "stopped early"
    return STEPS * len(x) / elapsed, ""


def tune_run(ckpt: "Checkpoint", device: str = "auto") -> TuneResult:
    """``hierarchy tune --train``: measure the training step of a run's model, size and config again."""
    from hierarchy.config.train import TrainConfig
    from hierarchy.models.backbones import model_from_arch
    from hierarchy.models.device import select_device

    stored = (ckpt.meta.model_extra or {}).get("train") or {}
    cfg = TrainConfig(**{k: v for k, v in stored.items() if k in ("batch_size", "optimizer", "precision", "lr")})
    torch_device = select_device(device)
    model = model_from_arch(ckpt.meta.arch).to(torch_device)
    return training_result(cfg, model, ckpt.meta.arch, torch_device, ckpt.preset.size,
                           train_candidates(torch_device, cfg.precision), refresh=True)
