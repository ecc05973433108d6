"""Device and precision selection for torch (training and the torch engine).

``precision: auto`` here is the conservative rule, used where nothing was measured
(``HIERARCHY_TUNE=off``, see docs/tuning.md): bf16 on CUDA (fp16 without bf16), bf16 on CPUs with AMX,
fp32 on every other CPU (AVX512-BF16 without AMX included: bf16 measured slower there). The measured
choice is :mod:`hierarchy.engine.tune` (inference) and :mod:`hierarchy.train.tune` (training). An
explicit request the device cannot serve falls back to fp32 with a warning.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from hierarchy.core import machine
from hierarchy.core.errors import HierarchyError
from hierarchy.core.precision import INFERENCE_ONLY, TRAIN_PRECISIONS, check_precision
from hierarchy.core.tunecache import cpu_default_precision

log = logging.getLogger(__name__)

_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


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


def cpu_supports_bf16() -> bool:
    """Native bf16 matmul on this CPU (AVX512_BF16 or AMX)? Without it bf16 is emulated and slower
    than fp32. Tests monkeypatch this to simulate an unsupported CPU."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    return "AMX" in capability or "BF16" in capability or bool(machine.cpu_flags() & _CPU_BF16_FLAGS)


def select_precision(device: torch.device, requested: str = "auto") -> str:
    """``auto`` (the conservative rule): bf16 on CUDA (fp16 where bf16 is unsupported) and on CPUs
    with native bf16 *and* AMX, fp32 elsewhere. An explicit request the device cannot serve falls back
    to fp32 with a warning."""
    check_precision(requested)
    if requested in INFERENCE_ONLY:
        raise HierarchyError(f"torch computes in {', '.join(TRAIN_PRECISIONS[1:])}; {requested} runs on an exported "
                             f"engine (`hierarchy export RUN --int8 --data DATASET`, then --engine onnx or openvino)")
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return "bf16" if bf16 else "fp16"
        return _fallback(requested, device) if requested == "bf16" and not bf16 else requested
    if device.type == "cpu":
        bf16 = cpu_supports_bf16()
        if requested == "auto":
            return "bf16" if bf16 and cpu_default_precision() == "bf16" else "fp32"
        return requested if requested == "fp32" or (requested == "bf16" and bf16) else _fallback(requested, device)
    return "fp32" if requested == "auto" else requested


def _fallback(requested: str, device: torch.device) -> str:
    log.warning("precision %s is not supported natively on %s; using fp32", requested, device)
    return "fp32"


# ---------------------------------------------------------------- training-time precision


def grad_scaler(device: torch.device, precision: str) -> Any:
    """Loss scaling for fp16 (CUDA AMP); a disabled scaler, which passes calls through, otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def autocast(device: torch.device, precision: str) -> Any:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# The training tuner's pick per (device type, precision), set by :func:`choose_memory_format`.
_CHOSEN_FORMATS: dict[tuple[str, str], torch.memory_format] = {}


def choose_memory_format(device: torch.device, precision: str, fmt: torch.memory_format) -> None:
    """Record the memory format training uses for ``precision`` on ``device`` (what
    :mod:`hierarchy.train.tune` measured fastest); every :func:`memory_format` call then returns it."""
    _CHOSEN_FORMATS[(device.type, precision)] = fmt


def memory_format(device: torch.device, precision: str) -> torch.memory_format:
    """Training's memory format: the tuner's pick (:func:`choose_memory_format`), else channels_last."""
    if (device.type, precision) in _CHOSEN_FORMATS:
        return _CHOSEN_FORMATS[(device.type, precision)]
    # Measured on a 2-core AVX512-BF16/AMX CPU (torch 2.14, ResNet18 at 224, batch 32, allocator thresholds
    # on): fp32 NCHW 2.8 s/step, fp32 channels_last 2.1 s, bf16 autocast NCHW 1.3 s, channels_last 0.67-0.9 s.
    # channels_last is what oneDNN's and cuDNN's fast convolution kernels expect, in every precision.
    return torch.channels_last
