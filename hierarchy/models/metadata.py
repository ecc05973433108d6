"""Checkpoint metadata (``metadata.json``, pydantic-validated), run-directory resolution and the
safetensors header sniff: everything about a checkpoint that needs no torch.

``hierarchy run --engine onnx`` reads checkpoints through this module alone, so it never imports
torch; :mod:`hierarchy.models.checkpoint` re-exports every name here for existing callers.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hierarchy.core.errors import CheckpointError
from hierarchy.core.fsutil import atomic_write_json
from hierarchy.data.preset import Preset

WEIGHTS_FILE = "best.safetensors"
METADATA_FILE = "metadata.json"
FORMAT = "hierarchy.checkpoint"
SCHEMA_VERSION = 1
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def sniff_safetensors(path: Path) -> str | None:
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


# ---------------------------------------------------------------- metadata


class CheckpointMetadata(BaseModel):
    """``metadata.json`` next to the weights. Unknown fields are kept (forward compatible)."""

    model_config = ConfigDict(extra="allow", defer_build=True)

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


# ---------------------------------------------------------------- resolution


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


def check_stage(meta: CheckpointMetadata, stage_name: str, labels: Sequence[str], path: str | Path) -> None:
    """The checkpoint must be for ``stage_name`` with exactly ``labels``, in order."""
    if meta.stage != stage_name or list(meta.labels) != list(labels):
        hint = " (same labels, different order)" if meta.stage == stage_name and sorted(meta.labels) == sorted(labels) else ""
        raise CheckpointError(path, f"checkpoint is for stage '{meta.stage}' with labels {list(meta.labels)}, "
                              f"pipeline stage '{stage_name}' expects {list(labels)}{hint}")
