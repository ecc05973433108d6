"""What the registry checks about a plugin and the classes it registers, as messages (None = fine).

Every check here turns a mistake that would otherwise be silent or surface much later (a stage
that vanishes, a default config that crashes ``build-dataset``) into a plugin failure naming the
plugin and its distribution.
"""
from __future__ import annotations

import difflib
import inspect
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from hierarchy.config.stage import Stage

API_ATTRIBUTE = "HIERARCHY_PLUGIN_API"
REMOVED_HOOKS = ("build_dataset", "train")  # Stage methods of plugin API 1 before 0.2


def api_problem(plugin: object) -> str | None:
    from hierarchy.config.stage import PLUGIN_API_VERSION

    declared = getattr(plugin, API_ATTRIBUTE, PLUGIN_API_VERSION)
    if declared == PLUGIN_API_VERSION:
        return None
    return (f"declares {API_ATTRIBUTE} = {declared!r} but this hierarchy supports {PLUGIN_API_VERSION}; "
            "install a plugin release built for this hierarchy version, or upgrade hierarchy")


def unknown_hook_problems(pm: pluggy.PluginManager, plugin: object, known: tuple[str, ...]) -> list[str]:
    """pluggy's ``check_pending`` for one plugin: every ``@hookimpl`` whose name is no hook spec."""
    problems = []
    for attr in sorted(dir(plugin)):
        if attr in known or pm.parse_hookimpl_opts(plugin, attr) is None:
            continue
        close = difflib.get_close_matches(attr, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        problems.append(f"@hookimpl '{attr}' is not a hierarchy hook (hooks: {', '.join(sorted(known))}){hint}")
    return problems


def nothing_registered_problem(pm: pluggy.PluginManager, plugin: object, known: tuple[str, ...]) -> str:
    """Why a plugin registered no stages, sources or weights providers."""
    unmarked = [h for h in known if callable(getattr(plugin, h, None)) and pm.parse_hookimpl_opts(plugin, h) is None]
    if unmarked:
        return (f"registered no stages: {', '.join(unmarked)} is not marked with @hookimpl "
                "(from hierarchy import hookimpl)")
    return f"registered no stages (it implements none of the hooks {', '.join(known)}, or never calls register())"


def stage_problem(cls: object) -> str | None:
    """Why ``cls`` cannot be registered as a stage, or None."""
    from hierarchy.config.stage import Stage, StageConfig, stage_name_problem

    if not (inspect.isclass(cls) and issubclass(cls, Stage)):
        return f"register() got {cls!r}, which is not a hierarchy.Stage subclass"
    name = getattr(cls, "name", None)
    bad_name = stage_name_problem(name)
    if bad_name:
        return f"{cls.__qualname__}.name: {bad_name}"
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
    gone = [m for m in REMOVED_HOOKS if m in vars(cls)]
    if gone:  # an override the engine would silently ignore: say so instead
        return (f"stage '{name}': {cls.__qualname__} overrides {', '.join(gone)}, which stages no longer have; "
                "the shared builder and trainer read `sources` and `Config` (see docs/plugins.md)")
    return default_config_problem(cls)


def default_config_problem(cls: "type[Stage]") -> str | None:
    """Build and validate the stage's default ``Config()`` now, so a bad default is this plugin's
    failure at registration instead of a traceback in ``build-dataset`` or ``run``."""
    from pydantic import ValidationError

    from hierarchy.core.yamlio import pydantic_errors

    try:
        config = cls.Config()
        type(config).model_validate(config.model_dump())
    except ValidationError as exc:
        problems = "; ".join(f"{exc.title}.{line}" for line in pydantic_errors(exc, {}))
        return f"stage '{cls.name}': its default config is invalid: {problems}"
    except Exception as exc:  # noqa: BLE001 - a raising default factory is the plugin's fault
        return f"stage '{cls.name}': building its default config failed: {type(exc).__name__}: {exc}"
    return None


def import_hint(exc: BaseException, editable_dir: str | None) -> str:
    """What to do about an entry point that cannot be imported."""
    if not isinstance(exc, ModuleNotFoundError):
        return ""
    where = editable_dir or "DIR"
    return (f" (if you renamed the package or edited the entry points in pyproject.toml, "
            f"re-run `pip install -e {where}`: entry points are read at install time)")
