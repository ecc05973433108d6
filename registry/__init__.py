"""Stage plugin registry: pluggy hooks discovered through the ``hierarchy.stages`` entry points."""
from __future__ import annotations

from .hookspecs import hookimpl, hookspec
from .manager import (
    DISABLE_AUTOLOAD_ENV,
    ENTRY_POINT_GROUP,
    PLUGINS_ENV,
    PluginFailure,
    PluginInfo,
    Registry,
    get_registry,
    get_stage,
    load_plugins,
    register_plugin,
    reset_registry,
)

__all__ = [
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV",
    "PluginFailure",
    "PluginInfo",
    "Registry",
    "get_registry",
    "get_stage",
    "hookimpl",
    "hookspec",
    "load_plugins",
    "register_plugin",
    "reset_registry",
]
