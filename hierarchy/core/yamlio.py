"""Strict YAML reading for every config file: safe loader, no duplicate keys, no tags,
YAML 1.2 booleans (``yes``/``no``/``on``/``off`` stay strings), and line numbers per key path."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from hierarchy.core.errors import ConfigError

Loc = tuple[Any, ...]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and only treats true/false as booleans."""


_StrictLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"duplicate key {key!r} (first defined on line {seen[key].start_mark.line + 1})", key_node.start_mark)
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _index_lines(node: yaml.Node | None, loc: Loc, out: dict[Loc, int]) -> None:
    if node is None:
        return
    out[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[loc + (key,)] = k.start_mark.line + 1
            _index_lines(v, loc + (key,), out)
            out[loc + (key,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _index_lines(v, loc + (i,), out)


MAX_NODES = 100_000  # values after alias expansion: a "billion laughs" file is refused, not expanded
MAX_DEPTH = 64  # nesting levels; real configs use < 10


class _Refused(Exception):
    """The YAML node graph is too big, too deep or recursive to be a configuration."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_shape(root: yaml.Node | None) -> None:
    """Count the values the document expands to (aliases share nodes, so sizes are memoised per node),
    iteratively: refuse alias cycles, more than MAX_NODES values and more than MAX_DEPTH levels."""
    sizes: dict[int, int] = {}
    active: set[int] = set()  # nodes whose subtree is being counted: the current path
    stack: list[tuple[yaml.Node, int, bool]] = [] if root is None else [(root, 1, False)]
    while stack:
        node, depth, counted = stack.pop()
        key = id(node)
        if counted:
            active.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > MAX_NODES:
                raise _Refused(f"the document expands to more than {MAX_NODES} values (alias bomb?)")
        elif key in active:
            raise _Refused("an alias refers to an enclosing anchor (recursive structure)")
        elif key not in sizes:
            if depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels")
            active.add(key)
            stack.append((node, depth, True))
            stack.extend((child, depth + 1, False) for child in _children(node))


def parse_yaml(text: str, source: str = "<string>") -> tuple[Any, dict[Loc, int]]:
    """Parse YAML text strictly; returns (data, {key path: line number})."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        _check_shape(node)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [_yaml_problem(exc)]) from None
    except _Refused as exc:
        raise ConfigError(source, [f"(top level): {exc}"]) from None
    except RecursionError:
        raise ConfigError(source, [f"(top level): nested deeper than {MAX_DEPTH} levels"]) from None
    finally:
        loader.dispose()
    lines: dict[Loc, int] = {}
    _index_lines(node, (), lines)
    return data, lines


def load_yaml(path: str | os.PathLike) -> tuple[Any, dict[Loc, int]]:
    """Read and parse a YAML file strictly; errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"cannot read: {exc}"]) from None
    return parse_yaml(text, str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if "could not determine a constructor" in problem:
        problem = f"tags are not allowed ({problem.split('tag ')[-1].strip()})"
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + problem


def format_loc(loc: Loc) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


_FRIENDLY = {
    "extra_forbidden": "extra field not permitted",
    "missing": "field required",
}


def pydantic_errors(exc: Any, lines: dict[Loc, int], prefix: Loc = ()) -> list[str]:
    """Turn a pydantic ValidationError into 'yaml.path: message (line N)' strings, all of them.
    Alternatives of one union field are merged into a single 'expected ...' message."""
    grouped: dict[Loc, list[dict]] = {}
    for err in exc.errors():
        loc = prefix + tuple(p for p in err["loc"] if not _is_union_tag(p))
        grouped.setdefault(loc, []).append(err)
    return [with_line(loc, _message(errs), lines) for loc, errs in grouped.items()]


def _message(errs: list[dict]) -> str:
    if len(errs) == 1:
        err = errs[0]
        msg = _FRIENDLY.get(err["type"], err["msg"])
    else:
        err = errs[0]
        wanted = [e["msg"].removeprefix("Input should be ").removeprefix("a valid ") for e in errs]
        msg = "expected " + " or ".join(dict.fromkeys(wanted))
    if err["type"] not in _FRIENDLY and "input" in err and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return msg


def with_line(loc: Loc, msg: str, lines: dict[Loc, int]) -> str:
    line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
    return f"{format_loc(loc)}: {msg}" + (f" (line {line})" if line else "")


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union member / literal name into loc ("float", "literal['auto']"); not a YAML key
    return isinstance(part, str) and (part.startswith(("literal[", "function-")) or part in {
        "float", "int", "str", "bool", "constrained-float", "constrained-int"})
