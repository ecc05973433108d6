"""Fast decode of one image file straight to the uint8 (3, S, S) arrays the presets ask for
(numpy from :func:`decode_arrays`, torch views of the same memory from :func:`decode_uint8`).

The reference is ``Preset.reference`` (PIL full decode, ``Resize((S, S))`` bilinear with
antialiasing). Three paths, all within 1/255 mean absolute difference of it (measured in
``docs/performance.md``, checked by ``tests/test_fast_path.py``):

* plain RGB JPEGs up to 4x the preset size, when torchvision is imported anyway (training, long
  runs): ``torchvision.io.decode_jpeg`` (libjpeg-turbo) + torch's uint8 antialiased bilinear resize:
  ~0.001/255 from the reference and ~1.6x cheaper than PIL decode + resize (1.7 vs 2.7 ms, 600x450);
* larger JPEGs: PIL with a JPEG draft to >= 2x the preset size (DCT-domain downscale, then an
  antialiased resize of at least 2x): ~0.3/255, and 2-8x cheaper than a full decode;
* everything else (PNG, CMYK or greyscale JPEG, EXIF-rotated, anything odd): ``load_image``'s
  decoder (:func:`~hierarchy.data.imageio.decode_image_bytes`) exactly as before, which also produces
  the typed :class:`~hierarchy.core.errors.ImageError` for bad files.

Each path decodes the bytes read once by :func:`~hierarchy.data.imageio.read_image_bytes`.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Sequence


if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

_SOI, _EOI = b"\xff\xd8\xff", b"\xff\xd9"
_ORIENTATION_TAG = 0x0112
DRAFT_FACTOR = 4  # a JPEG whose short side is >= 4x the largest size takes the draft path
DRAFT_MARGIN = 2  # ... drafted to >= 2x that size, so the final resize still antialiases >= 2x


def decode_arrays(path: "str | os.PathLike", sizes: Sequence[int], draft: bool = True) -> "dict[int, np.ndarray]":
    """``path`` -> {size: (3, size, size) uint8 numpy array} for each requested size (squash resize).
    The file is read once; every path decodes those bytes. ``draft=False`` never decodes a JPEG at
    reduced scale. Raises a typed :class:`ImageError`. Imports torch only when torchvision's decoder
    is in use (see :func:`_torch_jpeg_decoder`), so the ONNX engine decodes with PIL and numpy alone."""
    from hierarchy.data.imageio import read_image_bytes

    sizes = sorted(set(int(s) for s in sizes))
    data = read_image_bytes(path)
    header = _jpeg_header(data)
    if header is not None:
        width, height = header
        if not draft or min(width, height) < DRAFT_FACTOR * sizes[-1]:
            fast = _decode_jpeg_torch(data, sizes)
            if fast is not None:
                return {s: t.numpy() for s, t in fast.items()}
        else:
            return _from_pil(path, data, sizes, draft=DRAFT_MARGIN * sizes[-1])
    return _from_pil(path, data, sizes, draft=None)


def decode_uint8(path: "str | os.PathLike", sizes: Sequence[int], draft: bool = True) -> "dict[int, torch.Tensor]":
    """:func:`decode_arrays` as torch uint8 tensors (zero-copy views of the same memory)."""
    import torch

    return {s: torch.from_numpy(a) for s, a in decode_arrays(path, sizes, draft).items()}


def resize_uint8(chw: "torch.Tensor", size: int) -> "torch.Tensor":
    """(3, H, W) uint8 -> (3, size, size) uint8, bilinear with antialiasing (PIL-equivalent)."""
    import torch

    if tuple(chw.shape[1:]) == (size, size):
        return chw.contiguous()
    out = torch.nn.functional.interpolate(chw.unsqueeze(0), size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False)
    return out[0].contiguous()


def pil_to_array(img: "Image.Image", size: int) -> "np.ndarray":
    """RGB PIL image -> (3, size, size) uint8 numpy array (the preset's squash resize)."""
    from hierarchy.data.preset import Preset

    return Preset(size=size).to_array(img)


def _from_pil(path: "str | os.PathLike", data: bytes, sizes: Sequence[int],
              draft: int | None) -> "dict[int, np.ndarray]":
    from hierarchy.data.imageio import decode_image_bytes

    img = decode_image_bytes(path, data, draft_size=draft)
    return {s: pil_to_array(img, s) for s in sizes}


def _jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a complete, upright, 3-channel baseline-decodable JPEG within the pixel
    limits; None for anything the fast path should leave to PIL."""
    if not (data.startswith(_SOI) and data.endswith(_EOI)):
        return None
    from PIL import Image

    from hierarchy.data.imageio import DEFAULT_MAX_PIXELS

    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
            if im.format != "JPEG" or im.mode != "RGB" or _orientation(im) != 1:
                return None
            width, height = im.size
    except Exception:  # noqa: BLE001 - any header problem: let load_image classify it
        return None
    limit = min(DEFAULT_MAX_PIXELS, Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS)
    return (width, height) if 0 < width * height <= limit else None


def _orientation(im: "Image.Image") -> int:
    try:
        return int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF: not for the fast path
        return 0


def _torch_jpeg_decoder() -> Any:
    """torchvision's libjpeg-turbo decoder when torchvision is already imported (or after
    :func:`enable_torchvision_decoder`), else None and PIL decodes: importing torchvision only for
    this would cost ``hierarchy run`` ~1 s of start-up for ~1 ms per image. None too while a
    background import is still running, and where torchvision no longer has it (deprecated in 0.29
    in favour of TorchCodec)."""
    if "torchvision" not in sys.modules or _importing.is_set():
        return None
    return _load_torchvision_decoder()


@functools.lru_cache(maxsize=1)
def _load_torchvision_decoder() -> Any:
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB)


_importing = threading.Event()  # set while enable_torchvision_decoder(background=True) imports


def enable_torchvision_decoder(background: bool = False) -> "bool | threading.Thread":
    """Import torchvision's JPEG decoder (worth it for long runs). Returns True when available; with
    ``background`` returns the importing thread at once: images decode with PIL (same pixels within
    0.001/255) until the import is done, so its ~1 s is no longer spent before the first batch."""
    if not background:
        import torchvision  # noqa: F401

        return _load_torchvision_decoder() is not None
    _importing.set()
    thread = threading.Thread(target=_import_in_background, name="hierarchy-torchvision-import", daemon=True)
    thread.start()
    return thread


def _import_in_background() -> None:
    try:
        import torchvision  # noqa: F401

        _load_torchvision_decoder()
    except Exception as exc:  # noqa: BLE001 - any failure here only means PIL keeps decoding
        log.debug("torchvision import failed (%s); PIL keeps decoding", exc)
    finally:
        _importing.clear()


def _decode_jpeg_torch(data: bytes, sizes: Sequence[int]) -> "dict[int, torch.Tensor] | None":
    decoder = _torch_jpeg_decoder()
    if decoder is None:  # torchvision not loaded: PIL decodes, and torch is not imported here
        return None
    import torch

    try:
        chw = decoder(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except RuntimeError as exc:  # corrupt data: PIL decides the error type
        log.debug("decode_jpeg failed (%s); falling back to PIL", exc)
        return None
    if chw.ndim != 3 or chw.shape[0] != 3:
        return None
    return {s: resize_uint8(chw, s) for s in sizes}


def reference_difference(img: "Image.Image", uint8: "torch.Tensor", size: int) -> float:
    """Mean absolute difference, in [0, 1] pixel units, between ``uint8`` and the reference preset
    (``Preset.reference``: torchvision Resize + ToTensor, before Normalize) of ``img``."""
    import torch

    from hierarchy.data.preset import Preset

    preset = Preset(size=size)
    mean, std = torch.tensor(preset.mean).view(3, 1, 1), torch.tensor(preset.std).view(3, 1, 1)
    ref = preset.reference(img.convert("RGB")) * std + mean
    return float((uint8.float() / 255.0 - ref).abs().mean())
