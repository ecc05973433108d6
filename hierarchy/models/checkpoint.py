"""Checkpoint files that need torch: weights (safetensors only), resumable training state
(``torch.load(weights_only=True)``, never an unsafe fallback) and the weights/architecture checks.

A run directory holds ``best.safetensors`` + ``metadata.json`` (+ ``last.safetensors`` and the resumable
``train_state.pt`` written by training). Metadata and run-directory resolution live in the torch-free
:mod:`hierarchy.models.metadata`.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from hierarchy.core.errors import CheckpointError
from hierarchy.core.fsutil import atomic_write_with
from hierarchy.models.metadata import CheckpointMetadata, check_stage, sniff_safetensors

if TYPE_CHECKING:
    from torch import nn

_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


# ---------------------------------------------------------------- weights


def save_weights(
    path: str | Path, model_or_state_dict: "nn.Module | Mapping[str, torch.Tensor]", metadata: dict[str, str] | None = None
) -> None:
    """Atomically write a safetensors file. Tensors are cloned contiguous CPU copies, because
    safetensors refuses tensors that share storage (tied weights, views)."""
    from safetensors.torch import save_file

    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) else model_or_state_dict
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(path, f"cannot save non-tensor entries as weights: {bad}")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file safely; refuse anything else, and NaN/Inf weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "weights file not found")
    problem = sniff_safetensors(path)
    if problem:
        raise CheckpointError(path, problem)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(path, f"corrupt safetensors file: {e}") from e
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(path, f"tensor '{name}' contains NaN/Inf (diverged training or a corrupt file)")
    return state


# ---------------------------------------------------------------- training state


def _check_plain(obj: Any, where: str = "state") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is not a str/int")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"{where} is a {type(obj).__name__}; training state may only hold dict/list/tuple/"
                        "str/int/float/bool/None/torch.Tensor (so it loads with weights_only=True)")


def save_train_state(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically ``torch.save`` resumable state. Only plain types and tensors are accepted
    (RNG states as tensors, history as lists of dicts of floats), so loading never needs pickle."""
    _check_plain(state)
    atomic_write_with(path, lambda tmp: torch.save(state, tmp))


def describe_load_error(e: BaseException) -> str:
    """The useful part of a ``torch.load`` failure, without torch's advice to retry unsafely."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = text.split(marker, 1)[1].strip().splitlines()[0].split(". ", 1)[0]
    else:
        reason = re.sub(r"\x1b\[[0-9;]*m", "", text).strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {reason[:300]}"


def load_train_state(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``; anything outside the allowlist is refused, never retried unsafely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "training state file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        raise CheckpointError(path, "refused: contains objects outside the weights_only allowlist, or is "
                              f"not a torch.save() file ({describe_load_error(e)})") from e
    if not isinstance(state, dict):
        raise CheckpointError(path, f"training state is a {type(state).__name__}, expected a dict")
    return state


# ---------------------------------------------------------------- compatibility


def check_compatible(
    meta: CheckpointMetadata,
    stage_name: str,
    labels: Sequence[str],
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Stage name and labels (in order) must match; with ``state_dict``, also check that its
    keys and shapes fit the model ``meta.arch`` describes (built without pretrained weights)."""
    check_stage(meta, stage_name, labels, path)
    if state_dict is not None:
        from hierarchy.models.backbones import model_from_arch

        check_state_dict(model_from_arch(meta.arch), state_dict, path, meta.arch)


def check_state_dict(
    model: "nn.Module", state_dict: Mapping[str, torch.Tensor], path: str | Path, arch: Mapping[str, Any] | None = None
) -> None:
    """Refuse weights whose keys or shapes differ from ``model``'s, before anything is loaded."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return
    what = f"{arch['library']}/{arch['backbone']} with {arch['num_classes']} classes" if arch else type(model).__name__
    parts = [f"{label} {len(keys)}: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatches (file vs model)", shapes))
             if keys]
    raise CheckpointError(path, f"weights do not match the architecture in the metadata ({what}): " + "; ".join(parts))
