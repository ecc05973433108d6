"""Static audits of the package source, and checkpoint-loading guarantees not covered by test_checkpoint.py.

* every file write in hierarchy/, registry/, stages/ goes through hierarchy/core/fsutil.py (atomic: temp
  file + fsync + os.replace), or is a library writer wrapped in ``atomic_write_with``;
* every ``torch.load`` / hub loader passes ``weights_only=True`` literally;
* ``load_train_state`` calls ``torch.load`` once, with ``weights_only=True``, and never retries unsafely;
* the torch and Pillow security floors are pinned in pyproject.toml, with the reason, and installed.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("hierarchy", "registry", "stages")
ATOMIC_WRAPPERS = {"atomic_write_with"}  # a writer lambda passed to these writes a temp file
WRITE_METHODS = {"write_text", "write_bytes", "savefig", "save_file", "copy", "copy2", "copyfile", "copytree",
                 "savez", "savez_compressed", "savetxt", "tofile", "to_csv", "symlink_to", "hardlink_to", "touch"}
LOADERS = {"load", "load_state_dict_from_url", "load_url"}  # torch.load, torch.hub.*
# (file, function) -> why a plain write there is still all-or-nothing
ALLOWED = {
    ("hierarchy/commands/_scaffold.py", "write_package"): "writes into a private mkdtemp() directory that is then "
                                                "renamed into place as a whole",
    ("hierarchy/engine/bundle.py", "_extract"): "writes into the fresh private temporary directory a bundle is "
                                                "opened in; every member is hash-checked before anything loads",
    ("hierarchy/data/cache.py", "_build_lock"): "opens an empty lock file for flock; nothing is written to it",
    ("hierarchy/engine/output.py", "recorded_paths"): "--resume truncates a torn last line of an append-only "
                                                      "JSONL file: every complete record stays",
    ("hierarchy/engine/ray_run.py", "_write_listing"): "a scratch path list in a private temporary directory",
}


def sources() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((REPO / package).rglob("*.py"))


def _display(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _receiver(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return ast.unparse(func.value)
    return ""


def _mode(call: ast.Call, position: int) -> str:
    args = [kw.value for kw in call.keywords if kw.arg == "mode"] or call.args[position:position + 1]
    return args[0].value if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str) else ""


def _buffers(tree: ast.AST) -> set[str]:
    """Names assigned from io.BytesIO()/StringIO(): saving into them is not a file write."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                _name(node.value.func) in ("BytesIO", "StringIO"):
            out.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return out


def _is_write(call: ast.Call, buffers: set[str]) -> bool:
    name = _name(call.func)
    first = call.args[0] if call.args else None
    if name in ("copy", "copy2", "copyfile", "copytree"):  # shutil.*, not ndarray.copy()
        return _receiver(call.func) == "shutil" or len(call.args) >= 2
    if name in WRITE_METHODS:
        return True
    if name == "open":  # open(path, mode) or Path.open(mode)
        mode = _mode(call, 1 if isinstance(call.func, ast.Name) else 0)
        return bool(set(mode) & set("wax+"))
    if name in ("dump", "safe_dump"):  # json/yaml/pickle dump into a stream
        return len(call.args) >= 2
    if name == "save":  # torch.save, np.save, PIL Image.save(path)
        return not (isinstance(first, ast.Name) and first.id in buffers)
    return False


def _inside_atomic_wrapper(node: ast.AST, parents: dict[ast.AST, ast.AST], path: Path) -> bool:
    while node in parents:
        parent = parents[node]
        if isinstance(node, ast.Lambda) and isinstance(parent, ast.Call) and _name(parent.func) in ATOMIC_WRAPPERS:
            return True
        if isinstance(node, ast.FunctionDef) and (_display(path), node.name) in ALLOWED:
            return True
        node = parent
    return False


def non_atomic_writes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    buffers = _buffers(tree)
    return [f"{_display(path)}:{node.lineno}: {ast.unparse(node)[:100]}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and _is_write(node, buffers)
            and not _inside_atomic_wrapper(node, parents, path)]


def test_every_file_write_is_atomic() -> None:
    found = [hit for path in sources() if path.name != "fsutil.py" for hit in non_atomic_writes(path)]
    assert found == [], "writes that bypass hierarchy/core/fsutil.py:\n" + "\n".join(found)


def test_the_audit_catches_plain_writes(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import io, json, shutil, torch\n"
        "from pathlib import Path\n"
        "def f(p, obj, img):\n"
        "    Path(p).write_text('x')\n"
        "    with open(p, 'w') as fh:\n"
        "        json.dump(obj, fh)\n"
        "    torch.save(obj, p)\n"
        "    shutil.copy2(p, p + '.bak')\n"
        "    img.save(p)\n"
        "    buf = io.BytesIO()\n"
        "    img.save(buf, 'PNG')\n"  # not a file write
        "    with open(p, 'rb') as fh:\n"  # a read
        "        fh.read()\n"
        "    atomic_write_with(p, lambda tmp: torch.save(obj, tmp))\n"  # atomic
    )
    lines = sorted(int(hit.split(":")[1]) for hit in non_atomic_writes(sample))
    assert lines == [4, 5, 6, 7, 8, 9]


def unsafe_loads(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    hits = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and _name(node.func) in LOADERS and "torch" in _receiver(node.func)):
            continue
        flag = [kw.value for kw in node.keywords if kw.arg == "weights_only"]
        if not (flag and isinstance(flag[0], ast.Constant) and flag[0].value is True):
            hits.append(f"{_display(path)}:{node.lineno}: {ast.unparse(node)[:100]}")
    return hits


def test_the_audit_catches_unsafe_loads(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import torch\n"
                      "a = torch.load('x')\n"
                      "b = torch.load('x', weights_only=False)\n"
                      "c = torch.hub.load_state_dict_from_url('u')\n"
                      "d = torch.load('x', map_location='cpu', weights_only=True)\n")
    assert [int(hit.split(":")[1]) for hit in unsafe_loads(sample)] == [2, 3, 4]


def test_every_torch_load_is_weights_only() -> None:
    found = [hit for path in sources() for hit in unsafe_loads(path)]
    assert found == [], "torch loaders without a literal weights_only=True:\n" + "\n".join(found)


class _Exploit:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("unpickled arbitrary code",))


@pytest.mark.parametrize("kind", ["good", "malicious", "garbage"])
def test_load_train_state_never_falls_back_to_weights_only_false(tmp_path: Path, monkeypatch, capsys,
                                                                 kind: str) -> None:
    from hierarchy.models.checkpoint import load_train_state
    from hierarchy.core.errors import CheckpointError

    path = tmp_path / "train_state.pt"
    if kind == "garbage":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    else:
        torch.save({"epoch": 1, "model": {"w": torch.ones(2)}} | ({"x": _Exploit()} if kind == "malicious" else {}),
                   path)
    calls: list[dict[str, Any]] = []
    real = torch.load

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    if kind == "good":
        assert load_train_state(path)["epoch"] == 1
    else:
        with pytest.raises(CheckpointError, match="refused"):
            load_train_state(path)
    assert len(calls) == 1 and calls[0].get("weights_only") is True
    assert "unpickled arbitrary code" not in capsys.readouterr().out
    assert "weights_only=False" not in str(calls)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


@pytest.mark.parametrize(("package", "floor", "why"), [
    ("torch", (2, 10), "CVE-2025-32434"),
    ("pillow", (11, 3), "CVE-2025-48379"),
])
def test_security_floors_are_pinned_with_the_reason_and_installed(package: str, floor: tuple[int, int],
                                                                  why: str) -> None:
    from importlib.metadata import version

    text = (REPO / "pyproject.toml").read_text()
    if sys.version_info >= (3, 11):
        import tomllib

        deps = tomllib.loads(text)["project"]["dependencies"]
        spec = next(d for d in deps if re.match(rf"{package}\b", d, re.I))
        assert _version(spec.split(">=")[1]) >= floor, spec
    assert why in text  # the comment says which advisory the floor is for
    assert _version(version(package)) >= floor
