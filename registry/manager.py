"""Plugin manager: discovers stage plugins from entry points, lazily and idempotently.

pluggy's own ``load_setuptools_entrypoints`` stops at the first plugin that fails to import and
does not say which one did, so entry points are loaded one at a time here and every hook
implementation is called separately: one broken plugin is reported by entry-point name and
distribution, and every other plugin keeps working. Every plugin's ``register_sources`` runs
before any plugin's ``register_stages``; registered source types go into the data layer's table
(:mod:`hierarchy.data.sources`), which ``DatasetConfig`` validates against.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, distributions, entry_points
from typing import TYPE_CHECKING, Any, Callable

import pluggy

from . import checks, hookspecs

if TYPE_CHECKING:
    from hierarchy.config.stage import Stage
    from hierarchy.data.sources import Source
    from hierarchy.models.weights import WeightsProvider

ENTRY_POINT_GROUP = "hierarchy.stages"
# in this order: stages may use any plugin's sources
HOOKS = ("register_sources", "register_weights", "register_stages")
DISABLE_AUTOLOAD_ENV = "HIERARCHY_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_ENV = "HIERARCHY_PLUGINS"
EXCLUDE_PREFIX = "no:"  # HIERARCHY_PLUGINS=no:NAME leaves one plugin out (pytest's -p no:NAME)
FIRST_PARTY_DIST = "hierarchy-cascade"  # this project's distribution: its stage names win conflicts
log = logging.getLogger("hierarchy.registry")


@dataclass(frozen=True)
class PluginInfo:
    name: str
    dist: str | None = None
    version: str | None = None
    module: str = ""
    editable: str | None = None  # the source folder of an editable install (pip install -e)

    @property
    def first_party(self) -> bool:
        return self.dist == FIRST_PARTY_DIST

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
                "editable": p.editable, "phase": self.phase, "error": self.error}


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
        selected, excluded = _selected_plugins()
        eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
        loaded = [self._load_entry_point(ep) for ep in eps if _wanted(ep, selected, excluded)]
        self._collect([p for p in loaded if p is not None])
        for missing in sorted(((selected or set()) | excluded) - {ep.name for ep in eps}):
            self.failures.append(PluginFailure(PluginInfo(missing), "select",
                                               f"{PLUGINS_ENV} names it but no such entry point is installed"))

    def _load_entry_point(self, ep: EntryPoint) -> tuple[object, PluginInfo] | None:
        dist = getattr(ep, "dist", None)
        info = PluginInfo(ep.name, dist.name if dist else None, dist.version if dist else None, ep.value,
                          _editable_dir(dist))
        if self.pm.has_plugin(ep.name):
            return None
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import error is the plugin's, not ours
            self.failures.append(PluginFailure(info, "import", _describe(exc) + checks.import_hint(exc, info.editable)))
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
        problem = checks.api_problem(plugin)
        if problem:
            self.failures.append(PluginFailure(info, "api", problem))
            return False
        try:
            self.pm.register(plugin, name=info.name)
        except ValueError as exc:  # already registered, or hookimpl signature mismatch
            self.failures.append(PluginFailure(info, "register", _describe(exc)))
            return False
        for problem in checks.unknown_hook_problems(self.pm, plugin, HOOKS):  # pluggy's check_pending
            self.failures.append(PluginFailure(info, "hook", problem))
        return True

    def _collect(self, plugins: list[tuple[object, PluginInfo]]) -> None:
        """Call every plugin's ``register_sources``, then every plugin's ``register_stages``."""
        adders = {"register_sources": self._add_source, "register_weights": self._add_weights,
                  "register_stages": self._add_stage}
        before = len(self.failures)
        added: dict[str, int] = {}
        for hook in HOOKS:
            impls = getattr(self.pm.hook, hook).get_hookimpls()
            for plugin, info in plugins:
                for impl in impls:
                    if impl.plugin is plugin:
                        added[info.name] = added.get(info.name, 0) + self._call_hook(impl, info, adders[hook])
        failed = {f.plugin.name for f in self.failures[before:]}
        for plugin, info in plugins:  # a plugin that did nothing and said nothing is broken, not absent
            if not added.get(info.name) and info.name not in failed:
                self.failures.append(PluginFailure(info, "register",
                                                   checks.nothing_registered_problem(self.pm, plugin, HOOKS)))

    def _call_hook(self, impl: pluggy.HookImpl, info: PluginInfo, add: Callable[[Any, PluginInfo], None]) -> int:
        """Call one hook implementation; returns how many times it called ``register``."""
        calls = []

        def register(cls: Any) -> None:
            calls.append(cls)
            add(cls, info)

        kwargs = {"register": register} if "register" in impl.argnames else {}
        try:
            impl.function(**kwargs)
        except Exception as exc:  # noqa: BLE001 - a raising hook must not take the others down
            self.failures.append(PluginFailure(info, "hook", _describe(exc)))
        return len(calls)

    def _add_stage(self, cls: "type[Stage]", info: PluginInfo) -> None:
        problem = checks.stage_problem(cls)
        if problem:
            self.failures.append(PluginFailure(info, "register", problem))
            return
        name = cls.name
        held = self.stages.get(name)
        if held is not None and held.cls is cls:
            return
        if held is not None and held.plugin.first_party and not info.first_party:
            self._refuse_reuse(name, held.plugin, [info])
        elif info.first_party and (held is not None or name in self._conflicts):
            others = [held.plugin] if held is not None else self._conflicts.pop(name)
            self.failures[:] = [f for f in self.failures if not (f.phase == "conflict" and f"stage '{name}'" in f.error)]
            self.stages[name] = StageEntry(cls, info)  # first-party names win; the others are reported
            self._refuse_reuse(name, info, others)
        elif held is not None or name in self._conflicts:  # two third parties: neither is used
            newly = [self.stages.pop(name).plugin] if held is not None else []
            self._conflicts.setdefault(name, []).extend(newly + [info])
            owners = " and ".join(str(p) for p in self._conflicts[name])
            for party in newly + [info]:  # every party is listed as broken, not only the later one
                self.failures.append(PluginFailure(party, "conflict", (
                    f"stage '{name}' is registered by {owners}; neither is used (uninstall one, or leave one "
                    f"out with {PLUGINS_ENV}={EXCLUDE_PREFIX}PLUGIN)")))
        else:
            self.stages[name] = StageEntry(cls, info)

    def _refuse_reuse(self, name: str, owner: PluginInfo, others: list[PluginInfo]) -> None:
        for other in others:
            self.failures.append(PluginFailure(other, "conflict", (
                f"stage '{name}' is already registered by {owner} (first party: its names win); "
                f"{other} reuses the name and is not used: rename its stage")))

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
            raise PluginError(f"Stage '{name}' is registered by two plugins: {owners}. Uninstall one, or leave one "
                              f"out with {PLUGINS_ENV}={EXCLUDE_PREFIX}PLUGIN (first-party stages stay loaded).")
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


def _selected_plugins() -> tuple[set[str] | None, set[str]]:
    """``HIERARCHY_PLUGINS``: (entry-point names to load, or None for all; names to leave out)."""
    names = [p.strip() for p in os.environ.get(PLUGINS_ENV, "").split(",") if p.strip()]
    excluded = {n[len(EXCLUDE_PREFIX):] for n in names if n.startswith(EXCLUDE_PREFIX)}
    selected = {n for n in names if not n.startswith(EXCLUDE_PREFIX)}
    return (selected or None), excluded


def _wanted(ep: EntryPoint, selected: set[str] | None, excluded: set[str]) -> bool:
    """Named plugins are loaded and first-party ones stay, unless left out with ``no:NAME``."""
    if ep.name in excluded:
        return False
    dist = getattr(ep, "dist", None)
    return selected is None or ep.name in selected or (dist is not None and dist.name == FIRST_PARTY_DIST)


def _editable_dir(dist: Any) -> str | None:
    """The source folder of an editable install (PEP 610 ``direct_url.json``), else None."""
    if dist is None:
        return None
    # Run from the source tree, the build's ``*.egg-info`` there shadows the installed dist-info,
    # and only the latter has direct_url.json: look at every copy of the distribution.
    for copy in [dist, *distributions(name=dist.name)]:
        try:
            data = json.loads(copy.read_text("direct_url.json") or "{}")
        except (OSError, ValueError):
            continue
        if data.get("dir_info", {}).get("editable"):
            url = data.get("url", "")
            return url[len("file://"):] if url.startswith("file://") else url or None
    return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


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
