"""The shared predictor every stage gets from ``Stage.load_predictor``: device and precision
selection, and a model that maps uint8 batches to calibrated probabilities."""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from hierarchy.models.checkpoint import check_compatible, check_state_dict, load_weights, read_metadata, resolve_checkpoint
from hierarchy.core.errors import HierarchyError
from hierarchy.models.backbones import features_and_logits, model_from_arch
from hierarchy.models import resnet as native_resnet
from hierarchy.models.optimize import plan_for, prepare_model
from hierarchy.ood.fit import OODScorer, load_scorer
from hierarchy.data.preset import Preset
from hierarchy.config.stage import Prediction

if TYPE_CHECKING:
    from hierarchy.config.stage import Stage

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


# ---------------------------------------------------------------- device and precision


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def select_device(name: str = "auto") -> torch.device:
    """``auto``: cuda, else mps, else cpu. An explicitly requested device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise HierarchyError(f"invalid device '{name}' ({e}); use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HierarchyError(
                f"device '{name}' requested but CUDA is not available (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}; no GPU or driver found); use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HierarchyError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps" and not _mps_available():
        raise HierarchyError(f"device '{name}' requested but Apple MPS is not available; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise HierarchyError(f"unsupported device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    return device


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_supports_bf16() -> bool:
    """Native bf16 matmul on this CPU (AVX512_BF16 or AMX)? Without it bf16 is emulated and slower
    than fp32. Tests monkeypatch this to simulate an unsupported CPU."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    return "AMX" in capability or "BF16" in capability or bool(_cpu_flags() & _CPU_BF16_FLAGS)


def select_precision(device: torch.device, requested: str = "auto") -> str:
    """``auto``: bf16 on CUDA (fp16 where bf16 is unsupported) and on CPUs with native bf16,
    fp32 elsewhere. An explicit request the device cannot serve falls back to fp32 with a warning."""
    if requested not in PRECISIONS:
        raise HierarchyError(f"unknown precision '{requested}'; use one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return "bf16" if bf16 else "fp16"
        return _fallback(requested, device) if requested == "bf16" and not bf16 else requested
    if device.type == "cpu":
        bf16 = cpu_supports_bf16()
        if requested == "auto":
            return "bf16" if bf16 else "fp32"
        return requested if requested == "fp32" or (requested == "bf16" and bf16) else _fallback(requested, device)
    return "fp32" if requested == "auto" else requested


def _fallback(requested: str, device: torch.device) -> str:
    log.warning("precision %s is not supported natively on %s; using fp32", requested, device)
    return "fp32"


# ---------------------------------------------------------------- predictor


class TorchPredictor:
    """Implements :class:`hierarchy.config.stage.Predictor` for a torchvision/timm classifier."""

    def __init__(
        self,
        model: nn.Module,
        labels: Sequence[str],
        preset: Preset,
        metadata: dict[str, Any] | None = None,
        device: str | torch.device = "auto",
        precision: str = "auto",
        temperature: float = 1.0,
        ood_scorer: OODScorer | None = None,
        copy_model: bool = True,
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.labels = list(labels)
        self.preset = preset
        self.metadata = dict(metadata or {})
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.precision = select_precision(self.device, precision)
        self.temperature = float(temperature)
        self.plan = plan_for(self.device, self.precision)
        self.model = prepare_model(model, self.device, self.plan, copy_model)  # BN folded, channels_last, bf16 on CPU
        self.ood_scorer = ood_scorer.to(self.device) if ood_scorer is not None else None

    def _check_batch(self, batch: torch.Tensor) -> None:
        size = self.preset.size
        if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 tensor batch, got {getattr(batch, 'dtype', type(batch))}")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(f"expected a batch of shape (N, 3, {size}, {size}), got {tuple(batch.shape)}")

    def predict(self, batch: torch.Tensor, return_logits: bool = False, return_features: bool = False) -> Prediction:
        """(N, 3, S, S) uint8 -> probabilities softmax(logits / temperature), (N, C) float32."""
        self._check_batch(batch)
        with torch.inference_mode():
            plan = self.plan
            x = self.preset.normalize(batch.to(self.device, non_blocking=True), plan.input_dtype)
            x = x.contiguous(memory_format=plan.memory_format)
            with torch.autocast(self.device.type, dtype=plan.autocast_dtype, enabled=plan.autocast_dtype is not None):
                if return_features or self.ood_scorer is not None:  # OOD reuses this forward pass
                    features, logits = features_and_logits(self.model, x)
                else:
                    features, logits = None, self.model(x)
            logits, features = logits.float(), (None if features is None else features.float())
            if logits.shape[1] != len(self.labels):
                raise HierarchyError(f"model outputs {logits.shape[1]} classes but the stage has {len(self.labels)} labels")
            probs = torch.softmax(logits / self.temperature, dim=1)
            ood = None if self.ood_scorer is None else self.ood_scorer.score(features, logits)
            return Prediction(
                probs=probs.cpu().numpy().astype(np.float32),
                logits=logits.cpu().numpy() if return_logits else None,
                ood=ood.cpu().numpy().astype(np.float32) if ood is not None else None,
                features=features.float().cpu().numpy() if return_features else None,
            )


def load_predictor(
    stage: "Stage", weights: Path, device: str = "auto", precision: str = "auto"
) -> TorchPredictor:
    """Load a checkpoint (run directory or .safetensors with metadata.json beside it) for ``stage``,
    refusing it before loading if the stage, labels or architecture do not match."""
    torch_device = select_device(device)
    weights_path, meta_path = resolve_checkpoint(weights)
    meta = read_metadata(meta_path)
    check_compatible(meta, stage.name, stage.labels, meta_path)
    model = native_resnet.build(meta.arch) if native_resnet.supports(meta.arch) else model_from_arch(meta.arch)
    state = load_weights(weights_path)
    check_state_dict(model, state, weights_path, meta.arch)
    model.load_state_dict(state, strict=True)
    return TorchPredictor(
        model,
        stage.labels,
        Preset.from_dict(meta.preset),
        meta.model_dump(mode="json"),
        device=torch_device,
        precision=precision,
        temperature=meta.temperature,
        ood_scorer=load_scorer(meta.ood, meta_path.parent),
        copy_model=False,  # built here for this predictor alone
    )
