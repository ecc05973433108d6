"""What machine this is: the facts a speed measurement depends on (CPU model and the flags that matter,
cores, architecture, library versions), for the tuner's cache key and every benchmark's header.

Nothing here imports torch or a runtime: versions come from package metadata.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# Flags that change which kernels run fast: bf16/fp16/int8 matmul units and vector widths.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
               "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16", "i8mm")
LIBRARIES = ("torch", "torchvision", "timm", "onnxruntime", "openvino", "numpy", "pillow")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """Every flag /proc/cpuinfo reports (empty where there is none, e.g. macOS)."""
    return _cpuinfo()[1]


def speed_flags() -> tuple[str, ...]:
    """The :data:`SPEED_FLAGS` this CPU has, in that order."""
    flags = cpu_flags()
    return tuple(f for f in SPEED_FLAGS if f in flags)


def has_amx() -> bool:
    return "amx_bf16" in cpu_flags() or "amx_tile" in cpu_flags()


def cores() -> int:
    """CPUs this process may use (affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def describe() -> dict[str, Any]:
    """The machine as a JSON-able dict (see the module docstring)."""
    return {"cpu": cpu_model(), "flags": list(speed_flags()), "cores": cores(), "arch": platform.machine(),
            "system": platform.system(), "python": platform.python_version(), "libraries": library_versions()}


def fingerprint(**extra: Any) -> str:
    """A short hash of :func:`describe` plus ``extra`` (model, input size, ...): equal only where a
    measurement taken under one holds for the other."""
    blob = json.dumps({**describe(), **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def header() -> str:
    """One line for the top of a benchmark table."""
    d = describe()
    libs = ", ".join(f"{k} {v}" for k, v in d["libraries"].items())
    return (f"machine: {d['cpu']} ({d['arch']}), {d['cores']} cores, flags {' '.join(d['flags']) or 'none'}; "
            f"python {d['python']}; {libs}")


def user_cache_dir() -> Path:
    """``$HIERARCHY_CACHE_DIR``, else ``$XDG_CACHE_HOME/hierarchy``, else ``~/.cache/hierarchy``."""
    explicit = os.environ.get("HIERARCHY_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hierarchy"
