"""The tuner (hierarchy.engine.tune, hierarchy.train.tune, hierarchy.core.tunecache) with fake engines
whose speeds are known: it picks the fastest, caches, reuses, re-measures when a key part changes,
respects explicit flags and HIERARCHY_TUNE=off, and never trusts a corrupt or foreign cache file."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import hierarchy.engine.backends as backends
import hierarchy.models.device as device_mod
from hierarchy.commands.cli import main
from hierarchy.core import machine, tunecache
from hierarchy.engine import tune
from hierarchy.engine.backends import EngineSpec
from hierarchy.engine.backends.base import Checkpoint
from hierarchy.train import tune as train_tune

# seconds per image of each fake (engine, precision); a fixed 8 ms per batch on top
SPEED = {("fast", "fp32"): 0.0010, ("fast", "bf16"): 0.0002, ("slow", "fp32"): 0.0040}
RUNS: list[tuple[str, str, int]] = []  # every batch a fake ran: (engine, precision, batch size)
LOADS: list[tuple[str, str]] = []


class Clock:
    """The tuner's clock in these tests (its ``time``): a fake batch advances it by exactly its cost."""

    now = 0.0

    def perf_counter(self) -> float:
        return self.now


CLOCK = Clock()


class FakeBackend:
    device = "cpu"

    def __init__(self, name: str, precision: str):
        self.name, self.precision = name, precision

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        RUNS.append((self.name, self.precision, len(batch)))
        CLOCK.now += 0.008 + SPEED[(self.name, self.precision)] * len(batch)
        return np.zeros((len(batch), 2), np.float32), np.zeros((len(batch), 4), np.float32)


LOAD_S: dict[str, float] = {}  # seconds an engine's load costs on the fake clock (none by default)


@dataclass(frozen=True)
class FakeSpec(EngineSpec):
    def load(self, ckpt: Checkpoint, device: str, precision: str) -> FakeBackend:
        LOADS.append((self.name, precision))
        CLOCK.now += LOAD_S.get(self.name, 0.0)
        native = "bf16" if "bf16" in self.precisions else "fp32"  # an engine's own auto: bf16 where it has it
        return FakeBackend(self.name, native if precision == "auto" else precision)


FAKES = {"fast": FakeSpec("fast", "-", "fake, fast", precisions=("fp32", "bf16")),
         "slow": FakeSpec("slow", "-", "fake, slow", precisions=("fp32",))}


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Only the fake engines, tuning on, the cache in tmp_path, a CPU with bf16 and AMX, the fake clock."""
    monkeypatch.setattr(backends, "ENGINES", dict(FAKES))
    monkeypatch.setattr(backends, "AUTO_ORDER", ("slow",))
    monkeypatch.setenv("HIERARCHY_TUNE", "on")
    monkeypatch.setenv("HIERARCHY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16", "amx_tile"}))
    monkeypatch.setattr(tune, "time", CLOCK)
    RUNS.clear()
    LOADS.clear()
    LOAD_S.clear()
    return tmp_path / "cache" / "tune"


def make_run(root: Path, size: int = 32, seed: float = 0.0) -> Checkpoint:
    """A checkpoint the fakes can "run": metadata.json and a (tiny) safetensors file."""
    from hierarchy.data.preset import Preset
    from hierarchy.models.checkpoint import save_weights
    from hierarchy.models.metadata import CheckpointMetadata, write_metadata

    root.mkdir(parents=True, exist_ok=True)
    save_weights(root / "best.safetensors", {"w": torch.full((2,), seed)})
    write_metadata(root / "metadata.json", CheckpointMetadata(
        stage="skin_vs_nonskin", labels=["skin", "non-skin"], preset=Preset(size=size).to_dict(), created_by="test",
        arch={"backbone": "resnet18", "library": "torchvision", "num_classes": 2}))
    return Checkpoint.open(root)


def test_picks_the_fastest_and_writes_the_cache(fakes: Path, tmp_path: Path, caplog) -> None:
    ckpt = make_run(tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="hierarchy.engine"):
        backend, why, result = tune.load_backend(ckpt, "cpu", name="gate")
    assert (backend.name, backend.precision) == ("fast", "bf16") and result.pick == tune.Candidate("fast", "bf16")
    rates = {m.candidate.label(): m.img_s for m in result.measurements}
    assert set(rates) == {"slow fp32", "fast fp32", "fast bf16"}
    assert rates["fast bf16"] > rates["fast fp32"] > rates["slow fp32"] > 0
    assert result.batch == 64 and list(result.batches) == [8, 16, 32, 64]  # the fixed cost favours big batches
    files = list(fakes.glob("infer-*.json"))
    assert len(files) == 1 and result.cache == str(files[0])
    record = json.loads(files[0].read_text())
    assert record["schema"] == tunecache.SCHEMA and record["key"]["machine"]["cpu"] == machine.cpu_model()
    assert record["key"]["size"] == 32 and record["key"]["model"]["weights_sha256"] == ckpt.weights_sha256
    assert record["result"]["pick"] == {"engine": "fast", "precision": "bf16", "memory_format": "-"}
    assert "tune: gate -> fast bf16 batch 64 (measured " in caplog.text and f"cache {files[0]}" in caplog.text
    assert why.startswith("tuned")


def test_a_slow_candidate_is_stopped_early(fakes: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(backends, "AUTO_ORDER", ("fast",))  # the fast one first: the slow one is cut short
    _, _, result = tune.load_backend(make_run(tmp_path / "run"), "cpu")
    slow = next(m for m in result.measurements if m.candidate.engine == "slow")
    assert slow.note.startswith("stopped") and sum(1 for r in RUNS if r[0] == "slow") <= 2


def test_a_second_call_reuses_the_cache_without_measuring(fakes: Path, tmp_path: Path, caplog) -> None:
    ckpt = make_run(tmp_path / "run")
    first = tune.load_backend(ckpt, "cpu")[2]
    RUNS.clear()
    LOADS.clear()
    with caplog.at_level(logging.INFO, logger="hierarchy.engine"):
        backend, _, again = tune.load_backend(Checkpoint.open(tmp_path / "run"), "cpu", name="gate")
    assert RUNS == [] and LOADS == [("fast", "bf16")]  # only the winner is loaded, nothing is timed
    assert again.from_cache and again.pick == first.pick and again.batch == first.batch
    assert f"tune: gate -> fast bf16 batch {first.batch} (cached, measured" in caplog.text


def test_a_short_run_weighs_start_up_against_throughput(fakes: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    """The fast engine starts in 2 s (think: importing torch), the slow one in 0.1 s: a cached tuning
    serves 1 or 10 images on the slow one, 10,000 (or an unknown number) on the fast one."""
    monkeypatch.setitem(LOAD_S, "fast", 2.0)
    monkeypatch.setitem(LOAD_S, "slow", 0.1)
    ckpt = make_run(tmp_path / "run")
    first = tune.load_backend(ckpt, "cpu", inputs=1)[2]  # measuring imports everything: the fastest serves
    assert first.pick == tune.Candidate("fast", "bf16") and first.start_s("fast") == pytest.approx(2.0, abs=1e-6)
    assert first.start_s("slow") == pytest.approx(0.1, abs=1e-6)  # load only: the fakes have no warm-up cost
    record = json.loads(Path(first.cache).read_text())
    assert all(m["start_s"] > 0 for m in record["result"]["measurements"])
    with caplog.at_level(logging.INFO, logger="hierarchy.engine"):
        for n, engine in ((1, "slow"), (10, "slow"), (10_000, "fast"), (None, "fast")):
            backend, _, result = tune.load_backend(Checkpoint.open(tmp_path / "run"), "cpu", inputs=n)
            assert backend.name == engine and result.pick.engine == engine and result.from_cache
    assert "a run of 1 input(s) finishes first on it: start 0.1" in caplog.text
    assert tune.load_backend(Checkpoint.open(tmp_path / "run"), "cpu", inputs=1)[2].batch == 1


def test_hierarchy_run_tells_the_tuner_how_few_inputs_it_has(fakes: Path, tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    from hierarchy.commands import run as run_cmd

    monkeypatch.setitem(LOAD_S, "fast", 2.0)
    make_run(tmp_path / "run")
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(f"name: p\nroot: gate\nstages:\n  gate: {{stage: skin_vs_nonskin, weights: {tmp_path / 'run'}, "
                    "routes: {default: stop}}\n")
    monkeypatch.setattr(run_cmd, "COUNT_AHEAD", 8)  # counted up to 8: 8 images are a long run here
    images = []
    for i in range(run_cmd.COUNT_AHEAD):
        images.append(tmp_path / f"{i}.jpg")
        Image.new("RGB", (40, 30), (i, 100, 50)).save(images[-1])
    assert main(["tune", str(pipe)]) == 0
    for inputs, engine in ((images[:1], "slow"), (images[:4], "slow"), (images, "fast")):
        LOADS.clear()
        rc = main(["-q", "run", str(pipe), *map(str, inputs), "--format", "jsonl", "-o", str(tmp_path / "o.jsonl")])
        assert rc == 0 and [e for e, _ in LOADS] == [engine]


@pytest.mark.parametrize("change", ["library", "weights", "size", "export"])
def test_a_changed_key_part_measures_again(fakes: Path, tmp_path: Path, monkeypatch, change: str) -> None:
    tune.load_backend(make_run(tmp_path / "run"), "cpu")
    RUNS.clear()
    if change == "library":
        real = machine.library_versions()
        monkeypatch.setattr(machine, "library_versions", lambda: {**real, "openvino": "9999.0"})
        ckpt = Checkpoint.open(tmp_path / "run")
    elif change == "export":  # a new engine became available: other candidates
        monkeypatch.setitem(backends.ENGINES, "fast2", FakeSpec("fast2", "-", "fake", precisions=("fp32",)))
        SPEED[("fast2", "fp32")] = 0.002
        ckpt = Checkpoint.open(tmp_path / "run")
    else:
        ckpt = make_run(tmp_path / "run", seed=1.0) if change == "weights" else make_run(tmp_path / "other", size=48)
    result = tune.load_backend(ckpt, "cpu")[2]
    assert RUNS and not result.from_cache
    assert len(list(fakes.glob("infer-*.json"))) == 2


def test_explicit_engine_and_precision_are_not_measured(fakes: Path, tmp_path: Path) -> None:
    ckpt = make_run(tmp_path / "run")
    backend, why, result = tune.load_backend(ckpt, "cpu", precision="fp32", engine="slow")
    assert (backend.name, backend.precision, why, result) == ("slow", "fp32", "requested", None)
    assert RUNS == [] and not fakes.exists()
    backend, _, result = tune.load_backend(ckpt, "cpu", engine="fast")  # precision auto: only fast's are timed
    assert {r[0] for r in RUNS} == {"fast"} and {m.candidate.engine for m in result.measurements} == {"fast"}
    RUNS.clear()
    backend, _, result = tune.load_backend(ckpt, "cpu", precision="fp32")  # engine auto: only fp32 is timed
    assert {r[1] for r in RUNS} == {"fp32"} and backend.name == "fast" and backend.precision == "fp32"


def test_bf16_is_no_candidate_on_a_cpu_without_it(fakes: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2"}))
    result = tune.load_backend(make_run(tmp_path / "run"), "cpu")[2]
    assert {m.candidate.label() for m in result.measurements} == {"slow fp32", "fast fp32"}


@pytest.mark.parametrize("amx", [False, True])
def test_tune_off_uses_the_conservative_rule(fakes: Path, tmp_path: Path, monkeypatch, amx: bool) -> None:
    monkeypatch.setenv("HIERARCHY_TUNE", "off")
    monkeypatch.setattr(machine, "has_amx", lambda: amx)
    monkeypatch.setattr(device_mod, "cpu_supports_bf16", lambda: True)  # AVX512-BF16, with or without AMX
    backend, why, result = tune.load_backend(make_run(tmp_path / "run"), "cpu")
    assert backend.name == "slow" and why.startswith("auto:") and result is None  # AUTO_ORDER's rule
    assert RUNS == [] and not fakes.exists()
    monkeypatch.setattr(backends, "AUTO_ORDER", ("fast",))
    backend = tune.load_backend(make_run(tmp_path / "run"), "cpu")[0]
    assert backend.precision == ("bf16" if amx else "fp32")  # the engine's own auto only with AMX
    assert device_mod.select_precision(torch.device("cpu"), "auto") == ("bf16" if amx else "fp32")


def test_an_unknown_tune_mode_is_a_config_error(monkeypatch) -> None:
    from hierarchy.core.errors import ConfigError

    monkeypatch.setenv("HIERARCHY_TUNE", "sometimes")
    with pytest.raises(ConfigError, match="HIERARCHY_TUNE: unknown value 'sometimes'"):
        tunecache.tune_mode()


def _spoil(path: Path, how: str) -> None:
    if how == "corrupt":
        path.write_text('{"format": "hierarchy.tune", "schema": 1, "key": {')
    elif how == "schema":
        path.write_text(json.dumps({**json.loads(path.read_text()), "schema": 99}))
    else:  # foreign: a valid record of another machine copied over this one's
        record = json.loads(path.read_text())
        record["key"]["machine"]["cpu"] = "Some Other CPU"
        record["result"]["pick"] = {"engine": "slow", "precision": "fp32", "memory_format": "-"}
        path.write_text(json.dumps(record))


@pytest.mark.parametrize("how", ["corrupt", "schema", "foreign"])
def test_a_corrupt_or_foreign_cache_file_is_ignored_with_a_warning(fakes: Path, tmp_path: Path, caplog,
                                                                   how: str) -> None:
    ckpt = make_run(tmp_path / "run")
    path = Path(tune.load_backend(ckpt, "cpu")[2].cache)
    _spoil(path, how)
    RUNS.clear()
    with caplog.at_level(logging.WARNING, logger="hierarchy.tune"):
        backend, _, result = tune.load_backend(Checkpoint.open(tmp_path / "run"), "cpu")
    assert f"tune cache {path}" in caplog.text and "measuring again" in caplog.text
    assert RUNS and not result.from_cache and backend.name == "fast"  # re-measured, never trusted
    assert json.loads(path.read_text())["result"]["pick"]["engine"] == "fast"  # and overwritten


def test_refresh_measures_again(fakes: Path, tmp_path: Path, monkeypatch) -> None:
    tune.load_backend(make_run(tmp_path / "run"), "cpu")
    RUNS.clear()
    monkeypatch.setenv("HIERARCHY_TUNE", "refresh")
    assert not tune.load_backend(Checkpoint.open(tmp_path / "run"), "cpu")[2].from_cache and RUNS


def test_router_batch_size_explicit_wins_else_the_root_stage_tuning() -> None:
    tuned = SimpleNamespace(batch=64)
    router = SimpleNamespace(pipeline=SimpleNamespace(root="gate"),
                             stages={"gate": SimpleNamespace(predictor=SimpleNamespace(tuned=tuned))})
    assert tune.router_batch_size(router, 16) == 16 and tune.router_batch_size(router, None) == 64
    router.stages["gate"].predictor.tuned = None
    assert tune.router_batch_size(router, None) == tune.DEFAULT_BATCH


def test_cli_tune_prints_the_machine_and_the_table(fakes: Path, tmp_path: Path, capsys) -> None:
    make_run(tmp_path / "run")
    assert main(["tune", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == machine.header()
    assert out[1].startswith("skin_vs_nonskin: picked fast bf16 batch 64 (cache ")
    rows = [line.split() for line in out[3:6]]
    assert [r[:2] for r in rows] == [["fast", "bf16"], ["fast", "fp32"], ["slow", "fp32"]]  # fastest first
    assert rows[0][5] == "1.00" and rows[0][7] == "*" and float(rows[2][5]) < 0.5  # ratio, start s, picked
    assert "batch sweep of fast bf16" in out[6]
    RUNS.clear()
    assert main(["tune", str(tmp_path / "run"), "--format", "json"]) == 0  # measures again, ignoring the cache
    data = json.loads(capsys.readouterr().out)
    assert RUNS and data["machine"] == machine.describe() and data["stages"][0]["pick"]["engine"] == "fast"
    pipe = tmp_path / "pipe.yaml"  # a pipeline: every stage with weights, named by its id
    pipe.write_text(f"name: p\nroot: gate\nstages:\n  gate: {{stage: skin_vs_nonskin, weights: {tmp_path / 'run'}, "
                    "routes: {default: stop}}\n")
    assert main(["tune", str(pipe)]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("gate: picked fast bf16")


# ---------------------------------------------------------------- training


TRAIN_SPEED = {("fp32", "channels_last"): 50.0, ("fp32", "contiguous"): 40.0, ("bf16", "channels_last"): 90.0,
               ("bf16", "contiguous"): 20.0}


@pytest.fixture
def fake_steps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, str]]:
    """Training candidates with known speeds (time_steps replaced), tuning on, cache in tmp_path."""
    timed: list[tuple[str, str]] = []

    def fake_time_steps(cfg, model, device, cand, x, y, beat):
        timed.append((cand.precision, cand.memory_format))
        return TRAIN_SPEED[(cand.precision, cand.memory_format)], ""

    monkeypatch.setattr(train_tune, "time_steps", fake_time_steps)
    monkeypatch.setattr(device_mod, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(device_mod, "_CHOSEN_FORMATS", {})  # what these tests pick stays in them
    monkeypatch.setenv("HIERARCHY_TUNE", "on")
    monkeypatch.setenv("HIERARCHY_CACHE_DIR", str(tmp_path / "cache"))
    return timed


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))


ARCH = {"backbone": "tiny", "library": "torchvision", "num_classes": 2}


def train_cfg(**kw):
    from hierarchy.config.train import TrainConfig

    return TrainConfig(batch_size=4, **kw)


def test_training_picks_the_fastest_step_caches_it_and_sets_the_memory_format(fake_steps, tmp_path) -> None:
    cpu, model = torch.device("cpu"), tiny_model()
    assert train_tune.tune_training(train_cfg(), model, ARCH, cpu, 8) == "bf16"
    assert len(fake_steps) == 4 and device_mod.memory_format(cpu, "bf16") == torch.channels_last
    fake_steps.clear()
    assert train_tune.tune_training(train_cfg(), model, ARCH, cpu, 8) == "bf16" and fake_steps == []  # cached
    TRAIN_SPEED[("fp32", "contiguous")] = 500.0
    try:  # another input size: measured again, and contiguous wins now
        assert train_tune.tune_training(train_cfg(), model, ARCH, cpu, 16) == "fp32"
    finally:
        TRAIN_SPEED[("fp32", "contiguous")] = 40.0
    assert device_mod.memory_format(cpu, "fp32") == torch.contiguous_format
    assert model[0].weight.is_contiguous()  # the model itself was put in that format
    assert len(list((tmp_path / "cache" / "tune").glob("train-*.json"))) == 2


def test_training_explicit_precision_wins_and_off_measures_nothing(fake_steps, tmp_path, monkeypatch) -> None:
    cpu = torch.device("cpu")
    assert train_tune.tune_training(train_cfg(precision="fp32"), tiny_model(), ARCH, cpu, 8) == "fp32"
    assert {p for p, _ in fake_steps} == {"fp32"}  # only the memory format was measured
    fake_steps.clear()
    monkeypatch.setenv("HIERARCHY_TUNE", "off")
    monkeypatch.setattr(machine, "has_amx", lambda: False)
    assert train_tune.tune_training(train_cfg(), tiny_model(), ARCH, cpu, 8) == "fp32" and fake_steps == []
    assert device_mod.memory_format(cpu, "fp32") == torch.channels_last


def test_time_steps_trains_a_copy_and_leaves_the_model_alone() -> None:
    model, cpu = tiny_model(), torch.device("cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    rate, note = train_tune.time_steps(train_cfg(), model, cpu, tune.Candidate("torch", "fp32", "contiguous"), x, y, 0)
    assert rate > 0 and note == ""
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    cand = tune.Candidate("torch", "fp32", "channels_last")
    assert train_tune.time_steps(train_cfg(), model, cpu, cand, x, y, beat=1e12)[1] == "stopped after warm-up"


def test_train_stage_uses_the_tuned_precision(fake_steps, tmp_path, monkeypatch) -> None:
    from hierarchy.data.synth import make_image_folder
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin
    from hierarchy.train.trainer import train_stage

    monkeypatch.setitem(TRAIN_SPEED, ("fp32", "contiguous"), 500.0)
    for split, seed in (("train", 0), ("val", 1)):
        make_image_folder(tmp_path / "data" / split, ["skin", "non-skin"], n_per_label=4, size=(20, 20), seed=seed)
    cfg = SkinVsNonskin.Config(train={"pretrained": "none", "epochs": 1, "max_steps_per_epoch": 1, "batch_size": 4,
                                      "img_size": 16, "device": "cpu", "workers": 0, "ood": False,
                                      "threshold_target": None, "out": str(tmp_path / "runs")})
    run = train_stage(SkinVsNonskin(cfg), tmp_path / "data", progress=False)
    assert json.loads((run / "metadata.json").read_text())["precision"] == "fp32"
    assert len(fake_steps) == 4 and device_mod.memory_format(torch.device("cpu"), "fp32") == torch.contiguous_format
