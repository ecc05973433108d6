"""``hierarchy new-stage``: write a ready-to-install stage plugin package from templates.

The templates are package data under ``hierarchy/commands/templates/new_stage/`` (``string.Template``
files ending in ``.tmpl``; a ``package/`` folder becomes the plugin's import package). The whole
tree is rendered into a temporary folder beside the target and renamed into place, so the target
is either absent, the old tree (on error) or the complete new tree, never half written.
"""
from __future__ import annotations

import keyword
import os
import re
import shutil
import string
import tempfile
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from hierarchy.core.errors import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

TEMPLATE_DIR = ("templates", "new_stage")
TEMPLATE_SUFFIX = ".tmpl"
DEFAULT_LABELS = ("positive", "negative")
DIST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")  # PEP 508 project names
PACKAGE_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")
RESERVED_LABELS = frozenset({"default"})  # a pipeline route key meaning "any other label"


@dataclass(frozen=True)
class StageSpec:
    """What a new plugin package is called and which labels its stage has."""

    name: str
    labels: tuple[str, ...]
    dist_name: str | None = None  # --dist; default hierarchy-NAME
    package_name: str | None = None  # --package; default hierarchy_NAME

    @property
    def dist(self) -> str:
        return self.dist_name or "hierarchy-" + self.name.replace("_", "-")

    @property
    def package(self) -> str:
        return self.package_name or "hierarchy_" + self.name.replace("-", "_")

    @property
    def class_name(self) -> str:
        return "".join(part.capitalize() for part in re.split(r"[_\-]", self.name) if part)

    def substitutions(self) -> dict[str, str]:
        from hierarchy import __version__
        from hierarchy.config.stage import PLUGIN_API_VERSION

        return {"name": self.name, "dist": self.dist, "package": self.package, "cls": self.class_name,
                "labels": "(" + ", ".join(f'"{lab}"' for lab in self.labels) + ")",
                "label_list": ", ".join(self.labels), "api": str(PLUGIN_API_VERSION), "first": self.labels[0],
                "requirement": plugin_requirement(__version__),
                "tree": "\n".join(f"  {label}/    *.jpg, *.png, ..." for label in self.labels)}


def parse_labels(raw: str | None) -> tuple[str, ...]:
    """``"a,b,c"`` -> ``("a", "b", "c")`` (whitespace around names ignored); None -> the defaults."""
    if raw is None:
        return DEFAULT_LABELS
    return tuple(part.strip() for part in raw.split(","))


def validate(name: str, labels: tuple[str, ...], dist: str | None = None, package: str | None = None) -> StageSpec:
    """Check the stage name (the rule ``register()`` applies), labels, distribution and package names;
    raise ConfigError listing every problem."""
    from hierarchy.config.stage import stage_name_problem

    errors = []
    bad_name = stage_name_problem(name)
    if bad_name:
        errors.append(f"NAME: {bad_name}")
    if dist is not None and not DIST_RE.match(dist):
        errors.append(f"--dist: {dist!r} is not a distribution name (letters, digits, . _ -)")
    if package is not None and (not PACKAGE_RE.match(package) or keyword.iskeyword(package)):
        errors.append(f"--package: {package!r} is not a lower-case Python package name (a-z, 0-9, _)")
    if len(labels) < 2:
        errors.append(f"--labels: a stage needs at least 2 labels, got {list(labels)}")
    folded = [lab.casefold() for lab in labels]
    dups = sorted({lab for lab in labels if folded.count(lab.casefold()) > 1})
    if dups:
        errors.append(f"--labels: duplicate label(s) {dups} (labels are folder names: they may not differ only in case)")
    for lab in dict.fromkeys(labels):
        if not LABEL_RE.match(lab) or lab in RESERVED_LABELS:
            errors.append(f"--labels: {lab!r} is not usable as a label and folder name (letters, digits, _ . + -; "
                          "not 'default')")
    if errors:
        raise ConfigError("hierarchy new-stage", errors)
    return StageSpec(name, labels, dist, package)


def render(spec: StageSpec) -> dict[str, str]:
    """{relative output path: text} for every template file."""
    root = files("hierarchy.commands").joinpath(*TEMPLATE_DIR)
    subs = spec.substitutions()
    out = {}
    for rel, node in _walk(root, ()):
        parts = [spec.package if p == "package" else p for p in rel]
        parts[-1] = parts[-1][: -len(TEMPLATE_SUFFIX)]
        out["/".join(parts)] = string.Template(node.read_text(encoding="utf-8")).substitute(subs)
    return out


def _walk(node: "Traversable", rel: tuple[str, ...]) -> list[tuple[tuple[str, ...], "Traversable"]]:
    found = []
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        if child.is_dir():
            found += _walk(child, rel + (child.name,))
        elif child.name.endswith(TEMPLATE_SUFFIX):
            found.append((rel + (child.name,), child))
    return found


def write_package(spec: StageSpec, target: Path, force: bool = False) -> list[Path]:
    """Render the templates into ``target`` atomically; return the written files (sorted)."""
    target = Path(target)
    _check_target(target, force)
    rendered = render(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".new", dir=target.parent))
    try:
        for rel, text in rendered.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; use what mkdir would have made
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(target / rel for rel in rendered)


def _check_target(target: Path, force: bool) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ConfigError("hierarchy new-stage", [f"--dir: {target} exists and is a symlink or not a directory"])
    if target.exists() and not force:
        raise ConfigError("hierarchy new-stage", [f"--dir: {target} already exists; choose another --dir, "
                                                  "or pass --force to replace it"])


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first and deleted after."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rename(target, old / target.name)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old / target.name, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plugin_requirement(version: str) -> str:
    """``0.2.0.dev3`` -> ``hierarchy-cascade>=0.2,<0.3``: the one way a plugin depends on this project
    (its minor release line: the plugin API may change between minor releases before 1.0)."""
    from hierarchy.registry.manager import FIRST_PARTY_DIST

    major, minor = (int(n) for n in (re.findall(r"\d+", version) + ["0", "0"])[:2])
    return f"{FIRST_PARTY_DIST}>={major}.{minor},<{major}.{minor + 1}"
