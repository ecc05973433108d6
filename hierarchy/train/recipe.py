"""The optimisation side of the training recipe (TrainConfig): the input preset the weights ask
for, Adam/AdamW, the learning-rate schedule (warm-up + cosine) and the optional weight EMA.
Their defaults (Adam, constant lr, no EMA) are the original recipe."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from hierarchy.data.preset import Preset

if TYPE_CHECKING:
    from hierarchy.config.train import TrainConfig

DEFAULT_SIZE = 224


def train_preset(cfg: "TrainConfig", arch: Mapping[str, Any]) -> Preset:
    """The preset training and every engine use: the pretrained weights' mean/std (and their input
    size unless ``img_size`` is set); ImageNet mean/std and 224 px without a weights provider."""
    weights = arch.get("weights") or {}
    w = weights.get("preset") or {}
    size = cfg.img_size or int(w.get("size", DEFAULT_SIZE))
    if "mean" in w:
        return Preset(size=size, mean=tuple(w["mean"]), std=tuple(w["std"]))
    return Preset(size=size)


def make_optimizer(cfg: "TrainConfig", model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters instead of ~10 per tensor (40 -> 18 ms per ResNet18 step on CPU)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
               fused=device.type in ("cpu", "cuda") or None)


def lr_at(cfg: "TrainConfig", step: int, steps_per_epoch: int) -> float:
    """Learning rate at global step ``step`` (0-based): linear warm-up over ``warmup_epochs``, then
    constant or cosine to 0 at the end of the last epoch. A function of the step only, so resume
    continues the schedule exactly."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def make_ema(cfg: "TrainConfig", model: nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> Any:
    """An exponential moving average of the weights and buffers (None when ``ema`` is off);
    ``state``: the averaged weights saved by an earlier epoch (resume)."""
    if cfg.ema is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    if state is not None:
        ema.module.load_state_dict(state)
        ema.n_averaged.fill_(1)
    return ema
