"""The ``outliers`` source: generated negatives for outlier exposure.

A gate trained on dermoscopy against everyday photos learns "photo of things" vs "skin", and then
lets through what neither class showed it: textures, grayscale scans, close-ups of surfaces. This
source writes ``count`` images of such kinds, made only from what it is given (the photos under
``root``) and from procedural patterns, so nothing is fitted on an evaluation source:

* ``gray``: a photo from ``root`` in grayscale with a random gamma and contrast (scans are grey);
* ``zoom``: a small random crop of a photo (5-25% of its area) blown up (surfaces, textures);
* ``texture``: procedural multi-scale noise, stripes or cells in a random palette;
* ``blobs``: random soft discs and lines on a flat or noisy field (cells, vessels, stains).

Images are written once, deterministically (``seed``), to ``out`` (default: a folder in the user cache
named after the settings) and reused; the manifest refers to them.
"""
from __future__ import annotations

import colorsys
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field

from hierarchy.core.fsutil import atomic_write_with
from hierarchy.data.sources.base import Source, scan_images
from hierarchy.data.sources.items import Item, Problems

if TYPE_CHECKING:
    import numpy as np

Kind = Literal["gray", "zoom", "texture", "blobs"]
KINDS: tuple[str, ...] = ("gray", "zoom", "texture", "blobs")


class OutlierSource(Source):
    """``count`` generated negatives (see the module docstring); ``root`` holds the photos that
    ``gray`` and ``zoom`` are made from (e.g. the COCO images without people)."""

    type: Literal["outliers"] = "outliers"
    root: Path
    label: str
    count: int = Field(default=2000, ge=1, strict=True)
    kinds: list[Kind] = Field(default_factory=lambda: list(KINDS), min_length=1)
    size: int = Field(default=256, ge=32, le=1024, strict=True)  # side of the written square images
    seed: int = 0
    out: Optional[Path] = None  # where the images go (default: <user cache>/outliers/<settings hash>)

    def output_dir(self, root: Path) -> Path:
        if self.out is not None:
            return Path(os.path.expanduser(self.out))
        from hierarchy.core.machine import user_cache_dir

        settings = {"root": os.path.abspath(root), "count": self.count, "kinds": self.kinds, "size": self.size,
                    "seed": self.seed, "version": 1}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        return user_cache_dir() / "outliers" / digest

    def collect(self, root: Path, problems: Problems, *, exclude: Path | None = None) -> list[Item]:
        photos = scan_images(root, exclude)
        kinds = [k for k in self.kinds if photos or k not in ("gray", "zoom")]
        if not kinds:
            problems.add("unreadable", source=self.key, path=str(root), error="no photos to derive gray/zoom from")
            return []
        out = self.output_dir(root)
        out.mkdir(parents=True, exist_ok=True)
        items = []
        for i in range(self.count):
            kind = kinds[i % len(kinds)]
            path = out / f"{kind}_{i:05d}.jpg"
            if not path.is_file():
                try:
                    write_outlier(path, kind, photos, self.size, self.seed * 1_000_003 + i)
                except (OSError, ValueError) as exc:
                    problems.add("unreadable", source=self.key, path=str(path), error=f"{type(exc).__name__}: {exc}")
                    continue
            items.append(Item(path=str(path), label=self.label, source=self.key, group=path.name))
        return items


def write_outlier(path: Path, kind: str, photos: list[str], size: int, seed: int) -> None:
    """One generated image of ``kind``, written atomically as a JPEG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    if kind in ("gray", "zoom"):
        arr = _derived(rng, kind, photos[int(rng.integers(len(photos)))], size)
    else:
        arr = _texture(rng, size) if kind == "texture" else _blobs(rng, size)
    image, quality = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), int(rng.integers(60, 96))
    atomic_write_with(path, lambda tmp: image.save(tmp, "JPEG", quality=quality))


def _derived(rng: "np.random.Generator", kind: str, photo: str, size: int) -> "np.ndarray":
    import numpy as np
    from PIL import Image

    with Image.open(photo) as im:
        im = im.convert("RGB")
        w, h = im.size
        if kind == "zoom":
            side = int(min(w, h) * np.sqrt(rng.uniform(0.05, 0.25)))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            return np.asarray(im.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC), np.float32)
        side = min(w, h)
        x, y = (w - side) // 2, (h - side) // 2
        grey = np.asarray(im.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR).convert("L"),
                          np.float32) / 255.0
    grey = grey ** rng.uniform(0.5, 2.0)
    grey = (grey - grey.mean()) * rng.uniform(0.7, 1.6) + grey.mean()
    return np.repeat(grey[..., None] * 255.0, 3, axis=2)


def _palette(rng: "np.random.Generator", n: int = 2) -> "np.ndarray":
    import numpy as np

    return np.array([colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.9), rng.uniform(0.15, 1.0))
                     for _ in range(n)]) * 255.0


def _noise(rng: "np.random.Generator", size: int, octaves: int = 4) -> "np.ndarray":
    """Multi-scale value noise in [0, 1]: random grids upsampled and summed with falling weights."""
    import numpy as np
    from PIL import Image

    total = np.zeros((size, size), np.float32)
    for o in range(octaves):
        cells = int(2 ** (o + rng.integers(1, 4)))
        grid = (rng.uniform(0, 255, (cells, cells))).astype(np.uint8)
        total += np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), np.float32) / 255.0 / 2 ** o
    total -= total.min()
    return total / max(float(total.max()), 1e-6)


def _texture(rng: "np.random.Generator", size: int) -> "np.ndarray":
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    style = int(rng.integers(3))
    if style == 0:
        t = _noise(rng, size)
    elif style == 1:  # stripes warped by noise (wood, fabric)
        angle, freq = rng.uniform(0, np.pi), rng.uniform(4, 40)
        t = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq * 2 * np.pi
                               + _noise(rng, size) * rng.uniform(0, 8))
    else:  # cells: distance to the nearest random seed point
        pts = rng.uniform(0, 1, (int(rng.integers(8, 80)), 2))
        d = np.min((xx[..., None] - pts[:, 0]) ** 2 + (yy[..., None] - pts[:, 1]) ** 2, axis=-1)
        t = np.sqrt(d / max(float(d.max()), 1e-6))
    lo, hi = _palette(rng)
    img = lo + t[..., None] * (hi - lo)
    return img + rng.normal(0, rng.uniform(0, 12), img.shape)


def _blobs(rng: "np.random.Generator", size: int) -> "np.ndarray":
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    back, *inks = _palette(rng, 4)
    img = np.broadcast_to(back, (size, size, 3)).astype(np.float32) * (0.8 + 0.4 * _noise(rng, size, 3))[..., None]
    for _ in range(int(rng.integers(3, 60))):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.01, 0.12)
        alpha = np.clip(1.0 - np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r, 0, 1) ** rng.uniform(0.3, 2.0)
        img = img * (1 - alpha[..., None]) + inks[int(rng.integers(len(inks)))] * alpha[..., None]
    for _ in range(int(rng.integers(0, 8))):  # thin curved lines
        a, b, c = rng.uniform(-3, 3, 3)
        line = np.exp(-((yy - (a * (xx - 0.5) ** 2 + b * (xx - 0.5) * 0.3 + 0.5 + c * 0.1)) ** 2) / 2e-5)
        img = img * (1 - line[..., None]) + inks[0] * 0.6 * line[..., None]
    return img
