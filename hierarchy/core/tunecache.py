"""The tuner's cache and its switch: one JSON file per measurement key under
``machine.user_cache_dir()/tune/``, ``HIERARCHY_TUNE`` (on, off, refresh) and the conservative rule
used when tuning is off.

A file echoes its full key (the parts asked for plus :func:`hierarchy.core.machine.describe`) and a
schema version. On read, a corrupt file, another schema or a key other than the one asked for (a
"foreign" file: copied from another machine, or a hash collision) is ignored with a warning naming
the file, never trusted; the caller measures again and overwrites it. Nothing here imports torch.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from hierarchy.core import machine
from hierarchy.core.errors import ConfigError
from hierarchy.core.fsutil import atomic_write_json

log = logging.getLogger("hierarchy.tune")

SCHEMA = 2  # 2: inference measurements carry start_s
FORMAT = "hierarchy.tune"
ENV = "HIERARCHY_TUNE"
_MODES = {"": "on", "on": "on", "auto": "on", "1": "on", "off": "off", "0": "off", "refresh": "refresh"}


def tune_mode() -> str:
    """``on`` (default: measure once, then reuse the cache), ``off`` (no measuring, no cache: the
    conservative rule) or ``refresh`` (measure again and overwrite), from ``$HIERARCHY_TUNE``."""
    raw = os.environ.get(ENV, "").strip().lower()
    if raw not in _MODES:
        raise ConfigError("environment", [f"{ENV}: unknown value {raw!r}; use on, off or refresh"])
    return _MODES[raw]


def cpu_default_precision() -> str:
    """The conservative CPU rule used without measuring: bf16 only where AMX makes it reliably
    faster; fp32 elsewhere, also on AVX512-BF16 CPUs without AMX (where bf16 measured 1.5x slower)."""
    return "bf16" if machine.has_amx() else "fp32"


def full_key(parts: dict[str, Any]) -> dict[str, Any]:
    """``parts`` (kind, model, size, device, ...) plus the machine, as JSON would give it back."""
    return json.loads(json.dumps({**parts, "machine": machine.describe()}, sort_keys=True, default=str))


def cache_path(parts: dict[str, Any]) -> Path:
    kind = str(parts.get("kind", "tune"))
    return machine.user_cache_dir() / "tune" / f"{kind}-{machine.fingerprint(**parts)}.json"


def read_cache(parts: dict[str, Any]) -> dict[str, Any] | None:
    """The stored record (``result``, ``measured_at``, ``path``) for ``parts`` on this machine, or
    None when there is none or it cannot be trusted (warned, naming the file)."""
    path = cache_path(parts)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("tune cache %s is unreadable (%s); ignoring it and measuring again", path, exc)
        return None
    problem = _record_problem(data, full_key(parts))
    if problem:
        log.warning("tune cache %s %s; ignoring it and measuring again", path, problem)
        return None
    return {"result": data["result"], "measured_at": data["measured_at"], "path": str(path)}


def _record_problem(data: Any, key: dict[str, Any]) -> str | None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return "is not a hierarchy tune record"
    if data.get("schema") != SCHEMA:
        return f"has schema {data.get('schema')!r}, not {SCHEMA}"
    if data.get("key") != key:
        return "was measured for another key (model, input size, machine or library versions differ)"
    if not isinstance(data.get("result"), dict) or not isinstance(data.get("measured_at"), str):
        return "has no result"
    return None


def write_cache(parts: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Store ``result`` for ``parts`` atomically; returns the record as :func:`read_cache` would.
    A cache directory that cannot be written is warned about, not fatal (the result is still used)."""
    path = cache_path(parts)
    record = {"format": FORMAT, "schema": SCHEMA, "key": full_key(parts),
              "measured_at": time.strftime("%Y-%m-%d %H:%M"), "result": result}
    try:
        atomic_write_json(path, record)
    except OSError as exc:
        log.warning("cannot write the tune cache %s (%s); the measurement is used but not kept", path, exc)
    return {"result": result, "measured_at": record["measured_at"], "path": str(path)}
