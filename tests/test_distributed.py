"""DDP training: the distributed weighted sampler (fast, default suite) and `torchrun --nproc-per-node 2`
(gloo on CPU) against a one-process run, plus a killed DDP run that resumes with another process count."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from hierarchy.train.distributed import DistributedWeightedSampler, ShardSampler


def shares(weights, n, world, seed=3, epoch=1):
    out = []
    for rank in range(world):
        s = DistributedWeightedSampler(weights, n, rank, world, seed)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def test_one_rank_draws_exactly_what_the_one_process_sampler_draws():
    weights = torch.tensor([0.1] * 90 + [0.9] * 10, dtype=torch.double)
    gen = torch.Generator().manual_seed(3 * 1000 + 5)
    stock = list(WeightedRandomSampler(weights, 100, replacement=True, generator=gen))
    assert shares(weights, 100, 1, epoch=5)[0] == stock


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_split_one_global_draw(world):
    weights = torch.rand(101, generator=torch.Generator().manual_seed(0)).double()
    parts = shares(weights, 101, world)
    per = -(-101 // world)
    assert all(len(p) == per for p in parts)  # equal lengths: every rank runs the same number of steps
    glob = DistributedWeightedSampler(weights, 101, 0, world, 3)
    glob.set_epoch(1)
    order = glob.global_order()
    rebuilt = [order[k] for k in range(per * world)]
    assert sorted(sum(parts, [])) == sorted(rebuilt)  # disjoint positions; together the global draw
    assert [parts[r][i] for i in range(per) for r in range(world)] == rebuilt  # global batches split b per rank
    assert parts == shares(weights, 101, world)  # deterministic per seed and epoch
    assert parts != shares(weights, 101, world, epoch=2)


def test_weighted_shares_balance_the_classes():
    targets = [0] * 900 + [1] * 100  # 9:1 imbalance; the sampler weights 1/count
    counts = Counter(targets)
    weights = torch.tensor([1.0 / counts[t] for t in targets], dtype=torch.double)
    parts = shares(weights, 1000, 2)
    drawn = Counter(targets[i] for p in parts for i in p)
    assert sum(drawn.values()) == 1000
    assert 0.42 < drawn[1] / 1000 < 0.58  # balanced across both ranks together
    for p in parts:
        assert 0.4 < sum(targets[i] for i in p) / len(p) < 0.6  # and on each rank


def test_uniform_weights_see_most_samples_each_epoch():
    parts = shares(torch.ones(500, dtype=torch.double), 500, 2)
    seen = set(sum(parts, []))
    assert 0.58 < len(seen) / 500 < 0.69  # with replacement: 1 - 1/e of the samples, across ranks


def test_val_shards_cover_every_sample_once():
    parts = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))


# ---- torchrun, gloo ---------------------------------------------------------------------------------

TRAIN = ["train", "skin_vs_nonskin", "--pretrained", "none", "--img-size", "32", "--batch-size", "8",
         "--seed", "7", "--no-ood", "--threshold-target", "none", "--workers", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from hierarchy.data.synth import make_image_folder

    root = tmp_path_factory.mktemp("ddp-data")
    for split, n in (("train", 16), ("val", 8)):
        make_image_folder(root / split, ["skin", "non-skin"], n_per_label=n, size=(32, 32))
    return root


def hierarchy(args: list[str], **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("HIERARCHY_DISABLE_PLUGIN_AUTOLOAD", "RANK",
                                                            "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.Popen([sys.executable, "-m", "hierarchy", *args], env=env, **kw)


def finished(args: list[str]) -> str:
    proc = hierarchy(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return out.strip().splitlines()[-1]


def metrics(run: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader((run / "metrics.csv").open())]


@pytest.mark.slow  # two torch processes training on 2 cores: ~1-2 min
def test_torchrun_two_processes_match_one(data: Path, tmp_path: Path):
    from hierarchy.models.backbones import model_from_arch
    from hierarchy.models.checkpoint import load_weights

    one = Path(finished([*TRAIN, "--data", str(data), "--out", str(tmp_path / "one"), "--epochs", "2"]))
    two = Path(finished([*TRAIN, "--data", str(data), "--out", str(tmp_path / "two"), "--epochs", "2",
                         "--nproc-per-node", "2"]))
    assert [p.name for p in (tmp_path / "two" / "skin_vs_nonskin").iterdir()] == ["train"]  # one run dir
    assert not list(two.glob(".*.tmp"))
    meta = json.loads((two / "metadata.json").read_text())
    assert len(meta["epochs"]) == 2 and meta["temperature"] > 0
    model = model_from_arch(meta["arch"])
    model.load_state_dict(load_weights(two / "best.safetensors"))  # the weights load (no "module." prefix)
    m1, m2 = metrics(one), metrics(two)
    print("1 process:", m1, "\n2 processes:", m2)
    # The same global batches and gradients averaged over them; BatchNorm statistics are per rank (4
    # images, not 8: SyncBatchNorm needs CUDA), so losses agree within a tolerance, not exactly.
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.15 * max(1.0, a["train_loss"])
    for m in (m1, m2):
        assert m[1]["val_loss"] < m[0]["val_loss"] and m[1]["val_acc"] >= 0.75
    assert abs(m1[1]["val_acc"] - m2[1]["val_acc"]) <= 0.25


@pytest.mark.slow
def test_killed_ddp_run_resumes_with_another_process_count(data: Path, tmp_path: Path):
    proc = hierarchy([*TRAIN, "--data", str(data), "--out", str(tmp_path), "--epochs", "3", "--nproc-per-node", "2"],
                     stdout=subprocess.DEVNULL, stderr=(tmp_path / "log").open("w"), start_new_session=True)
    run = tmp_path / "skin_vs_nonskin" / "train"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        rows = (run / "metrics.csv").read_text().splitlines() if (run / "metrics.csv").exists() else []
        if len(rows) >= 2:  # epoch 1 committed
            break
        assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait(60)
    assert len(metrics(run)) < 3
    assert finished(["train", "skin_vs_nonskin", "--resume", str(run), "--workers", "0"]) == str(run)
    meta = json.loads((run / "metadata.json").read_text())
    assert [e["epoch"] for e in meta["epochs"]] == [1, 2, 3]


def test_nproc_per_node_relaunches_the_same_command_under_torchrun(monkeypatch):
    from hierarchy.commands import train as train_cmd
    from hierarchy.commands.cli import main

    calls = []
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(train_cmd.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["-q", "train", "skin_vs_nonskin", "--nproc-per-node", "3", "--epochs", "2",
                 "--nproc-per-node=3"]) == 0
    assert calls[0][1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m", "hierarchy",
                            "-q", "train", "skin_vs_nonskin", "--epochs", "2"]
