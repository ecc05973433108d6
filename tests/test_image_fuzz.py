"""Mutation fuzzing of hierarchy.data.imageio.load_image.

Contract under test: every call returns an RGB image or raises ImageError, nothing else.
The default suite runs ~60 mutants in-process; ``-m slow`` runs 600 mutants, each in a
subprocess worker with a per-file timeout, so a hang or a crash of the decoder also fails.
"""
from __future__ import annotations

import collections
import io
import json
import os
import queue
import random
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image, features

from hierarchy.core.errors import ImageError
from hierarchy.data.imageio import load_image

ERROR_TYPES = frozenset(
    {"not_found", "not_a_file", "unreadable", "empty", "too_large", "unsupported_format", "undecodable",
     "truncated"}
)
FILE_TIMEOUT_S = 10.0
SLOW_COUNT = 2000
FAST_COUNT = 60
DRAFT_EVERY = 3  # every third mutant is loaded with draft_size to fuzz the JPEG draft path


# ------------------------------------------------------------------------------ seeds


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _seed_images() -> dict[str, bytes]:
    rng = np.random.default_rng(1234)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    rgb[:, :16] = np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None]
    img = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6
    rgba = Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (24, 32), dtype=np.uint8)]))
    deep = Image.frombytes("I;16", (32, 24), rng.integers(0, 65536, (24, 32), dtype=np.uint16).tobytes())
    frames = [img, img.transpose(Image.Transpose.ROTATE_180)]
    seeds = {
        "jpeg.jpg": _encode(img, "JPEG", quality=90, exif=exif.tobytes()),
        "progressive.jpg": _encode(img, "JPEG", progressive=True),
        "cmyk.jpg": _encode(img.convert("CMYK"), "JPEG"),
        "rgb.png": _encode(img, "PNG", exif=exif.tobytes()),
        "rgba.png": _encode(rgba, "PNG"),
        "palette.png": _encode(img.convert("P"), "PNG", transparency=0),
        "deep.png": _encode(deep, "PNG"),
        "anim.gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "rle.bmp": _encode(img.convert("P"), "BMP"),
        "lzw.tif": _encode(img, "TIFF", compression="tiff_lzw"),
        "raw.tif": _encode(rgba, "TIFF"),
    }
    if features.check("webp"):
        seeds["lossy.webp"] = _encode(img, "WEBP")
        seeds["anim.webp"] = _encode(
            frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True
        )
    return seeds


# -------------------------------------------------------------------------- mutations


def _bit_flips(rng: random.Random, data: bytearray) -> None:
    for _ in range(rng.randint(1, 16)):
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)


def _truncate(rng: random.Random, data: bytearray) -> None:
    del data[rng.randint(1, max(1, len(data) - 1)) :]


def _duplicate_chunk(rng: random.Random, data: bytearray) -> None:
    start = rng.randrange(len(data))
    chunk = data[start : start + rng.randint(1, 256)]
    insert_at = rng.randrange(len(data))
    data[insert_at:insert_at] = chunk * rng.randint(1, 4)


def _header_garbage(rng: random.Random, data: bytearray) -> None:
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(min(64, len(data)))] = rng.randrange(256)


def _size_fields(rng: random.Random, data: bytearray) -> None:
    """Stamp 0xFF or 0x00 runs: the typical way to fake huge lengths, sizes and offsets."""
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(len(data))
        run = rng.randint(1, 4)
        data[pos : pos + run] = bytes([rng.choice((0x00, 0xFF))]) * run


def _delete_chunk(rng: random.Random, data: bytearray) -> None:
    start = rng.randrange(len(data))
    del data[start : start + rng.randint(1, 128)]
    if not data:
        data.append(0)


MUTATIONS: dict[str, Callable[[random.Random, bytearray], None]] = {
    "bitflip": _bit_flips,
    "truncate": _truncate,
    "dupchunk": _duplicate_chunk,
    "headergarbage": _header_garbage,
    "sizefields": _size_fields,
    "delchunk": _delete_chunk,
}


def make_mutants(directory: Path, count: int, seed: int = 1234) -> list[Path]:
    rng = random.Random(seed)
    seeds = _seed_images()
    names = sorted(seeds)
    paths = []
    for i in range(count):
        seed_name = names[i % len(names)]
        data = bytearray(seeds[seed_name])
        applied = rng.sample(sorted(MUTATIONS), rng.randint(1, 2))
        for name in applied:
            MUTATIONS[name](rng, data)
        path = directory / f"{i:04d}_{'+'.join(applied)}_{seed_name}"
        path.write_bytes(bytes(data))
        paths.append(path)
    return paths


def _draft_for(index: int) -> int | None:
    return 8 if index % DRAFT_EVERY == 0 else None


# ----------------------------------------------------------------------- fast suite


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's chatter about corrupt metadata
def test_mutated_images_give_rgb_or_image_error(tmp_path: Path) -> None:
    outcomes: collections.Counter[str] = collections.Counter()
    for i, path in enumerate(make_mutants(tmp_path, FAST_COUNT)):
        try:
            img = load_image(path, draft_size=_draft_for(i))
        except ImageError as exc:
            assert exc.type in ERROR_TYPES, f"{path.name}: unknown type {exc.type}"
            outcomes[exc.type] += 1
            continue
        assert img.mode == "RGB", path.name
        assert np.asarray(img).shape == (img.height, img.width, 3), path.name
        outcomes["ok"] += 1
    assert sum(outcomes.values()) == FAST_COUNT


def test_mutants_are_deterministic(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = [p.read_bytes() for p in make_mutants(tmp_path / "a", 12)]
    second = [p.read_bytes() for p in make_mutants(tmp_path / "b", 12)]
    assert first == second


# ----------------------------------------------------------------------- slow suite

WORKER_CODE = r"""
import json, os, sys, time
from hierarchy.core.errors import ImageError
from hierarchy.data.imageio import load_image
sys.stdout.write("ready\n"); sys.stdout.flush()
for line in sys.stdin:
    hex_path, draft = line.split()
    path = os.fsdecode(bytes.fromhex(hex_path))
    start = time.perf_counter()
    try:
        img = load_image(path, draft_size=int(draft) or None)
        outcome = "ok" if img.mode == "RGB" else "BAD_MODE " + img.mode
    except ImageError as exc:
        outcome = exc.type
    except BaseException as exc:
        outcome = "UNEXPECTED " + type(exc).__name__ + ": " + str(exc)[:200]
    result = {"outcome": outcome, "seconds": time.perf_counter() - start}
    sys.stdout.write(json.dumps(result) + "\n"); sys.stdout.flush()
"""


class Worker:
    """A decoder subprocess we can kill on a hang and replace after a crash."""

    def __init__(self) -> None:
        self.proc = self._spawn()

    @staticmethod
    def _spawn() -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # libtiff/Pillow chatter; crashes show up as CRASH rc=...
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        return proc

    def load(self, path: Path, draft: int | None) -> tuple[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{os.fsencode(path).hex()} {draft or 0}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], FILE_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else None
        if line:
            result = json.loads(line)
            return result["outcome"], result["seconds"]
        if line is None:
            outcome, seconds = "HANG", FILE_TIMEOUT_S
        else:  # EOF: the worker died mid-file (segfault, abort, OOM kill)
            outcome, seconds = f"CRASH rc={self.proc.wait()}", 0.0
        self.close()
        self.proc = self._spawn()
        return outcome, seconds

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _run_pool(paths: list[Path], workers: int) -> dict[Path, tuple[str, float]]:
    jobs: queue.Queue[tuple[int, Path]] = queue.Queue()
    for item in enumerate(paths):
        jobs.put(item)
    results: dict[Path, tuple[str, float]] = {}

    def drain() -> None:
        worker = Worker()
        try:
            while True:
                try:
                    index, path = jobs.get_nowait()
                except queue.Empty:
                    return
                results[path] = worker.load(path, _draft_for(index))
        finally:
            worker.close()

    threads = [threading.Thread(target=drain) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.slow
def test_fuzz_many_mutants_in_subprocesses(tmp_path: Path) -> None:
    paths = make_mutants(tmp_path, SLOW_COUNT)
    results = _run_pool(paths, workers=max(1, min(4, os.cpu_count() or 1)))
    by_type = collections.Counter(outcome for outcome, _ in results.values())
    slowest_path, (_, slowest) = max(results.items(), key=lambda kv: kv[1][1])
    print(f"\nfuzz: {len(results)} files, outcomes {dict(sorted(by_type.items()))}, "
          f"max {slowest:.3f}s ({slowest_path.name})")
    bad = {
        p.name: outcome
        for p, (outcome, seconds) in results.items()
        if (outcome != "ok" and outcome not in ERROR_TYPES) or seconds >= FILE_TIMEOUT_S
    }
    assert len(results) == SLOW_COUNT
    assert not bad, bad
