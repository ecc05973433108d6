"""Synthetic data in the real on-disk formats, for ``hierarchy demo``, tests and plugin authors.

* :func:`make_ham10000` -- ``HAM10000_metadata.csv`` + JPEGs in ``HAM10000_images_part_1/_part_2``;
  ids use the clearly synthetic prefix ``SYN`` (``SYN_L0000001`` lesions, ``SYN_0000001`` images).
* :func:`make_coco` -- ``annotations/instances_<set>.json`` (loadable with pycocotools, official
  category ids) + ``<set>/<12-digit id>.jpg``; about half the images contain a ``person``.
* :func:`make_ood` -- grey stripes / checkerboards / noise, unlike both of the above.
* :func:`make_image_folder` -- ``root/<label>/*.jpg`` with a label-dependent colour and pattern.

Images are built to be easy for a tiny CNN: skin = smooth skin tone with a lesion blob whose
colour, size and shape depend on ``dx``; non-skin = saturated blue/green/grey scenes with
rectangles and lines. Everything is deterministic given ``seed``.
"""
from __future__ import annotations

import colorsys
import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hierarchy.core.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import numpy as np

HAM_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
DX_WEIGHTS = {"nv": 0.40, "mel": 0.15, "bkl": 0.12, "bcc": 0.10, "akiec": 0.09, "vasc": 0.07, "df": 0.07}
SKIN_TONES = ((236, 196, 168), (226, 178, 146), (214, 164, 126), (200, 146, 110), (186, 132, 98), (240, 205, 185))
# dx -> lesion colour, radius (fraction of the short side), border irregularity, aspect ratio, texture
DX_STYLE: dict[str, dict[str, Any]] = {
    "mel": {"color": (48, 30, 24), "radius": 0.30, "irregular": 0.28, "aspect": 1.2, "texture": "variegated"},
    "nv": {"color": (128, 82, 52), "radius": 0.22, "irregular": 0.03, "aspect": 1.0, "texture": None},
    "bcc": {"color": (226, 158, 172), "radius": 0.21, "irregular": 0.06, "aspect": 1.1, "texture": "pearly"},
    "akiec": {"color": (196, 66, 52), "radius": 0.24, "irregular": 0.12, "aspect": 1.3, "texture": "scaly"},
    "bkl": {"color": (156, 110, 68), "radius": 0.30, "irregular": 0.08, "aspect": 1.6, "texture": None},
    "df": {"color": (112, 72, 54), "radius": 0.11, "irregular": 0.04, "aspect": 1.0, "texture": None},
    "vasc": {"color": (128, 24, 84), "radius": 0.18, "irregular": 0.05, "aspect": 1.0, "texture": None},
}
COCO_CATEGORIES = (
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (16, "bird", "animal"),
    (17, "cat", "animal"), (18, "dog", "animal"), (44, "bottle", "kitchen"), (62, "chair", "furniture"),
    (64, "potted plant", "furniture"), (72, "tv", "electronic"),
)
SCENE_COLORS = ((40, 90, 210), (30, 150, 60), (120, 122, 130), (20, 60, 140), (70, 170, 90), (90, 90, 100))
LOCALIZATIONS = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "scalp")


def _rng(seed: int) -> "np.random.Generator":
    import numpy as np

    return np.random.default_rng(seed)


def _jpeg(arr: "np.ndarray", path: Path) -> None:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
    atomic_write_bytes(path, buf.getvalue())


def _grid(w: int, h: int) -> tuple["np.ndarray", "np.ndarray"]:
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return xx / max(w - 1, 1), yy / max(h - 1, 1)


def _smooth_noise(rng: "np.random.Generator", w: int, h: int, cells: int = 4) -> "np.ndarray":
    """Low-frequency noise in [-1, 1] (bilinear upsampling of a coarse random grid)."""
    import numpy as np
    from PIL import Image

    coarse = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    up = np.asarray(Image.fromarray(coarse, "L").resize((w, h), Image.BILINEAR), dtype=np.float64)
    return up / 127.5 - 1.0


# --- skin -----------------------------------------------------------------------------------


def _skin_background(rng: "np.random.Generator", w: int, h: int) -> "np.ndarray":
    import numpy as np

    base = np.array(SKIN_TONES[rng.integers(len(SKIN_TONES))], dtype=np.float64) + rng.normal(0, 6, 3)
    xx, yy = _grid(w, h)
    gx, gy = rng.uniform(-0.08, 0.08, 2)
    shade = 1.0 + gx * (xx - 0.5) + gy * (yy - 0.5) + 0.03 * _smooth_noise(rng, w, h)
    return base[None, None, :] * shade[..., None] + rng.normal(0, 2.0, (h, w, 3))


def _lesion_shape(rng: "np.random.Generator", dx: str) -> dict[str, Any]:
    """Per-lesion parameters; the images of one lesion share them (with small per-image jitter)."""
    style = DX_STYLE[dx]
    return {
        "dx": dx,
        "color": [c + d for c, d in zip(style["color"], rng.normal(0, 8, 3))],
        "radius": style["radius"] * rng.uniform(0.85, 1.15),
        "phases": rng.uniform(0, 6.283, 5),
        "amps": rng.uniform(0.3, 1.0, 5),
        "angle": rng.uniform(0, 3.1416),
    }


def _lesion_alpha(rng: "np.random.Generator", shape: dict[str, Any], w: int, h: int) -> "np.ndarray":
    import numpy as np

    style = DX_STYLE[shape["dx"]]
    xx, yy = _grid(w, h)
    cx, cy = 0.5 + rng.uniform(-0.1, 0.1, 2)
    dx_, dy_ = (xx - cx) * w, (yy - cy) * h
    ang = shape["angle"] + rng.uniform(-0.3, 0.3)
    u, v = dx_ * np.cos(ang) + dy_ * np.sin(ang), -dx_ * np.sin(ang) + dy_ * np.cos(ang)
    r0 = shape["radius"] * min(w, h)
    dist = np.hypot(u / (r0 * style["aspect"]), v / r0)
    theta = np.arctan2(v, u)
    wobble = sum(a * np.sin((k + 2) * theta + p) for k, (a, p) in enumerate(zip(shape["amps"], shape["phases"])))
    edge = 1.0 + style["irregular"] * wobble / 2.5
    return np.clip((edge - dist) / 0.12, 0.0, 1.0)


def _lesion_texture(rng: "np.random.Generator", shape: dict[str, Any], w: int, h: int) -> "np.ndarray":
    import numpy as np

    color = np.array(shape["color"], dtype=np.float64)[None, None, :] * np.ones((h, w, 1))
    texture = DX_STYLE[shape["dx"]]["texture"]
    if texture == "variegated":  # blue-black / dark red-brown patches
        mix = (_smooth_noise(rng, w, h, 6) + 1) / 2
        color = color * (1 - mix[..., None]) + np.array([20, 18, 40.0]) * mix[..., None]
    elif texture == "pearly":  # shiny centre
        xx, yy = _grid(w, h)
        glow = np.exp(-(((xx - 0.5) ** 2) + (yy - 0.5) ** 2) / 0.01)
        color = color + 40 * glow[..., None]
    elif texture == "scaly":  # whitish scale speckles
        speck = (rng.uniform(0, 1, (h, w)) > 0.8).astype(np.float64)
        color = color + 60 * speck[..., None]
    return color + rng.normal(0, 3.0, (h, w, 3))


def skin_image(rng: "np.random.Generator", shape: dict[str, Any], size: tuple[int, int]) -> "np.ndarray":
    """One dermoscopy-like image (H, W, 3) float for a lesion from :func:`_lesion_shape`."""
    w, h = size
    bg = _skin_background(rng, w, h)
    alpha = _lesion_alpha(rng, shape, w, h)[..., None]
    return bg * (1 - alpha) + _lesion_texture(rng, shape, w, h) * alpha


def _pick_dx(rng: "np.random.Generator", n: int, weights: dict[str, float]) -> list[str]:
    """One lesion of every weighted dx first (when n allows), the rest drawn by weight."""
    import numpy as np

    names = [d for d in sorted(weights) if weights[d] > 0]
    unknown = sorted(set(weights) - set(DX_STYLE))
    if unknown or not names:
        raise ValueError(f"dx_weights: unknown dx {unknown} or no positive weight; known: {sorted(DX_STYLE)}")
    p = np.array([weights[d] for d in names], dtype=np.float64)
    rest = list(rng.choice(names, size=max(n - len(names), 0), p=p / p.sum()))
    out = (names + rest)[:n]
    rng.shuffle(out)
    return [str(d) for d in out]


def make_ham10000(
    root: Path,
    *,
    n_lesions: int = 40,
    max_images_per_lesion: int = 3,
    size: tuple[int, int] = (96, 72),
    seed: int = 0,
    dx_weights: dict[str, float] | None = None,
) -> Path:
    """Write a HAM10000-format folder (metadata CSV + JPEGs in two parts) under ``root``; return ``root``."""
    root = Path(root)
    rng = _rng(seed)
    dxs = _pick_dx(rng, n_lesions, dx_weights or DX_WEIGHTS)
    lesions = [(dx, _lesion_shape(rng, dx), _lesion_meta(rng, dx)) for dx in dxs]
    counts = [int(rng.integers(1, max_images_per_lesion + 1)) for _ in lesions]
    half = (sum(counts) + 1) // 2  # upstream ships the images in two parts of about equal size
    rows: list[dict[str, str]] = []
    for lesion, ((dx, shape, meta), count) in enumerate(zip(lesions, counts), start=1):
        for _ in range(count):
            image_id = f"SYN_{len(rows) + 1:07d}"
            rows.append({"lesion_id": f"SYN_L{lesion:07d}", "image_id": image_id, "dx": dx, **meta})
            part = 1 if len(rows) <= half else 2
            _jpeg(skin_image(rng, shape, size), root / f"HAM10000_images_part_{part}" / f"{image_id}.jpg")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HAM_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(root / "HAM10000_metadata.csv", buf.getvalue())
    return root


def _lesion_meta(rng: "np.random.Generator", dx: str) -> dict[str, str]:
    dx_type = "histo" if dx in ("mel", "bcc", "akiec") else str(rng.choice(["follow_up", "consensus", "histo"]))
    return {
        "dx_type": dx_type,
        "age": f"{5 * int(rng.integers(4, 18))}.0",
        "sex": str(rng.choice(["male", "female"])),
        "localization": str(rng.choice(LOCALIZATIONS)),
    }


# --- coco -----------------------------------------------------------------------------------


def _scene(rng: "np.random.Generator", w: int, h: int) -> "np.ndarray":
    import numpy as np

    top, bottom = (np.array(SCENE_COLORS[i], dtype=np.float64) for i in rng.choice(len(SCENE_COLORS), 2))
    _, yy = _grid(w, h)
    horizon = rng.uniform(0.3, 0.7)
    img = np.where((yy < horizon)[..., None], top, bottom) * np.ones((h, w, 1))
    for _ in range(int(rng.integers(2, 5))):  # buildings / boxes
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        img[y0 : y0 + int(rng.integers(6, h // 2)), x0 : x0 + int(rng.integers(6, w // 3))] = rng.uniform(20, 235, 3)
    for _ in range(int(rng.integers(1, 4))):  # lines
        y = int(rng.integers(0, h))
        img[y : y + 2, :] = rng.uniform(0, 255, 3)
    return img + rng.normal(0, 3.0, (h, w, 3))


def _draw_object(rng: "np.random.Generator", img: "np.ndarray", cat_id: int) -> list[float]:
    """Paint one object, return its COCO bbox [x, y, w, h]."""
    h, w = img.shape[:2]
    bw, bh = (int(rng.integers(w // 8, w // 4)), int(rng.integers(h // 3, h // 2 + 1))) if cat_id == 1 else (
        int(rng.integers(w // 8, w // 3)), int(rng.integers(h // 8, h // 3)))
    x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    colour = (200, 30, 40) if cat_id == 1 else rng.uniform(0, 255, 3)
    img[y : y + bh, x : x + bw] = colour
    if cat_id == 1:  # a "head": a darker square on top of the body
        img[y : y + max(bh // 5, 2), x + bw // 4 : x + 3 * bw // 4] = (40, 30, 90)
    return [float(x), float(y), float(bw), float(bh)]


def _coco_set(rng: "np.random.Generator", root: Path, name: str, first_id: int, n: int, size: tuple[int, int]) -> dict:
    w, h = size
    with_person = set(rng.permutation(n)[: (n + 1) // 2].tolist())
    others = [c[0] for c in COCO_CATEGORIES if c[0] != 1]
    images, anns = [], []
    for i in range(n):
        img_id = first_id + i
        img = _scene(rng, w, h)
        cats = [1] * int(rng.integers(1, 3)) if i in with_person else []
        cats += [int(c) for c in rng.choice(others, int(rng.integers(0, 3 if cats else 4)))]
        for cat in cats:
            x, y, bw, bh = _draw_object(rng, img, cat)
            anns.append({
                "id": len(anns) + 1, "image_id": img_id, "category_id": cat, "bbox": [x, y, bw, bh],
                "area": bw * bh, "iscrowd": 0, "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
            })
        file_name = f"{img_id:012d}.jpg"
        images.append({"id": img_id, "file_name": file_name, "width": w, "height": h, "license": 1})
        _jpeg(img, root / name / file_name)
    return {
        "info": {"description": f"hierarchy synthetic COCO-format data ({name})", "version": "1.0"},
        "licenses": [{"id": 1, "name": "synthetic, public domain", "url": ""}],
        "images": images,
        "annotations": anns,
        "categories": [{"id": i, "name": n_, "supercategory": s} for i, n_, s in COCO_CATEGORIES],
    }


def make_coco(
    root: Path,
    *,
    sets: Sequence[str] = ("train2017", "val2017"),
    n_images: int = 30,
    size: tuple[int, int] = (96, 72),
    seed: int = 0,
) -> Path:
    """Write a COCO-format folder (instances JSON per set + images) under ``root``; return ``root``."""
    root = Path(root)
    rng = _rng(seed)
    for k, name in enumerate(sets):
        data = _coco_set(rng, root, name, 100000 * (k + 1) + 1, n_images, size)
        atomic_write_json(root / "annotations" / f"instances_{name}.json", data)
    return root


# --- ood / image folder ---------------------------------------------------------------------


def _ood_image(rng: "np.random.Generator", kind: int, w: int, h: int) -> "np.ndarray":
    import numpy as np

    xx, yy = _grid(w, h)
    lo, hi = sorted(rng.uniform(0, 255, 2))
    if kind == 0:  # stripes
        period = rng.uniform(0.05, 0.2)
        g = np.where(np.sin((xx * np.cos(rng.uniform(0, 3.14)) + yy) / period * 6.283) > 0, hi, lo)
    elif kind == 1:  # checkerboard
        n = int(rng.integers(3, 9))
        g = np.where(((xx * n).astype(int) + (yy * n).astype(int)) % 2 == 0, hi, lo)
    else:  # noise
        g = rng.uniform(lo, hi + 1, (h, w))
    return np.repeat(g[..., None], 3, axis=2)


def make_ood(root: Path, *, n: int = 20, size: tuple[int, int] = (96, 72), seed: int = 0) -> Path:
    """Write ``n`` grey stripe / checkerboard / noise JPEGs into ``root``; return ``root``."""
    root = Path(root)
    rng = _rng(seed)
    kinds = ("stripes", "checker", "noise")
    for i in range(n):
        _jpeg(_ood_image(rng, i % 3, *size), root / f"ood_{kinds[i % 3]}_{i:04d}.jpg")
    return root


def _label_image(rng: "np.random.Generator", index: int, count: int, w: int, h: int) -> "np.ndarray":
    import numpy as np

    hue = (index / max(count, 1) + rng.uniform(-0.03, 0.03)) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.9)) * 255
    xx, yy = _grid(w, h)
    axis = xx if index % 2 == 0 else yy  # stripe orientation alternates with the label
    stripes = (np.sin(axis * (4 + 2 * (index % 4)) * 6.283 + rng.uniform(0, 6.283)) > 0)[..., None]
    return colour * np.where(stripes, 1.0, 0.55) + rng.normal(0, 4.0, (h, w, 3))


def make_image_folder(
    root: Path, labels: Sequence[str], n_per_label: int = 10, size: tuple[int, int] = (64, 64), seed: int = 0
) -> Path:
    """Write ``root/<label>/<label>_NNNN.jpg`` with a colour and stripe pattern per label; return ``root``."""
    root = Path(root)
    rng = _rng(seed)
    for k, label in enumerate(labels):
        for i in range(n_per_label):
            _jpeg(_label_image(rng, k, len(labels), *size), root / label / f"{label}_{i:04d}.jpg")
    return root
