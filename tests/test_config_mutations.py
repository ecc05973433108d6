"""Mutated pipeline and training configs through the CLI: every one is rejected with exit code 2 and
its YAML path (or line) in the message, before any predictor, model or dataset is built.

test_pipeline_validation.py checks the static pipeline checks at the library level; here each
mutation goes through `hierarchy validate` / `hierarchy run` / `hierarchy train --config` /
`hierarchy build-dataset --config`, with spies that fail the test if weights would be loaded.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hierarchy.commands.cli import main

PIPE = """\
name: ok
root: color
stages:
  color:
    stage: fake_color
    threshold: 0.8
    ood: auto
    routes: {red: bright, other: stop}
  bright:
    stage: fake_bright
    weights: w/bright.safetensors
    routes: {default: stop}
"""

BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 8))

# id -> (old, new, text expected in the error); old == "" means "replace the whole file"
PIPELINE_MUTATIONS: dict[str, tuple[str, str, str]] = {
    "misspelled_key": ("threshold: 0.8", "treshold: 0.8", "stages.color.treshold: extra field not permitted (line 6)"),
    "misspelled_top_key": ("root: color", "rot: color", "rot: extra field not permitted"),
    "missing_name": ("name: ok\n", "", "name: field required"),
    "threshold_wrong_type": ("threshold: 0.8", "threshold: [0.8]", "stages.color.threshold: expected"),
    "threshold_yes": ("threshold: 0.8", "threshold: yes", "stages.color.threshold: expected"),
    "ood_no": ("ood: auto", "ood: no", "stages.color.ood: expected"),
    "threshold_above_one": ("threshold: 0.8", "threshold: 1.5", "stages.color.threshold: must be between 0 and 1"),
    "threshold_negative": ("threshold: 0.8", "threshold: -0.1", "stages.color.threshold: must be between 0 and 1"),
    "weights_int": ("weights: w/bright.safetensors", "weights: 5", "stages.bright.weights"),
    "duplicate_stage_id": ("  bright:\n", "  bright:\n    stage: fake_bright\n  bright:\n", "duplicate key 'bright'"),
    "duplicate_key": ("threshold: 0.8", "threshold: 0.8\n    threshold: 0.9", "duplicate key 'threshold'"),
    "python_tag": ("name: ok", "name: !!python/object/apply:os.system ['echo pwned']", "tags are not allowed"),
    "python_name_tag": ("routes: {default: stop}", "routes: !!python/name:os.system", "tags are not allowed"),
    "custom_tag": ("name: ok", "name: !include other.yaml", "tags are not allowed"),
    "cycle": ("routes: {default: stop}", "routes: {default: color}", "routes form a cycle: color -> bright -> color"),
    "self_loop": ("routes: {default: stop}", "routes: {default: bright}", "routes form a cycle: bright -> bright"),
    "unknown_stage": ("stage: fake_bright", "stage: fake_brite", "stages.bright.stage: Unknown stage 'fake_brite'"),
    "bad_route_target": ("red: bright", "red: brite", "stages.color.routes.red: route target 'brite'"),
    "bad_route_label": ("other: stop}", "other: stop, blu: stop}", "stages.color.routes.blu: 'blu' is not a label"),
    "routes_not_a_mapping": ("routes: {default: stop}", "routes: stop", "stages.bright.routes"),
    "uncovered_label": ("routes: {red: bright, other: stop}", "routes: {red: bright}", "stages.color.routes: no route"),
    "root_not_a_stage": ("root: color", "root: colour", "root: 'colour' is not a stage id"),
    "unreachable": ("", PIPE + "  orphan:\n    stage: fake_blue\n    routes: {default: stop}\n", "stages.orphan"),
    "stages_empty": ("", "name: x\nroot: a\nstages: {}\n", "stages"),
    "stages_list": ("", "name: x\nroot: a\nstages: [a, b]\n", "stages"),
    "top_level_list": ("", "- name: ok\n- root: color\n", "(top level)"),
    "top_level_scalar": ("", "just a string\n", "(top level)"),
    "empty_file": ("", "", "(top level)"),
    "only_comments": ("", "# nothing here\n", "(top level)"),
    "syntax_error": ("routes: {red: bright, other: stop}", "routes: {red: bright, other: stop", "line"),
    "alias_bomb": ("", PIPE + BOMB.replace("l1: &l1 [", "l0: &l0 [x, x, x, x, x, x, x, x, x, x]\nl1: &l1 ["),
                   "(top level): the document expands to more than"),
    "recursive_alias": ("name: ok", "name: &n [*n]", "(top level): an alias refers to an enclosing anchor"),
    "deep_nesting": ("name: ok", "name: " + "[" * 500 + "]" * 500, "(top level): nested deeper than"),
}

TRAIN = """\
stage: skin_vs_nonskin
dataset:
  sources:
    - {type: ham10000, root: ham, label: skin}
    - {type: coco, root: coco, label: non-skin}
  seed: 0
  val_fraction: 0.2
  materialize: none
train:
  backbone: resnet18
  pretrained: none
  epochs: 2
  batch_size: 8
  lr: 0.001
  hflip: true
  workers: 0
  precision: fp32
"""

TRAIN_MUTATIONS: dict[str, tuple[str, str, str]] = {
    "misspelled_key": ("epochs: 2", "epoch: 2", "train.epoch: extra field not permitted (line 12)"),
    "misspelled_section": ("train:", "trian:", "trian: extra field not permitted"),
    "epochs_text": ("epochs: 2", "epochs: two", "train.epochs: Input should be a valid integer"),
    "epochs_quoted": ("epochs: 2", "epochs: '2'", "train.epochs: Input should be a valid integer"),
    "epochs_bool": ("epochs: 2", "epochs: true", "train.epochs: Input should be a valid integer"),
    "epochs_zero": ("epochs: 2", "epochs: 0", "train.epochs: Input should be greater than or equal to 1"),
    "batch_fraction": ("batch_size: 8", "batch_size: 2.5", "train.batch_size"),
    "lr_negative": ("lr: 0.001", "lr: -1", "train.lr: Input should be greater than 0"),
    "lr_yes": ("lr: 0.001", "lr: yes", "train.lr"),
    "hflip_yes": ("hflip: true", "hflip: yes", "train.hflip: Input should be a valid boolean"),
    "hflip_one": ("hflip: true", "hflip: 1", "train.hflip: Input should be a valid boolean"),
    "workers_negative": ("workers: 0", "workers: -1", "train.workers"),
    "precision_unknown": ("precision: fp32", "precision: fp8", "train.precision"),
    "duplicate_key": ("epochs: 2", "epochs: 2\n  epochs: 3", "duplicate key 'epochs'"),
    "python_tag": ("backbone: resnet18", "backbone: !!python/object/apply:os.system ['echo pwned']",
                   "tags are not allowed"),
    "other_stage": ("stage: skin_vs_nonskin", "stage: lesion_type", "stage: this config is for stage 'lesion_type'"),
    "unknown_source_type": ("type: coco,", "type: imagenet,", "dataset.sources.1"),
    "seed_text": ("seed: 0", "seed: zero", "dataset.seed"),
    "val_fraction_above_one": ("val_fraction: 0.2", "val_fraction: 1.5", "dataset.val_fraction"),
    "materialize_unknown": ("materialize: none", "materialize: hardlink", "dataset.materialize"),
    "train_section_list": ("", "train: [epochs, 2]\n", "train: Input should be a valid dictionary"),
    "top_level_list": ("", "- train\n- dataset\n", "(top level)"),
    "empty_file": ("", "", "(top level): expected a mapping with dataset: and train: sections (the file is empty)"),
    "alias_bomb": ("", "l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n" + BOMB + "dataset: {seed: 0}\n",
                   "the document expands to more than"),
}


def mutate(base: str, old: str, new: str) -> str:
    if not old:
        return new
    assert base.count(old) == 1, old
    return base.replace(old, new)


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) anything that would build a predictor, a model or a dataset."""
    import hierarchy.data.builder
    import hierarchy.models.backbones
    import hierarchy.engine.predictor
    import hierarchy.train.trainer
    from hierarchy.engine.router import Router

    calls: list[str] = []

    def spy(name: str, result: Any = None):  # type: ignore[no-untyped-def]
        def record(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return result
        return record

    class NoRouter:
        pipeline = SimpleNamespace(root="root")
        stages = {"root": SimpleNamespace(predictor=SimpleNamespace(tuned=None))}  # untuned: batch 32

        def run(self, *args: Any, **kwargs: Any) -> Any:
            return iter(())

    monkeypatch.setattr(Router, "from_pipeline", classmethod(spy("router", NoRouter())))
    monkeypatch.setattr(hierarchy.engine.predictor, "load_predictor", spy("load_predictor"))
    monkeypatch.setattr(hierarchy.models.backbones, "create_model", spy("create_model"))
    monkeypatch.setattr(hierarchy.train.trainer, "train_stage", spy("train_stage", Path("run-dir")))
    monkeypatch.setattr(hierarchy.data.builder, "build_dataset", spy("build_dataset", {}))
    return calls


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def rejected(argv: list[str], expected: str, file: Path, capsys: pytest.CaptureFixture, spies: list[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert str(file) in err and "Traceback" not in err
    assert spies == [], f"built {spies} before rejecting the config"


# ----------------------------------------------------------------------------- pipelines


def test_good_pipeline_reaches_the_router(fake_stages, spies: list[str], tmp_path: Path, capsys) -> None:
    pipe = write(tmp_path / "pipe.yaml", PIPE)
    assert main(["validate", str(pipe)]) == 0
    assert spies == []
    assert main(["run", str(pipe), str(tmp_path), "--format", "jsonl"]) == 0
    assert spies == ["router"]  # the spies do see a valid pipeline go through


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", sorted(PIPELINE_MUTATIONS))
def test_mutated_pipeline_is_rejected(fake_stages, spies: list[str], tmp_path: Path, capsys,
                                      case: str, command: str) -> None:
    old, new, expected = PIPELINE_MUTATIONS[case]
    pipe = write(tmp_path / "pipe.yaml", mutate(PIPE, old, new))
    argv = ["validate", str(pipe)] if command == "validate" else ["run", str(pipe), str(tmp_path / "x.jpg")]
    rejected(argv, expected, pipe, capsys, spies)


@pytest.mark.parametrize("command", ["validate", "run"])
def test_non_utf8_pipeline_is_rejected(fake_stages, spies: list[str], tmp_path: Path, capsys, command: str) -> None:
    pipe = tmp_path / "pipe.yaml"
    pipe.write_bytes(PIPE.replace("name: ok", "name: caf").encode() + b"\xe9\xff\n")
    argv = ["validate", str(pipe)] if command == "validate" else ["run", str(pipe), str(tmp_path)]
    rejected(argv, "cannot read", pipe, capsys, spies)


def test_python_tag_never_runs(fake_stages, spies: list[str], tmp_path: Path, capsys) -> None:
    canary = tmp_path / "canary"
    tagged = PIPE.replace("name: ok", f"name: !!python/object/apply:os.system ['touch {canary}']")
    pipe = write(tmp_path / "pipe.yaml", tagged)
    rejected(["run", str(pipe), str(tmp_path)], "tags are not allowed", pipe, capsys, spies)
    assert not canary.exists()


# ------------------------------------------------------------------------- training configs


def test_good_training_config_reaches_the_trainer(real_stages, spies: list[str], tmp_path: Path, capsys) -> None:
    cfg = write(tmp_path / "cfg.yaml", TRAIN)
    assert main(["train", "skin_vs_nonskin", "--config", str(cfg), "--data", str(tmp_path)]) == 0
    assert main(["build-dataset", "skin_vs_nonskin", "--config", str(cfg), "--out", str(tmp_path / "ds")]) == 0
    assert spies == ["train_stage", "build_dataset"]


@pytest.mark.parametrize("command", ["train", "train+flags", "build-dataset"])
@pytest.mark.parametrize("case", sorted(TRAIN_MUTATIONS))
def test_mutated_training_config_is_rejected(real_stages, spies: list[str], tmp_path: Path, capsys,
                                             case: str, command: str) -> None:
    old, new, expected = TRAIN_MUTATIONS[case]
    cfg = write(tmp_path / "cfg.yaml", mutate(TRAIN, old, new))
    if command == "build-dataset":
        argv = ["build-dataset", "skin_vs_nonskin", "--config", str(cfg), "--out", str(tmp_path / "ds")]
    else:  # with flags, the CLI overrides must not paper over a broken section
        flags = ["--epochs", "1", "--seed", "1"] if command == "train+flags" else []
        argv = ["train", "skin_vs_nonskin", "--config", str(cfg), "--data", str(tmp_path), *flags]
    if command == "train+flags" and case in ("epochs_text", "epochs_quoted", "epochs_bool", "epochs_zero"):
        expected = ""  # the flag replaces the bad value; nothing left to reject
        assert main(argv) == 0 and spies == ["train_stage"]
        return
    rejected(argv, expected, cfg, capsys, spies)


@pytest.mark.parametrize("command", ["train", "build-dataset"])
def test_non_utf8_training_config_is_rejected(real_stages, spies: list[str], tmp_path: Path, capsys,
                                              command: str) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(TRAIN.encode() + b"# caf\xe9\n")
    argv = [command, "skin_vs_nonskin", "--config", str(cfg)]
    argv += ["--data", str(tmp_path)] if command == "train" else []
    rejected(argv, "cannot read", cfg, capsys, spies)


def test_training_config_errors_are_all_reported(real_stages, spies: list[str], tmp_path: Path, capsys) -> None:
    text = TRAIN.replace("epochs: 2", "epochs: 0").replace("hflip: true", "hflip: no").replace("seed: 0", "seed: x")
    cfg = write(tmp_path / "cfg.yaml", text)
    rejected(["train", "skin_vs_nonskin", "--config", str(cfg)], "train.epochs", cfg, capsys, spies)
    main(["train", "skin_vs_nonskin", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert "train.hflip" in err and "dataset.seed" in err and "(line 12)" in err
