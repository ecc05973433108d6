"""The inference and training fast paths: same answers as the reference path, order, fallbacks,
cache invalidation, allocator setup. Correctness only; speed lives in benchmarks/."""
from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import solid
from PIL import Image

from hierarchy.data import decode
from hierarchy.models import optimize
from hierarchy.core import perf
from hierarchy.models import device as predict
from hierarchy.models import resnet
from hierarchy.data.labelled import Sample
from hierarchy.models.backbones import create_model
from hierarchy.engine.predictor import Predictor
from hierarchy.models.device import select_precision
from hierarchy.data.preset import Preset
from hierarchy.data.synth import _lesion_shape, _rng, _scene, skin_image
from hierarchy.train.trainer import train_stage

SIZE = 32
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.*")


def photo(path: Path, size: tuple[int, int], seed: int, fmt: str = "JPEG") -> Path:
    """A generated skin or scene picture with some sensor noise (high frequencies) saved as ``fmt``."""
    rng = _rng(seed)
    w, h = size
    arr = skin_image(rng, _lesion_shape(rng, "mel"), (w, h)) if seed % 2 else _scene(rng, w, h)
    arr = np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


@pytest.fixture(params=["torchvision", "pil"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both JPEG decode paths: torchvision's decoder, and PIL (as a short `hierarchy run` uses)."""
    if request.param == "torchvision":
        assert decode.enable_torchvision_decoder()
    else:
        monkeypatch.setattr(decode, "_torch_jpeg_decoder", lambda: None)
    return request.param


def test_decode_is_within_1_255_of_the_reference_preset(tmp_path: Path, decoder: str) -> None:
    files = [photo(tmp_path / f"a{i}.jpg", (150, 110), i) for i in range(4)]  # full decode
    files += [photo(tmp_path / f"b{i}.jpg", (300, 200), i) for i in range(2)]  # >= 4x: JPEG draft
    files += [photo(tmp_path / "c.png", (90, 70), 1, "PNG")]  # not a JPEG: load_image
    for f in files:
        out = decode.decode_uint8(f, [SIZE, 2 * SIZE])
        assert set(out) == {SIZE, 2 * SIZE}
        for size, tensor in out.items():
            assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, size, size)
            with Image.open(f) as img:
                assert decode.reference_difference(img, tensor, size) <= 1 / 255, (f.name, size)


def test_decode_errors_stay_typed(tmp_path: Path) -> None:
    from hierarchy.core.errors import ImageError

    good = photo(tmp_path / "ok.jpg", (80, 60), 0).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(300) + b"\xff\xd9")
    for name, kinds in (("cut.jpg", {"truncated", "undecodable"}), ("junk.jpg", {"undecodable", "truncated"}),
                        ("missing.jpg", {"not_found"})):
        with pytest.raises(ImageError) as info:
            decode.decode_uint8(tmp_path / name, [SIZE])
        assert info.value.type in kinds


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet18", 2)[0].eval()


def test_fast_path_gives_the_reference_labels(tmp_path: Path, model: torch.nn.Module, decoder: str) -> None:
    preset = Preset(size=SIZE)
    files = [photo(tmp_path / f"{i}.jpg", (120, 90), i) for i in range(8)]
    with Image.open(files[0]):
        pass
    reference = []
    for f in files:
        with Image.open(f) as img:
            reference.append(preset.reference(img.convert("RGB")))
    with torch.no_grad():
        ref_logits = model(torch.stack(reference))
    fast = Predictor.from_torch(model, ("a", "b"), preset, device="cpu", precision="fp32")
    batch = torch.stack([decode.decode_uint8(f, [SIZE])[SIZE] for f in files])
    pred = fast.predict(batch, return_logits=True)
    np.testing.assert_array_equal(pred.probs.argmax(1), ref_logits.argmax(1).numpy())
    np.testing.assert_allclose(pred.logits, ref_logits.numpy(), atol=0.05)


def test_bf16_falls_back_to_fp32_when_the_cpu_lacks_it(monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module) -> None:
    monkeypatch.setattr(predict, "cpu_supports_bf16", lambda: False)
    cpu = torch.device("cpu")
    assert select_precision(cpu, "auto") == "fp32" and select_precision(cpu, "bf16") == "fp32"
    p = Predictor.from_torch(model, ("a", "b"), Preset(size=SIZE), device="cpu", precision="bf16")
    assert p.precision == "fp32" and p.backend.plan.input_dtype == torch.float32
    assert next(p.backend.model.parameters()).dtype == torch.float32
    monkeypatch.setattr(predict, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr("hierarchy.core.machine.has_amx", lambda: True)  # auto picks bf16 only with AMX
    assert select_precision(cpu, "auto") == "bf16"
    fast = Predictor.from_torch(model, ("a", "b"), Preset(size=SIZE), device="cpu", precision="auto")
    assert fast.backend.plan.input_dtype == torch.bfloat16 and next(fast.backend.model.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched


def test_native_resnet_matches_torchvision_and_folds_the_same_pairs(model: torch.nn.Module) -> None:
    arch = {"backbone": "resnet18", "library": "torchvision", "num_classes": 2}
    native = resnet.build(arch).eval()
    native.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(native(x), model(x))
    assert sorted(resnet.batchnorm_pairs(native)) == sorted(optimize._traced_pairs(model))
    folded = optimize.prepare_model(native, torch.device("cpu"), optimize.plan_for(torch.device("cpu"), "fp32"))
    with torch.no_grad():
        torch.testing.assert_close(folded(x.contiguous(memory_format=torch.channels_last)), model(x),
                                   atol=1e-4, rtol=1e-4)


def test_outputs_keep_input_order_under_random_decode_delays(fake_stages, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from hierarchy.engine.pipeline import parse_pipeline
    from hierarchy.engine.router import Router

    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    paths = [solid(tmp_path / f"{i:03d}.png", colours[i % 3]) for i in range(40)]
    paths.insert(7, tmp_path / "missing.png")
    real = decode.decode_arrays
    rng = random.Random(0)
    delays = {p: rng.uniform(0, 0.02) for p in paths}

    def slow(path, sizes, draft=True):
        time.sleep(delays[Path(path)])
        return real(path, sizes, draft)

    monkeypatch.setattr(decode, "decode_arrays", slow)  # what Router.decode calls
    router = Router.from_pipeline(parse_pipeline("name: o\nroot: c\nstages:\n  c:\n    stage: fake_color\n"
                                                 "    routes: {default: stop}\n"))
    recs = list(router.run(iter(paths), batch_size=6, workers=4))
    assert [r["path"] for r in recs] == [str(p) for p in paths]
    assert recs[7]["status"] == "error" and all(r["status"] == "ok" for i, r in enumerate(recs) if i != 7)
    assert [r["label"] for r in recs if r["status"] == "ok"][:3] == ["red", "other", "other"]


# ---------------------------------------------------------------- training cache


def _manifest(tmp_path: Path, n: int) -> tuple[Path, list[Sample]]:
    rows = [(f"img/{i}.jpg", "skin" if i % 2 else "non-skin", "train") for i in range(n)]
    for path, _, _ in rows:
        photo(tmp_path / path, (64, 48), int(path.split("/")[1].split(".")[0]))
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    return tmp_path, [Sample(tmp_path / p, lab, s) for p, lab, s in rows]


def test_cache_is_built_once_and_invalidated_on_manifest_or_size_change(tmp_path: Path) -> None:
    from hierarchy.data.cache import CACHE_DIR, load_or_build

    data, samples = _manifest(tmp_path, 6)
    first = load_or_build(data, samples, SIZE, "train")
    assert first.path.parent == data / CACHE_DIR and first.array.shape == (6, 3, SIZE, SIZE) and first.ok.all()
    np.testing.assert_array_equal(first.array[2], decode.decode_uint8(samples[2].path, [SIZE])[SIZE].numpy())
    assert not [p for p in first.path.parent.iterdir() if p.suffix == ".tmp"]  # written atomically
    mtime = first.path.stat().st_mtime_ns
    again = load_or_build(data, samples, SIZE, "train")
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime  # a hit, not a rebuild
    assert load_or_build(data, samples, 2 * SIZE, "train").path != first.path  # img-size change
    with open(data / "manifest.csv", "a", newline="") as f:
        f.write("img/0.jpg,skin,val\n")
    changed = load_or_build(data, samples, SIZE, "train")
    assert changed.path != first.path  # manifest change
    json_files = sorted(p.name for p in (data / CACHE_DIR).glob("*.json"))
    assert len(json_files) == 3 and all(json.loads((data / CACHE_DIR / n).read_text())["n"] == 6 for n in json_files)


def test_cache_marks_unreadable_images(tmp_path: Path) -> None:
    from hierarchy.data.cache import load_or_build

    data, samples = _manifest(tmp_path, 3)
    samples[1].path.write_bytes(b"not an image")
    cache = load_or_build(data, samples, SIZE, "train")
    assert cache.ok.tolist() == [True, False, True]


def _train(data: Path, out: Path, **train: object) -> dict[str, str]:
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin

    cfg = SkinVsNonskin.Config(train={"pretrained": "none", "epochs": 2, "batch_size": 8, "img_size": SIZE,
                                      "calibrate": False, "threshold_target": None, "ood": False, **train})
    run = train_stage(SkinVsNonskin(cfg), data, out, progress=False)
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


def test_cached_training_gives_the_plain_validation_accuracy(tmp_path: Path) -> None:
    """The fast path (cache, threads, precision auto: bf16 autocast + channels_last on capable CPUs)
    against the plain one (decode every epoch, single-process loader, fp32), same data and seed."""
    from hierarchy.data.synth import make_image_folder

    for split, n in (("train", 16), ("val", 8)):
        make_image_folder(tmp_path / "data" / split, ["skin", "non-skin"], n_per_label=n, size=(72, 54), seed=len(split))
    plain = _train(tmp_path / "data", tmp_path / "plain", cache=False, workers=0, precision="fp32")
    fast = _train(tmp_path / "data", tmp_path / "fast", cache=True, workers="auto")
    again = _train(tmp_path / "data", tmp_path / "again", cache=True, workers="auto")  # from the cache file
    print("val acc plain fp32", plain["val_acc"], "fast", fast["val_acc"])
    assert abs(float(plain["val_acc"]) - float(fast["val_acc"])) <= 0.15
    assert again["val_acc"] == fast["val_acc"] and again["train_loss"] == fast["train_loss"]


# ---------------------------------------------------------------- allocator and CLI


def test_allocator_settings_apply_and_can_be_opted_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(perf, "_applied", {})
    if sys.platform.startswith("linux") and os.path.exists("/lib/x86_64-linux-gnu/libc.so.6"):
        assert perf.configure_allocator() is True
    monkeypatch.setattr(perf, "_applied", {})
    monkeypatch.setenv(perf.OPT_OUT_ENV, "off")
    assert perf.configure_allocator() is False


def _checkpoint(run: Path, model: torch.nn.Module) -> None:
    from hierarchy.models.checkpoint import save_weights
    from hierarchy.models.metadata import CheckpointMetadata, write_metadata

    save_weights(run / "best.safetensors", model)
    arch = {"backbone": "resnet18", "library": "torchvision", "num_classes": 2}
    write_metadata(run / "metadata.json", CheckpointMetadata(
        stage="skin_vs_nonskin", labels=["skin", "non-skin"], arch=arch, preset=Preset(size=SIZE).to_dict(),
        created_by="test"))


@pytest.mark.parametrize("malloc", ["", "off"])
def test_cli_exit_codes_and_pipes_with_the_allocator_setup(tmp_path: Path, model: torch.nn.Module, malloc: str) -> None:
    _checkpoint(tmp_path / "run", model)
    (tmp_path / "p.yaml").write_text("name: p\nroot: g\nstages:\n  g:\n    stage: skin_vs_nonskin\n"
                                     "    weights: run\n    ood: 'off'\n    routes: {default: stop}\n")
    img = photo(tmp_path / "a.jpg", (80, 60), 1)
    env = {**os.environ, perf.OPT_OUT_ENV: malloc, "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "hierarchy", "-q", "run", str(tmp_path / "p.yaml")]
    ok = subprocess.run([*cmd, str(img), "--format", "jsonl"], capture_output=True, text=True, env=env,
                        stdin=subprocess.DEVNULL, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["status"] == "ok"
    bad = subprocess.run([*cmd, str(img), str(tmp_path / "nope.jpg"), "--format", "csv"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 3 and len(bad.stdout.strip().splitlines()) == 3
    piped = subprocess.run(f"{' '.join(cmd)} {img} {img} {img} --format jsonl | head -n 1", shell=True,
                           capture_output=True, text=True, env=env, timeout=300)
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 1
    usage = subprocess.run([sys.executable, "-m", "hierarchy", "run"], capture_output=True, text=True, env=env)
    assert usage.returncode == 2


def test_background_torchvision_import_leaves_decoding_to_pil_until_it_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    release = threading.Event()

    def slow_import() -> None:  # stands in for the ~1 s `import torchvision`
        release.wait(10)
        decode._importing.clear()

    monkeypatch.setattr(decode, "_import_in_background", slow_import)
    thread = decode.enable_torchvision_decoder(background=True)
    assert decode._torch_jpeg_decoder() is None  # importing: PIL decodes meanwhile
    release.set()
    thread.join(10)
    assert not thread.is_alive() and decode._torch_jpeg_decoder() is not None


def test_only_long_runs_import_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """From LONG_RUN inputs when a stage runs on torch anyway, from EXPORTED_LONG_RUN when none does."""
    from hierarchy.engine import router

    started = []
    monkeypatch.setattr(decode, "enable_torchvision_decoder", lambda background=False: started.append(background) or "t")
    paths = [Path(f"{i}.jpg") for i in range(router.EXPORTED_LONG_RUN)]
    for n, torch_engine, thread in ((router.LONG_RUN - 1, True, None), (router.LONG_RUN, False, None),
                                    (router.LONG_RUN, True, "t"), (router.EXPORTED_LONG_RUN - 1, False, None),
                                    (router.EXPORTED_LONG_RUN, False, "t")):
        kept, got = router._maybe_fast_jpeg(iter(paths[:n]), torch_engine)
        assert list(kept) == paths[:n] and got == thread
    assert started == [True, True]


def test_long_runs_on_the_torch_engine_use_the_torchvision_decoder() -> None:
    """The shared Predictor takes numpy batches on every engine, so 'does this run import torch' is
    asked of its engine, not of its batch format."""
    from fakes import FakePredictor

    from hierarchy.engine.router import runs_on_torch

    model = create_model("resnet18", 2)[0].eval()
    assert runs_on_torch(Predictor.from_torch(model, ("a", "b"), Preset(size=SIZE), device="cpu", precision="fp32"))
    assert runs_on_torch(FakePredictor("f", ("a", "b"), lambda m: m[:, :2]))  # takes torch batches

    class NumpyOnly(FakePredictor):
        batch_format = "numpy"

    assert not runs_on_torch(NumpyOnly("f", ("a", "b"), lambda m: m[:, :2]))
