"""hierarchy: hierarchical image classification with pluggable stages.

Everything a stage plugin needs is importable from here, lazily (``import hierarchy`` loads
nothing else; a name's module is imported on first use)::

    from hierarchy import CocoSource, Ham10000Source, Stage, hookimpl
"""
from __future__ import annotations

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "Stage": "hierarchy.config.stage",
    "StageConfig": "hierarchy.config.stage",
    "Prediction": "hierarchy.config.stage",
    "TrainConfig": "hierarchy.config.train",
    "DatasetConfig": "hierarchy.data.dataset_config",
    "Source": "hierarchy.data.sources",
    "Ham10000Source": "hierarchy.data.sources",
    "CocoSource": "hierarchy.data.sources",
    "FolderSource": "hierarchy.data.sources",
    "hookimpl": "hierarchy.registry",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hierarchy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
