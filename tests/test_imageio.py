"""Catalogue of good and bad inputs for hierarchy.data.imageio. Every file is generated in tmp_path."""
from __future__ import annotations

import errno
import inspect
import io
import os
import socket
import struct
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin, features

import hierarchy.data.imageio as imageio
from hierarchy.core.errors import ImageError
from hierarchy.data.imageio import (
    ALLOWED_FORMATS,
    BACKGROUND,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    iter_image_files,
    load_image,
)



def permissions_enforced(directory: Path) -> bool:
    """False when running with CAP_DAC_OVERRIDE (root), where chmod 0 does not stop reads."""
    probe = directory / ".probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        probe.read_bytes()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o600)
        probe.unlink()
    return False


# ----------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def noise(w: int = 48, h: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def asymmetric() -> np.ndarray:
    """A 3x5 RGB array with every pixel distinct, so any rotation/flip is detectable."""
    return (np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3) * 5).astype(np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose (valid-CRC) IHDR claims width x height, with a tiny IDAT: never decodable."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def load_error(path: object, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(path, **kwargs)  # type: ignore[arg-type]
    return info.value


# ------------------------------------------------------------------------ public API


def test_public_constants() -> None:
    assert DEFAULT_MAX_PIXELS == 40_000_000
    assert DEFAULT_MAX_BYTES == 200 * 1024 * 1024
    assert ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
    assert BACKGROUND == (255, 255, 255)
    assert IMAGE_EXTENSIONS == frozenset(
        {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
    )


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP"])
def test_every_allowed_format_loads_as_rgb(tmp_path: Path, fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    path = write(tmp_path / "img.bin", encode(noise(), fmt))  # extension deliberately wrong
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.size == (48, 32)


def test_one_pixel_image(tmp_path: Path) -> None:
    path = write(tmp_path / "one.png", encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))
    img = load_image(path)
    assert img.size == (1, 1)
    assert img.getpixel((0, 0)) == (10, 20, 30)


def test_image_is_fully_decoded_after_file_is_gone(tmp_path: Path) -> None:
    path = write(tmp_path / "a.png", encode(noise(), "PNG"))
    img = load_image(path)
    path.unlink()
    assert np.asarray(img).shape == (32, 48, 3)


# --------------------------------------------------------------------- error catalogue

PSD_HEADER = b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 8, 8, 8, 3) + b"\x00" * 64
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>'
HEIC_HEADER = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64

# case -> (accepted error types, factory building the input under tmp_path)
BAD_INPUTS: dict[str, tuple[tuple[str, ...], Callable[[Path], Path]]] = {
    "empty": (("empty",), lambda d: write(d / "empty.jpg", b"")),
    "random_bytes": (("undecodable",), lambda d: write(d / "r.jpg", np.random.default_rng(1).bytes(4096))),
    "text_file": (("undecodable",), lambda d: write(d / "notes.png", b"not an image\n" * 20)),
    # The garbage reads as a segment length longer than the file: either answer is honest.
    "jpeg_magic_then_garbage": (
        ("undecodable", "truncated"),
        lambda d: write(d / "g.jpg", b"\xff\xd8\xff\xe0" + b"\x13" * 500),
    ),
    "truncated_jpeg": (("truncated",), lambda d: write(d / "t.jpg", encode(noise(64, 64), "JPEG")[:1500])),
    "truncated_png": (("truncated",), lambda d: write(d / "t.png", encode(noise(64, 64), "PNG")[:3000])),
    "png_1e9_pixels": (("too_large",), lambda d: write(d / "1g.png", png_with_header(31_623, 31_623))),
    "png_150_megapixels": (("too_large",), lambda d: write(d / "150m.png", png_with_header(15_000, 10_000))),
    "png_50_megapixels": (("too_large",), lambda d: write(d / "50m.png", png_with_header(8_000, 6_250))),
    "pdf_renamed_jpg": (
        ("unsupported_format",),
        lambda d: write(d / "doc.jpg", encode(Image.new("RGB", (8, 8)), "PDF")),
    ),
    "psd_renamed_jpg": (("unsupported_format",), lambda d: write(d / "layers.jpg", PSD_HEADER)),
    "svg_renamed_png": (("unsupported_format",), lambda d: write(d / "vector.png", SVG)),
    "heic_renamed_jpg": (("unsupported_format",), lambda d: write(d / "phone.jpg", HEIC_HEADER)),
    "zip_renamed_jpg": (("unsupported_format",), lambda d: _zip(d / "archive.jpg")),
    "directory": (("not_a_file",), lambda d: _mkdir(d / "folder.jpg")),
    "symlink_to_directory": (("not_a_file",), lambda d: _symlink(d / "l.jpg", _mkdir(d / "real"))),
    "fifo": (("not_a_file",), lambda d: _mkfifo(d / "pipe.jpg")),
    "unix_socket": (("not_a_file",), lambda d: _socket(d / "s.jpg")),
    "missing": (("not_found",), lambda d: d / "does_not_exist.jpg"),
    "dangling_symlink": (("not_found",), lambda d: _symlink(d / "dangling.jpg", d / "gone.jpg")),
    # A symlink loop exists as a path but can never be opened: reported as unreadable (ELOOP).
    "symlink_loop": (("unreadable",), lambda d: _symlink(d / "loop.jpg", d / "loop.jpg")),
}


def _zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("inner.txt", "x")
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _symlink(link: Path, target: Path) -> Path:
    os.symlink(target, link)
    return link


def _socket(path: Path) -> Path:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.fspath(path))
    sock.close()  # the socket file stays on disk
    return path


def _mkfifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_input_is_typed_error(tmp_path: Path, case: str) -> None:
    expected, factory = BAD_INPUTS[case]
    path = factory(tmp_path)
    err = load_error(path)
    assert err.type in expected, str(err)
    assert err.path == path
    assert str(path) in str(err)


def test_truncated_jpeg_is_typed_error(tmp_path: Path) -> None:
    path = write(tmp_path / "cut.jpg", encode(noise(128, 128), "JPEG", quality=95)[:-2000])
    assert load_error(path).type == "truncated"


def test_pixel_check_happens_before_decoding(tmp_path: Path) -> None:
    # 50M pixels is below Pillow's own bomb limits, so only our header check can say too_large
    # (decoding the bogus IDAT would give truncated/undecodable instead).
    err = load_error(write(tmp_path / "h.png", png_with_header(8_000, 6_250)))
    assert err.type == "too_large"
    assert "max_pixels" in err.message


def test_max_pixels_parameter(tmp_path: Path) -> None:
    path = write(tmp_path / "a.png", encode(noise(100, 100), "PNG"))
    assert load_error(path, max_pixels=9_999).type == "too_large"
    assert load_image(path, max_pixels=10_000).size == (100, 100)


def test_max_bytes_parameter(tmp_path: Path) -> None:
    data = encode(noise(), "PNG")
    path = write(tmp_path / "a.png", data)
    err = load_error(path, max_bytes=len(data) - 1)
    assert err.type == "too_large"
    assert "max_bytes" in err.message
    assert load_image(path, max_bytes=len(data)).mode == "RGB"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_above_raised_limit_is_too_large(tmp_path: Path) -> None:
    # Caller lifts max_pixels above Pillow's warning threshold: the warning still refuses it.
    path = write(tmp_path / "b.png", png_with_header(15_000, 10_000))
    assert load_error(path, max_pixels=10**12).type == "too_large"


def test_permission_denied_is_unreadable(tmp_path: Path) -> None:
    if not permissions_enforced(tmp_path):
        pytest.skip("file permissions are not enforced for this user (root)")
    path = write(tmp_path / "secret.png", encode(noise(), "PNG"))
    path.chmod(0)
    try:
        assert load_error(path).type == "unreadable"
    finally:
        path.chmod(0o600)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillow_globals_untouched(tmp_path: Path) -> None:
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    load_error(write(tmp_path / "t.jpg", encode(noise(64, 64), "JPEG")[:1500]))
    load_error(write(tmp_path / "b.png", png_with_header(15_000, 10_000)))
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS) == before


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_character_device_is_not_a_file() -> None:
    assert load_error("/dev/null").type == "not_a_file"


def test_io_error_while_reading_is_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "a.png", encode(noise(), "PNG"))

    def failing_read(f: object, limit: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(imageio, "_read_all", failing_read)
    assert load_error(path).type == "unreadable"


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (struct.error("unpack requires a buffer"), "undecodable"),
        (SyntaxError("not a PNG file"), "undecodable"),
        (ValueError("tile cannot extend outside image"), "undecodable"),
        (KeyError("mode"), "undecodable"),
        (IndexError("list index out of range"), "undecodable"),
        (ZeroDivisionError("division by zero"), "undecodable"),
        (OSError("image file is truncated"), "truncated"),
        (EOFError(), "truncated"),
        (MemoryError(), "too_large"),
        (Image.DecompressionBombError("bomb"), "too_large"),
        (Image.DecompressionBombWarning("bomb"), "too_large"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_pillow_exceptions_are_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException, expected: str
) -> None:
    path = write(tmp_path / "a.png", encode(noise(), "PNG"))

    def raising_open(*args: object, **kwargs: object) -> Image.Image:
        raise exc

    monkeypatch.setattr(imageio.Image, "open", raising_open)
    err = load_error(path)
    assert err.type == expected
    assert err.__cause__ is exc


def test_keyboard_interrupt_is_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "a.png", encode(noise(), "PNG"))

    def interrupted(*args: object, **kwargs: object) -> Image.Image:
        raise KeyboardInterrupt

    monkeypatch.setattr(imageio.Image, "open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_image(path)


def test_invalid_draft_size_is_a_caller_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_image(tmp_path / "whatever.jpg", draft_size=0)


def test_concurrent_loads_from_threads(tmp_path: Path) -> None:
    good = write(tmp_path / "good.png", encode(noise(), "PNG"))
    bad = write(tmp_path / "bad.jpg", encode(noise(64, 64), "JPEG")[:1500])
    filters_before = list(warnings.filters)

    def outcome(path: Path) -> str:
        try:
            return load_image(path).mode
        except ImageError as exc:
            return exc.type

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(outcome, [good, bad] * 40))
    assert results == ["RGB", "truncated"] * 40
    assert warnings.filters == filters_before


# ---------------------------------------------------------------------- mode handling


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red
    img = load_image(write(tmp_path / "cmyk.jpg", encode(cmyk, "JPEG", quality=100)))
    assert img.mode == "RGB"
    r, g, b = np.asarray(img)[8, 8].tolist()
    assert r > 240 and g < 15 and b < 15


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    img16 = Image.frombytes("I;16", (256, 256), ramp.astype("<u2").tobytes())
    img = load_image(write(tmp_path / "deep.png", encode(img16, "PNG")))
    arr = np.asarray(img)
    assert img.mode == "RGB"
    assert len(np.unique(arr)) >= 200
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255


def test_16bit_big_endian_tiff_is_scaled(tmp_path: Path) -> None:
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    img16 = Image.frombytes("I;16B", (256, 256), ramp.astype(">u2").tobytes())
    arr = np.asarray(load_image(write(tmp_path / "deep.tif", encode(img16, "TIFF"))))
    assert len(np.unique(arr)) >= 200
    assert arr[-1, -1, 0] == 255


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_float_and_32bit_int_tiff_are_stretched(tmp_path: Path, dtype: type) -> None:
    values = (np.linspace(-5, 5, 256 * 256) * (1 if dtype is np.float32 else 100_000)).astype(dtype)
    arr = np.asarray(
        load_image(write(tmp_path / "v.tif", encode(Image.fromarray(values.reshape(256, 256)), "TIFF")))
    )
    assert arr.min() == 0 and arr.max() == 255
    assert len(np.unique(arr)) >= 200


def test_rgba_png_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, 4:] = (200, 0, 0, 255)  # right half opaque red, left half fully transparent black
    img = load_image(write(tmp_path / "alpha.png", encode(Image.fromarray(rgba), "PNG")))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == BACKGROUND
    assert img.getpixel((7, 7)) == (200, 0, 0)


def test_la_png_composited_on_white(tmp_path: Path) -> None:
    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((3, 3), (50, 255))
    img = load_image(write(tmp_path / "la.png", encode(la, "PNG")))
    assert img.getpixel((0, 0)) == BACKGROUND
    assert img.getpixel((3, 3)) == (50, 50, 50)


def test_palette_png_with_transparency_composited_on_white(tmp_path: Path) -> None:
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    pal.paste(1, (4, 0, 8, 8))
    img = load_image(write(tmp_path / "pal.png", encode(pal, "PNG", transparency=0)))
    assert img.getpixel((0, 0)) == BACKGROUND
    assert img.getpixel((7, 7)) == (0, 128, 0)


def test_greyscale_and_bilevel_become_rgb(tmp_path: Path) -> None:
    grey = load_image(write(tmp_path / "l.png", encode(Image.new("L", (4, 4), 77), "PNG")))
    bilevel = load_image(write(tmp_path / "1.bmp", encode(Image.new("1", (4, 4), 1), "BMP")))
    assert grey.getpixel((1, 1)) == (77, 77, 77)
    assert bilevel.getpixel((1, 1)) == (255, 255, 255)


def test_animated_gif_returns_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    img = load_image(write(tmp_path / "anim.gif", data))
    assert img.mode == "RGB"
    assert img.getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_animated_webp_returns_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    img = load_image(write(tmp_path / "anim.webp", data))
    assert img.getpixel((4, 4)) == (255, 0, 0)


def test_multipage_tiff_returns_first_page(tmp_path: Path) -> None:
    pages = [Image.new("RGB", (8, 8), c) for c in ((0, 255, 0), (255, 0, 0))]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert load_image(write(tmp_path / "pages.tif", data)).getpixel((0, 0)) == (0, 255, 0)


def test_rgb_png_with_colour_key_transparency(tmp_path: Path) -> None:
    img = Image.new("RGB", (4, 4), (10, 20, 30))
    img.putpixel((3, 3), (200, 100, 0))
    out = load_image(write(tmp_path / "key.png", encode(img, "PNG", transparency=(10, 20, 30))))
    assert out.getpixel((0, 0)) == BACKGROUND
    assert out.getpixel((3, 3)) == (200, 100, 0)


def test_lab_tiff_becomes_rgb(tmp_path: Path) -> None:
    img = load_image(write(tmp_path / "lab.tif", encode(Image.new("LAB", (4, 4), (255, 128, 128)), "TIFF")))
    assert img.mode == "RGB"
    assert all(v > 245 for v in img.getpixel((0, 0)))  # L=100, a=b=0 is white


# ------------------------------------------------------------------------------- EXIF


@pytest.mark.parametrize(("orientation", "quarter_turns_ccw"), [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_png(tmp_path: Path, orientation: int, quarter_turns_ccw: int) -> None:
    pixels = asymmetric()
    data = encode(Image.fromarray(pixels), "PNG", exif=exif_bytes(orientation))
    img = load_image(write(tmp_path / "o.png", data))
    np.testing.assert_array_equal(np.asarray(img), np.rot90(pixels, quarter_turns_ccw))
    assert 0x0112 not in img.getexif()  # already applied: must not be rotated twice


@pytest.mark.parametrize(("orientation", "quarter_turns_ccw"), [(6, -1), (8, 1)])
def test_exif_orientation_jpeg(tmp_path: Path, orientation: int, quarter_turns_ccw: int) -> None:
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:16, :32] = (255, 0, 0)  # red block top-left
    data = encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif_bytes(orientation))
    got = np.asarray(load_image(write(tmp_path / "o.jpg", data))).astype(int)
    want = np.rot90(pixels, quarter_turns_ccw).astype(int)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 8


def test_xmp_orientation_in_png(tmp_path: Path) -> None:
    pixels = asymmetric()
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
    img = load_image(write(tmp_path / "xmp.png", encode(Image.fromarray(pixels), "PNG", pnginfo=info)))
    np.testing.assert_array_equal(np.asarray(img), np.rot90(pixels, -1))


def test_tiff_orientation_tag(tmp_path: Path) -> None:
    pixels = asymmetric()
    img = load_image(write(tmp_path / "o.tif", encode(Image.fromarray(pixels), "TIFF", tiffinfo={274: 8})))
    np.testing.assert_array_equal(np.asarray(img), np.rot90(pixels, 1))


@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00" + b"\xde\xad\xbe\xef" * 8,  # not TIFF at all
        b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xf0",  # IFD offset far past the end
        b"Exif\x00\x00II\x2a\x00\x08\x00\x00\x00\x01\x00\x12\x01\x02\x00\x04\x00\x00\x00abc\x00",
    ],
    ids=["garbage", "bad_offset", "orientation_as_text"],
)
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_malformed_exif_does_not_fail_the_image(tmp_path: Path, exif: bytes) -> None:
    pixels = asymmetric()
    data = encode(Image.fromarray(pixels), "PNG", exif=exif)
    img = load_image(write(tmp_path / "bad_exif.png", data))
    np.testing.assert_array_equal(np.asarray(img), pixels)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_malformed_exif_in_jpeg_does_not_fail(tmp_path: Path) -> None:
    data = encode(noise(), "JPEG", exif=b"Exif\x00\x00II\x2a\x00\xff\xff\x00\x00garbage")
    assert load_image(write(tmp_path / "bad_exif.jpg", data)).size == (48, 32)


# ------------------------------------------------------------------ paths and draft


def test_non_utf8_file_name_loads(tmp_path: Path) -> None:
    name = os.fsdecode(b"\xff\xfe.jpg")
    path = write(tmp_path / name, encode(noise(), "JPEG"))
    assert load_image(path).size == (48, 32)
    assert load_image(str(path)).size == (48, 32)
    assert [p.name for p in iter_image_files(tmp_path)] == [name]


def test_symlink_to_file_is_followed(tmp_path: Path) -> None:
    target = write(tmp_path / "real.png", encode(noise(), "PNG"))
    link = _symlink(tmp_path / "link.png", target)
    assert load_image(link).size == (48, 32)


def test_draft_size_decodes_big_jpeg_smaller(tmp_path: Path) -> None:
    gradient = np.linspace(0, 255, 2000, dtype=np.uint8)[None, :, None].repeat(1600, 0).repeat(3, 2)
    path = write(tmp_path / "big.jpg", encode(Image.fromarray(gradient), "JPEG"))
    assert load_image(path).size == (2000, 1600)
    small = load_image(path, draft_size=300)
    assert small.mode == "RGB"
    assert min(small.size) >= 300
    assert small.size[0] < 2000 and small.size[1] < 1600
    # max_pixels applies to what is actually decoded, so the draft lets this one through.
    assert load_error(path, max_pixels=1_000_000).type == "too_large"
    assert load_image(path, max_pixels=1_000_000, draft_size=300).size == small.size


def test_draft_size_on_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (1024, 768), (0, 255, 255, 0))
    img = load_image(write(tmp_path / "cmyk.jpg", encode(cmyk, "JPEG")), draft_size=200)
    assert img.mode == "RGB"
    assert img.size == (512, 384)  # 768 // 200 = 3, so the largest usable scale is 1/2
    assert img.getpixel((5, 5))[0] > 240


def test_camera_mpo_jpeg_loads_first_image(tmp_path: Path) -> None:
    first, second = Image.new("RGB", (640, 480), (255, 0, 0)), Image.new("RGB", (640, 480), (0, 0, 255))
    path = write(tmp_path / "stereo.jpg", encode(first, "MPO", save_all=True, append_images=[second]))
    img = load_image(path)
    assert img.size == (640, 480) and img.getpixel((5, 5))[0] > 240
    assert load_image(path, draft_size=200).size == (320, 240)


def test_draft_size_ignored_for_non_jpeg(tmp_path: Path) -> None:
    path = write(tmp_path / "a.png", encode(noise(400, 300), "PNG"))
    assert load_image(path, draft_size=50).size == (400, 300)


# ----------------------------------------------------------------- iter_image_files


def test_iter_image_files_walks_sorted_and_filters(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "b" / "sub").mkdir(parents=True)
    (root / "a_dir").mkdir()
    for rel in ["z.TIFF", "a.jpg", "b/x.PNG", "b/sub/y.jpeg", "a_dir/q.webp", "c.txt", "b/readme.md"]:
        (root / rel).write_bytes(b"x")
    os.symlink(root, root / "loop")  # directory symlink loop: must not be followed
    os.symlink(root / "loop2.jpg", root / "loop2.jpg")  # file symlink loop: skipped
    found = [p.relative_to(root).as_posix() for p in iter_image_files(root)]
    assert found == ["a.jpg", "a_dir/q.webp", "b/sub/y.jpeg", "b/x.PNG", "z.TIFF"]


def test_iter_image_files_is_a_generator(tmp_path: Path) -> None:
    assert inspect.isgenerator(iter_image_files(tmp_path))


def test_iter_image_files_single_file(tmp_path: Path) -> None:
    path = write(tmp_path / "scan.dat", b"x")
    assert list(iter_image_files(path)) == [path]


def test_iter_image_files_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        list(iter_image_files(tmp_path / "nope"))
    assert info.value.type == "not_found"


def test_iter_image_files_skips_unreadable_dir(tmp_path: Path) -> None:
    if not permissions_enforced(tmp_path):
        pytest.skip("directory permissions are not enforced for this user (root)")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "a.jpg").write_bytes(b"x")
    (tmp_path / "ok.jpg").write_bytes(b"x")
    (tmp_path / "locked").chmod(0)
    try:
        assert [p.name for p in iter_image_files(tmp_path)] == ["ok.jpg"]
    finally:
        (tmp_path / "locked").chmod(0o700)
