"""hierarchy.data.batches (the one decode-and-batch iterator) and reading each image file once."""
from __future__ import annotations

import builtins
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import solid
from PIL import Image

from hierarchy.core.errors import ImageError
from hierarchy.data import decode
from hierarchy.data.batches import Decoded, decode_batches, decode_item
from hierarchy.data.imageio import decode_image_bytes, load_image, read_image_bytes
from hierarchy.data.labelled import Sample
from hierarchy.data.preset import Preset

SIZE = 16


def _noise_image(path: Path, size: tuple[int, int], fmt: str) -> Path:
    arr = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, fmt)
    return path


# ---------------------------------------------------------------- each file read once


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often each path is opened, through os.open or builtins.open (what PIL uses for a path)."""
    counts: dict[str, int] = {}
    real_os_open, real_open = os.open, builtins.open

    def count(path: object) -> None:
        if isinstance(path, (str, os.PathLike)):
            key = os.fspath(path)
            counts[key] = counts.get(key, 0) + 1

    def os_open(path, *args, **kwargs):
        count(path)
        return real_os_open(path, *args, **kwargs)

    def open_(file, *args, **kwargs):
        count(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    return counts


@pytest.mark.parametrize("fmt, size, fast_jpeg", [
    ("PNG", (40, 30), False),  # PIL path
    ("JPEG", (8 * SIZE, 6 * SIZE), False),  # >= 4x the size: the JPEG draft path
    ("JPEG", (8 * SIZE, 6 * SIZE), True),  # draft=False with torchvision's decoder
])
def test_decode_reads_each_file_once(tmp_path: Path, opens: dict[str, int], monkeypatch: pytest.MonkeyPatch,
                                     fmt: str, size: tuple[int, int], fast_jpeg: bool) -> None:
    path = _noise_image(tmp_path / f"img.{fmt.lower()}", size, fmt)
    if fast_jpeg:
        assert decode.enable_torchvision_decoder()
    else:
        monkeypatch.setattr(decode, "_torch_jpeg_decoder", lambda: None)
    opens.clear()
    out = decode.decode_arrays(path, [SIZE, 2 * SIZE], draft=not fast_jpeg)
    assert opens == {str(path): 1}
    assert out[SIZE].shape == (3, SIZE, SIZE) and out[2 * SIZE].shape == (3, 2 * SIZE, 2 * SIZE)
    if fmt == "PNG":  # the bytes decode to exactly what load_image gives
        np.testing.assert_array_equal(out[SIZE], Preset(size=SIZE).to_array(load_image(path)))


def test_decode_image_bytes_keeps_load_images_typed_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"%PDF-1.4 not an image")
    with pytest.raises(ImageError) as exc:
        decode_image_bytes(bad, read_image_bytes(bad))
    assert exc.value.type == "unsupported_format" and exc.value.path == bad
    with pytest.raises(ImageError, match="empty"):
        read_image_bytes(_touch(tmp_path / "empty.png"))
    with pytest.raises(ImageError, match="too_large"):
        read_image_bytes(solid(tmp_path / "big.png", (1, 2, 3)), max_bytes=10)
    ok = solid(tmp_path / "ok.png", (1, 2, 3))
    with pytest.raises(ImageError, match="too_large"):
        decode_image_bytes(ok, read_image_bytes(ok), max_pixels=10)


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


# ---------------------------------------------------------------- decode_batches


def test_batches_keep_input_order_and_chunking_under_random_delays() -> None:
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.01) for _ in range(23)]

    def slow(key: str) -> Decoded:
        time.sleep(delays[int(key)])
        return Decoded(Path(key))

    chunks = list(decode_batches((str(i) for i in range(23)), slow, 5, workers=4))
    assert [len(c) for c in chunks] == [5, 5, 5, 5, 3]
    assert [d.path for c in chunks for d in c] == [Path(str(i)) for i in range(23)]


def test_batches_take_inputs_lazily_two_chunks_at_most() -> None:
    pulled = []

    def keys():
        for i in range(100):
            pulled.append(i)
            yield str(i)

    batches = decode_batches(keys(), lambda k: Decoded(Path(k)), 4, workers=2)
    next(batches)
    assert len(pulled) == 8  # the chunk yielded and the one decoding, nothing more
    next(batches)
    assert len(pulled) == 12
    batches.close()


def test_a_failing_item_is_a_typed_error_and_the_chunk_survives(tmp_path: Path) -> None:
    def flaky(key: str) -> Decoded:
        if key == "b":
            raise KeyError("a bug in some decoder")
        if key == "c":
            raise ImageError("truncated", key, "ends early")
        return Decoded(Path(key))

    [chunk] = list(decode_batches(["a", "b", "c", "d"], flaky, 4, workers=2))
    assert [d.path for d in chunk] == [Path(p) for p in "abcd"]
    assert chunk[0].error is None and chunk[3].error is None
    assert isinstance(chunk[1].error, ImageError) and chunk[1].error.type == "undecodable"
    assert "KeyError" in chunk[1].error.message and chunk[1].error.path == Path("b")
    assert chunk[2].error.type == "truncated"


def test_closing_early_stops_decoding() -> None:
    started = threading.Event()
    calls = []

    def slow(key: str) -> Decoded:
        calls.append(key)
        started.set()
        time.sleep(0.01)
        return Decoded(Path(key))

    batches = decode_batches((str(i) for i in range(10_000)), slow, 8, workers=2)
    next(batches)
    batches.close()
    assert started.is_set() and len(calls) <= 16


def test_chunk_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        next(decode_batches(["a"], lambda k: Decoded(Path(k)), 0))


def test_decode_item_gives_every_presets_array_or_the_error(tmp_path: Path) -> None:
    path = solid(tmp_path / "r.png", (250, 10, 10), size=20)
    small, large = Preset(size=8), Preset(size=12, mean=(0.5, 0.5, 0.5))
    item = decode_item(path, [small, large])
    assert item.error is None and item.array(small).shape == (3, 8, 8) and item.array(large).shape == (3, 12, 12)
    assert item.tensor(small).dtype == torch.uint8 and int(item.tensor(small)[0, 0, 0]) == 250
    missing = decode_item(tmp_path / "nope.png", [small])
    assert missing.error is not None and missing.error.type == "not_found" and not missing.arrays


# ---------------------------------------------------------------- the threaded training loader


def test_threaded_loader_gives_the_single_process_loaders_batches(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, RandomSampler

    from hierarchy.train.loader import ImageDataset, ThreadedLoader, collate

    samples = [Sample(solid(tmp_path / f"{i}.png", (20 * i, 5, 200 - 20 * i), size=12), "ab"[i % 2], "train")
               for i in range(9)]
    samples[4].path.write_bytes(b"broken")
    ds = ImageDataset(samples, ["a", "b"], Preset(size=SIZE), train=True, hflip=True)

    def batches(make):
        torch.manual_seed(3)
        return [(x.clone(), y.clone()) for x, y in make(RandomSampler(ds, generator=torch.Generator().manual_seed(7)))]

    threaded = batches(lambda s: ThreadedLoader(ds, 4, s, threads=2))
    plain = batches(lambda s: DataLoader(ds, batch_size=4, sampler=s, collate_fn=collate))
    assert sum(len(y) for _, y in threaded) == 8  # the broken image is dropped
    assert len(threaded) == len(plain) == 3
    for (xt, yt), (xp, yp) in zip(threaded, plain):
        assert torch.equal(xt, xp) and torch.equal(yt, yp)
