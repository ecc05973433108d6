"""The figures benchmarks/bench_gate_quality.py reports, on hand-made records (no training)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gate_quality as bench  # noqa: E402


def record(status: str, label: str | None, p_skin: float) -> dict:
    return {"status": status, "label": label,
            "trace": [{"probs": {"skin": p_skin, "non-skin": 1 - p_skin}}]}


def test_scores_count_rejection_as_the_gate_stopping_and_leave_abstentions_out() -> None:
    rows = [{"group": "dermoscopy", "label": "skin"}] * 2 + [{"group": "textures", "label": "non-skin"}] * 3
    records = [record("ok", "skin", 0.9), record("abstained", None, 0.55),  # skin: passed, abstained
               record("rejected", None, 0.8), record("ok", "non-skin", 0.2), record("ok", "skin", 0.7)]
    got = bench.scores(rows, records)
    assert got["dermoscopy"] == 0.5 and got["textures"] == pytest.approx(2 / 3)
    assert got["coverage"] == 0.8  # one of five abstained
    assert got["error_answered"] == 0.25  # of the four answered, the texture passed as skin is wrong
    assert got["selective_error_90"] == pytest.approx(2 / 5)  # by confidence alone: the 0.8 and 0.7 textures
