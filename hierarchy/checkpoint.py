"""Checkpoints: weights (safetensors only), metadata (JSON, pydantic-validated) and resumable
training state (``torch.load(weights_only=True)``, never an unsafe fallback).

A run directory holds ``best.safetensors`` + ``metadata.json`` (+ ``last.safetensors`` and the resumable
``train_state.pt`` written by training).
"""
from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import CheckpointError
from .fsutil import atomic_write_json, atomic_write_with
from .preset import Preset

if TYPE_CHECKING:
    from torch import nn

WEIGHTS_FILE = "best.safetensors"
METADATA_FILE = "metadata.json"
FORMAT = "hierarchy.checkpoint"
SCHEMA_VERSION = 1
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
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


def _sniff(path: Path) -> str | None:
    """None if ``path`` looks like safetensors, else why it is refused."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return f"not a safetensors file (only {size} bytes)"
    (n,) = struct.unpack("<Q", head[:8])
    if n < MAX_HEADER_BYTES and n <= size - 8 and head[8:9] == b"{":
        return None
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "not a safetensors file: it is a Python pickle (refused: unpickling can run arbitrary code)"
    if head[:4] == b"PK\x03\x04":
        return "not a safetensors file: it is a zip archive, probably a torch.save() checkpoint (refused)"
    return f"not a safetensors file (oversized/invalid header: declared {n} header bytes in a {size}-byte file)"


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file safely; refuse anything else, and NaN/Inf weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "weights file not found")
    problem = _sniff(path)
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


# ---------------------------------------------------------------- metadata


class CheckpointMetadata(BaseModel):
    """``metadata.json`` next to the weights. Unknown fields are kept (forward compatible)."""

    model_config = ConfigDict(extra="allow")

    format: Literal["hierarchy.checkpoint"] = FORMAT
    schema_version: int = SCHEMA_VERSION
    stage: str = Field(min_length=1)
    labels: list[str] = Field(min_length=1)
    arch: dict[str, Any]
    preset: dict[str, Any]
    temperature: float = Field(default=1.0, gt=0)
    threshold: dict[str, Any] | None = None
    ood: dict[str, Any] | None = None
    epochs: list[dict[str, Any]] = Field(default_factory=list)
    best: dict[str, Any] = Field(default_factory=dict)
    dataset: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, Any] = Field(default_factory=dict)
    created_by: str

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > SCHEMA_VERSION:
            raise ValueError(f"schema_version {v} is newer than this hierarchy reads ({SCHEMA_VERSION}); upgrade hierarchy")
        if v != SCHEMA_VERSION:
            raise ValueError(f"schema_version {v} is invalid (expected {SCHEMA_VERSION})")
        return v

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, v: list[str]) -> list[str]:
        dupes = sorted({x for x in v if v.count(x) > 1})
        if dupes:
            raise ValueError(f"duplicate labels {dupes}")
        return v

    @field_validator("arch")
    @classmethod
    def _arch_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        missing = [k for k in ("backbone", "library", "num_classes") if k not in v]
        if missing:
            raise ValueError(f"missing keys {missing}")
        if v["library"] not in ("torchvision", "timm"):
            raise ValueError(f"library must be torchvision or timm, got {v['library']!r}")
        return v

    @field_validator("preset")
    @classmethod
    def _preset_loads(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            Preset.from_dict(v)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a valid preset ({type(e).__name__}: {e})") from e
        return v

    @model_validator(mode="after")
    def _classes_match_labels(self) -> "CheckpointMetadata":
        if int(self.arch["num_classes"]) != len(self.labels):
            raise ValueError(f"arch.num_classes {self.arch['num_classes']} != {len(self.labels)} labels")
        return self


def _validation_problems(e: ValidationError) -> list[str]:
    return [f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()]


def read_metadata(path: str | Path) -> CheckpointMetadata:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "metadata file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"unreadable metadata JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(path, "metadata must be a JSON object")
    try:
        return CheckpointMetadata.model_validate(data)
    except ValidationError as e:
        raise CheckpointError(path, "invalid checkpoint metadata:\n" + "\n".join(f"  {p}" for p in _validation_problems(e))) from e


def write_metadata(path: str | Path, meta: CheckpointMetadata) -> None:
    atomic_write_json(path, meta.model_dump(mode="json"))


def update_metadata(run_dir: str | Path, **fields: Any) -> CheckpointMetadata:
    """Read ``metadata.json`` (in ``run_dir``, or ``run_dir`` itself if a file), apply ``fields``,
    re-validate and atomically rewrite it. Returns the new metadata."""
    run_dir = Path(run_dir)
    path = run_dir / METADATA_FILE if run_dir.is_dir() else run_dir
    data = read_metadata(path).model_dump(mode="json")
    data.update(fields)
    try:
        meta = CheckpointMetadata.model_validate(data)
    except ValidationError as e:
        raise CheckpointError(path, "update makes the metadata invalid:\n" + "\n".join(f"  {p}" for p in _validation_problems(e))) from e
    write_metadata(path, meta)
    return meta


# ---------------------------------------------------------------- resolution and compatibility


def resolve_checkpoint(weights: str | Path) -> tuple[Path, Path]:
    """A run directory -> (dir/best.safetensors, dir/metadata.json); a weights file -> (file,
    metadata.json beside it); ``metadata.json`` itself -> its run directory."""
    weights = Path(weights)
    if weights.is_file() and weights.name == METADATA_FILE:
        weights = weights.parent
    if weights.is_dir():
        pair = (weights / WEIGHTS_FILE, weights / METADATA_FILE)
    elif weights.is_file():
        pair = (weights, weights.parent / METADATA_FILE)
    else:
        raise CheckpointError(weights, "checkpoint not found (expected a run directory or a .safetensors file)")
    for p in pair:
        if not p.is_file():
            raise CheckpointError(p, f"checkpoint incomplete: {p.name} not found (looked for {pair[0]} and {pair[1]})")
    return pair


def check_compatible(
    meta: CheckpointMetadata,
    stage_name: str,
    labels: Sequence[str],
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Stage name and labels (in order) must match; with ``state_dict``, also check that its
    keys and shapes fit the model ``meta.arch`` describes (built without pretrained weights)."""
    if meta.stage != stage_name or list(meta.labels) != list(labels):
        hint = " (same labels, different order)" if sorted(meta.labels) == sorted(labels) else ""
        raise CheckpointError(path, f"checkpoint is for stage '{meta.stage}' with labels {list(meta.labels)}, "
                              f"pipeline stage '{stage_name}' expects {list(labels)}{hint}")
    if state_dict is not None:
        from .models import model_from_arch

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
