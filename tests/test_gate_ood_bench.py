"""The OOD comparison of benchmarks/bench_gate_ood.py on hand-made scores (no model, no training)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gate_ood as bench  # noqa: E402


def test_union_rejects_what_either_score_rejects_and_keeps_the_tuning_share() -> None:
    rng = np.random.default_rng(0)
    ref_a, ref_b = rng.normal(size=1000), rng.normal(size=1000)
    ev_a = np.array([0.0, 9.0, 0.0, 0.0])  # the second image is far out on a only,
    ev_b = np.array([0.0, 0.0, 9.0, 0.0])  # the third on b only
    tune, ev = bench.union({"val": (ref_a, ev_a)}, {"val": (ref_b, ev_b)})["val"]
    t = np.quantile(tune, 0.99)
    assert (tune <= t).mean() >= 0.99  # one threshold keeps the share of the tuning set under both scores
    assert (ev > t).tolist() == [False, True, True, False]


def test_summarise_counts_a_pass_only_where_the_gate_said_skin() -> None:
    groups = np.array(["dermoscopy"] * 4 + ["textures"] * 2)
    said_skin = np.array([True, True, True, False, True, False])
    never = np.zeros(6)  # a score that rejects nothing: the gate's own label decides
    got = bench.summarise({"val": (np.zeros(100), never), "aug": (np.zeros(100), never)}, said_skin, groups)
    assert got["val@0.99"]["dermoscopy"] == 0.75 and got["aug@0.995"]["textures"] == 0.5


def test_block_scorers_score_each_block_on_its_own_columns() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 6)) + 3.0
    blocks = [slice(0, 3), slice(3, 6)]
    scorers = bench.block_scorers(train, np.zeros(400, dtype=int), blocks)
    odd = np.full((1, 6), 3.0)
    odd[0, 3:] = [-3.0, 9.0, 3.0]  # out of distribution in block 1's columns only
    assert scorers["mahalanobis-block1"](odd, None)[0] > scorers["mahalanobis-block1"](train, None).max()
    assert scorers["mahalanobis-block0"](odd, None)[0] < np.quantile(scorers["mahalanobis-block0"](train, None), 0.9)


def test_union_still_rejects_beyond_every_tuning_image_when_the_threshold_is_the_top_rank() -> None:
    ref_a = np.arange(100.0)
    ref_b = ref_a[::-1].copy()  # each score's largest is a different tuning image: two tie at the top rank
    ev_a, ev_b = np.array([50.0, 500.0]), np.array([50.0, 50.0])
    tune, ev = bench.union({"val": (ref_a, ev_a)}, {"val": (ref_b, ev_b)})["val"]
    t = np.quantile(tune, 0.99)
    assert (ev > t).tolist() == [False, True]
