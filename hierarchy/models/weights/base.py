"""The weights-provider interface: a provider offers (backbone, tag) -> a weights file and the
preset those weights were trained with. Plugins register providers through the
``register_weights`` hook (:mod:`hierarchy.registry.hookspecs`); :func:`resolve` picks one."""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from hierarchy.core.errors import PretrainedWeightsError


@dataclass(frozen=True)
class WeightsPreset:
    """The input normalisation and size the weights expect. ``interpolation`` is the resize the
    weights were trained with; the project always squash-resizes bilinearly, it is recorded only."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int = 224
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = [float(v) for v in self.mean], [float(v) for v in self.std]
        return d


@dataclass(frozen=True)
class WeightsEntry:
    """What one provider offers for one (backbone, tag)."""

    provider: str  # the provider's name
    backbone: str  # the name users pass to --backbone (library/name)
    tag: str  # the --pretrained value, e.g. "imagenet"
    library: str  # the architecture the file loads into: timm or torchvision ...
    model: str  # ... and its model name there (recorded in metadata.json's arch)
    preset: WeightsPreset
    file: Path  # where the file is, or would be once installed/cached
    source: str  # where it comes from, in words (a package, a cache, a URL)
    hint: str  # what to install or copy when it is not available


class WeightsProvider(ABC):
    """A source of pretrained backbone weights. ``extra`` names the pip extra that installs it."""

    name: str = ""
    extra: str | None = None
    downloads: bool = False  # True: load() may fetch a missing file when the network answers

    @abstractmethod
    def offer(self, library: str, model: str, tag: str) -> WeightsEntry | None:
        """The entry for backbone ``library/model`` and ``tag``, or None if this provider has none."""

    @abstractmethod
    def listing(self) -> list[WeightsEntry]:
        """The entries to show in ``hierarchy weights`` (for the library caches: what is cached)."""

    def available(self, entry: WeightsEntry) -> bool:
        """Can :meth:`load` succeed without the network? The default: the file is there."""
        return entry.file.is_file()

    @abstractmethod
    def load(self, entry: WeightsEntry) -> tuple[nn.Module, Path]:
        """(``entry.library/entry.model`` with the weights and its own head, the file read);
        :class:`~hierarchy.core.errors.PretrainedWeightsError` for anything that goes wrong."""


@dataclass(frozen=True)
class Resolved:
    model: nn.Module
    file: Path
    entry: WeightsEntry

    def record(self) -> dict[str, Any]:
        """The ``weights`` block of metadata.json: provider, tag, file, its sha256 and the preset."""
        e = self.entry
        return {"provider": e.provider, "tag": e.tag, "source": e.source, "file": str(self.file),
                "sha256": file_sha256(self.file), "preset": e.preset.to_dict()}


def resolve(providers: Sequence[WeightsProvider], library: str, model: str, tag: str) -> Resolved:
    """Load ``tag`` weights for ``library/model`` from the first provider that has them offline,
    else from the first one that may download them; otherwise one error naming every provider's
    file and what to install. Providers come in registration order (first-party ones first)."""
    offers = [(p, e) for p in providers if (e := p.offer(library, model, tag)) is not None]
    for provider, entry in offers:
        if provider.available(entry):
            return Resolved(*provider.load(entry), entry)
    errors: list[str] = []
    for provider, entry in offers:
        if provider.downloads:
            try:
                return Resolved(*provider.load(entry), entry)
            except PretrainedWeightsError as exc:
                errors.append(f"provider '{provider.name}': {exc}")
    errors += [_unavailable(p, e) for p, e in offers if not p.downloads]
    if not offers:
        names = ", ".join(p.name for p in providers) or "none"
        raise PretrainedWeightsError(f"{library}/{model}", f"no weights provider offers '{tag}' weights for "
                                     f"this backbone (providers: {names}; see `hierarchy weights`). Use "
                                     "--pretrained none or --pretrained PATH (a local .safetensors/.pth file)")
    raise PretrainedWeightsError(offers[0][1].file, " | ".join(errors))


def _unavailable(provider: WeightsProvider, entry: WeightsEntry) -> str:
    extra = f" (pip install 'hierarchy-cascade[{provider.extra}]')" if provider.extra else ""
    return f"provider '{provider.name}': {entry.file} not found{extra}. {entry.hint}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
