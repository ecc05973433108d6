"""Weights providers in the registry: the built-in plugin that offers the first-party providers
through ``register_weights``, and the check every registered provider must pass."""
from __future__ import annotations

from typing import Callable

from hierarchy.models.weights import WeightsProvider, first_party

from .hookspecs import hookimpl

BUILTIN = "hierarchy-weights"  # the plugin name of the first-party providers


@hookimpl
def register_weights(register: Callable[[WeightsProvider], None]) -> None:
    for provider in first_party():
        register(provider)


def provider_problem(provider: object) -> str | None:
    """Why ``provider`` cannot be registered, or None."""
    if not isinstance(provider, WeightsProvider):
        return f"register() got {provider!r}, which is not a hierarchy.models.weights.WeightsProvider"
    if not isinstance(provider.name, str) or not provider.name:
        return f"{type(provider).__qualname__}.name must be a non-empty string, got {provider.name!r}"
    return None
