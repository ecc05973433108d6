"""The torch backend: a torchvision/timm classifier prepared for inference (BatchNorm folded,
channels_last, bf16 autocast where the CPU has it; see :mod:`hierarchy.models.optimize`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from hierarchy.data.preset import Preset
from hierarchy.engine.backends.base import Checkpoint
from hierarchy.models import resnet as native_resnet
from hierarchy.models.backbones import features_and_logits, model_from_arch
from hierarchy.models.checkpoint import check_state_dict, load_weights
from hierarchy.models.device import select_device, select_precision
from hierarchy.models.metadata import CheckpointMetadata
from hierarchy.models.optimize import plan_for, prepare_model


class TorchBackend:
    """Implements :class:`hierarchy.engine.backends.base.Backend` with a torch module."""

    name = "torch"

    def __init__(self, model: nn.Module, preset: Preset, device: str | torch.device = "auto",
                 precision: str = "auto", copy_model: bool = True):
        self.torch_device = device if isinstance(device, torch.device) else select_device(device)
        self.device = str(self.torch_device)
        self.precision = select_precision(self.torch_device, precision)
        self.preset = preset
        self.plan = plan_for(self.torch_device, self.precision)
        self.model = prepare_model(model, self.torch_device, self.plan, copy_model)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        plan = self.plan
        with torch.inference_mode():
            x = torch.as_tensor(batch).to(self.torch_device, non_blocking=True)
            x = self.preset.normalize(x, plan.input_dtype).contiguous(memory_format=plan.memory_format)
            with torch.autocast(self.torch_device.type, dtype=plan.autocast_dtype,
                                enabled=plan.autocast_dtype is not None):
                features, logits = features_and_logits(self.model, x)
            return logits.float().cpu().numpy(), features.float().cpu().numpy()


def build_model(meta: CheckpointMetadata, weights: Path) -> nn.Module:
    """The checkpoint's fp32 model with its weights loaded (refused before loading if they do not fit
    ``meta.arch``); torchvision's ResNets are rebuilt natively for a faster start."""
    model = native_resnet.build(meta.arch) if native_resnet.supports(meta.arch) else model_from_arch(meta.arch)
    state = load_weights(weights)
    check_state_dict(model, state, weights, meta.arch)
    model.load_state_dict(state, strict=True)
    return model


def load(ckpt: Checkpoint, device: str, precision: str) -> TorchBackend:
    if precision == "int8":
        from hierarchy.engine.quantize import int8_refusal

        raise int8_refusal(ckpt, "torch")
    return TorchBackend(build_model(ckpt.meta, ckpt.weights), ckpt.preset, device=device, precision=precision,
                        copy_model=False)  # built here for this backend alone
