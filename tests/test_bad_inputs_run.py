"""The bad-input catalogue through the router and the CLI (`hierarchy run`), not just the loader.

Contract: every input gets exactly one record, in input order; a bad input gets a typed error record,
the good inputs of the same batch still get predictions, and nothing prints a traceback.
The loader-level catalogue lives in test_imageio.py; here every case goes through `main(["run", ...])`.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import struct
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from fakes import FakePredictor
from PIL import Image

from hierarchy.commands.cli import main
from hierarchy.engine.pipeline import parse_pipeline
from hierarchy.engine.router import Router
from hierarchy.config.stage import Stage
from hierarchy.registry import hookimpl, register_plugin

ERROR_TYPES = {"not_found", "not_a_file", "unreadable", "empty", "too_large", "unsupported_format",
               "undecodable", "truncated"}
QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")

PIPE = """\
name: bad-inputs
root: quad
stages:
  quad:
    stage: fake_quadrant
    routes: {default: color}
  color:
    stage: fake_color
    routes: {red: bright, other: stop}
  bright:
    stage: fake_bright
    routes: {default: stop}
"""


# ------------------------------------------------------------------ an orientation-sensitive stage


def _quadrant_probs(batch: np.ndarray) -> np.ndarray:
    """(N, 3, S, S) uint8 -> softmax over the mean brightness of the four quadrants."""
    grey = batch.astype(np.float64).mean(axis=1)
    h, w = grey.shape[1] // 2, grey.shape[2] // 2
    means = np.stack([grey[:, :h, :w].mean((1, 2)), grey[:, :h, w:].mean((1, 2)),
                      grey[:, h:, :w].mean((1, 2)), grey[:, h:, w:].mean((1, 2))], axis=1) / 255.0
    e = np.exp(8.0 * means)
    return e / e.sum(axis=1, keepdims=True)


class QuadrantPredictor(FakePredictor):
    def predict(self, batch):  # type: ignore[no-untyped-def]
        from hierarchy.config.stage import Prediction

        return Prediction(probs=_quadrant_probs(batch.numpy()))


class QuadrantStage(Stage):
    """Which quadrant is brightest: a rotation of the image changes the answer."""

    name = "fake_quadrant"
    labels = QUADRANTS

    def load_predictor(self, weights: Path | None, **options: str) -> QuadrantPredictor:
        return QuadrantPredictor(self.name, self.labels, lambda m: m, size=16)


class QuadrantPlugin:
    @hookimpl
    def register_stages(self, register) -> None:  # type: ignore[no-untyped-def]
        register(QuadrantStage)


@pytest.fixture
def pipe(fake_stages, tmp_path: Path) -> Path:
    register_plugin(QuadrantPlugin(), name="quadrant")
    path = tmp_path / "pipe.yaml"
    path.write_text(PIPE)
    return path


# ------------------------------------------------------------------------------- input makers


def upright(size: int = 32) -> np.ndarray:
    """Mid-grey with a bright top-left quadrant and a red tint, so both cascade levels have work."""
    arr = np.full((size, size, 3), 60, dtype=np.uint8)
    arr[..., 0] = 200
    arr[: size // 2, : size // 2] = 250
    return arr


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def put(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def exif(orientation: int) -> bytes:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags.tobytes()


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _rgba(d: Path) -> Path:
    arr = np.dstack([upright(), np.full((32, 32), 128, np.uint8)])
    return put(d / "rgba.png", encode(Image.fromarray(arr, "RGBA"), "PNG"))


def _palette_transparent(d: Path) -> Path:
    return put(d / "palette.png", encode(Image.fromarray(upright()).convert("P"), "PNG", transparency=0))


def _animated_gif(d: Path) -> Path:
    frames = [Image.fromarray(upright()), Image.fromarray(upright()[::-1].copy())]
    return put(d / "anim.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:]))


def _sixteen_bit(d: Path) -> Path:
    arr = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    return put(d / "deep.png", encode(Image.frombytes("I;16", (32, 32), arr.tobytes()), "PNG"))


def _loop(d: Path) -> Path:
    os.symlink("loop.jpg", d / "loop.jpg")
    return d / "loop.jpg"


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "pipe.jpg")
    return d / "pipe.jpg"


def _non_utf8(d: Path) -> Path:
    return put(d / os.fsdecode(b"caf\xe9-\xff.png"), encode(Image.fromarray(upright()), "PNG"))


JPEG = lambda: encode(Image.fromarray(upright(64)), "JPEG", quality=90)  # noqa: E731
PDF = lambda: encode(Image.new("RGB", (8, 8)), "PDF")  # noqa: E731
PSD = b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 8, 8, 8, 3) + b"\x00" * 64
MALFORMED_EXIF = b"Exif\x00\x00II\x2a\x00\xff\xff\x00\x00garbage"

# case -> (expected error type, or None for "must get a prediction"; factory under a directory)
CATALOGUE: dict[str, tuple[str | None, Callable[[Path], Path]]] = {
    "zero_bytes": ("empty", lambda d: put(d / "zero.jpg", b"")),
    "random_bytes_jpg": ("undecodable", lambda d: put(d / "random.jpg", random.Random(3).randbytes(4096))),
    "truncated_jpeg": ("truncated", lambda d: put(d / "cut.jpg", JPEG()[:700])),
    "png_claiming_1e9_pixels": ("too_large", lambda d: put(d / "huge.png", png_claiming(31_623, 31_623))),
    "pdf_renamed_jpg": ("unsupported_format", lambda d: put(d / "doc.jpg", PDF())),
    "psd_renamed_jpg": ("unsupported_format", lambda d: put(d / "layers.jpg", PSD)),
    "missing_path": ("not_found", lambda d: d / "missing.jpg"),
    "symlink_loop": ("unreadable", _loop),
    "fifo": ("not_a_file", _fifo),
    "cmyk_jpeg": (None, lambda d: put(d / "cmyk.jpg", encode(Image.fromarray(upright()).convert("CMYK"), "JPEG"))),
    "sixteen_bit_png": (None, _sixteen_bit),
    "rgba_png": (None, _rgba),
    "palette_transparency_png": (None, _palette_transparent),
    "animated_gif": (None, _animated_gif),
    "exif_orientation_6": (None, lambda d: put(d / "o6.jpg", encode(Image.fromarray(upright()), "JPEG", exif=exif(6)))),
    "exif_orientation_8": (None, lambda d: put(d / "o8.jpg", encode(Image.fromarray(upright()), "JPEG", exif=exif(8)))),
    "malformed_exif": (None, lambda d: put(d / "badexif.jpg",
                                           encode(Image.fromarray(upright()), "JPEG", exif=MALFORMED_EXIF))),
    "non_utf8_name": (None, _non_utf8),
    "one_pixel": (None, lambda d: put(d / "dot.png", encode(Image.new("RGB", (1, 1), (250, 20, 20)), "PNG"))),
}


def good(d: Path, i: int) -> Path:
    return put(d / f"good_{i:02d}.png", encode(Image.fromarray(upright()), "PNG"))


# ----------------------------------------------------------------------------------- helpers


def run_cli(pipe: Path, inputs: list[Path], capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, list[dict], str]:
    code = main(["run", str(pipe), *map(str, inputs), "--format", "jsonl", "--workers", "2", *extra])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def check_record(rec: dict, expected: str | None) -> None:
    if expected is None:
        assert rec["status"] == "ok" and rec["error"] is None, rec
        assert rec["label"] is not None and [t["stage"] for t in rec["trace"]][:1] == ["quad"], rec
    else:
        assert rec["status"] == "error" and rec["error"]["type"] == expected, rec
        assert rec["error"]["message"] and rec["label"] is None and rec["trace"] == [], rec


# ------------------------------------------------------------------------------------- tests


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's note about the corrupt EXIF
@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_bad_input_between_good_ones_gets_its_record(pipe: Path, tmp_path: Path, capsys, case: str) -> None:
    expected, factory = CATALOGUE[case]
    inputs = [good(tmp_path, 0), factory(tmp_path), good(tmp_path, 1)]
    code, recs, err = run_cli(pipe, inputs, capsys)
    assert [r["path"] for r in recs] == [str(p) for p in inputs]
    check_record(recs[0], None)
    check_record(recs[1], expected)
    check_record(recs[2], None)
    assert code == (0 if expected is None else 3)
    assert "Traceback" not in err


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_whole_catalogue_in_one_batch(pipe: Path, tmp_path: Path, capsys) -> None:
    inputs, expected = [], []
    for i, case in enumerate(sorted(CATALOGUE)):
        inputs += [good(tmp_path, i), CATALOGUE[case][1](tmp_path)]
        expected += [None, CATALOGUE[case][0]]
    code, recs, err = run_cli(pipe, inputs, capsys, "--batch-size", "4")
    assert code == 3 and "Traceback" not in err
    assert [r["path"] for r in recs] == [str(p) for p in inputs]
    for rec, want in zip(recs, expected):
        check_record(rec, want)
    n_errors = sum(want is not None for want in expected)
    assert f"{len(inputs)} item(s)" in err and f"{n_errors} error" in err


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_predicts_like_a_physically_rotated_copy(pipe: Path, tmp_path: Path, capsys,
                                                                  orientation: int) -> None:
    # Store the pixels turned the other way, tagged so that a viewer turns them back upright.
    stored = np.rot90(upright(), 1 if orientation == 6 else -1).copy()
    tagged = put(tmp_path / "tagged.jpg", encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif(orientation)))
    rotated = put(tmp_path / "rotated.jpg", encode(Image.fromarray(upright()), "JPEG", quality=95))
    untagged = put(tmp_path / "untagged.jpg", encode(Image.fromarray(stored), "JPEG", quality=95))
    _, recs, _ = run_cli(pipe, [tagged, rotated, untagged], capsys)
    quad = [r["trace"][0] for r in recs]
    assert quad[0]["label"] == quad[1]["label"] == "top_left"
    assert quad[2]["label"] != "top_left"  # the test can tell orientations apart
    for label in QUADRANTS:
        assert quad[0]["probs"][label] == pytest.approx(quad[1]["probs"][label], abs=0.02)


def test_directory_given_as_a_file_input_to_the_router(pipe: Path, tmp_path: Path) -> None:
    # The CLI walks directories; a library caller handing the router a directory gets a typed record.
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    link = tmp_path / "link.jpg"
    os.symlink(folder, link)
    router = Router.from_pipeline(parse_pipeline(PIPE))
    recs = list(router.run([good(tmp_path, 0), folder, link, good(tmp_path, 1)], batch_size=2, workers=2))
    assert [r["status"] for r in recs] == ["ok", "error", "error", "ok"]
    assert {r["error"]["type"] for r in recs[1:3]} == {"not_a_file"}


def test_directory_input_is_walked_and_skips_what_is_not_a_file(pipe: Path, tmp_path: Path, capsys) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    good(tree, 0)
    good(tree / "sub", 1)
    (tree / "dir.jpg").mkdir()  # a directory with an image name is walked, not decoded
    os.symlink("loop.png", tree / "loop.png")  # a symlink loop is not a file: skipped by the walk
    os.symlink(tree, tree / "sub" / "up")  # a directory symlink cycle is not followed
    code, recs, err = run_cli(pipe, [tree], capsys)
    assert code == 0 and "Traceback" not in err
    assert [Path(r["path"]).relative_to(tree).as_posix() for r in recs] == ["good_00.png", "sub/good_01.png"]


def test_non_utf8_file_name_in_jsonl_csv_and_table(pipe: Path, tmp_path: Path, capsys) -> None:
    weird = _non_utf8(tmp_path)
    raw = os.fsencode(weird)
    code, recs, _ = run_cli(pipe, [weird], capsys)
    assert code == 0 and os.fsencode(recs[0]["path"]) == raw  # JSON escapes the surrogates: lossless
    out = tmp_path / "out.csv"
    assert main(["run", str(pipe), str(weird), "--format", "csv", "-o", str(out)]) == 0
    assert raw in out.read_bytes()
    rows = list(csv.DictReader(io.StringIO(out.read_bytes().decode("utf-8", "surrogateescape"))))
    assert os.fsencode(rows[0]["path"]) == raw and rows[0]["status"] == "ok"
    for fmt in ("csv", "table", "json"):  # stdout is bytes underneath: the raw name must pass through
        stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        with contextlib.redirect_stdout(stdout):  # not monkeypatch: it would outlive capsys' teardown
            assert main(["run", str(pipe), str(weird), "--format", fmt]) == 0
        stdout.flush()
        assert (b"caf\xe9-\xff.png" if fmt != "json" else b"caf\\udce9-\\udcff.png") in stdout.buffer.getvalue(), fmt


def test_thousand_images_one_percent_corrupt(pipe: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    png = encode(Image.fromarray(upright(8)), "PNG")
    corrupt = set(random.Random(7).sample(range(1000), 10))
    kinds = [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, png[: len(png) // 2], b"%PDF-1.4 not an image"]
    for i in range(1000):
        put(folder / f"img_{i:04d}.png", kinds[i % len(kinds)] if i in corrupt else png)
    start = time.perf_counter()
    code, recs, err = run_cli(pipe, [folder], capsys, "--batch-size", "64")
    seconds = time.perf_counter() - start
    assert code == 3 and "Traceback" not in err
    assert [r["path"] for r in recs] == [str(folder / f"img_{i:04d}.png") for i in range(1000)]
    errors = [i for i, r in enumerate(recs) if r["status"] == "error"]
    assert set(errors) == corrupt and all(recs[i]["error"]["type"] in ERROR_TYPES for i in errors)
    assert all(r["status"] == "ok" for i, r in enumerate(recs) if i not in corrupt)
    with capsys.disabled():
        print(f"\n1000 images (10 corrupt) through `hierarchy run --format jsonl`: {seconds:.2f}s")


# ------------------------------------------------------------------------------------ fuzz


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:  # bit flips anywhere
        for _ in range(rng.randint(1, 12)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation
        del buf[rng.randint(2, len(buf) - 1):]
    elif kind == 2:  # stomp a marker/length field in the header segments
        pos = rng.randrange(2, min(600, len(buf) - 4))
        buf[pos:pos + 2] = rng.choice([b"\xff\xff", b"\x00\x00", b"\xff\xd9", b"\xff\xc0"])
    else:  # duplicate or delete a chunk
        start = rng.randrange(len(buf))
        if rng.random() < 0.5:
            buf[start:start] = buf[start:start + rng.randint(1, 200)] * rng.randint(1, 3)
        else:
            del buf[start:start + rng.randint(1, 200)]
    return bytes(buf)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mutated_jpegs_in_one_run_get_one_record_each(pipe: Path, tmp_path: Path, capsys) -> None:
    rng = random.Random(2024)
    seeds = [JPEG(), encode(Image.fromarray(upright(48)), "JPEG", progressive=True, exif=exif(6)),
             encode(Image.fromarray(upright(40)).convert("CMYK"), "JPEG")]
    inputs = [put(tmp_path / f"m{i:03d}.jpg", _mutate(seeds[i % len(seeds)], rng)) for i in range(90)]
    code, recs, err = run_cli(pipe, inputs, capsys, "--batch-size", "16")
    assert "Traceback" not in err and code in (0, 3)
    assert [r["path"] for r in recs] == [str(p) for p in inputs]
    for rec in recs:
        assert rec["status"] == "ok" or (rec["status"] == "error" and rec["error"]["type"] in ERROR_TYPES), rec
    statuses = {r["status"] for r in recs}
    assert statuses == {"ok", "error"}  # the mutants exercise both paths
