"""Checkpoint safety (malicious files never execute), metadata schema and compatibility checks."""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from hierarchy.models.checkpoint import check_compatible, load_train_state, load_weights, save_train_state, save_weights
from hierarchy.models.metadata import CheckpointMetadata, read_metadata, resolve_checkpoint, update_metadata, write_metadata
from hierarchy.core.errors import CheckpointError
from hierarchy.models.backbones import create_model
from hierarchy.engine.predictor import load_predictor
from hierarchy.data.preset import Preset
from hierarchy.config.stage import Stage

LABELS = ("skin", "not_skin")


class GateStage(Stage):
    name = "gate"
    labels = LABELS


def make_run(tmp_path: Path, backbone: str = "resnet18", labels: tuple[str, ...] = LABELS, **meta: Any) -> Path:
    model, arch = create_model(backbone, len(labels))
    run = tmp_path / "run"
    save_weights(run / "best.safetensors", model)
    fields = dict(stage="gate", labels=list(labels), arch=arch, preset=Preset(size=32).to_dict(), created_by="test")
    write_metadata(run / "metadata.json", CheckpointMetadata(**{**fields, **meta}))
    return run


# ---------------------------------------------------------------- malicious files


def canary_code(canary: Path) -> str:
    """A Python expression that creates the canary file."""
    return f"__import__('pathlib').Path({str(canary)!r}).write_text('pwned')"


class Evil:
    """Pickles to a call of ``exec`` that writes the canary file."""

    def __init__(self, canary: Path):
        self.code = canary_code(canary)

    def __reduce__(self):
        return (exec, (self.code,))


def eval_pickle(canary: Path) -> bytes:
    """A hand-written protocol-2 pickle: builtins.eval(<write canary>)."""
    code = canary_code(canary)
    return b"\x80\x02cbuiltins\neval\n(V" + code.encode() + b"\ntR."


def _reduce_state(path: Path, canary: Path) -> None:
    torch.save({"epoch": 1, "model": {"w": torch.zeros(2)}, "callback": Evil(canary)}, path)


def _eval_state(path: Path, canary: Path) -> None:
    path.write_bytes(eval_pickle(canary))


def _optimizer_state(path: Path, canary: Path) -> None:
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": Evil(canary)}},
                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]}
    torch.save({"epoch": 2, "optimizer": optimizer}, path)


TRAIN_STATE_PAYLOADS: dict[str, Callable[[Path, Path], None]] = {
    "reduce-object": _reduce_state,
    "builtins-eval": _eval_state,
    "optimizer-payload": _optimizer_state,
}


@pytest.mark.parametrize("kind", sorted(TRAIN_STATE_PAYLOADS))
def test_payloads_are_live(tmp_path: Path, kind: str) -> None:
    """Control: an unsafe load WOULD run each payload, so the refusal tests below mean something."""
    path, canary = tmp_path / "state.pt", tmp_path / "control-canary"
    TRAIN_STATE_PAYLOADS[kind](path, canary)
    if kind == "builtins-eval":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert canary.exists()


@pytest.mark.parametrize("kind", sorted(TRAIN_STATE_PAYLOADS))
def test_malicious_train_state_refused(tmp_path: Path, kind: str) -> None:
    path, canary = tmp_path / "last.pt", tmp_path / "canary"
    TRAIN_STATE_PAYLOADS[kind](path, canary)
    with pytest.raises(CheckpointError, match=r"last.pt: refused: contains objects outside the weights_only allowlist"):
        load_train_state(path)
    assert not canary.exists()


@pytest.mark.parametrize("kind", ["eval-pickle", "reduce-pickle", "torch-zip"])
def test_pickle_renamed_safetensors_refused(tmp_path: Path, kind: str) -> None:
    path, canary = tmp_path / "best.safetensors", tmp_path / "canary"
    if kind == "eval-pickle":
        path.write_bytes(eval_pickle(canary))
    elif kind == "reduce-pickle":
        path.write_bytes(pickle.dumps(Evil(canary), protocol=4))
    else:
        torch.save({"w": Evil(canary)}, path)
    expected = "zip archive" if kind == "torch-zip" else "Python pickle"
    with pytest.raises(CheckpointError, match=f"best.safetensors: not a safetensors file: it is a {expected}"):
        load_weights(path)
    assert not canary.exists()


@pytest.mark.parametrize("declared", [2**40, 200_000_000, 10_000])
def test_oversized_header_refused(tmp_path: Path, declared: int) -> None:
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", declared) + b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}' + b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"big.safetensors: not a safetensors file \(oversized/invalid header"):
        load_weights(path)


def test_malicious_weights_refused_by_load_predictor(tmp_path: Path) -> None:
    run, canary = make_run(tmp_path), tmp_path / "canary"
    (run / "best.safetensors").write_bytes(eval_pickle(canary))
    with pytest.raises(CheckpointError, match="Python pickle"):
        load_predictor(GateStage(), run, device="cpu")
    assert not canary.exists()


# ---------------------------------------------------------------- weights


def test_weights_round_trip_shared_and_strided(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "tied": base, "t": base.t(), "view": base[1]}  # shared storage, non-contiguous
    path = tmp_path / "w.safetensors"
    save_weights(path, state, metadata={"stage": "gate"})
    loaded = load_weights(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"stage": "gate"}
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_weights_rejected(tmp_path: Path, bad: float) -> None:
    w = torch.zeros(4, 4)
    w[1, 2] = bad
    path = tmp_path / "w.safetensors"
    save_weights(path, {"layer1.0.conv1.weight": w, "count": torch.tensor([1])})
    with pytest.raises(CheckpointError, match=r"w.safetensors: tensor 'layer1.0.conv1.weight' contains NaN/Inf"):
        load_weights(path)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.safetensors: weights file not found"):
        load_weights(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------- training state


def test_train_state_round_trip(tmp_path: Path) -> None:
    state = {
        "epoch": 3,
        "rng": {"torch": torch.get_rng_state(), "python": [3, [1, 2, 3], None]},
        "history": [{"loss": 0.5, "acc": 0.9}],
        "config": {"lr": 1e-3, "backbone": "resnet18", "hflip": True},
        "optimizer": torch.optim.Adam([torch.nn.Parameter(torch.ones(2))]).state_dict(),
    }
    save_train_state(tmp_path / "last.pt", state)
    loaded = load_train_state(tmp_path / "last.pt")
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert loaded["history"] == state["history"] and loaded["config"] == state["config"]


def test_save_train_state_rejects_non_plain(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"state\['rng'\]\['numpy'\] is a Evil"):
        save_train_state(tmp_path / "last.pt", {"rng": {"numpy": Evil(tmp_path / "c")}})
    assert not (tmp_path / "last.pt").exists()


# ---------------------------------------------------------------- metadata


def test_metadata_round_trip_keeps_extras(tmp_path: Path) -> None:
    run = make_run(tmp_path, future_field={"x": 1})
    meta = read_metadata(run / "metadata.json")
    assert meta.format == "hierarchy.checkpoint" and meta.schema_version == 1 and meta.temperature == 1.0
    assert meta.model_dump()["future_field"] == {"x": 1}


def test_invalid_metadata_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps({"format": "other", "schema_version": 1, "labels": ["a", "a"],
                                "arch": {"backbone": "resnet18"}, "preset": {}, "temperature": -1}))
    with pytest.raises(CheckpointError) as info:
        read_metadata(path)
    msg = str(info.value)
    for field in ("format", "stage", "labels", "arch", "preset", "temperature", "created_by"):
        assert f"  {field}" in msg, field
    assert msg.startswith(str(path))


def test_newer_schema_version_says_upgrade(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    data = json.loads((run / "metadata.json").read_text())
    (run / "metadata.json").write_text(json.dumps({**data, "schema_version": 2}))
    with pytest.raises(CheckpointError, match="upgrade hierarchy"):
        read_metadata(run / "metadata.json")


def test_update_metadata(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    update_metadata(run, temperature=1.7, threshold={"skin": 0.4})
    meta = read_metadata(run / "metadata.json")
    assert meta.temperature == 1.7 and meta.threshold == {"skin": 0.4}
    with pytest.raises(CheckpointError, match="update makes the metadata invalid"):
        update_metadata(run, temperature=0)
    assert read_metadata(run / "metadata.json").temperature == 1.7


def test_resolve_checkpoint(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    pair = (run / "best.safetensors", run / "metadata.json")
    assert resolve_checkpoint(run) == pair
    assert resolve_checkpoint(run / "best.safetensors") == pair
    assert resolve_checkpoint(run / "metadata.json") == pair
    with pytest.raises(CheckpointError, match="missing: checkpoint not found"):
        resolve_checkpoint(tmp_path / "missing")
    (run / "metadata.json").unlink()
    with pytest.raises(CheckpointError, match="metadata.json: checkpoint incomplete"):
        resolve_checkpoint(run)


# ---------------------------------------------------------------- compatibility


def test_stage_and_label_mismatch_message(tmp_path: Path) -> None:
    meta = read_metadata(make_run(tmp_path) / "metadata.json")
    with pytest.raises(CheckpointError, match=r"checkpoint is for stage 'gate' with labels \['skin', 'not_skin'\], "
                                              r"pipeline stage 'lesion' expects \['skin', 'not_skin'\]"):
        check_compatible(meta, "lesion", LABELS, "x")
    with pytest.raises(CheckpointError, match="same labels, different order"):
        check_compatible(meta, "gate", ("not_skin", "skin"), "x")
    check_compatible(meta, "gate", LABELS, "x")


def test_other_architecture_rejected_naming_file(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    save_weights(run / "best.safetensors", create_model("resnet34", 2)[0])
    with pytest.raises(CheckpointError, match=r"best.safetensors: weights do not match the architecture in the "
                                              r"metadata \(torchvision/resnet18 with 2 classes\): unexpected"):
        load_predictor(GateStage(), run, device="cpu")
    meta = read_metadata(run / "metadata.json")
    with pytest.raises(CheckpointError, match="unexpected"):
        check_compatible(meta, "gate", LABELS, run, state_dict=load_weights(run / "best.safetensors"))


def test_wrong_label_count_rejected_naming_file(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    save_weights(run / "best.safetensors", create_model("resnet18", 3)[0])  # a 3-class head
    with pytest.raises(CheckpointError, match=r"best.safetensors: .*shape mismatches \(file vs model\) 2: "
                                              r"fc.weight \(3, 512\) vs \(2, 512\)"):
        load_predictor(GateStage(), run, device="cpu")
