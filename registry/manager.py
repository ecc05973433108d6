"""Plugin manager: discovers stage plugins from entry points, lazily and idempotently.

pluggy's own ``load_setuptools_entrypoints`` stops at the first plugin that fails to import and
does not say which one did, so entry points are loaded one at a time here and every hook
implementation is called separately: one broken plugin is reported by entry-point name and
distribution, and every other plugin keeps working. Every plugin's ``register_sources`` runs
before any plugin's ``register_stages``; registered source types go into the data layer's table
(:mod:`hierarchy.data.sources`), which ``DatasetConfig`` validates against.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Callable

import pluggy

from . import hookspecs

if TYPE_CHECKING:
    from hierarchy.config.stage import Stage
    from hierarchy.data.sources import Source
    from hierarchy.models.weights import WeightsProvider

ENTRY_POINT_GROUP = "hierarchy.stages"
# in this order: stages may use any plugin's sources
HOOKS = ("register_sources", "register_weights", "register_stages")
DISABLE_AUTOLOAD_ENV = "HIERARCHY_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_ENV = "HIERARCHY_PLUGINS"
API_ATTRIBUTE = "HIERARCHY_PLUGIN_API"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")
log = logging.getLogger("hierarchy.registry")


@dataclass(frozen=True)
class PluginInfo:
    name: str
    dist: str | None = None
    version: str | None = None
    module: str = ""

    def __str__(self) -> str:
        where = f"{self.dist} {self.version}" if self.dist else "not from a distribution"
        return f"plugin '{self.name}' ({where})"


@dataclass(frozen=True)
class PluginFailure:
    plugin: PluginInfo
    phase: str  # import | api | hook | register | conflict | select
    error: str

    def __str__(self) -> str:
        return f"{self.plugin}: {self.phase} failed: {self.error}"

    def to_dict(self) -> dict[str, Any]:
        p = self.plugin
        return {"plugin": p.name, "dist": p.dist, "version": p.version, "module": p.module,
                "phase": self.phase, "error": self.error}


@dataclass(frozen=True)
class StageEntry:
    cls: "type[Stage]"
    plugin: PluginInfo


@dataclass(frozen=True)
class SourceEntry:
    cls: "type[Source]"
    plugin: PluginInfo


@dataclass(frozen=True)
class WeightsProviderEntry:
    provider: "WeightsProvider"
    plugin: PluginInfo


@dataclass
class Registry:
    """Stages and source types registered by plugins. Use :func:`get_registry` for the
    process-wide instance."""

    pm: pluggy.PluginManager = field(default_factory=lambda: _new_plugin_manager())
    stages: dict[str, StageEntry] = field(default_factory=dict)
    sources: dict[str, SourceEntry] = field(default_factory=dict)
    weights: dict[str, WeightsProviderEntry] = field(default_factory=dict)  # provider name -> entry
    failures: list[PluginFailure] = field(default_factory=list)
    _conflicts: dict[str, list[PluginInfo]] = field(default_factory=dict)  # stage name -> its plugins
    _source_conflicts: dict[str, list[PluginInfo]] = field(default_factory=dict)
    _autoloaded: bool = False

    def load_entry_points(self) -> None:
        """Import and register every ``hierarchy.stages`` entry point (once)."""
        if self._autoloaded:
            return
        self._autoloaded = True
        if os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() in {"1", "true", "yes"}:
            return
        selected = _selected_plugins()
        eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
        loaded = [self._load_entry_point(ep) for ep in eps if selected is None or ep.name in selected]
        self._collect([p for p in loaded if p is not None])
        for missing in sorted((selected or set()) - {ep.name for ep in eps}):
            self.failures.append(PluginFailure(PluginInfo(missing), "select",
                                               f"{PLUGINS_ENV} names it but no such entry point is installed"))

    def _load_entry_point(self, ep: EntryPoint) -> tuple[object, PluginInfo] | None:
        dist = getattr(ep, "dist", None)
        info = PluginInfo(ep.name, dist.name if dist else None, dist.version if dist else None, ep.value)
        if self.pm.has_plugin(ep.name):
            return None
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import error is the plugin's, not ours
            self.failures.append(PluginFailure(info, "import", _describe(exc)))
            return None
        return (plugin, info) if self._add_plugin(plugin, info) else None

    def register_plugin(self, plugin: object, name: str | None = None, info: PluginInfo | None = None) -> None:
        """Register a plugin object (module, class or instance) and collect its sources and stages now."""
        if info is None:
            name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
            info = PluginInfo(name, module=getattr(plugin, "__name__", type(plugin).__module__))
        if self._add_plugin(plugin, info):
            self._collect([(plugin, info)])

    def _add_plugin(self, plugin: object, info: PluginInfo) -> bool:
        if not _api_compatible(plugin, info, self.failures):
            return False
        try:
            self.pm.register(plugin, name=info.name)
        except ValueError as exc:  # already registered, or hookimpl signature mismatch
            self.failures.append(PluginFailure(info, "register", _describe(exc)))
            return False
        return True

    def _collect(self, plugins: list[tuple[object, PluginInfo]]) -> None:
        """Call every plugin's ``register_sources``, then every plugin's ``register_stages``."""
        adders = {"register_sources": self._add_source, "register_weights": self._add_weights,
                  "register_stages": self._add_stage}
        for hook in HOOKS:
            impls = getattr(self.pm.hook, hook).get_hookimpls()
            for plugin, info in plugins:
                for impl in impls:
                    if impl.plugin is plugin:
                        self._call_hook(impl, info, adders[hook])

    def _call_hook(self, impl: pluggy.HookImpl, info: PluginInfo, add: Callable[[Any, PluginInfo], None]) -> None:
        def register(cls: Any) -> None:
            add(cls, info)

        kwargs = {"register": register} if "register" in impl.argnames else {}
        try:
            impl.function(**kwargs)
        except Exception as exc:  # noqa: BLE001 - a raising hook must not take the others down
            self.failures.append(PluginFailure(info, "hook", _describe(exc)))

    def _add_stage(self, cls: "type[Stage]", info: PluginInfo) -> None:
        problem = _stage_problem(cls)
        if problem:
            self.failures.append(PluginFailure(info, "register", problem))
            return
        name = cls.name
        if name in self._conflicts:
            self._conflicts[name].append(info)
        elif name in self.stages and self.stages[name].cls is not cls:
            first = self.stages.pop(name).plugin
            self._conflicts[name] = [first, info]
        else:
            self.stages[name] = StageEntry(cls, info)
            return
        owners = " and ".join(str(p) for p in self._conflicts[name])
        self.failures.append(PluginFailure(info, "conflict", f"stage '{name}' is registered by {owners}"))

    def _add_source(self, cls: "type[Source]", info: PluginInfo) -> None:
        from hierarchy.core.errors import PluginError
        from hierarchy.data.sources import (register_source_type, source_type_name, source_type_problem,
                                            unregister_source_type)

        problem = source_type_problem(cls)
        if problem:
            self.failures.append(PluginFailure(info, "register", problem))
            return
        name = source_type_name(cls)
        held = self.sources.get(name)
        if held is not None and held.cls is cls:
            return
        if held is not None:  # two plugins claim one type name: neither gets it
            del self.sources[name]
            unregister_source_type(name)
            self._source_conflicts[name] = [held.plugin]
        if name in self._source_conflicts:
            self._source_conflicts[name].append(info)
            owners = " and ".join(str(p) for p in self._source_conflicts[name])
            self.failures.append(PluginFailure(info, "conflict", f"source type '{name}' is registered by {owners}"))
            return
        try:
            register_source_type(cls)
        except PluginError as exc:  # a built-in type holds the name
            self.failures.append(PluginFailure(info, "conflict", f"{exc}; choose another type name"))
            return
        self.sources[name] = SourceEntry(cls, info)

    def _add_weights(self, provider: "WeightsProvider", info: PluginInfo) -> None:
        from .weights import provider_problem

        problem = provider_problem(provider)
        held = self.weights.get(getattr(provider, "name", ""))
        if problem is None and held is not None:
            problem = f"weights provider '{provider.name}' is already registered by {held.plugin}"
        if problem:
            self.failures.append(PluginFailure(info, "conflict" if held else "register", problem))
            return
        self.weights[provider.name] = WeightsProviderEntry(provider, info)

    def weights_providers(self) -> "list[WeightsProvider]":
        """Every registered weights provider, the built-in ones (always registered) first."""
        from . import weights

        if not self.pm.has_plugin(weights.BUILTIN):
            self.register_plugin(weights, info=PluginInfo(weights.BUILTIN, module=weights.__name__))
        entries = sorted(self.weights.values(), key=lambda e: e.plugin.name != weights.BUILTIN)
        return [e.provider for e in entries]

    def forget_sources(self) -> None:
        """Take this registry's source types out of the data layer's table."""
        from hierarchy.data.sources import unregister_source_type

        for name in self.sources:
            unregister_source_type(name)
        self.sources.clear()

    def get(self, name: str) -> "type[Stage]":
        from hierarchy.core.errors import PluginError, UnknownStageError

        if name in self.stages:
            return self.stages[name].cls
        if name in self._conflicts:
            owners = " and ".join(str(p) for p in self._conflicts[name])
            raise PluginError(f"Stage '{name}' is registered by two plugins: {owners}. "
                              f"Uninstall one, or choose plugins with {PLUGINS_ENV}=name1,name2.")
        raise UnknownStageError(self.unknown_message(name))

    def unknown_message(self, name: str, with_failures: bool = True) -> str:
        known = ", ".join(f"{n} (from package {e.plugin.dist or e.plugin.name})" for n, e in sorted(self.stages.items()))
        msg = f"Unknown stage '{name}'; known: {known or 'none'}"
        if self.failures and with_failures:
            msg += f". {len(self.failures)} plugin problem(s): " + "; ".join(str(f) for f in self.failures)
        return msg


def _new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _selected_plugins() -> set[str] | None:
    raw = os.environ.get(PLUGINS_ENV, "").strip()
    return {p.strip() for p in raw.split(",") if p.strip()} if raw else None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _api_compatible(plugin: object, info: PluginInfo, failures: list[PluginFailure]) -> bool:
    from hierarchy.config.stage import PLUGIN_API_VERSION

    declared = getattr(plugin, API_ATTRIBUTE, PLUGIN_API_VERSION)
    if declared == PLUGIN_API_VERSION:
        return True
    failures.append(PluginFailure(info, "api", (
        f"declares {API_ATTRIBUTE} = {declared!r} but this hierarchy supports {PLUGIN_API_VERSION}; "
        "install a plugin release built for this hierarchy version, or upgrade hierarchy")))
    return False


def _stage_problem(cls: object) -> str | None:
    from hierarchy.config.stage import Stage, StageConfig

    if not (inspect.isclass(cls) and issubclass(cls, Stage)):
        return f"register() got {cls!r}, which is not a hierarchy.Stage subclass"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return f"{cls.__qualname__}.name must be a lower-case identifier (letters, digits, _ or -), got {name!r}"
    labels = getattr(cls, "labels", None)
    if not isinstance(labels, (tuple, list)) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
        return f"stage '{name}': labels must be a tuple of at least 2 non-empty strings, got {labels!r}"
    if len(set(labels)) != len(labels) or "default" in labels:
        return f"stage '{name}': labels must be unique and may not be the reserved word 'default': {labels!r}"
    if not (inspect.isclass(cls.Config) and issubclass(cls.Config, StageConfig)):
        return f"stage '{name}': Config must subclass hierarchy.StageConfig"
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        return f"stage '{name}': {cls.__qualname__} does not implement {missing}"
    gone = [m for m in _REMOVED_HOOKS if m in vars(cls)]
    if gone:  # an override the engine would silently ignore: say so instead
        return (f"stage '{name}': {cls.__qualname__} overrides {', '.join(gone)}, which stages no longer have; "
                "the shared builder and trainer read `sources` and `Config` (see docs/plugins.md)")
    return _default_config_problem(cls)


_REMOVED_HOOKS = ("build_dataset", "train")  # Stage methods of plugin API 1 before 0.2


def _default_config_problem(cls: "type[Stage]") -> str | None:
    from pydantic import ValidationError

    from hierarchy.core.yamlio import pydantic_errors

    try:
        cls.Config()
    except ValidationError as exc:
        problems = "; ".join(f"{exc.title}.{line}" for line in pydantic_errors(exc, {}))
        return f"stage '{cls.name}': its default config is invalid: {problems}"
    return None


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, with entry points loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry()
    _REGISTRY.load_entry_points()
    return _REGISTRY


def load_plugins() -> Registry:
    """Load entry-point plugins (idempotent). Returns the registry."""
    return get_registry()


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin programmatically (tests, notebooks)."""
    get_registry().register_plugin(plugin, name=name)


def get_stage(name: str) -> "type[Stage]":
    """Look a stage class up by name; fails loudly with the known names."""
    return get_registry().get(name)


def reset_registry() -> None:
    """Forget every plugin and the source types they added; the next lookup reloads entry points (tests)."""
    global _REGISTRY
    if _REGISTRY is not None:
        _REGISTRY.forget_sources()
    _REGISTRY = None


__all__: list[str] = ["Registry", "get_registry", "load_plugins", "register_plugin", "get_stage",
                      "reset_registry", "PluginInfo", "PluginFailure", "SourceEntry", "StageEntry", "WeightsProviderEntry"]
