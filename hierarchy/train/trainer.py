"""The shared trainer every stage uses: fine-tune a timm/torchvision backbone on a manifest or an
ImageFolder tree, with atomic checkpoints, resume, early stopping and calibration afterwards."""
from __future__ import annotations

import csv
import io
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hierarchy.core.errors import DatasetError, HierarchyError
from hierarchy.models.device import autocast, grad_scaler, memory_format
from hierarchy.core.fsutil import atomic_write_json, atomic_write_text
from hierarchy.data.preset import Preset
from hierarchy.train import distributed
from hierarchy.train.loader import make_loaders
from hierarchy.train.recipe import lr_at, make_ema, make_optimizer, set_lr, train_preset
from hierarchy.train.rundir import new_run_dir, removed_on_failure

if TYPE_CHECKING:
    from hierarchy.config.stage import Stage
    from hierarchy.config.train import TrainConfig

log = logging.getLogger("hierarchy.train")
STATE_FILE = "train_state.pt"
MAX_BAD_STEPS = 5  # consecutive non-finite losses before training stops


class TrainingDiverged(HierarchyError):
    """The loss became NaN/Inf repeatedly; the last good checkpoint is kept untouched."""


@dataclass
class RunState:
    epoch: int = 0  # last completed epoch
    best_epoch: int = 0
    best_val_loss: float = math.inf
    history: list[dict[str, float]] = field(default_factory=list)
    stale_epochs: int = 0


def train_stage(stage: "Stage", data: Path | None, out: Path | None = None, *, resume: Path | None = None,
                progress: bool = True) -> Path:
    """Train ``stage`` with ``stage.config.train``; returns the run directory (removed again if the run
    fails before saving a checkpoint, see :mod:`hierarchy.train.rundir`)."""
    created: list[Path] = []
    with removed_on_failure(created):
        return _train_stage(stage, data, out, resume, progress, created)


def _train_stage(stage: "Stage", data: Path | None, out: Path | None, resume: Path | None, progress: bool,
                 created: list[Path]) -> Path:
    from hierarchy.models.checkpoint import load_train_state
    from hierarchy.models.device import select_device
    from hierarchy.train.tune import tune_training

    cfg = stage.config.train
    dinfo, device_name = distributed.setup(cfg.device)  # torchrun: join the process group (docs/scaling.md)
    state, run_dir, model_state, opt_state, raw = RunState(), None, None, None, {}
    if resume is not None:
        run_dir, saved = _resume_target(Path(resume))
        raw = load_train_state(run_dir / STATE_FILE)
        state, model_state, opt_state = _restore(raw, stage)
        data = data or Path(raw["data"])
    if data is None:
        raise DatasetError("no training data: pass --data DIR (a build-dataset output or a train/ + val/ tree)")
    if run_dir is None:  # only rank 0 creates it; the others are told its name
        run_dir = distributed.broadcast(new_run_dir(Path(out or cfg.out) / stage.name, cfg.name) if dinfo.main else None)
        created += [run_dir] if dinfo.main else []
    torch.manual_seed(cfg.seed)
    device = select_device(device_name)
    model, arch = _build_model(cfg, len(stage.labels), model_state, device, torch.channels_last, raw.get("arch"))
    preset = Preset.from_dict(raw["preset"]) if "preset" in raw else train_preset(cfg, arch)  # from the weights
    precision = tune_training(cfg, model, arch, device, preset.size)  # auto: measured here (train/tune.py)
    loaders = make_loaders(data, stage.labels, preset, cfg, device)
    opt = make_optimizer(cfg, model, device)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    ctx = TrainContext(stage, cfg, run_dir, data, device, precision, preset, arch, loaders, grad_scaler(device, precision),
                       ema=make_ema(cfg, model, raw.get("ema")))
    if resume is None and dinfo.main:
        ctx.write_config()
    elif dinfo.main:
        from hierarchy.train.resume import recover_run

        recover_run(ctx, state, model_state)  # temp files of a killed write, writes after the last commit
    ctx.ddp = distributed.wrap(model, device)
    log.info("run %s: %d train / %d val images, %s on %s (%s)", run_dir, len(loaders.train.dataset),
             len(loaders.val.dataset), arch["backbone"], device, precision)
    _fit(ctx, model, opt, state, progress and dinfo.main)
    if dinfo.main:  # calibration, threshold tuning and OOD fitting once, on the whole val split
        ctx.loaders.val = ctx.loaders.val_all or ctx.loaders.val
        ctx.finalize(state, ctx.served(model))
    distributed.barrier()
    return run_dir


@dataclass
class TrainContext:
    stage: "Stage"
    cfg: "TrainConfig"
    run_dir: Path
    data: Path
    device: torch.device
    precision: str
    preset: Preset
    arch: dict
    loaders: Any
    scaler: Any = None  # torch.amp.GradScaler, enabled for fp16 only
    best_eval: dict | None = None
    ema: Any = None  # torch.optim.swa_utils.AveragedModel when cfg.ema is set
    ddp: Any = None  # the model in DistributedDataParallel under torchrun (forward + backward), else None

    def served(self, model: nn.Module) -> nn.Module:
        """The weights that are evaluated and published: the EMA when on, else the trained model."""
        return self.ema.module if self.ema is not None else model

    def write_config(self) -> None:
        import yaml

        from hierarchy.config.load import dump_stage_config

        text = yaml.safe_dump(dump_stage_config(self.stage.config, self.stage.name), sort_keys=False)
        atomic_write_text(self.run_dir / "config.yaml", text)

    def metadata(self, state: RunState, **extra: Any) -> dict[str, Any]:
        from hierarchy.data.labelled import manifest_sha256

        meta = {
            "format": "hierarchy.checkpoint", "schema_version": 1, "stage": self.stage.name,
            "labels": list(self.stage.labels), "arch": self.arch, "preset": self.preset.to_dict(),
            "input_size": self.preset.size, "temperature": 1.0, "threshold": None, "ood": None,
            "epochs": state.history, "best": _best(state), "created_by": f"hierarchy {_version()}",
            "dataset": {"path": str(self.data), "manifest_sha256": manifest_sha256(self.data)},
            "train": self.cfg.model_dump(mode="json"), "versions": _versions(), "device": str(self.device),
            "precision": self.precision,
        }
        meta.update(extra)
        return meta

    def save_epoch(self, model: nn.Module, opt: torch.optim.Optimizer, state: RunState, improved: bool) -> None:
        from hierarchy.models.checkpoint import save_train_state

        if not distributed.current().main:  # only rank 0 writes the run directory
            return
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        served = {k: v.detach().cpu() for k, v in self.served(model).state_dict().items()}
        _check_finite(served, state.epoch, self.run_dir)
        # The state file is the commit point for resume and is replaced atomically FIRST. Everything else
        # is derived from it and written after it, so a kill in between leaves best/last/metadata of the
        # previous epoch (a consistent pair for inference), and --resume rewrites them (train_resume.py).
        save_train_state(self.run_dir / STATE_FILE, {
            "stage": self.stage.name, "labels": list(self.stage.labels), "data": str(self.data),
            "config": self.stage.config.model_dump(mode="json"), "model": weights,
            "optimizer": opt.state_dict(), "epoch": state.epoch, "best_epoch": state.best_epoch,
            "best_val_loss": state.best_val_loss, "history": state.history, "stale_epochs": state.stale_epochs,
            "arch": self.arch, "preset": self.preset.to_dict(), **({"ema": served} if self.ema is not None else {})})
        self.publish(served, state, best=improved)

    def publish(self, weights: dict[str, torch.Tensor], state: RunState, best: bool) -> None:
        """Write the files derived from the committed state: best/last weights, metadata, metrics."""
        from hierarchy.models.checkpoint import save_weights

        tag = {"stage": self.stage.name, "epoch": str(state.epoch)}
        if best:
            save_weights(self.run_dir / "best.safetensors", weights, tag)
        save_weights(self.run_dir / "last.safetensors", weights, tag)
        self.write_records(state)

    def write_records(self, state: RunState, **extra: Any) -> None:
        atomic_write_json(self.run_dir / "metadata.json", self.metadata(state, **extra))
        buf = io.StringIO()
        if state.history:
            w = csv.DictWriter(buf, fieldnames=list(state.history[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(state.history)
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())

    def finalize(self, state: RunState, model: nn.Module) -> None:
        from hierarchy.train.report import finalize_run

        finalize_run(self, state, model)


def _fit(ctx: TrainContext, model: nn.Module, opt: torch.optim.Optimizer, state: RunState, progress: bool) -> None:
    cfg = ctx.cfg
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        torch.manual_seed(cfg.seed * 1000 + epoch)  # resume-safe: randomness depends only on seed and epoch
        ctx.loaders.set_epoch(epoch)
        train_loss, train_acc = _train_epoch(ctx, model, opt, epoch, progress)
        ev = evaluate_model(ctx.served(model), ctx.loaders.val, ctx.device, ctx.precision, len(ctx.stage.labels),
                            gather=True)
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": ev["loss"],
               "val_acc": ev["acc"], **{f"val_recall_{lab}": r for lab, r in zip(ctx.stage.labels, ev["recall"])}}
        state.epoch = epoch
        state.history.append(row)
        improved = ev["loss"] < state.best_val_loss
        if improved:
            state.best_epoch, state.best_val_loss, state.stale_epochs = epoch, ev["loss"], 0
            ctx.best_eval = ev
        else:
            state.stale_epochs += 1
        ctx.save_epoch(model, opt, state, improved)
        if distributed.current().main:
            _print_summary(row, ctx.stage.labels, improved)
        if cfg.patience and state.stale_epochs >= cfg.patience:
            print(f"early stopping: val loss did not improve for {cfg.patience} epoch(s)", file=sys.stderr)
            break


def _train_epoch(ctx: TrainContext, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, progress: bool) -> tuple[float, float]:
    from tqdm import tqdm

    model.train()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=ctx.cfg.label_smoothing)
    total, correct, loss_sum, bad, skipped = 0, 0, 0.0, 0, 0
    steps = len(ctx.loaders.train) if ctx.cfg.max_steps_per_epoch is None else min(len(ctx.loaders.train), ctx.cfg.max_steps_per_epoch)
    bar = tqdm(ctx.loaders.train, total=steps, desc=f"epoch {epoch}/{ctx.cfg.epochs}", file=sys.stderr,
               disable=not progress or None, leave=False)
    for step, (x, y) in enumerate(bar):
        if step >= steps:
            break
        if y.numel() < 2:  # all unreadable (each logged by the dataset), or a last batch of one: BatchNorm needs 2
            continue
        x, y = _to_device(ctx, x, y)
        set_lr(opt, lr_at(ctx.cfg, (epoch - 1) * steps + step, steps))
        opt.zero_grad(set_to_none=True)
        with autocast(ctx.device, ctx.precision):
            logits = (ctx.ddp or model)(x)
        loss = loss_fn(logits.float(), y)
        if not _step(ctx, model, opt, loss):
            bad, skipped = bad + 1, skipped + 1
            _bad_step(ctx, epoch, step, bad, loss)
            continue
        bad = 0
        if ctx.ema is not None:
            ctx.ema.update_parameters(model)
        n = y.numel()
        total, loss_sum = total + n, loss_sum + loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        bar.set_postfix(loss=f"{loss_sum / total:.4f}")
    bar.close()
    if skipped and not total:
        raise TrainingDiverged(f"every step of epoch {epoch} had a non-finite loss or gradient; stopped. The last "
                               f"good checkpoint in {ctx.run_dir} is untouched. Lower --lr or check the data.")
    loss_sum, correct, total = distributed.all_ranks_sum([loss_sum, correct, total])
    return (loss_sum / total if total else math.nan), (correct / total if total else math.nan)


def _step(ctx: TrainContext, model: nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> bool:
    """Backward and optimizer step; False (and no step) when the loss or a gradient is not finite,
    so the weights never see a NaN/Inf. With fp16 the GradScaler's overflow steps are expected:
    they lower the scale and are skipped without counting as bad steps."""
    scaler = ctx.scaler
    if not bool(torch.isfinite(loss)):
        return False
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # no-op unless fp16: gradients are checked at their true scale
    if _grads_finite(model):
        scaler.step(opt)
        scaler.update()
        return True
    if scaler.is_enabled():
        scaler.update()  # found inf: halve the scale and try the next batch
        opt.zero_grad(set_to_none=True)
        return scaler.get_scale() >= 1.0  # 17 overflows in a row from 2**16: a real divergence
    return False


def _grads_finite(model: nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())


def _bad_step(ctx: TrainContext, epoch: int, step: int, bad: int, loss: torch.Tensor) -> None:
    """Log a skipped step; stop after MAX_BAD_STEPS in a row (nothing of this epoch is saved)."""
    what = "loss" if not torch.isfinite(loss) else "gradient"
    log.warning("epoch %d step %d: non-finite %s (loss %s); step skipped", epoch, step, what, loss.item())
    if bad >= MAX_BAD_STEPS:
        raise TrainingDiverged(f"{bad} consecutive non-finite losses/gradients in epoch {epoch}; stopped. The last "
                               f"good checkpoint in {ctx.run_dir} is untouched. Lower --lr or check the data.")


def _check_finite(weights: dict[str, torch.Tensor], epoch: int, run_dir: Path) -> None:
    """Refuse to commit NaN/Inf weights or buffers (e.g. BatchNorm statistics of a skipped NaN batch)."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise TrainingDiverged(f"epoch {epoch}: NaN/Inf in {len(bad)} weight tensor(s) ({', '.join(bad[:3])}); "
                               f"nothing of this epoch was saved. The last good checkpoint in {run_dir} is "
                               "untouched. Lower --lr or check the data.")


@torch.inference_mode()
def evaluate_model(model: nn.Module, loader: Any, device: torch.device, precision: str, n_classes: int,
                   gather: bool = False) -> dict[str, Any]:
    """Loss, accuracy, per-class recall, plus raw logits and targets (for calibration and plots).
    ``gather``: under DDP each rank scored its share of val; metrics are of all shares together."""
    model.eval()
    logits_all, ys = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        x = loader.normalize(x).contiguous(memory_format=memory_format(device, precision))
        with autocast(device, precision):
            logits_all.append(model(x).float().cpu())
        ys.append(y)
    logits = torch.cat(logits_all) if logits_all else torch.zeros(0, n_classes)
    y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long)
    if gather:
        logits, y = (torch.from_numpy(a) for a in distributed.gather_arrays(logits.numpy(), y.numpy()))
    loss = nn.functional.cross_entropy(logits, y).item() if len(y) else math.nan
    pred = logits.argmax(1)
    recall = [((pred == c) & (y == c)).sum().item() / max(1, (y == c).sum().item()) for c in range(n_classes)]
    return {"loss": loss, "acc": (pred == y).float().mean().item() if len(y) else math.nan, "recall": recall,
            "logits": logits.numpy(), "targets": y.numpy()}


def _to_device(ctx: TrainContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(ctx.device, non_blocking=True)
    x = ctx.loaders.train.normalize(x).contiguous(memory_format=memory_format(ctx.device, ctx.precision))
    return x, y.to(ctx.device, non_blocking=True)


def _build_model(cfg: "TrainConfig", n: int, state: dict | None, device: torch.device,
                 fmt: torch.memory_format, arch: dict | None = None) -> tuple[nn.Module, dict]:
    """A new model (pretrained weights from the registry's providers), or, resuming, the saved
    ``arch`` (the architecture the weights were loaded into) with the saved ``state``."""
    from hierarchy.models.backbones import create_model, model_from_arch
    from hierarchy.registry import get_registry

    if state is not None and arch is not None:
        model = model_from_arch(arch)
    else:
        pretrained = "none" if state is not None else cfg.pretrained
        model, arch = create_model(cfg.backbone, n, pretrained, providers=get_registry().weights_providers())
    if state is not None:
        model.load_state_dict(state)
    return model.to(device).to(memory_format=fmt), arch


def _resume_target(path: Path) -> tuple[Path, Path]:
    run_dir = path if path.is_dir() else path.parent
    state = run_dir / STATE_FILE
    if not state.is_file():
        raise HierarchyError(f"cannot resume: {state} not found (pass a run directory or its {STATE_FILE})")
    return run_dir, state


def _restore(raw: dict, stage: "Stage") -> tuple[RunState, dict, dict]:
    if raw.get("stage") != stage.name or list(raw.get("labels", [])) != list(stage.labels):
        raise HierarchyError(f"cannot resume: the run is for stage {raw.get('stage')!r} with labels "
                             f"{raw.get('labels')}, not '{stage.name}' {list(stage.labels)}")
    st = RunState(raw["epoch"], raw["best_epoch"], raw["best_val_loss"], list(raw["history"]), raw.get("stale_epochs", 0))
    return st, raw["model"], raw["optimizer"]


def _best(state: RunState) -> dict[str, Any]:
    rows = [r for r in state.history if r["epoch"] == state.best_epoch]
    return rows[0] if rows else {}


def _print_summary(row: dict[str, float], labels: tuple[str, ...], improved: bool) -> None:
    recalls = " ".join(f"{lab}={row[f'val_recall_{lab}']:.3f}" for lab in labels)
    print(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
          f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} | recall {recalls}"
          + (" *best*" if improved else ""), file=sys.stderr)


def _version() -> str:
    from hierarchy import __version__

    return __version__


def _versions() -> dict[str, str]:
    import platform

    import torchvision

    out = {"hierarchy": _version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "python": platform.python_version()}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:
        pass
    return out
