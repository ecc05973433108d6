"""Hook specifications for hierarchy plugins. Markers and bodiless specs only."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from hierarchy.config.stage import Stage
    from hierarchy.data.sources import Source
    from hierarchy.models.weights import WeightsProvider

PROJECT = "hierarchy"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_stages(register: "Callable[[type[Stage]], None]") -> None:
    """Register stage classes by calling ``register(StageSubclass)`` once per stage."""


@hookspec
def register_sources(register: "Callable[[type[Source]], None]") -> None:
    """Register dataset source types by calling ``register(SourceSubclass)`` once per type. Every
    plugin's sources are registered before any plugin's stages, so a stage may use any of them."""


@hookspec
def register_weights(register: "Callable[[WeightsProvider], None]") -> None:
    """Register pretrained-weights providers by calling ``register(provider)`` once per provider
    (an instance of :class:`hierarchy.models.weights.WeightsProvider`). Providers are asked in
    registration order, the built-in ones first, for ``--pretrained TAG`` of a backbone."""
