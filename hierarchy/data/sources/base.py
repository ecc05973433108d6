"""The base class of every dataset source type, built-in or from a plugin.

A source type is a pydantic model subclassing :class:`Source`: a ``type`` literal with a default
(``type: Literal["dicom"] = "dicom"``; YAML names it, Python need not), its own settings as fields,
and :meth:`Source.collect`, which lists the labelled images under a root folder. The dataset
builder calls ``collect`` and does the rest (label checks, ``max_images``, verification, splits).
"""
from __future__ import annotations

import os
from abc import abstractmethod
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from hierarchy.data.sources.items import Item, Problems


class Source(BaseModel):
    """One place images and labels come from. ``name`` (default: the type) is the source's key for
    ``--source NAME=DIR``, which replaces ``root``; ``max_images`` caps it, whole groups at a time."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    type: str
    name: Optional[str] = None  # its key for `--source NAME=DIR` (default: its type); two of one type need one
    root: Path  # a relative root is resolved against the working directory `hierarchy` runs in
    max_images: Optional[int] = Field(default=None, ge=1, strict=True)  # cap, applied whole groups at a time

    @property
    def key(self) -> str:
        return self.name or self.type

    def labels(self) -> list[str]:
        """Labels this configuration can produce, checked against the stage's before any scan
        (``[]`` when only the scan tells, like a folder source's sub-folder names). The default is
        the source's ``label`` field when it has one."""
        label = getattr(self, "label", None)
        return [] if label is None else [label]

    @abstractmethod
    def collect(self, root: Path, problems: Problems, *, exclude: Path | None = None) -> list[Item]:
        """Every labelled image under ``root`` (this source's ``root``, or its ``--source`` override;
        an existing directory). Skip what lies under ``exclude`` (the output folder, when it is inside
        ``root``); record unusable entries in ``problems`` instead of raising; raise
        :class:`~hierarchy.core.errors.DatasetError` for configuration problems only."""


def scan_images(root: Path, exclude: Path | None = None) -> list[str]:
    """Absolute paths of the image files under ``root``, minus those under ``exclude``, in a
    deterministic order. Directory symlinks are followed (``ln -s /data/texture root/texture`` is how
    label folders are often assembled), each real directory once; paths keep the link's name."""
    from hierarchy.data.imageio import iter_image_files

    skip = None if exclude is None else os.path.abspath(exclude) + os.sep
    files = (os.path.abspath(p) for p in iter_image_files(root, follow_links=True))
    return [f for f in files if skip is None or not f.startswith(skip)]
