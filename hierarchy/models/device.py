"""Device and precision selection for torch (training and the torch engine).

``precision: auto`` follows the CPU's flags (bf16 autocast on AVX512-BF16/AMX, fp32 elsewhere); an
explicit request the device cannot serve falls back to fp32 with a warning.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from hierarchy.core.errors import HierarchyError
from hierarchy.core.precision import check_precision

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
    check_precision(requested)
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


# ---------------------------------------------------------------- training-time precision


def grad_scaler(device: torch.device, precision: str) -> Any:
    """Loss scaling for fp16 (CUDA AMP); a disabled scaler, which passes calls through, otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def autocast(device: torch.device, precision: str) -> Any:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def memory_format(device: torch.device, precision: str) -> torch.memory_format:
    # Measured on a 2-core AVX512-BF16/AMX CPU (torch 2.14, ResNet18 at 224, batch 32, allocator thresholds
    # on): fp32 NCHW 2.8 s/step, fp32 channels_last 2.1 s, bf16 autocast NCHW 1.3 s, channels_last 0.67-0.9 s.
    # channels_last is what oneDNN's and cuDNN's fast convolution kernels expect, in every precision.
    return torch.channels_last
