"""Pipeline bundles: one zip file carrying a validated cascade from the machine that trained it to
the one that uses it (``hierarchy bundle PIPELINE -o triage.hbundle``).

Inside: ``pipeline.yaml`` (each stage's ``weights`` rewritten to ``stages/<id>/<file>``), every
stage's weights, ``metadata.json``, OOD scorer, exports (``*.onnx``) and model card, the pipeline's
card when there is one, and ``MANIFEST.json`` with every member's sha256 and size.

Opening (``load_pipeline`` does it for any bundle, so ``run``/``evaluate``/``validate`` take one
wherever they take a pipeline) checks the member list against the manifest (no member added,
missing or duplicated; no absolute, ``..`` or backslash name; no symlink; declared sizes within
limits and equal to the manifest's), extracts into a fresh temporary directory only, reading at
most each member's declared size (a zip bomb stops there), and verifies every sha256 before
anything is loaded. Any failure raises :class:`~hierarchy.core.errors.BundleError` naming the member.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from hierarchy.core.errors import BundleError
from hierarchy.core.fsutil import atomic_write_with, sha256_file
from hierarchy.models.metadata import resolve_checkpoint

FORMAT = "hierarchy.bundle"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
PIPELINE = "pipeline.yaml"
SUFFIX = ".hbundle"
STAGE_FILES = ("metadata.json", "ood.safetensors", "MODEL_CARD.md")
EXPORT_SUFFIXES = (".onnx", ".onnx.data")
MAX_TOTAL_BYTES = 8 << 30  # declared uncompressed size of all members together
MAX_RATIO = 200  # uncompressed / compressed, for members over 1 MiB (weights barely compress)
MAX_MANIFEST_BYTES = 1 << 20


def is_bundle(path: str | os.PathLike) -> bool:
    p = Path(path)
    if p.suffix == SUFFIX:
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


# ---------------------------------------------------------------- writing


def _stage_members(sid: str, weights: Path) -> dict[str, Path]:
    w, meta = resolve_checkpoint(weights)
    run = meta.parent
    files = {w.name: w, **{n: run / n for n in STAGE_FILES if (run / n).is_file()}}
    files.update({p.name: p for p in sorted(run.iterdir()) if p.is_file() and p.name.endswith(EXPORT_SUFFIXES)
                  and p.name.startswith(w.stem)})
    return {f"stages/{sid}/{name}": path for name, path in files.items()}


def write_bundle(pipeline: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Bundle the pipeline YAML ``pipeline`` and everything its stages load into ``out``; returns the manifest."""
    from hierarchy.core.yamlio import load_yaml
    from hierarchy.engine.pipeline import load_pipeline

    pipe = load_pipeline(pipeline)
    data, _ = load_yaml(pipeline)
    members: dict[str, Path] = {}
    for sid in pipe.stages:
        weights = pipe.weights_path(sid)
        if weights is None:
            continue
        files = _stage_members(sid, weights)
        members.update(files)
        data["stages"][sid]["weights"] = next(n for n, p in files.items() if p.suffix == ".safetensors"
                                              and not n.endswith("/ood.safetensors"))
    card = Path(pipeline).resolve().parent / "MODEL_CARD.md"
    if card.is_file():
        members["MODEL_CARD.md"] = card
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode("utf-8")
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "pipeline": PIPELINE, "name": pipe.name,
                "members": {PIPELINE: {"sha256": hashlib.sha256(text).hexdigest(), "size": len(text)},
                            **{n: {"sha256": sha256_file(p), "size": p.stat().st_size} for n, p in members.items()}}}

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
            z.writestr(PIPELINE, text)
            for name, path in members.items():
                z.write(path, name)

    atomic_write_with(out, write)
    return manifest


# ---------------------------------------------------------------- opening


def _check_name(name: str) -> None:
    p = PurePosixPath(name)
    if (not name or "\\" in name or name.startswith("/") or p.is_absolute() or ".." in p.parts
            or (len(name) > 1 and name[1] == ":") or name.endswith("/")):
        raise BundleError(name, "unsafe member name (absolute, '..', backslash, drive or directory entry)")


def _check_entries(infos: list[zipfile.ZipInfo]) -> None:
    seen: set[str] = set()
    total = 0
    for info in infos:
        _check_name(info.filename)
        if info.filename in seen:
            raise BundleError(info.filename, "duplicate member")
        seen.add(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise BundleError(info.filename, "symbolic link member refused")
        total += info.file_size
        if info.file_size > 1 << 20 and info.file_size > MAX_RATIO * max(1, info.compress_size):
            raise BundleError(info.filename, f"compression ratio over {MAX_RATIO} (zip bomb?)")
    if total > MAX_TOTAL_BYTES:
        raise BundleError("(all members)", f"{total} bytes uncompressed, over the {MAX_TOTAL_BYTES}-byte limit")


def _read_manifest(z: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo]) -> dict[str, Any]:
    if MANIFEST not in infos:
        raise BundleError(MANIFEST, "missing: not a hierarchy bundle")
    if infos[MANIFEST].file_size > MAX_MANIFEST_BYTES:
        raise BundleError(MANIFEST, "too large")
    try:
        manifest = json.loads(z.read(MANIFEST))
    except ValueError as exc:
        raise BundleError(MANIFEST, f"unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("members"), dict):
        raise BundleError(MANIFEST, f"not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(MANIFEST, f"format_version {manifest.get('format_version')} (this hierarchy reads {FORMAT_VERSION})")
    return manifest


def _extract(z: zipfile.ZipFile, info: zipfile.ZipInfo, want: dict[str, Any], root: Path) -> None:
    if info.file_size != want.get("size"):
        raise BundleError(info.filename, f"size {info.file_size} differs from the manifest's {want.get('size')}")
    dest = root.joinpath(*PurePosixPath(info.filename).parts)
    if root.resolve() not in dest.resolve().parents:
        raise BundleError(info.filename, "would extract outside the bundle directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    h, left = hashlib.sha256(), info.file_size
    with z.open(info) as src, open(dest, "wb") as f:
        while chunk := src.read(min(1 << 20, left + 1)):
            left -= len(chunk)
            if left < 0:
                raise BundleError(info.filename, "more data than declared (zip bomb?)")
            h.update(chunk)
            f.write(chunk)
    if h.hexdigest() != want.get("sha256"):
        raise BundleError(info.filename, "sha256 mismatch: the member was changed after bundling")


def open_bundle(path: str | os.PathLike, into: str | os.PathLike | None = None) -> Path:
    """Verify ``path`` and extract it into a new temporary directory (removed at exit unless ``into``,
    an existing parent for it, is given); return the extracted ``pipeline.yaml``."""
    path = Path(path)
    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BundleError(str(path), f"not a readable bundle: {exc}") from None
    root = Path(tempfile.mkdtemp(prefix="hierarchy-bundle-", dir=into))
    try:
        with z:
            infos = z.infolist()
            _check_entries(infos)
            by_name = {i.filename: i for i in infos}
            manifest = _read_manifest(z, by_name)
            listed, present = set(manifest["members"]), set(by_name) - {MANIFEST}
            for name in sorted(present - listed):
                raise BundleError(name, "member not in the manifest (added after bundling)")
            for name in sorted(listed - present):
                raise BundleError(name, "listed in the manifest but missing from the bundle")
            for name in sorted(listed):
                _extract(z, by_name[name], manifest["members"][name], root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    if into is None:
        atexit.register(shutil.rmtree, root, True)
    return root / manifest.get("pipeline", PIPELINE)
