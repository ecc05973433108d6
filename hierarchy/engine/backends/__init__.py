"""The one list of inference engines, and ``--engine auto``.

Each engine is an :class:`EngineSpec`: what it needs (a runtime package, an up-to-date export), what
it can serve (devices, precisions) and the module whose ``load(checkpoint, device, precision)``
returns its :class:`~hierarchy.engine.backends.base.Backend`. A new engine registers the same way
(:func:`register_engine`). ``auto`` picks the first exported engine of :data:`AUTO_ORDER` whose needs
are met, else torch, and says why (:func:`choose_engine`).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hierarchy.core.errors import ConfigError

if TYPE_CHECKING:
    from hierarchy.engine.backends.base import Backend, Checkpoint

AUTO = "auto"


@dataclass(frozen=True)
class EngineSpec:
    name: str
    module: str  # has load(ckpt, device, precision) -> Backend
    summary: str
    runtime: str | None = None  # the package it imports (None: torch, always installed)
    extra: str | None = None  # the pip extra that installs it
    exported: bool = False  # runs the ONNX file `hierarchy export` writes
    devices: tuple[str, ...] = ("cpu", "cuda", "mps")
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")

    def load(self, ckpt: "Checkpoint", device: str, precision: str) -> "Backend":
        return importlib.import_module(self.module).load(ckpt, device, precision)


ENGINES: dict[str, EngineSpec] = {}


def register_engine(spec: EngineSpec) -> None:
    if spec.name == AUTO or spec.name in ENGINES:
        raise ValueError(f"engine name {spec.name!r} is taken")
    ENGINES[spec.name] = spec


register_engine(EngineSpec("torch", "hierarchy.engine.backends.torch_backend",
                           "PyTorch; CUDA, MPS or CPU, bf16 autocast on capable CPUs"))
register_engine(EngineSpec("onnx", "hierarchy.engine.backends.onnx_backend",
                           "ONNX Runtime on the exported model; fp32 (int8 after export --int8), fast start, no torch",
                           runtime="onnxruntime", extra="onnx", exported=True, devices=("cpu", "cuda"),
                           precisions=("fp32", "int8")))
register_engine(EngineSpec("openvino", "hierarchy.engine.backends.openvino_backend",
                           "OpenVINO on the exported model; CPU, bf16 where native, no torch",
                           runtime="openvino", extra="openvino", exported=True, devices=("cpu",),
                           precisions=("fp32", "bf16", "fp16", "int8")))

# Exported engines `auto` tries, fastest first as measured on CPU (docs/performance.md); torch is the
# fallback. Deciding between candidates by timing them on the machine at hand is the tuner's job.
AUTO_ORDER = ("openvino", "onnx")


def engine_names() -> tuple[str, ...]:
    return (AUTO, *ENGINES)


def get_engine(name: str) -> EngineSpec:
    """The engine called ``name``; a :class:`ConfigError` listing the known ones otherwise."""
    if name not in ENGINES:
        raise ConfigError("command line", [f"--engine: unknown engine {name!r}; use one of {', '.join(engine_names())}"])
    return ENGINES[name]


def unmet_need(spec: EngineSpec, ckpt: "Checkpoint", device: str, precision: str) -> str | None:
    """Why ``spec`` cannot run this checkpoint here, or None. Imports nothing heavy."""
    from hierarchy.engine.exported import export_problem, runtime_installed
    from hierarchy.engine.quantize import int8_problem

    kind = device.partition(":")[0]
    if device == AUTO and "cuda" not in spec.devices and _gpu_present():
        return "a GPU is present and it runs on CPU only"
    if device != AUTO and kind not in spec.devices:
        return f"it cannot run on {device} (serves {', '.join(spec.devices)})"
    if precision != AUTO and precision not in spec.precisions:
        return f"it cannot compute in {precision} (serves {', '.join(spec.precisions)})"
    if spec.runtime and not runtime_installed(spec.runtime):
        return f"{spec.runtime} is not installed (pip install 'hierarchy-cascade[{spec.extra}]')"
    if not spec.exported:
        return None
    return int8_problem(ckpt, spec.name) if precision == "int8" else export_problem(ckpt)


def choose_engine(requested: str, ckpt: "Checkpoint", device: str, precision: str) -> tuple[EngineSpec, str]:
    """The engine to load ``ckpt`` with and why: ``requested`` itself, or for ``auto`` the first of
    :data:`AUTO_ORDER` whose needs are met, else torch (the reason lists what each lacked)."""
    if requested != AUTO:
        return get_engine(requested), "requested"
    skipped: dict[str, list[str]] = {}  # problem -> engines it rules out (one line for a shared cause)
    for name in AUTO_ORDER:
        problem = unmet_need(ENGINES[name], ckpt, device, precision) if name in ENGINES else "not registered"
        if problem is None:
            return ENGINES[name], f"auto: {ENGINES[name].runtime} installed and {ckpt.weights.stem}.onnx up to date"
        skipped.setdefault(problem, []).append(name)
    return ENGINES["torch"], "auto: " + "; ".join(f"not {', '.join(names)}: {p}" for p, names in skipped.items())


def _gpu_present() -> bool:
    """A cheap sign of an NVIDIA GPU (no torch import): the driver's device nodes."""
    return os.path.exists("/dev/nvidiactl")
