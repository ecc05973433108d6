"""The package layering of docs/architecture.md, checked on the source with ``ast``.

The layer table in docs/architecture.md is the one place the order is declared; these tests read it.
Every ``import`` counts (module level and inside functions; only ``if TYPE_CHECKING:`` blocks are
skipped), as does a string constant naming a project module that is not a package
(``importlib.import_module`` targets, the engine registry).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
MAX_LINES = 400
# Top-level modules of `hierarchy` that are no subpackage: the layer each one counts as.
ROOT_MODULES = {"hierarchy.__main__": "commands", "hierarchy.stage": "config"}


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str  # absolute dotted name of the imported module
    names: tuple[str, ...]  # names taken from it (`from m import a, b`); empty for `import m`


# ---------------------------------------------------------------- parsing


def _mapped_folders() -> dict[str, str]:
    """setup.py's MAPPED: repository folders installed under another package name
    (``registry/`` as ``hierarchy.registry``, ``stages/`` as ``hierarchy.stages``)."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["MAPPED"]:
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no MAPPED = {folder: package}")


FOLDERS = {"hierarchy": "hierarchy", **_mapped_folders()}  # folder -> the package it installs as


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(REPO).with_suffix("").parts
    parts = FOLDERS[folder].split(".") + rest
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (REPO / folder).rglob("*.py"))


def project_modules() -> set[str]:
    return {module_name(p) for p in source_files()}


def project_packages() -> set[str]:
    return {module_name(p) for p in source_files() if p.name == "__init__.py"}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


class _Collector(ast.NodeVisitor):
    def __init__(self, path: Path, modules: set[str], packages: frozenset[str] = frozenset()) -> None:
        self.path, self.modules, self.packages, self.found = path, modules, packages, []
        self.aliases: dict[str, str] = {}  # local name bound to a project module -> that module

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [Import(self.path, node.lineno, a.name, ()) for a in node.names]
        self.aliases.update({a.asname: a.name for a in node.names if a.asname})

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.path, node)
        for a in node.names:  # `from hierarchy.metrics import thresholds` imports a module
            sub = f"{base}.{a.name}"
            if sub in self.modules:
                self.aliases[a.asname or a.name] = sub
            self.found.append(Import(self.path, node.lineno, sub, ()) if sub in self.modules
                              else Import(self.path, node.lineno, base, (a.name,)))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        """``module._name`` through a module imported above counts as taking ``_name`` from it."""
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases and node.attr.startswith("_"):
            self.found.append(Import(self.path, node.lineno, self.aliases[node.value.id], (node.attr,)))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        # a module file, not a package: package names double as logger names and entry-point groups
        if isinstance(node.value, str) and node.value in self.modules and node.value not in self.packages:
            self.found.append(Import(self.path, node.lineno, node.value, ()))


def imports_of(path: Path, modules: set[str], packages: frozenset[str] = frozenset()) -> list[Import]:
    collector = _Collector(path, modules, packages)
    collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return collector.found


def package_of(module: str) -> str | None:
    """The layered package a module belongs to (``core``, ..., ``registry``, ``stages``), or None
    for a module outside this project and for the ``hierarchy`` facade itself."""
    parts = module.split(".")
    if parts[0] != "hierarchy" or len(parts) == 1:
        return None
    return ROOT_MODULES.get(".".join(parts[:2]), parts[1])


def all_imports() -> list[Import]:
    modules = project_modules()
    packages = frozenset(project_packages())
    return [imp for path in source_files() for imp in imports_of(path, modules, packages)]


def where(imp: Import) -> str:
    return f"{imp.path.relative_to(REPO)}:{imp.line}"


def cross_imports() -> list[tuple[str, str, Import]]:
    """(importing package, imported package, import) for every import between two packages."""
    out = []
    for imp in all_imports():
        src, dst = package_of(module_name(imp.path)), package_of(imp.module)
        if src and dst and src != dst:
            out.append((src, dst, imp))
    return out


# ---------------------------------------------------------------- the declared layers

_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`([\w.]+)`\s*\|[^|]*\|([^|]*)\|\s*$")


def declared_layers() -> dict[str, tuple[int, set[str]]]:
    """{package: (layer, the packages its "may import" cell names)} from the doc's layer table."""
    layers = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = _ROW.match(line)
        if m:
            layer, name, may = m.groups()
            layers[name.removeprefix("hierarchy.")] = (int(layer), set(re.findall(r"`(\w+)`", may)))
    return layers


def layer_of() -> dict[str, int]:
    return {name: layer for name, (layer, _) in declared_layers().items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


# ---------------------------------------------------------------- the checker checks itself


def test_collector_sees_function_level_relative_and_string_imports():
    f = REPO / "hierarchy" / "engine" / "fake.py"  # never written: parsed from a string
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "from ..core import errors\n"
        "if TYPE_CHECKING:\n    from hierarchy.commands import cli\n"
        "else:\n    import hierarchy.data.decode\n"
        "def f():\n    from hierarchy.metrics.classification import _ratio\n"
        "SPEC = 'hierarchy.ood.scores'\n"
        "log = getLogger('hierarchy.train')  # a package name: a logger, not an import\n"
        "from hierarchy.ood import scores as sc\n"
        "sc._private, sc.public\n")
    c = _Collector(f, {"hierarchy.core.errors", "hierarchy.ood.scores", "hierarchy.metrics.classification",
                       "hierarchy.data.decode", "hierarchy.commands.cli", "hierarchy.train"},
                   frozenset({"hierarchy.train"}))
    c.visit(tree)
    got = {(i.module, i.names) for i in c.found}
    assert got == {("typing", ("TYPE_CHECKING",)), ("hierarchy.core.errors", ()), ("hierarchy.data.decode", ()),
                   ("hierarchy.metrics.classification", ("_ratio",)), ("hierarchy.ood.scores", ()),
                   ("hierarchy.ood.scores", ("_private",))}


def test_find_cycle_reports_the_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_package_of():
    assert package_of("hierarchy.engine.backends.torch_backend") == "engine"
    assert package_of("hierarchy.stage") == "config"
    assert package_of("hierarchy.registry.manager") == "registry"
    assert module_name(REPO / "registry" / "manager.py") == "hierarchy.registry.manager"
    assert module_name(REPO / "stages" / "__init__.py") == "hierarchy.stages"
    assert package_of("hierarchy") is None and package_of("numpy.linalg") is None


# ---------------------------------------------------------------- the rules


def test_layer_table_is_complete_and_consistent():
    layers = declared_layers()
    on_disk = {p.name for p in (REPO / "hierarchy").iterdir() if (p / "__init__.py").is_file()}
    on_disk |= {name.split(".")[1] for name in FOLDERS.values() if name != "hierarchy"}
    assert set(layers) == on_disk, "docs/architecture.md layer table: packages missing or extra"
    for name, (layer, may) in layers.items():
        allowed = {other for other, (lay, _) in layers.items() if lay < layer or (lay == layer and other != name)}
        assert may == allowed, f"{name}: 'may import' should name exactly {sorted(allowed)}, names {sorted(may)}"


def test_no_import_cycle_between_packages():
    edges: dict[str, set[str]] = {}
    for src, dst, _ in cross_imports():
        edges.setdefault(src, set()).add(dst)
    cycle = find_cycle(edges)
    if cycle:
        sites = [f"  {a} -> {b}: " + ", ".join(where(i) for s, d, i in cross_imports() if (s, d) == (a, b))
                 for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle " + " -> ".join(cycle) + "\n" + "\n".join(sites))


def test_no_package_imports_a_higher_layer():
    layer = layer_of()
    undeclared = sorted({p for src, dst, _ in cross_imports() for p in (src, dst)} - set(layer))
    assert not undeclared, f"packages missing from the docs/architecture.md layer table: {undeclared}"
    upward = [f"{where(i)}: {src} (layer {layer[src]}) imports {i.module} ({dst}, layer {layer[dst]})"
              for src, dst, i in cross_imports() if layer[dst] > layer[src]]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_private_name_imported_from_another_package():
    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    bad = [f"{where(i)}: {i.module} {', '.join(i.names)}".rstrip()
           for src, dst, i in cross_imports()
           if any(private(p) for p in i.module.split(".")) or any(private(n) for n in i.names)]
    assert not bad, "private names imported across packages:\n" + "\n".join(bad)


def test_the_hierarchy_facade_is_for_plugins_only():
    """``hierarchy/__init__.py`` re-exports the plugin API lazily (it reaches up to ``registry``);
    inside the project only ``__version__`` is taken from it, everything else from its own module."""
    bad = [f"{where(i)}: from hierarchy import {', '.join(i.names)}" for i in all_imports()
           if i.module == "hierarchy" and set(i.names) - {"__version__"}
           and package_of(module_name(i.path)) not in (None, "stages")]
    assert not bad, "import these from their defining module:\n" + "\n".join(bad)


def test_no_module_over_400_lines():
    long = [f"{p.relative_to(REPO)}: {n} lines" for p in source_files()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)


def test_doc_names_every_package_and_only_existing_ones():
    text = DOC.read_text(encoding="utf-8")
    packages = sorted(module_name(p) for p in source_files() if p.name == "__init__.py")
    unnamed = [p for p in packages if f"`{p}`" not in text]
    assert not unnamed, f"packages docs/architecture.md does not name: {unnamed}"
    folders = "|".join(FOLDERS)
    dotted = set(re.findall(r"`(hierarchy(?:\.\w+)+)`", text))
    paths = set(re.findall(rf"(?<![\w./])((?:{folders})/[\w/]*\w(?:\.py)?/?)", text))
    missing = sorted({d for d in dotted if d not in project_modules()}
                     | {p for p in paths if not (REPO / p.rstrip("/")).exists()})
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"
