"""The source types ``DatasetConfig.sources`` accepts: the built-in ones plus those plugins add
through the ``register_sources`` hook (the plugin registry calls :func:`register_source_type`).

Each entry of ``sources`` is validated by its ``type`` against this table (:func:`parse_source`),
so a new data format is one registered class and needs no change here or in the builder.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Literal, Mapping, get_args, get_origin

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from hierarchy.core.errors import PluginError
from hierarchy.data.sources.base import Source

TYPE_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")
_TYPES: dict[str, type[Source]] = {}


def source_type_name(cls: type[Source]) -> str:
    """The ``type`` a source class answers to (its ``type`` field's default)."""
    return cls.model_fields["type"].default


def source_type_problem(cls: object) -> str | None:
    """Why ``cls`` cannot be registered as a source type, or None."""
    if not (inspect.isclass(cls) and issubclass(cls, Source)):
        return f"register() got {cls!r}, which is not a hierarchy.Source subclass"
    field = cls.model_fields["type"]
    name = field.default
    if not (get_origin(field.annotation) is Literal and get_args(field.annotation) == (name,)
            and isinstance(name, str) and TYPE_RE.match(name)):
        return (f"{cls.__qualname__}.type must be a one-value Literal with that value as its default, a "
                f"lower-case identifier, e.g. type: Literal[\"dicom\"] = \"dicom\"; got {field.annotation} = "
                f"{name!r}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        return f"source type '{name}': {cls.__qualname__} does not implement {missing}"
    return None


def register_source_type(cls: type[Source]) -> str:
    """Add ``cls`` to the table; returns its type name. Raises PluginError for an invalid class or
    a type name another class holds."""
    problem = source_type_problem(cls)
    if problem:
        raise PluginError(problem)
    name = source_type_name(cls)
    held = _TYPES.get(name)
    if held is not None and held is not cls:
        raise PluginError(f"source type '{name}' is already registered by {held.__module__}.{held.__qualname__}")
    _TYPES[name] = cls
    return name


def unregister_source_type(name: str) -> None:
    """Remove a type from the table (the plugin registry does, on reset or conflict)."""
    _TYPES.pop(name, None)


def source_types() -> dict[str, type[Source]]:
    """{type name: class}, sorted by name."""
    return dict(sorted(_TYPES.items()))


def parse_source(value: Any) -> Source:
    """Validate one entry of ``DatasetConfig.sources``: a registered source instance as it is, a
    mapping as the class its ``type`` names (errors keep their field path)."""
    known = ", ".join(sorted(_TYPES))
    if isinstance(value, Source):
        if _TYPES.get(value.type) is not type(value):
            raise _error((), f"{type(value).__qualname__} (type {value.type!r}) is not a registered source type; "
                             f"known types: {known}", value.model_dump())
        return value
    if not isinstance(value, Mapping):
        raise _error((), f"expected a mapping with a type: key (one of {known})", value)
    if "type" not in value:
        raise _error(("type",), f"field required: the source type, one of {known}", value)
    cls = _TYPES.get(value["type"]) if isinstance(value["type"], str) else None
    if cls is None:
        raise _error(("type",), f"unknown source type {value['type']!r}; known types: {known}", value)
    return cls.model_validate(dict(value))


def _error(loc: tuple[str, ...], message: str, value: Any) -> ValidationError:
    detail = InitErrorDetails(type=PydanticCustomError("source_type", message), loc=loc, input=value)
    return ValidationError.from_exception_data("Source", [detail])
