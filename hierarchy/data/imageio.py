"""The one image loader used by the engine and every stage.

``load_image`` returns a fully decoded RGB ``PIL.Image.Image`` or raises
:class:`hierarchy.core.errors.ImageError` with a stable ``type``:

=====================  ===============================================================
``not_found``          the path (or a symlink target) does not exist
``not_a_file``         a directory, fifo, socket, device...
``unreadable``         permission denied, symlink loop (ELOOP), I/O error while reading
``empty``              zero bytes
``too_large``          file bytes > ``max_bytes``, or width*height > ``max_pixels``
                       (checked from the header before decoding), Pillow decompression bomb
``unsupported_format`` a recognisable format outside ``ALLOWED_FORMATS`` (PDF, PSD, SVG, HEIC...)
``undecodable``        random bytes or corrupt data
``truncated``          the data ends before the image does
=====================  ===============================================================

Conversion rules: EXIF orientation is applied; only the first frame of an animated
GIF/WebP/TIFF is returned; images with transparency (RGBA, LA, PA, P or L/RGB with a
``transparency`` key) are composited on :data:`BACKGROUND` (white); 16-bit greyscale is
scaled by bit depth (65535 -> 255); 32-bit integer and float images are stretched from
their min..max to 0..255; every other mode goes through ``Image.convert("RGB")``.
Pillow globals (``LOAD_TRUNCATED_IMAGES``, ``MAX_IMAGE_PIXELS``) and the ``warnings`` filters
are never changed, so ``load_image`` is safe to call from many threads at once.
"""
from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from hierarchy.core.errors import ImageError

DEFAULT_MAX_PIXELS: int = 40_000_000  # well under Pillow's 89M warning / 179M error
DEFAULT_MAX_BYTES: int = 200 * 1024 * 1024
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)

_ORIENTATION_TAG = 0x0112
_ORIENTATION_INFO_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")
_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Magic bytes of formats we recognise but refuse (checked only after Pillow gave up).
_FOREIGN_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"%PDF", "PDF"),
    (0, b"8BPS", "PSD"),
    (0, b"PK\x03\x04", "ZIP"),
    (0, b"PK\x05\x06", "ZIP"),
    (0, b"\x1f\x8b", "gzip"),
    (0, b"Rar!", "RAR"),
    (0, b"7z\xbc\xaf\x27\x1c", "7z"),
    (0, b"%!PS", "PostScript"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"\x00\x00\x02\x00", "CUR"),
    (0, b"DDS ", "DDS"),
    (0, b"qoif", "QOI"),
    (0, b"v/1\x01", "OpenEXR"),
    (0, b"#?RADIANCE", "HDR"),
    (0, b"\x7fELF", "ELF"),
    (128, b"DICM", "DICOM"),
    (4, b"ftyp", "ISO media (HEIC/AVIF/MP4)"),
)
_TEXT_MARKUP: tuple[tuple[bytes, str], ...] = (
    (b"<?xml", "XML"),
    (b"<svg", "SVG"),
    (b"<!doctype svg", "SVG"),
    (b"<!doctype html", "HTML"),
    (b"<html", "HTML"),
)


def load_image(
    path: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    draft_size: int | None = None,
) -> Image.Image:
    """Load ``path`` as a fully decoded RGB image or raise :class:`ImageError`.

    ``draft_size`` (JPEG only) lets the decoder pick a reduced power-of-two scale whose
    sides are still >= ``draft_size``; the output may then be smaller than the original.
    ``max_pixels`` applies to the size that will actually be decoded (after drafting).
    """
    _check_draft_size(draft_size)
    data = read_image_bytes(path, max_bytes)
    return decode_image_bytes(path, data, max_pixels=max_pixels, draft_size=draft_size)


def decode_image_bytes(
    path: str | os.PathLike,
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """:func:`load_image` for the bytes of ``path`` already read (by :func:`read_image_bytes`):
    the same checks, conversion rules and typed errors (naming ``path``), without reading again."""
    _check_draft_size(draft_size)
    img = _decode(path, data, max_pixels, draft_size)
    return _finish(path, img)


def _check_draft_size(draft_size: int | None) -> None:
    if draft_size is not None and draft_size < 1:
        raise ValueError(f"draft_size must be >= 1, got {draft_size}")


def iter_image_files(root: str | os.PathLike, follow_links: bool = False) -> Iterator[Path]:
    """Yield ``root`` if it is a file, else every image file under it (by suffix).

    Directories are walked depth-first with the entries of each sorted by name (so the order
    is deterministic); directory symlinks are followed only with ``follow_links`` (each real
    directory once, so a link loop ends), unreadable directories are skipped. A missing or
    unreadable root raises :class:`ImageError`.
    """
    root_path = Path(root)
    try:
        is_dir = stat.S_ISDIR(os.stat(root_path).st_mode)
    except OSError as exc:
        raise _open_error(root, exc) from exc
    if not is_dir:
        yield root_path
        return
    # An explicit stack instead of recursion: arbitrarily deep trees cannot hit RecursionError.
    stack = [iter(_sorted_entries(root_path))]
    seen = {_dir_key(root_path)}
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
        elif _is_real_dir(entry) or (follow_links and _is_linked_dir(entry) and _dir_key(entry.path) not in seen):
            seen.add(_dir_key(entry.path))
            stack.append(iter(_sorted_entries(entry.path)))
        elif _is_image_file(entry):
            yield Path(entry.path)


def _sorted_entries(directory: str | os.PathLike) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []


def _is_real_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _is_linked_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_symlink() and entry.is_dir()
    except OSError:
        return False


def _dir_key(path: str | os.PathLike) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_dev, st.st_ino)


def _is_image_file(entry: os.DirEntry) -> bool:
    if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
        return False
    try:
        return entry.is_file()  # follows file symlinks; a loop or dangling link is False
    except OSError:
        return False


# --------------------------------------------------------------------------- reading


def read_image_bytes(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of ``path``, read once, or :class:`ImageError` (``not_found``, ``not_a_file``,
    ``unreadable``, ``empty``, ``too_large``). Opens without blocking (a fifo must not hang us)
    and checks it is a regular file before reading."""
    fs_path = os.fspath(path)
    try:
        fd = os.open(fs_path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise _open_error(path, exc) from exc
    try:
        _check_stat(path, os.fstat(fd), max_bytes)
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            data = _read_all(f, max_bytes + 1)
    except OSError as exc:
        raise ImageError("unreadable", path, f"read failed: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if not data:
        raise ImageError("empty", path, "file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError("too_large", path, f"file is larger than max_bytes={max_bytes}")
    return data


def _read_all(f: io.RawIOBase, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = f.read(min(1 << 20, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _open_error(path: str | os.PathLike, exc: OSError) -> ImageError:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return ImageError("not_found", path, "no such file")
    if exc.errno in (errno.EISDIR, errno.ENXIO, errno.ENODEV):
        return ImageError("not_a_file", path, f"not a regular file ({reason})")
    if exc.errno == errno.ELOOP:
        return ImageError("unreadable", path, "too many levels of symbolic links (symlink loop)")
    return ImageError("unreadable", path, f"cannot open: {reason}")


def _check_stat(path: str | os.PathLike, st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "special file"
        raise ImageError("not_a_file", path, f"not a regular file ({kind})")
    if st.st_size == 0:
        raise ImageError("empty", path, "file is empty (0 bytes)")
    if st.st_size > max_bytes:
        raise ImageError(
            "too_large", path, f"file has {st.st_size} bytes, more than max_bytes={max_bytes}"
        )


# -------------------------------------------------------------------------- decoding


def _decode(
    path: str | os.PathLike, data: bytes, max_pixels: int, draft_size: int | None
) -> Image.Image:
    try:
        return _open_and_load(path, data, max_pixels, draft_size)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise _unidentified(path, data) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_large", path, f"decompression bomb: {exc}") from exc
    except MemoryError as exc:
        raise ImageError("too_large", path, "out of memory while decoding") from exc
    except EOFError as exc:
        raise ImageError("truncated", path, f"premature end of data: {exc}") from exc
    except Exception as exc:  # Pillow plugins raise many types on corrupt input
        raise _decode_error(path, exc) from exc


def _open_and_load(
    path: str | os.PathLike, data: bytes, max_pixels: int, draft_size: int | None
) -> Image.Image:
    img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    # Pillow only *warns* above MAX_IMAGE_PIXELS. Refusing here has the effect of turning that
    # warning into an error without warnings.catch_warnings(), which is process-global and
    # races when load_image runs in threads (the engine and dataset checks do).
    _check_pixels(path, img.size, Image.MAX_IMAGE_PIXELS, "Pillow's decompression-bomb limit")
    if draft_size is not None and img.format in ("JPEG", "MPO"):
        img.draft("RGB", (draft_size, draft_size))
    _check_pixels(path, img.size, max_pixels, "max_pixels")
    img.load()
    return img


def _check_pixels(
    path: str | os.PathLike, size: tuple[int, int], limit: int | None, what: str
) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError("undecodable", path, f"invalid image size {width}x{height}")
    if limit is not None and width * height > limit:
        pixels = width * height
        raise ImageError("too_large", path, f"{width}x{height} = {pixels} pixels > {what}={limit}")


def _decode_error(path: str | os.PathLike, exc: Exception) -> ImageError:
    text = str(exc)
    lowered = text.lower()
    if "truncated" in lowered or "premature end" in lowered:
        return ImageError("truncated", path, text or "image data ends early")
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return ImageError("undecodable", path, detail)


def _unidentified(path: str | os.PathLike, data: bytes) -> ImageError:
    foreign = _sniff_foreign(data)
    if foreign is not None:
        return ImageError(
            "unsupported_format", path, f"{foreign} is not one of {', '.join(ALLOWED_FORMATS)}"
        )
    return ImageError("undecodable", path, "not a recognised image format")


def _sniff_foreign(data: bytes) -> str | None:
    for offset, magic, name in _FOREIGN_MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for prefix, name in _TEXT_MARKUP:
        if head.startswith(prefix):
            return name
    return None


# ------------------------------------------------------------------------ conversion


def _finish(path: str | os.PathLike, img: Image.Image) -> Image.Image:
    orientation = _orientation(img)
    try:
        rgb = _to_rgb(img)
    except MemoryError as exc:
        raise ImageError("too_large", path, "out of memory while converting to RGB") from exc
    except Exception as exc:  # an exotic mode Pillow can decode but not convert
        message = f"cannot convert mode {img.mode} to RGB: {exc}"
        raise ImageError("unsupported_format", path, message) from exc
    method = _TRANSPOSE.get(orientation)
    if method is None:
        return rgb
    out = rgb.transpose(method)
    # The pixels are now upright: drop the tag so nobody rotates them a second time.
    for key in _ORIENTATION_INFO_KEYS:
        out.info.pop(key, None)
    return out


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8); malformed EXIF means "no transpose", never a failure."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        return int(value)
    except Exception:  # malformed EXIF can raise anything; it must not cost us the image
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(img)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return _composite(img.convert("RGBA"))
    return img.convert("RGB")


def _composite(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, BACKGROUND)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _scale_to_uint8(img: Image.Image) -> np.ndarray:
    """16-bit: fixed 65535 -> 255 scale. 32-bit int / float: stretch finite min..max."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    values = arr.astype(np.float32)  # 8 output bits need no more precision; halves memory
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    low, high = float(values[finite].min()), float(values[finite].max())
    if high <= low:
        return np.full(arr.shape, int(np.clip(low, 0, 255)), dtype=np.uint8)
    scaled = (np.where(finite, values, low) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
