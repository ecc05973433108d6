"""hierarchy train STAGE: fine-tune the stage's classifier with the shared trainer."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from hierarchy.commands import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a stage", description="Train a stage on a build-dataset output or a "
                       "train/ + val/ ImageFolder tree. Writes runs/<stage>/<name>/ with best.safetensors, "
                       "last.safetensors, train_state.pt, metadata.json, metrics.csv, config.yaml and plots.")
    p.add_argument("stage", help="stage name (see `hierarchy stages`)")
    p.add_argument("--config", metavar="FILE", help="stage config YAML (its train: section)")
    p.add_argument("--data", metavar="DIR", help="dataset dir (default: datasets/<stage>)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--img-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--backbone", help="torchvision or timm model name (default resnet18)")
    p.add_argument("--pretrained", metavar="imagenet|TAG|none|PATH",
                   help="a tag a weights provider offers (see `hierarchy weights`), none, or a weights file")
    p.add_argument("--device", help="auto|cpu|cuda|cuda:N|mps")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--workers", help="DataLoader workers (auto or N)")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="decode and resize every image once into a uint8 cache")
    p.add_argument("--max-steps", type=int, dest="max_steps_per_epoch", help="cap steps per epoch (smoke tests)")
    p.add_argument("--out", metavar="DIR", help="runs root (default runs/); run dir = OUT/<stage>/<name>")
    p.add_argument("--name", help="run name (default train, then train2, ...)")
    p.add_argument("--resume", metavar="RUN_OR_CKPT", help="continue a run from its last complete epoch")
    p.add_argument("--seed", type=int)
    p.add_argument("--patience", type=int, help="early stopping: epochs without val-loss improvement")
    p.add_argument("--nproc-per-node", type=positive_int, metavar="N", help="train with N processes on this "
                   "machine (DDP: one per GPU, or gloo on CPU) by launching torchrun; --batch-size is the global "
                   "batch. Several machines: run torchrun yourself (docs/scaling.md)")
    after = p.add_argument_group("after training (docs/evaluation.md, docs/ood.md)")
    after.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                       help="fit temperature scaling on val (default on)")
    after.add_argument("--threshold-target", type=threshold_target, metavar="KIND=X[,label=L]|none",
                       help="tune the abstention threshold on val: max_risk=0.01 (default), target_coverage=0.9, "
                       "target_precision=0.99,label=malignant; none skips tuning")
    after.add_argument("--ood", action=argparse.BooleanOptionalAction, default=None,
                       help="fit the out-of-distribution score (default on)")
    after.add_argument("--ood-method", choices=("knn", "mahalanobis", "energy"))
    after.add_argument("--ood-keep", type=float, metavar="SHARE", help="OOD threshold keeps this share of val (0.99)")
    after.add_argument("--ood-tune", choices=("shifted", "val"), help="tune it on shifted val views (default) or as is")
    after.add_argument("--ood-per-class", action=argparse.BooleanOptionalAction, default=None,
                       help="keep SHARE of each predicted class (default on), not of val as a whole")
    after.add_argument("--ood-fit-aperture", type=float, metavar="SHARE",
                       help="also fit on SHARE of train seen through a round field of view (default 0)")
    p.set_defaults(func=run)


TRAIN_FLAGS = ("epochs", "batch_size", "img_size", "lr", "backbone", "pretrained", "device", "precision",
               "workers", "cache", "max_steps_per_epoch", "out", "name", "seed", "patience", "calibrate", "ood",
               "ood_method", "ood_keep", "ood_tune", "ood_per_class", "ood_fit_aperture")
_NONE = object()  # --threshold-target none: an explicit null, unlike an absent flag


def threshold_target(text: str) -> object:
    """``max_risk=0.01`` / ``target_precision=0.99,label=mel`` -> dict; ``none`` -> no tuning."""
    if text.strip().lower() in ("none", "null", "off"):
        return _NONE
    target: dict[str, object] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KIND=X[,label=L] or none, got {text!r}")
        key = key.strip()
        try:
            target[key] = value.strip() if key == "label" else float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}: expected a number, got {value.strip()!r}") from None
    return target


def run(args: argparse.Namespace) -> int:
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        return launch_torchrun(args.nproc_per_node, args.argv)
    return train(args)


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """``torchrun --standalone --nproc-per-node N -m hierarchy <argv without --nproc-per-node>``;
    its exit code (each rank's run of this same command, joined into one DDP job)."""
    rest, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc-per-node"):
            skip = arg == "--nproc-per-node" and not skip
            continue
        rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "hierarchy", *rest]
    print("launching: " + " ".join(cmd[1:]), file=sys.stderr)
    return subprocess.call(cmd)


def train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hierarchy.registry import get_stage

    from hierarchy.config.load import load_stage_config
    from hierarchy.train.trainer import train_stage

    cls = get_stage(args.stage)
    overrides = {k: getattr(args, k) for k in TRAIN_FLAGS}
    if args.threshold_target is not None and args.threshold_target is not _NONE:
        overrides["threshold_target"] = args.threshold_target
    if overrides["workers"] not in (None, "auto"):
        overrides["workers"] = int(overrides["workers"]) if str(overrides["workers"]).isdigit() else overrides["workers"]
    config_path = args.config
    if args.resume and not config_path:
        run_dir = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        config_path = run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else None
    config = load_stage_config(cls, config_path, train=overrides)
    if args.threshold_target is _NONE:  # None overrides are "not given" in load_stage_config
        config = config.model_copy(update={"train": config.train.model_copy(update={"threshold_target": None})})
    data = Path(args.data) if args.data else (None if args.resume else Path("datasets") / cls.name)
    run_dir = train_stage(cls(config), data, resume=Path(args.resume) if args.resume else None)
    if os.environ.get("RANK", "0") == "0":
        print(run_dir)
    return 0
