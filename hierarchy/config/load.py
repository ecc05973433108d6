"""Loading a stage's training/dataset config from YAML plus CLI overrides, validated by pydantic."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from pydantic import ValidationError

from hierarchy.core.errors import ConfigError
from hierarchy.config.stage import Stage, StageConfig
from hierarchy.core.yamlio import load_yaml, pydantic_errors


def load_stage_config(stage_cls: type[Stage], path: str | os.PathLike | None = None,
                      train: Mapping[str, Any] | None = None, dataset: Mapping[str, Any] | None = None) -> StageConfig:
    """Defaults of ``stage_cls.Config``, then the YAML file (if any), then non-None CLI overrides.

    The YAML has the shape ``{stage: name, dataset: {...}, train: {...}}``; ``stage`` is optional
    and, when present, must match. Every problem is reported with its YAML path."""
    data: dict[str, Any] = {}
    lines: dict = {}
    source = str(path) if path else "command line"
    if path is not None:
        raw, lines = load_yaml(path)
        if not isinstance(raw, dict):  # an empty file (None) too: a config given explicitly must say something
            got = "the file is empty" if raw is None else f"got a {type(raw).__name__}"
            raise ConfigError(source, [f"(top level): expected a mapping with dataset: and train: sections ({got})"])
        data = dict(raw or {})
        named = data.pop("stage", stage_cls.name)
        if named != stage_cls.name:
            raise ConfigError(source, [f"stage: this config is for stage '{named}', not '{stage_cls.name}'"])
    defaults = stage_cls.Config().model_dump()
    for section, overrides in (("train", train), ("dataset", dataset)):
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        base = data.get(section, {})
        if (given or section in data) and isinstance(base, dict):  # a wrong type stays, for pydantic to report
            # keys not given keep the stage's own defaults (e.g. its dataset sources), not the base class's
            data[section] = {**defaults.get(section, {}), **base, **given}
    try:
        return stage_cls.Config.model_validate(data) if data else stage_cls.Config()
    except ValidationError as exc:
        raise ConfigError(source, pydantic_errors(exc, lines)) from None


def dump_stage_config(config: StageConfig, stage_name: str) -> dict[str, Any]:
    """JSON/YAML-safe dict of a resolved config (paths as strings)."""
    return {"stage": stage_name, **config.model_dump(mode="json")}


def parse_source_roots(pairs: list[str] | None, **named: str | None) -> dict[str, Path]:
    """``--source NAME=DIR`` pairs plus sugar flags like ``--ham10000 DIR`` -> {key: Path}."""
    roots = {k: Path(v) for k, v in named.items() if v}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ConfigError("command line", [f"--source: expected NAME=DIR, got {pair!r}"])
        roots[key] = Path(value)
    return roots
