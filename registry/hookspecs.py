"""Hook specifications for hierarchy plugins. Markers and bodiless specs only."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from hierarchy.config.stage import Stage

PROJECT = "hierarchy"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_stages(register: "Callable[[type[Stage]], None]") -> None:
    """Register stage classes by calling ``register(StageSubclass)`` once per stage."""
