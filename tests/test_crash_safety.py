"""Crash safety of `hierarchy train`: SIGKILL at chosen points (inside checkpoint writes too), then
`--resume`; and non-finite losses/gradients never overwrite the last good checkpoint.

The kill tests run the real CLI in a subprocess on a tiny generated dataset. To kill *during* a write
deterministically, a harness holds fsutil's rename of one chosen file, so its `.<name>.XXXXXXXX.tmp`
sits in the run dir until the test sees it and sends SIGKILL.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from hierarchy.models.checkpoint import load_train_state, load_weights
from hierarchy.core.fsutil import temp_target
from hierarchy.train.trainer import train_stage

EPOCHS = 3
STAGE = "skin_vs_nonskin"
HARNESS = """
import os, sys, time
import hierarchy.core.fsutil as fsutil
name, nth = os.environ["HOLD_PUBLISH"].rsplit(":", 1)
real, seen = fsutil._publish, [0]
def publish(tmp, path):
    if path.name == name:
        seen[0] += 1
        if seen[0] == int(nth):
            print("HOLDING", tmp, file=sys.stderr, flush=True)
            time.sleep(600)  # the test kills us here: the temp file is written, never renamed
    real(tmp, path)
fsutil._publish = publish
from hierarchy.commands.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_options() -> dict[str, Any]:
    """Tiny and fast; options that only exist in newer configs are switched off when present."""
    from hierarchy.config.train import TrainConfig

    opts = {"backbone": "timm/test_resnet", "epochs": EPOCHS, "precision": "fp32", "device": "cpu", "workers": 0,
            "ood": False, "threshold_target": None, "calibrate": True}
    return {k: v for k, v in opts.items() if k in TrainConfig.model_fields}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """synth + `hierarchy build-dataset`: ~16 images, train and val splits."""
    from hierarchy.data import synth
    from hierarchy.commands.cli import main
    from hierarchy.registry import reset_registry

    root = tmp_path_factory.mktemp("crash")
    ham = synth.make_ham10000(root / "ham", n_lesions=8, max_images_per_lesion=1, size=(24, 24), seed=3)
    coco = synth.make_coco(root / "coco", n_images=8, size=(24, 24), seed=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("HIERARCHY_DISABLE_PLUGIN_AUTOLOAD", raising=False)
        reset_registry()
        code = main(["build-dataset", STAGE, "--ham10000", str(ham), "--coco", str(coco), "--out", str(root / "ds")])
        reset_registry()
    assert code == 0
    (root / "cfg.yaml").write_text(yaml.safe_dump({"stage": STAGE, "train": train_options()}))
    return root


def trainer(root: Path, extra: list[str], hold: str | None, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("HIERARCHY_DISABLE_PLUGIN_AUTOLOAD", None)
    if hold:
        env["HOLD_PUBLISH"] = hold
    prog = ["-c", HARNESS] if hold else ["-m", "hierarchy"]
    args = [sys.executable, *prog, "train", STAGE, *extra]
    return subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def start_args(root: Path, run: Path) -> list[str]:
    return ["--config", str(root / "cfg.yaml"), "--data", str(root / "ds"), "--pretrained", "none", "--img-size", "32",
            "--batch-size", "8", "--out", str(run.parent.parent), "--name", run.name]


def temps(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if temp_target(p.name)) if run.is_dir() else []


def wait_until(proc: subprocess.Popen, log: Path, found: Callable[[], Any], timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := found():
            return value
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before the kill point:\n{log.read_text()}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"kill point not reached in {timeout}s:\n{log.read_text()}")


def kill_while_writing(root: Path, run: Path, name: str, nth: int, extra: list[str]) -> None:
    """Run until the nth write of ``name`` has its temp file on disk, then SIGKILL."""
    log = root / f"kill-{run.name}.log"
    proc = trainer(root, extra, f"{name}:{nth}", log)
    wait_until(proc, log, lambda: "HOLDING" in log.read_text())
    assert [temp_target(t) for t in temps(run)] == [name]  # the write in flight, never renamed
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL


def resume(root: Path, run: Path) -> str:
    log = root / f"resume-{run.name}.log"
    proc = trainer(root, ["--resume", str(run)], None, log)
    code = proc.wait(600)
    assert code == 0, log.read_text()
    return log.read_text()


def committed_epoch(run: Path) -> int:
    return int(load_train_state(run / "train_state.pt")["epoch"])


def check_finished(run: Path) -> None:
    """All epochs done, records agree, no temp files, best.safetensors loads through the predictor."""
    from safetensors import safe_open

    from hierarchy.engine.predictor import load_predictor
    from hierarchy.registry import get_stage, reset_registry

    state = load_train_state(run / "train_state.pt")
    assert state["epoch"] == EPOCHS and [r["epoch"] for r in state["history"]] == list(range(1, EPOCHS + 1))
    meta = json.loads((run / "metadata.json").read_text())
    assert [r["epoch"] for r in meta["epochs"]] == list(range(1, EPOCHS + 1))
    assert len((run / "metrics.csv").read_text().splitlines()) == EPOCHS + 1
    assert temps(run) == []
    with safe_open(str(run / "best.safetensors"), "pt") as f:
        assert int(f.metadata()["epoch"]) == meta["best"]["epoch"] == state["best_epoch"]
    with safe_open(str(run / "last.safetensors"), "pt") as f:
        assert int(f.metadata()["epoch"]) == EPOCHS
    reset_registry()
    try:
        predictor = load_predictor(get_stage(STAGE)(), run, device="cpu", precision="fp32")
    finally:
        reset_registry()
    probs = predictor.predict(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).probs
    assert probs.shape == (2, 2) and abs(float(probs.sum()) - 2.0) < 1e-4


# ------------------------------------------------------------------------------- kill tests


def test_kill_during_the_commit_write_resumes_from_last_complete_epoch(data: Path, monkeypatch) -> None:
    monkeypatch.delenv("HIERARCHY_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    run = data / "runs" / STAGE / "commit"
    kill_while_writing(data, run, "train_state.pt", 2, start_args(data, run))
    assert committed_epoch(run) == 1  # the previous commit is intact
    assert load_weights(run / "best.safetensors")  # and so is the checkpoint next to it
    assert len(json.loads((run / "metadata.json").read_text())["epochs"]) == 1
    log = resume(data, run)
    assert "epoch 2:" in log and "epoch 1:" not in log  # continued, not restarted
    check_finished(run)


KILL_POINTS = [
    ("best.safetensors", 1),  # the very first best: state says epoch 1, best.safetensors does not exist yet
    ("last.safetensors", 2),  # after the commit of epoch 2, before the files derived from it
    ("metadata.json", 2),
    ("metrics.csv", EPOCHS),  # every epoch committed: resume only finishes the run
    ("curves.png", 1),  # during the plots after the last epoch
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "nth"), KILL_POINTS, ids=[f"{n}-{k}" for n, k in KILL_POINTS])
def test_kill_at_each_write_then_resume(data: Path, monkeypatch, name: str, nth: int) -> None:
    monkeypatch.delenv("HIERARCHY_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    run = data / "runs" / STAGE / f"{name.replace('.', '_')}{nth}"
    kill_while_writing(data, run, name, nth, start_args(data, run))
    before = committed_epoch(run)
    resume(data, run)
    check_finished(run)
    assert before >= 1


@pytest.mark.slow
def test_kill_before_the_first_commit_cannot_resume(data: Path, monkeypatch, capsys) -> None:
    from hierarchy.commands.cli import main
    from hierarchy.registry import reset_registry

    monkeypatch.delenv("HIERARCHY_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    reset_registry()
    run = data / "runs" / STAGE / "first"
    kill_while_writing(data, run, "train_state.pt", 1, start_args(data, run))
    assert not (run / "train_state.pt").exists() and not (run / "best.safetensors").exists()
    try:
        assert main(["train", STAGE, "--resume", str(run)]) == 1
    finally:
        reset_registry()
    assert "cannot resume" in capsys.readouterr().err


@pytest.mark.slow
def test_repeated_unaimed_kills_still_finish(data: Path, monkeypatch) -> None:
    """Kill at the first sight of a new temp file, three times, resuming (or restarting) each time."""
    monkeypatch.delenv("HIERARCHY_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    run = data / "runs" / STAGE / "unaimed"
    for kill in range(3):
        if run.exists() and not (run / "train_state.pt").exists():
            shutil.rmtree(run)  # killed before the first commit: there is nothing to resume
        extra = ["--resume", str(run)] if run.exists() else start_args(data, run)
        leftover = set(temps(run))
        log = data / f"unaimed-{kill}.log"
        proc = trainer(data, extra, None, log)
        try:
            wait_until(proc, log, lambda: set(temps(run)) - leftover)
        except AssertionError:
            if proc.returncode == 0:
                break  # finished before the next temp file showed up
            raise
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    if not (run / "train_state.pt").exists():
        shutil.rmtree(run)
        assert trainer(data, start_args(data, run), None, data / "unaimed-fresh.log").wait(600) == 0
    resume(data, run)
    check_finished(run)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    from hierarchy.core.fsutil import atomic_write_with

    target = tmp_path / "best.safetensors"
    target.write_bytes(b"old")

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(target, half_then_fail)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["best.safetensors"]


def test_only_fsutil_temp_files_are_removed(tmp_path: Path) -> None:
    import tempfile

    from hierarchy.core.fsutil import remove_temp_files

    made = []
    for name in ("best.safetensors", "train_state.pt", "metadata.json"):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=tmp_path)
        os.close(fd)
        made.append(Path(tmp))
    keep = ["best.safetensors", "notes.tmp", ".hidden.tmp", ".x.link.tmp", ".best.safetensors.tmp"]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()  # not a file: left alone
    assert sorted(remove_temp_files(tmp_path)) == sorted(made)
    assert sorted(os.listdir(tmp_path)) == sorted(keep + [".dir.abcdefgh.tmp"])
    assert [temp_target(p.name) for p in made] == ["best.safetensors", "train_state.pt", "metadata.json"]


# ------------------------------------------------------------------------------ NaN / Inf


def snapshot(run: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(run.iterdir()) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """In-process training on one thread: on a busy 2-core machine, two OpenMP threads spin-wait
    against each other and a tiny step takes seconds instead of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def good_run(data: Path) -> Path:
    """One clean epoch, trained in-process."""
    from hierarchy.config.load import load_stage_config
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin

    train = {**train_options(), "epochs": 1, "pretrained": "none", "img_size": 32, "batch_size": 4,
             "out": str(data / "nan-runs"), "name": "good"}
    return train_stage(SkinVsNonskin(load_stage_config(SkinVsNonskin, train=train)), data / "ds", progress=False)


def resume_in_process(run: Path, **train: Any) -> Path:
    from hierarchy.config.load import load_stage_config
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin

    config = load_stage_config(SkinVsNonskin, run / "config.yaml", train={"epochs": EPOCHS, **train})
    return train_stage(SkinVsNonskin(config), None, resume=run, progress=False)


class NaNLoss(torch.nn.Module):
    def __init__(self, **_kwargs: object) -> None:  # label_smoothing=...
        super().__init__()

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return logits.sum() * math.nan


def poison_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", NaNLoss)


def poison_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finite loss, NaN gradient on one parameter."""
    import hierarchy.models.backbones

    real = hierarchy.models.backbones.create_model

    def create(*args: Any, **kwargs: Any) -> Any:
        model, arch = real(*args, **kwargs)
        next(model.parameters()).register_hook(lambda g: torch.full_like(g, math.nan))
        return model, arch

    monkeypatch.setattr(hierarchy.models.backbones, "create_model", create)


def poison_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizer writes an Inf into the weights: later losses are NaN, the epoch must not commit."""
    real = torch.optim.Adam.step

    def step(self: torch.optim.Adam, *args: Any, **kwargs: Any) -> Any:
        out = real(self, *args, **kwargs)
        with torch.no_grad():
            first = self.param_groups[0]["params"][0]
            first[(0,) * first.dim()] = math.inf
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)


@pytest.mark.parametrize(("poison", "batch", "message"), [
    (poison_loss, 2, "5 consecutive non-finite"),
    (poison_gradients, 2, "5 consecutive non-finite"),
    (poison_loss, 8, "every step of epoch 2"),
    (poison_weights, 8, r"NaN/Inf in \d+ weight tensor"),
], ids=["nan_loss", "nan_gradient", "nan_loss_short_epoch", "inf_weight"])
def test_non_finite_training_never_overwrites_the_last_good_checkpoint(good_run: Path, tmp_path: Path, monkeypatch,
                                                                       poison, batch: int, message: str) -> None:
    from hierarchy.train.trainer import TrainingDiverged

    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    before = snapshot(run)
    poison(monkeypatch)
    with pytest.raises(TrainingDiverged, match=message) as info:
        resume_in_process(run, batch_size=batch)
    assert "untouched" in str(info.value)
    assert snapshot(run) == before  # same bytes, same mtimes: nothing was rewritten
    assert committed_epoch(run) == 1 and load_weights(run / "best.safetensors")


def test_one_non_finite_step_is_skipped_and_training_goes_on(good_run: Path, tmp_path: Path, monkeypatch,
                                                             caplog) -> None:
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    real, calls = torch.nn.functional.cross_entropy, [0]

    def once_inf(logits: torch.Tensor, y: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        loss = real(logits, y, *args, **kwargs)
        return loss * math.inf if calls[0] == 2 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", once_inf)
    with caplog.at_level("WARNING", logger="hierarchy.train"):
        resume_in_process(run, epochs=2, batch_size=4)
    skipped = [r for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(skipped) == 1 and "non-finite loss" in skipped[0].getMessage()
    assert committed_epoch(run) == 2
    assert all(torch.isfinite(t).all() for t in load_weights(run / "last.safetensors").values())


def test_atomic_writes_never_replace_devices(tmp_path):
    """`-o /dev/null` must not turn /dev/null into a regular file (tested on a fifo, never on /dev/null)."""
    import threading

    from hierarchy.core.fsutil import atomic_write_text

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))
    reader.start()
    atomic_write_text(fifo, "hello")
    reader.join(10)
    assert got == ["hello"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
